"""Operating a pipeline: `spotline models`, `dead` and `eval` (`bench` is in bench.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from spotline.common.settings import Settings

from .context import Ctx, current, need_url, pass_ctx


@click.group()
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


@click.group()
def dead() -> None:
    """The dead-letter stream: entries that could not be processed, with their reason."""


@dead.command("list")
@click.option("--count", default=100, show_default=True, help="At most this many.")
@pass_ctx
def dead_list(ctx: Ctx, count: int) -> None:
    """List dead letters: id, stream, frame, reason, deliveries, age."""
    from spotline.common.deadletters import DeadLetters

    dl = DeadLetters.connect(ctx.settings, need_url(ctx.settings))
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
    dl = DeadLetters.connect(ctx.settings, need_url(ctx.settings))
    n = dl.retry(None if all_ else list(ids))
    click.echo(f"re-queued {n} entr{'y' if n == 1 else 'ies'}")


@click.command("eval")
@click.argument("dataset", type=click.Path(exists=True))
@click.option("--reference", is_flag=True,
              help="Run in this process with the reference pipeline (the same stage code, no "
              "Redis) instead of through the streaming pipeline.")
@click.option("--t-max", default=30.0, show_default=True,
              help="Speed score: 1 - min(t, t_max) / t_max over the whole run.")
@click.option("--out", "out_dir", default="out/eval", show_default=True,
              type=click.Path(file_okay=False), help="Where eval.json and eval.png go.")
@click.option("--limit", type=int, default=None, help="Only the first N images.")
@click.option("--batch-size", default=4, show_default=True,
              help="Images sent together (each image's latency is its batch's time).")
@click.option("--timeout", default=600.0, show_default=True,
              help="Pipeline mode: seconds to wait for a batch's results.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def eval_cmd(dataset: str, reference: bool, t_max: float, out_dir: str, limit: int | None,
             batch_size: int, timeout: float, no_progress: bool) -> None:
    """Score the method on a TIL-format DATASET (folder with vlm.jsonl and images/): accuracy
    (mean round(IoU) over captions), speed score, latency p50/p95/p99 and accuracy per caption;
    writes eval.json and eval.png to --out. Uses the running pipeline (`spotline up` or
    SPOTLINE_REDIS_URL), else starts a local one; --reference runs in this process."""
    from spotline.producer.dataset import load_til

    s = current().settings
    if limit is not None and limit < 1:
        raise click.UsageError("--limit must be >= 1")
    images = load_til(dataset)[:limit]
    report = _run_eval(s, images, reference, t_max, batch_size, timeout, not no_progress)
    _show_report(report, images)
    from spotline.eval import write_report

    json_path, png_path = write_report(report, out_dir)
    click.echo(f"wrote {json_path} and {png_path}")


def _run_eval(s: Settings, images: list[Any], reference: bool, t_max: float, batch_size: int,
              timeout: float, progress: bool) -> Any:
    from spotline.eval import evaluate
    from spotline.pipeline.supervisor import LocalPipeline, running_url

    if reference:
        from spotline.pipeline.reference import Reference

        ref = Reference(s)

        def identify(imgs: list[bytes], caps: list[list[str]]) -> list[Any]:
            return [r.boxes for r in ref.identify(imgs, caps)]

        return evaluate(images, identify, t_max=t_max, progress=progress, batch_size=batch_size)
    url = running_url(s)
    if url is not None:
        return _eval_pipeline(s, url, images, t_max, batch_size, timeout, progress)
    click.echo("no running pipeline: starting a local one (embedded redis-server, one worker "
               "per stage)...", err=True)
    with LocalPipeline(s) as local_url:
        return _eval_pipeline(s, local_url, images, t_max, batch_size, timeout, progress)


def _eval_pipeline(s: Settings, url: str, images: list[Any], t_max: float, batch_size: int,
                   timeout: float, progress: bool) -> Any:
    from spotline.eval import evaluate
    from spotline.producer.client import Client
    from spotline.producer.sources import validate_frame

    client = Client.connect(url, s)

    def identify(imgs: list[bytes], caps: list[list[str]]) -> list[Any]:
        ids = [client.publish(img, c, source_id="eval", image_size=validate_frame(img, c, s),
                              sequenced=False)  # unrelated images, not a video
               for img, c in zip(imgs, caps, strict=True)]
        found = client.await_results(ids, timeout=timeout)
        return [found[f].boxes for f in ids]

    try:
        return evaluate(images, identify, t_max=t_max, progress=progress, batch_size=batch_size)
    finally:
        client.close()


def _show_report(report: Any, images: list[Any] | None = None) -> None:
    click.echo(f"accuracy     {report.accuracy:.4f}  ({report.n_captions} captions, "
               f"{report.n_images} images)")
    if images:  # beside it, chance: one of the image's true boxes picked at random
        from spotline.train.demo import chance_of

        click.echo(f"chance       {chance_of(images):.4f}  (1 / boxes in the caption's image)")
    click.echo(f"speed score  {report.speed_score:.4f}  ({report.total_seconds:.2f} s, "
               f"t_max {report.t_max:g} s)")
    click.echo(f"latency      p50 {1000 * report.latency_p50:.1f} ms, p95 "
               f"{1000 * report.latency_p95:.1f} ms, p99 {1000 * report.latency_p99:.1f} ms "
               f"(per image)")
    if report.errors:
        click.echo(f"errors       {len(report.errors)} (first: {report.errors[0]['error']})")
    if getattr(report, "breakdown", None):
        from spotline.eval import breakdown_lines

        click.echo("accuracy by frame size (long side, px), object size (true box's long side, "
                   "px), colour and background:")
        for line in breakdown_lines(report):
            click.echo(line)
    if report.per_caption:
        width = min(40, max(len(c) for c in report.per_caption))
        click.echo("per caption:")
        for caption, row in sorted(report.per_caption.items(),
                                   key=lambda kv: (-kv[1]["accuracy"], kv[0])):
            click.echo(f"  {caption[:width]:<{width}}  {row['accuracy']:.3f}  "
                       f"({int(row['hits'])}/{int(row['n'])})")
