"""`spotline bench`: figures measured on this machine (never pass/fail), one subcommand a kind.

stream (the default with no subcommand): the tiny-model in-process reference against the
streaming pipeline; real: the same, then real-size architectures; backends: each model per
backend; soak: a local pipeline fed for minutes; video: per-frame against track mode on clips;
gpu: each model on an accelerator. Every subcommand prints the CPU's probe first and the load
average last (gpu records them as its first section). See docs/performance.md.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from spotline.bench.gpu import bench_gpu
from spotline.bench.probes import add_probe

from .context import Ctx, current, pass_ctx

_JSON_HELP = "Write every figure as JSON here (fields: docs/performance.md)."


def _json_option(command: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
                        help=_JSON_HELP)(command)


@click.group(invoke_without_command=True)
@click.pass_context
def bench(ctx: click.Context) -> None:
    """Measure this machine (figures, never pass/fail). With no subcommand, `bench stream`
    with its defaults. Each subcommand has --help; docs/performance.md has the fields."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(stream)


def _stream_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The options `bench stream` and `bench real` share."""
    for option in reversed([
        click.option("--quick", is_flag=True, help="Tiny models on 4 frames, fewer round trips "
                     "and a 100-frame backlog: about a minute (tests)."),
        click.option("--frames", "n_frames", type=click.IntRange(1), default=None,
                     help="Tiny-model frames: the bundled photos, then synthetic 1520x870 "
                     "ones [default: 24; --quick: 4]."),
        click.option("--iterations", type=click.IntRange(1), default=None,
                     help="Transport hops per message [default: 300; --quick: 60]."),
        click.option("--rounds", type=click.IntRange(1), default=None,
                     help="Tiny-model measurements keep the best of this many rounds (a shared "
                     "machine only adds time) [default: 2; --quick: 1]."),
        _json_option,
        click.option("--png", "png_path", type=click.Path(dir_okay=False), default=None,
                     help="Draw throughput, latency percentiles and stage times here (PNG)."),
    ]):
        command = option(command)
    return command


@bench.command()
@_stream_options
@click.option("--only", type=click.Choice(["all", "transport"]), default="all",
              show_default=True, help="transport: only the hop micro-benchmark.")
@pass_ctx
def stream(ctx: Ctx, quick: bool, n_frames: int | None, iterations: int | None,
           rounds: int | None, json_path: str | None, png_path: str | None, only: str) -> None:
    """The transport hop; the in-process reference against the streaming pipeline (one worker
    per stage, then two for the slowest) on the same frames with tiny models; light-load
    latency; Redis memory under a 1,000-frame backlog."""
    from spotline import bench as b

    opts = _options(quick, n_frames, iterations, rounds, real=False, real_frames=0)
    if only == "transport":
        report = {"transport": b.transport_bench(ctx.settings, opts.iterations)}
        click.echo("\n".join(b.transport_lines(report)))
        _write(report, json_path, None)
        return
    click.echo("(real-size architectures off: `spotline bench real` adds them, ~12 more "
               "minutes on 2 CPU cores)")
    _run(ctx, opts, json_path, png_path)


@bench.command()
@_stream_options
@click.option("--real-frames", type=click.IntRange(1), default=3, show_default=True,
              help="Frames for the real-size part.")
@pass_ctx
def real(ctx: Ctx, quick: bool, n_frames: int | None, iterations: int | None,
         rounds: int | None, json_path: str | None, png_path: str | None,
         real_frames: int) -> None:
    """`bench stream`, then the same with real-size random architectures (YOLOv9c at imgsz with
    TTA, SRVGG x4v3, SigLIP-large-384): ~40 s per frame per pass on 2 CPU cores, ~12 minutes
    more in all; the models are written once under data_dir."""
    _run(ctx, _options(quick, n_frames, iterations, rounds, real=True, real_frames=real_frames),
         json_path, png_path)


def _options(quick: bool, n_frames: int | None, iterations: int | None, rounds: int | None,
             real: bool, real_frames: int) -> Any:
    from spotline import bench as b

    opts = b.BenchOptions.quick_run() if quick else b.BenchOptions()
    changes = {k: v for k, v in (("frames", n_frames), ("iterations", iterations),
                                 ("rounds", rounds)) if v}
    if real:
        changes.update(real=True, real_frames=real_frames)
    return b.BenchOptions(**{**opts.__dict__, **changes})


def _run(ctx: Ctx, opts: Any, json_path: str | None, png_path: str | None) -> None:
    from spotline import bench as b

    report = b.main(ctx.settings, opts, say=lambda m: click.echo(m, err=True))
    click.echo(b.table(report))
    _write(report, json_path, png_path)


def _write(report: dict[str, Any], json_path: str | None, png_path: str | None) -> None:
    from spotline import bench as b

    if json_path:
        b.write_json(report, json_path)
        click.echo(f"wrote {json_path}")
    if png_path:
        b.write_png(report, png_path)
        click.echo(f"wrote {png_path}")


@bench.command()
@click.option("--real", is_flag=True, help="The real-size random architectures at the seed's "
              "settings (written once under data_dir) instead of the configured models.")
@click.option("--runs", type=click.IntRange(1), default=None,
              help="Timed calls per model and backend after one warm-up [default: 3; 1 with "
              "--real].")
@click.option("--part", type=click.Choice(["all", "models", "pipeline"]), default="all",
              show_default=True, help="The per-model table, the whole pipeline on the exports "
              "(settings backend, export_precision[_<model>]) against the torch in-process "
              "reference, or both.")
@click.option("--pipeline-frames", type=click.IntRange(2), default=4, show_default=True,
              help="Frames of the whole-pipeline part (2 of them again one at a time for light "
              "load).")
@_json_option
@pass_ctx
def backends(ctx: Ctx, real: bool, runs: int | None, part: str, pipeline_frames: int,
             json_path: str | None) -> None:
    """Time each model per backend (torch, ONNX Runtime, OpenVINO; fp32 and int8, exported
    first when missing) in a process of its own and print its RSS; then the whole pipeline on
    the exports against the torch reference."""
    from spotline.bench import exported
    from spotline.bench.backends import run_backends, table

    report = run_backends(ctx.settings, real, runs, part, pipeline_frames,
                          say=lambda m: click.echo(m, err=True))
    if report["cases"]:
        click.echo(table(report))
    if "pipeline" in report:
        click.echo(exported.lines(report["pipeline"]))
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=2))
        click.echo(f"wrote {json_path}")


@bench.command()
@click.argument("minutes", type=click.FloatRange(min=0, min_open=True), required=False)
@click.option("--rate", type=click.FloatRange(min=0, min_open=True), default=1.0,
              show_default=True, help="Frames/s published.")
@click.option("--seconds", type=click.FloatRange(min=0, min_open=True), default=None,
              hidden=True)  # tests: a soak of a few seconds
@click.option("--clips", "clips", type=click.Path(exists=True, file_okay=False), default=None,
              help="Publish these clips' frames (`spotline data synth --video`), looping, as "
                   "one source; in track mode the report adds its ask memory and an answer.")
@_json_option
@pass_ctx
def soak(ctx: Ctx, minutes: float | None, rate: float, seconds: float | None,
         clips: str | None, json_path: str | None) -> None:
    """Run a local pipeline and publish at --rate for MINUTES; print each process's RSS at
    start, after warm-up and at the end, the slope in MiB/min, Redis used_memory, and whether
    results == frames (status 1 when not). With --clips and SPOTLINE_TRACKING=true, also the
    source's ask memory against its cap as it grew, and an answer over all of it."""
    from spotline.bench.soak import run_soak

    if minutes is None and seconds is None:
        raise click.UsageError("give MINUTES")
    report = run_soak(ctx.settings, seconds if seconds is not None else minutes * 60,
                      rate=rate, echo=lambda m: click.echo(m, err=True), clips=clips)
    click.echo("\n".join(report.lines()))
    if json_path:
        Path(json_path).write_text(json.dumps(report.as_json(), indent=2))
        click.echo(f"wrote {json_path}")
    if not report.lossless:
        raise click.ClickException("results != frames: frames were lost or doubled")


@bench.command()
@click.argument("clips", type=click.Path(exists=True, file_okay=False))
@click.option("--clips", "n_clips", type=click.IntRange(1), default=4, show_default=True,
              help="Clips to use.")
@click.option("--frames", type=click.IntRange(1), default=60, show_default=True,
              help="Frames per clip.")
@click.option("--absent", type=click.IntRange(0), default=1, show_default=True,
              help="Captions per frame that name nothing in the clip.")
@click.option("--in-process", is_flag=True,
              help="Also both modes in this process (the same stage code, no Redis hops; joint "
              "assignment; \"not in view\" with and without), labelled in-process.")
@click.option("--real", is_flag=True,
              help="The real-size random architectures (YOLOv9c, SRVGG, SigLIP-large; written "
              "once under the data dir) at the seed's settings instead of the configured "
              "models: what each mode costs at real size. A random detector's boxes do not "
              "persist from frame to frame, so track mode reuses little, and accuracy means "
              "nothing (docs/track-mode.md).")
@_json_option
def video(clips: str, n_clips: int, frames: int, absent: int, in_process: bool, real: bool,
          json_path: str | None) -> None:
    """Per-frame mode against track mode on the clips under CLIPS (`spotline data synth
    --video`), through the streaming pipeline (workers as `spotline up` starts them, frames
    published by the client): frames/s, crops embedded per frame, accuracy (IoU > 0.5),
    caption flips per 100 frames, "not in view" precision and recall with --absent."""
    from spotline.cli.track import video_bench

    settings = current().settings
    if real:
        from spotline.bench.runs import real_settings

        settings = real_settings(settings)
    video_bench(settings, clips, n_clips, frames, absent, json_path, in_process, real=real)


@bench.command()
@click.option("--size", default="960x544", show_default=True,
              help="Frame size WxH of the held-out scenes published.")
@click.option("--frames", "n_frames", type=click.IntRange(1), default=20, show_default=True,
              help="Frames, each sent alone at light load, then all at once.")
@click.option("--rounds", type=click.IntRange(1), default=2, show_default=True,
              help="Light-load rounds; each frame keeps its best (a shared machine only adds "
              "time).")
@_json_option
def demo(size: str, n_frames: int, rounds: int, json_path: str | None) -> None:
    """The demo models through the streaming pipeline on held-out scenes of SIZE (workers as
    `spotline up` starts them, frames from the client): light-load latency p50/p95 with each
    stage's share, the accuracy of those answers (IoU > 0.5), then a burst's frames/s."""
    from spotline.bench.demo import bench_demo, lines

    try:
        w, h = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise click.BadParameter(f"size must be WxH, got {size!r}") from None
    try:
        report = bench_demo(current().settings, (w, h), n_frames, rounds,
                            say=lambda m: click.echo(m, err=True))
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo("\n".join(lines(report)))
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=2, default=str))
        click.echo(f"wrote {json_path}")


for _command in (stream, real, backends, soak, video, demo):
    add_probe(_command)  # the probe first, the load average last (gpu: its first section)
bench.add_command(bench_gpu)
