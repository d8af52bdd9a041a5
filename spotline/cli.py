"""The `spotline` command line. Every subcommand has --help."""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path

import click

from spotline.common.errors import SpotlineError
from spotline.common.logs import setup_logging
from spotline.common.settings import Settings, load_settings

log = logging.getLogger("spotline")


class Ctx:
    """What every subcommand gets: the settings, read once."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings


pass_ctx = click.make_pass_decorator(Ctx)


def _need_url(settings: Settings) -> str:
    from spotline.up import running_url

    url = running_url(settings)
    if not url:
        raise click.ClickException(
            "no Redis to talk to: set SPOTLINE_REDIS_URL, or start `spotline up` first")
    return url


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_file", type=click.Path(dir_okay=False),
              help="TOML or YAML settings file (also SPOTLINE_CONFIG).")
@click.option("--log-level", default=None, help="DEBUG, INFO, WARNING, ERROR.")
@click.pass_context
def cli(ctx: click.Context, config_file: str | None, log_level: str | None) -> None:
    """spotline: streaming visual grounding (YOLO -> Real-ESRGAN -> SigLIP) over Redis Streams.

    Settings come from SPOTLINE_* environment variables and an optional --config file; see
    docs/settings.md. With no SPOTLINE_REDIS_URL, `up` and `demo` run an embedded redis-server.
    """
    try:
        settings = load_settings(config_file=config_file, log_level=log_level)
    except SpotlineError as exc:
        raise click.ClickException(str(exc)) from None
    setup_logging(settings.log_level)
    ctx.obj = Ctx(settings)


@cli.command()
@click.argument("stage", type=click.Choice(["detect", "upscale", "score", "collect"]))
@click.option("--burst", is_flag=True, help="Exit when the inbox is empty (tests, batch runs).")
@click.option("--metrics-port", type=int, default=None, help="Serve /metrics on this port.")
@click.option("--stage-class", default=None, metavar="MODULE:CLASS",
              help="Run a custom Stage implementation for this inbox.")
@pass_ctx
def worker(ctx: Ctx, stage: str, burst: bool, metrics_port: int | None,
           stage_class: str | None) -> None:
    """Run one worker of STAGE (a consumer in the stage's group) until SIGTERM/SIGINT."""
    from spotline.common.serve import run_stage
    from spotline.stages import load_stage

    url = _need_url(ctx.settings)
    try:
        run_stage(load_stage(stage, ctx.settings, stage_class), ctx.settings, url,
                  burst=burst, metrics_port=metrics_port)
    except SpotlineError as exc:
        raise click.ClickException(str(exc)) from None


@cli.command()
@click.option("--workers", "worker_specs", multiple=True, metavar="STAGE=N",
              help="Worker processes for a stage (repeatable), e.g. --workers score=2.")
@click.option("--metrics", is_flag=True, help="Each worker serves /metrics (from metrics_port "
              "or 9100 up).")
@click.option("--persist", is_flag=True, help="Embedded Redis with AOF in data_dir/redis.")
@pass_ctx
def up(ctx: Ctx, worker_specs: tuple[str, ...], metrics: bool, persist: bool) -> None:
    """Run the whole pipeline here: Redis (embedded unless SPOTLINE_REDIS_URL) and supervised
    workers for every stage. Ctrl-C or SIGTERM stops it (exit 0)."""
    from spotline.up import parse_workers, run_up

    try:
        run_up(ctx.settings, parse_workers(worker_specs), metrics=metrics, persist=persist,
               echo=click.echo)
    except SpotlineError as exc:
        raise click.ClickException(str(exc)) from None


@cli.group()
def models() -> None:
    """Model files: tiny random checkpoints for tests and demos."""


@models.command("tiny")
@click.argument("directory", type=click.Path(file_okay=False))
def models_tiny(directory: str) -> None:
    """Write tiny random-initialised checkpoints (YOLO .pt, Real-ESRGAN .pth, SigLIP dir) in the
    real formats to DIRECTORY. Boxes from them are arbitrary: they exist to run the pipeline."""
    from spotline.stages.tiny import write_tiny_models

    paths = write_tiny_models(Path(directory))
    for kind, path in paths.items():
        click.echo(f"{kind}: {path}")
    click.echo("Point spotline at them with SPOTLINE_DETECTOR_WEIGHTS, SPOTLINE_UPSCALER_WEIGHTS "
               "and SPOTLINE_SCORER_DIR (or leave those empty: tiny models are the default).")


@cli.group()
def dead() -> None:
    """The dead-letter stream: entries that could not be processed, with their reason."""


@dead.command("list")
@click.option("--count", default=100, show_default=True, help="At most this many.")
@pass_ctx
def dead_list(ctx: Ctx, count: int) -> None:
    """List dead letters: id, stream, frame, reason, deliveries, age."""
    from spotline.common.deadletters import DeadLetters

    dl = DeadLetters.connect(ctx.settings, _need_url(ctx.settings))
    rows = dl.list(count)
    if not rows:
        click.echo("no dead letters")
    for row in rows:
        click.echo(f"{row.id}  stream={row.stream} frame={row.frame or '?'} "
                   f"deliveries={row.deliveries} age={row.age_s:.0f}s  {row.reason}")


@dead.command("retry")
@click.argument("ids", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="Retry every dead letter.")
@pass_ctx
def dead_retry(ctx: Ctx, ids: tuple[str, ...], all_: bool) -> None:
    """Re-queue dead letters (by id, or --all) to the stream they came from."""
    from spotline.common.deadletters import DeadLetters

    if not ids and not all_:
        raise click.UsageError("give dead-letter ids or --all")
    dl = DeadLetters.connect(ctx.settings, _need_url(ctx.settings))
    n = dl.retry(None if all_ else list(ids))
    click.echo(f"re-queued {n} entr{'y' if n == 1 else 'ies'}")


@cli.command()
@click.option("--quick", is_flag=True, help="Tiny models on 4 frames, fewer round trips and a "
              "100-frame backlog: about a minute (tests).")
@click.option("--frames", "n_frames", type=click.IntRange(1), default=None,
              help="Tiny-model frames: the bundled photos, then synthetic 1520x870 ones "
              "[default: 24; --quick: 4].")
@click.option("--real/--no-real", default=False, show_default=True,
              help="Also run real-size random architectures (YOLOv9c at imgsz with TTA, SRVGG "
              "x4v3, SigLIP-large-384): ~40 s per frame per pass on 2 CPU cores, ~12 minutes "
              "in all; written once under data_dir.")
@click.option("--real-frames", type=click.IntRange(1), default=3, show_default=True,
              help="Frames for the real-size part.")
@click.option("--iterations", type=click.IntRange(1), default=None,
              help="Transport hops per message [default: 300; --quick: 60].")
@click.option("--rounds", type=click.IntRange(1), default=None,
              help="Tiny-model measurements keep the best of this many rounds (a shared "
              "machine only adds time) [default: 2; --quick: 1].")
@click.option("--only", type=click.Choice(["all", "transport"]), default="all",
              show_default=True, help="transport: only the hop micro-benchmark.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Write every figure as JSON here (fields: docs/performance.md).")
@click.option("--png", "png_path", type=click.Path(dir_okay=False), default=None,
              help="Draw throughput, latency percentiles and stage times here (PNG).")
@pass_ctx
def bench(ctx: Ctx, quick: bool, n_frames: int | None, real: bool, real_frames: int,
          iterations: int | None, rounds: int | None, only: str, json_path: str | None,
          png_path: str | None) -> None:
    """Measure this machine (figures, never pass/fail): the transport hop; the in-process
    reference against the streaming pipeline (one worker per stage, then two for the slowest)
    on the same frames with tiny models; light-load latency; Redis memory under a 1,000-frame
    backlog; with --real, the same with real-size architectures. See docs/performance.md."""
    from spotline import bench as b

    opts = b.BenchOptions.quick_run() if quick else b.BenchOptions()
    changes = {k: v for k, v in (("frames", n_frames), ("iterations", iterations),
                                 ("rounds", rounds)) if v}
    opts = b.BenchOptions(**{**opts.__dict__, **changes, "real": real,
                             "real_frames": real_frames})
    try:
        if only == "transport":
            report = {"transport": b.transport_bench(ctx.settings, opts.iterations)}
            click.echo("\n".join(b.transport_lines(report)))
        else:
            if not real:
                click.echo("(real-size architectures off: add --real for them, ~12 more "
                           "minutes on 2 CPU cores)")
            report = b.main(ctx.settings, opts, say=lambda m: click.echo(m, err=True))
            click.echo(b.table(report))
    except SpotlineError as exc:
        raise click.ClickException(str(exc)) from None
    if json_path:
        b.write_json(report, json_path)
        click.echo(f"wrote {json_path}")
    if png_path and only == "all":
        b.write_png(report, png_path)
        click.echo(f"wrote {png_path}")


@cli.command()
@click.option("--host", default=None, help="Bind address (default: http_host setting).")
@click.option("--port", type=int, default=None, help="Port (default: http_port, 5004).")
@click.option("--metrics-port", type=int, default=None,
              help="Also serve /metrics on this port (it is always on the main port too).")
@click.option("--timeout", default=120.0, show_default=True,
              help="Seconds to wait for the pipeline before answering 504.")
@pass_ctx
def serve(ctx: Ctx, host: str | None, port: int | None, metrics_port: int | None,
          timeout: float) -> None:
    """HTTP gateway, compatible with the seed's container: GET /health, POST /identify
    (plus GET /metrics and the OpenAPI page at /docs). Needs a running pipeline."""
    import uvicorn

    from spotline.common.metrics import Metrics
    from spotline.producer.client import Client
    from spotline.producer.gateway import create_app

    # A SIGTERM before uvicorn runs, or the one uvicorn re-raises after its graceful
    # shutdown, is a clean exit 0 (what compose and supervisors expect).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    s = ctx.settings
    metrics = Metrics()
    if metrics_port is not None:
        metrics.serve(metrics_port)
    app = create_app(s, Client.connect(_need_url(s), s), metrics, timeout_s=timeout)
    uvicorn.run(app, host=host or s.http_host, port=port or s.http_port,
                log_level=s.log_level.lower(), timeout_graceful_shutdown=5)


@cli.command()
@click.option("--out", "out_dir", default="out/demo", show_default=True,
              type=click.Path(file_okay=False), help="Where annotated images go.")
@click.option("--timeout", default=600.0, show_default=True, help="Seconds to wait for results.")
@pass_ctx
def demo(ctx: Ctx, out_dir: str, timeout: float) -> None:
    """Run the pipeline on ultralytics' bundled bus.jpg and zidane.jpg with a few captions:
    print the boxes and write annotated images. Uses a running `spotline up` (or
    SPOTLINE_REDIS_URL) if there is one, else starts a local pipeline for the demo."""
    from spotline.demo import run_demo
    from spotline.up import running_url

    try:
        run_demo(ctx.settings, running_url(ctx.settings), Path(out_dir), timeout)
    except SpotlineError as exc:
        raise click.ClickException(str(exc)) from None


def _register_io_commands() -> None:
    from spotline.cli_io import COMMANDS

    for command in COMMANDS:
        cli.add_command(command)


_register_io_commands()
cli.add_command(__import__("spotline.cli_sink", fromlist=["sink"]).sink)  # spotline sink
cli.add_command(__import__("spotline.cli_sources", fromlist=["sources"]).sources)
cli.add_command(__import__("spotline.cli_export", fromlist=["export"]).export)  # export


def main() -> None:
    try:
        cli(prog_name="spotline")
    except SpotlineError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
