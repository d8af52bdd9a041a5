"""Running the pipeline: `spotline worker`, `up`, `serve` and `demo`."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import click

from spotline.common import topology

from .context import Ctx, need_url, pass_ctx


@click.command()
@click.argument("stage", type=click.Choice(topology.ALL_STAGES))
@click.option("--burst", is_flag=True, help="Exit when the inbox is empty (tests, batch runs).")
@click.option("--metrics-port", type=int, default=None, help="Serve /metrics on this port.")
@click.option("--stage-class", default=None, metavar="MODULE:CLASS",
              help="Run a custom Stage implementation for this inbox.")
@pass_ctx
def worker(ctx: Ctx, stage: str, burst: bool, metrics_port: int | None,
           stage_class: str | None) -> None:
    """Run one worker of STAGE (a consumer in the stage's group) until SIGTERM/SIGINT."""
    from spotline.common.worker_main import run_stage
    from spotline.stages import load_stage

    url = need_url(ctx.settings)
    run_stage(load_stage(stage, ctx.settings, stage_class), ctx.settings, url,
              burst=burst, metrics_port=metrics_port)


@click.command()
@click.option("--workers", "worker_specs", multiple=True, metavar="STAGE=N",
              help="Worker processes for a stage (repeatable), e.g. --workers score=2.")
@click.option("--metrics", is_flag=True, help="Each worker serves /metrics (from metrics_port "
              "or 9100 up).")
@click.option("--persist", is_flag=True, help="Embedded Redis with AOF in data_dir/redis.")
@pass_ctx
def up(ctx: Ctx, worker_specs: tuple[str, ...], metrics: bool, persist: bool) -> None:
    """Run the whole pipeline here: Redis (embedded unless SPOTLINE_REDIS_URL) and supervised
    workers for every stage. Ctrl-C or SIGTERM stops it (exit 0)."""
    from spotline.pipeline.supervisor import parse_workers, run_up

    run_up(ctx.settings, parse_workers(worker_specs), metrics=metrics,
           persist=persist, echo=click.echo)


@click.command()
@click.option("--host", default=None, help="Bind address (default: http_host setting, "
              "127.0.0.1). Another address needs API keys (or insecure_open_gateway).")
@click.option("--port", type=int, default=None, help="Port (default: http_port, 5004).")
@click.option("--metrics-port", type=int, default=None,
              help="Also serve /metrics on this port (it is always on the main port too).")
@click.option("--timeout", default=120.0, show_default=True,
              help="Seconds to wait for the pipeline before answering 504.")
@pass_ctx
def serve(ctx: Ctx, host: str | None, port: int | None, metrics_port: int | None,
          timeout: float) -> None:
    """HTTP gateway, compatible with the seed's container: GET /health, POST /identify
    (plus GET /metrics, the live view at /live, /sources and the OpenAPI page at /docs).
    Needs a running pipeline. With no API keys it serves only on loopback (docs/security.md)."""
    import uvicorn

    from spotline.common.metrics import Metrics
    from spotline.producer.client import Client
    from spotline.producer.gateway import create_app
    from spotline.results.ask import Asker

    # A SIGTERM before uvicorn runs, or the one uvicorn re-raises after its graceful
    # shutdown, is a clean exit 0 (what compose and supervisors expect).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    s = ctx.settings
    metrics = Metrics()
    if metrics_port is not None:
        metrics.serve(metrics_port, addr=s.metrics_host)
    bind = host or s.http_host
    app = create_app(s, Client.connect(need_url(s), s), metrics, timeout_s=timeout, host=bind)
    app.state.asker = Asker(s.replace(redis_url=need_url(s)))  # GET /ask
    uvicorn.run(app, host=bind, port=port or s.http_port,
                log_level=s.log_level.lower(), timeout_graceful_shutdown=5)


@click.command()
@click.option("--out", "out_dir", default="out/demo", show_default=True,
              type=click.Path(file_okay=False), help="Where annotated images go.")
@click.option("--timeout", default=600.0, show_default=True, help="Seconds to wait for results.")
@pass_ctx
def demo(ctx: Ctx, out_dir: str, timeout: float) -> None:
    """Run the pipeline on a few frames with captions: print the boxes and write annotated
    images. With the demo models (the default when no weights are set): synthetic scenes of
    coloured shapes, each box checked against the truth; else ultralytics' bundled bus.jpg and
    zidane.jpg. Uses a running `spotline up` (or
    SPOTLINE_REDIS_URL) if there is one, else starts a local pipeline for the demo."""
    from spotline.pipeline.demo import run_demo
    from spotline.pipeline.supervisor import running_url

    run_demo(ctx.settings, running_url(ctx.settings), Path(out_dir), timeout)
