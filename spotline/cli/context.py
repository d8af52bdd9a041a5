"""What every subcommand gets: the settings (read once by the main group) and the Redis URL
of the running pipeline."""

from __future__ import annotations

import click

from spotline.common.settings import Settings, load_settings


class Ctx:
    """What every subcommand gets: the settings, read once."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings


pass_ctx = click.make_pass_decorator(Ctx)


def current() -> Ctx:
    """The main group's Ctx (a command invoked on its own, outside the `spotline` group,
    reads the settings itself)."""
    ctx = click.get_current_context().find_object(Ctx)
    return ctx if ctx is not None else Ctx(load_settings())


def need_url(settings: Settings) -> str:
    """The running pipeline's Redis URL (SPOTLINE_REDIS_URL, or `spotline up`'s), else a
    ClickException saying how to get one."""
    from spotline.pipeline.supervisor import running_url

    url = running_url(settings)
    if not url:
        raise click.ClickException(
            "no Redis to talk to: set SPOTLINE_REDIS_URL, or start `spotline up` first")
    return url
