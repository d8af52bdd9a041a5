"""The `spotline` command line. Every subcommand has --help.

One module per concern: pipeline (worker, up, serve, demo), feeds (publish, results, ingest,
jobs), ops (models, dead, eval), bench (its subcommands), track (calibrate, eval's track-mode
options), sink, sources, export, train (data, finetune, models demo), ask_cmd, config_cmd;
context holds the settings and the Redis URL, output how results are shown. A SpotlineError
from any command becomes one clean error line here. Each command is registered below from a
plain import.
"""

from __future__ import annotations

import click

from spotline.common.errors import SpotlineError
from spotline.common.extras import missing_extra
from spotline.common.logs import setup_logging
from spotline.common.settings import load_settings
from spotline.train.demo import apply_demo_models

from . import ask_cmd, bench, config_cmd, export, feeds, ops, pipeline, sink, sources, track, train
from .context import Ctx, need_url, pass_ctx


class _Group(click.Group):
    """The main group: a SpotlineError (bad input, config, Redis, model) anywhere below is a
    ClickException, "Error: <what went wrong>" and exit status 1, with no traceback; so is an
    import of a library this install left out, with the extra that brings it."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except SpotlineError as exc:
            raise click.ClickException(str(exc)) from None
        except ImportError as exc:  # a library of a role this install left out
            error = missing_extra(exc, f"spotline {ctx.invoked_subcommand or ''}".strip())
            if error is None:
                raise
            raise click.ClickException(str(error)) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True,
              callback=config_cmd.print_version, help="Print spotline's version and exit.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False),
              help="TOML or YAML settings file (also SPOTLINE_CONFIG).")
@click.option("--log-level", default=None, help="DEBUG, INFO, WARNING, ERROR.")
@click.pass_context
def cli(ctx: click.Context, config_file: str | None, log_level: str | None) -> None:
    """spotline: streaming visual grounding (YOLO -> Real-ESRGAN -> SigLIP) over Redis Streams.

    Settings come from SPOTLINE_* environment variables and an optional --config file; see
    docs/settings.md (`spotline config` prints them). With no SPOTLINE_REDIS_URL, `up` and
    `demo` run an embedded redis-server.
    """
    # with no weight paths set, every command (up, worker, eval, bench, ...) runs the committed
    # demo models with their settings (trained: they find things, where the tiny models are
    # random), unless SPOTLINE_MODELS=tiny
    settings = apply_demo_models(load_settings(config_file=config_file, log_level=log_level))
    setup_logging(settings.log_level)
    ctx.obj = Ctx(settings)


for _command in (pipeline.worker, pipeline.up, pipeline.serve, pipeline.demo, feeds.publish,
                 feeds.results, feeds.ingest, feeds.jobs, ops.models, ops.dead, bench.bench,
                 ops.eval_cmd, config_cmd.config, sink.sink, sources.sources, export.export,
                 track.calibrate, ask_cmd.ask, train.data, train.finetune):
    cli.add_command(_command)
track.add_grounding_options(ops.eval_cmd)  # eval --calibrate / --grounding
ops.models.add_command(train.models_demo)  # spotline models demo


def main() -> None:
    """The `spotline` console script."""
    cli(prog_name="spotline")


__all__ = ["Ctx", "cli", "main", "need_url", "pass_ctx"]
