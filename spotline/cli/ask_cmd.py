"""`spotline ask SOURCE CAPTION`: a caption asked now, answered over a source's last minutes
from what the track stage kept (docs/ask.md)."""

from __future__ import annotations

import json

import click

from .context import need_url, pass_ctx


@click.command("ask")
@click.argument("source")
@click.argument("caption")
@click.option("--since", default="10m", show_default=True,
              help="How far back: 90s, 10m, 1h (a bare number: minutes).")
@click.option("--all", "every", is_flag=True,
              help="Every source with a memory (as SOURCE '-').")
@click.option("--limit", default=5, show_default=True, type=click.IntRange(1, 100),
              help="Matching tracks shown at most.")
@click.option("--json", "as_json", is_flag=True, help="The answer as JSON.")
@pass_ctx
def ask(ctx: object, source: str, caption: str, since: str, every: bool, limit: int,
        as_json: bool) -> None:
    """Which tracks of SOURCE ('-': every source) in the last --since match CAPTION, best
    first, with their calibrated probability, first and last seen and boxes over time; "not
    seen" when none passes the calibration's threshold. Needs track mode
    (SPOTLINE_TRACKING=true), which keeps the memory."""
    from spotline.results.ask import Asker, parse_since, render

    settings = ctx.settings  # type: ignore[attr-defined]
    s = settings.replace(redis_url=need_url(settings))
    asker = Asker(s)
    sources = None if every or source == "-" else [source]
    answer = asker.ask(caption, sources, parse_since(since), limit=limit)
    click.echo(json.dumps(answer.as_json()) if as_json else render(answer))
