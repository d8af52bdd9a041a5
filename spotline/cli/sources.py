"""`spotline sources add|list|remove|run`: feeds started and stopped at run time
(producer/control.py)."""

from __future__ import annotations

import json
import signal
import time
from typing import Any

import click


def _registry(ctx: Any) -> Any:
    from spotline.common.transport import Transport
    from spotline.pipeline.supervisor import running_url
    from spotline.producer.control import Registry

    url = running_url(ctx.settings)
    if not url:
        raise click.ClickException(
            "no Redis to talk to: set SPOTLINE_REDIS_URL, or start `spotline up` first")
    return Registry(Transport(ctx.settings, url=url))


@click.group()
def sources() -> None:
    """Feeds run without restarting anything: register them here (or over the gateway's
    /sources), and `spotline sources run` supervises them: state, last frame, reconnects,
    retries with backoff."""


@sources.command("add")
@click.argument("spec")
@click.option("-c", "--caption", "captions", multiple=True, help="A caption (repeatable).")
@click.option("--id", "source_id", default=None, help="Source id [default: from SPEC].")
@click.option("--fps", type=float, default=None, help="Frames per second at most.")
@click.option("--live", is_flag=True, help="Read a video file as a live stream.")
@click.option("--policy", type=click.Choice(["block", "drop-oldest"]), default=None,
              help="Backpressure [default: drop-oldest for live feeds, else the setting].")
@click.option("--replace", is_flag=True, help="Replace a feed with the same id.")
@click.pass_obj
def add(ctx: Any, spec: str, captions: tuple[str, ...], source_id: str | None,
        fps: float | None, live: bool, policy: str | None, replace: bool) -> None:
    """Register SPEC (RTSP/HTTP URL, camera index, video, folder, image; paths as the
    supervisor sees them) as a feed. A feed registered here is the operator's own: unlike one
    added over the gateway's /sources, it is not bound by the feed policy (feed_roots,
    feed_schemes, feed_allow_private, feed_allow_cameras; docs/security.md)."""
    from spotline.producer.control import FeedSpec
    from spotline.producer.sources import default_source_id

    feed = FeedSpec(source_id or default_source_id(spec), spec, captions, fps, live, policy,
                    origin="host")
    if not _registry(ctx).add(feed, replace=replace):
        raise click.ClickException(f"source {feed.source_id!r} exists (--replace to replace it)")
    click.echo(f"added {feed.source_id}")


@sources.command("list")
@click.option("--json", "as_json", is_flag=True, help="JSON, one feed a line.")
@click.pass_obj
def list_(ctx: Any, as_json: bool) -> None:
    """Registered feeds: state, last frame, frames, drops, reconnects, last error."""
    rows = _registry(ctx).listing()
    if as_json:
        for row in rows:
            click.echo(json.dumps(row))
        return
    if not rows:
        click.echo("no sources")
    now = time.time()
    for row in rows:
        st = row["status"]
        last = st.get("last_frame_time")
        age = f"{now - last:.1f}s ago" if last else "never"
        click.echo(f"{row['source_id']}  {st['state']}  last frame {age}  "
                   f"published={st.get('published', 0)} dropped={st.get('dropped', 0)} "
                   f"reconnects={st.get('reconnects', 0) + st.get('restarts', 0)}  "
                   f"{row['spec']}" + ("  (added over HTTP)" if row.get("origin") == "http"
                                       else "")
                   + (f"  error: {st['error']}" if st.get("error") else ""))


@sources.command("remove")
@click.argument("source_id")
@click.pass_obj
def remove(ctx: Any, source_id: str) -> None:
    """Stop and unregister a feed."""
    if not _registry(ctx).remove(source_id):
        raise click.ClickException(f"no source {source_id!r}")
    click.echo(f"removed {source_id}")


@sources.command("run")
@click.option("--stall", type=click.FloatRange(0.1), default=10.0, show_default=True,
              help="Seconds without a frame before a running feed is reported stalled.")
@click.option("--max-backoff", type=click.FloatRange(0.01), default=60.0, show_default=True,
              help="Longest wait between retries of a failing feed (it doubles up to this).")
@click.option("--backoff", type=click.FloatRange(0.01), default=1.0, show_default=True,
              help="First wait between retries.")
@click.option("--metrics-port", type=int, default=None,
              help="Serve /metrics (frames published and dropped, by feed) on this port.")
@click.pass_obj
def run(ctx: Any, stall: float, max_backoff: float, backoff: float,
        metrics_port: int | None) -> None:
    """Supervise the registered feeds until SIGTERM/SIGINT (several supervisors share them:
    each feed runs in exactly one)."""
    from spotline.producer.client import Client
    from spotline.producer.control import Supervisor

    registry = _registry(ctx)
    client = Client(registry.t, via="feed")
    if metrics_port is not None:
        client.metrics.serve(metrics_port, addr=ctx.settings.metrics_host)
    sup = Supervisor(ctx.settings, client, stall_s=stall, base_backoff_s=backoff,
                     max_backoff_s=max_backoff)
    signal.signal(signal.SIGTERM, sup.stop)
    signal.signal(signal.SIGINT, sup.stop)
    sup.run()
