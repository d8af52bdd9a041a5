"""Feeds in, results out: `spotline publish`, `results`, `ingest`, `jobs` and `eval`.

The main group registers them with ``for c in COMMANDS: cli.add_command(c)``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import click

from spotline.common.errors import SpotlineError
from spotline.common.settings import BACKPRESSURE, Settings


def _ctx() -> Any:
    """The main group's Ctx (its settings). Imported here, not at the top, so that
    spotline.cli may import this module at any point without a circular import."""
    from spotline.cli import Ctx

    ctx = click.get_current_context().find_object(Ctx)
    if ctx is None:  # a command invoked on its own, outside the `spotline` group
        from spotline.common.settings import load_settings

        ctx = Ctx(load_settings())
    return ctx


def _url(settings: Settings) -> str:
    from spotline.cli import _need_url

    return _need_url(settings)


def _fail(exc: Exception) -> click.ClickException:
    return click.ClickException(str(exc))


# --- manifest: which image a frame id came from -------------------------------------------------
def _frame_path(source: Any, name: str) -> str | None:
    """The image file a frame was read from, for file-based sources (else None)."""
    kind = getattr(source, "kind", "")
    if kind == "image":
        return str(Path(source.path).resolve())
    if kind == "folder":
        return str((Path(source.path) / name).resolve())
    if kind == "dataset":
        for img in getattr(source, "images", ()):
            if img.image_path.name == name:
                return str(img.image_path.resolve())
    return None


def _read_manifest(path: str) -> dict[str, dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise click.ClickException(f"cannot read manifest {path}: {exc.strerror or exc}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            rows[str(row["frame_id"])] = row
        except (ValueError, KeyError, TypeError):
            raise click.ClickException(f"{path}:{n}: not a manifest row") from None
    return rows


# --- output of results -------------------------------------------------------------------------
def _result_line(result: Any, name: str | None = None) -> str:
    head = f"{result.frame_id}  {result.source_id}" + (f"/{name}" if name else "")
    if result.error:
        status = f"ERROR {result.error}"
    else:
        status = "fallback (no box)" if result.fallback else "ok"
    boxes = "; ".join(f"{c!r} [{', '.join(f'{v:.1f}' for v in b)}]"
                      for c, b in zip(result.captions, result.boxes, strict=True))
    return f"{head}  {status}  {1000 * result.latency:.0f} ms  {boxes}"


@contextmanager
def _jsonl(path: str | None) -> Iterator[TextIO | None]:
    if path is None:
        yield None
    elif path == "-":
        yield sys.stdout
    else:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as fh:
            yield fh


class _Sink:
    """Where results go: stdout lines, a JSONL file, annotated images."""

    def __init__(self, jsonl: TextIO | None, annotate: Path | None,
                 manifest: dict[str, dict[str, Any]] | None = None) -> None:
        self.jsonl = jsonl
        self.annotate = annotate
        self.manifest = manifest or {}
        self.images: dict[str, bytes] = {}  # frame id -> image (publish --wait --annotate)
        self.count = 0

    def __call__(self, result: Any, name: str | None = None) -> None:
        from spotline.annotate import write_annotated

        self.count += 1
        row = self.manifest.get(result.frame_id, {})
        name = name or row.get("name")
        if self.jsonl is not None:
            out = result.as_json()
            if name:
                out["name"] = name
            self.jsonl.write(json.dumps(out) + "\n")
            self.jsonl.flush()
        if self.jsonl is not sys.stdout:
            click.echo(_result_line(result, name))
        if self.annotate is None:
            return
        image = self.images.pop(result.frame_id, None)
        if image is None and row.get("path"):
            try:
                image = Path(row["path"]).read_bytes()
            except OSError as exc:
                click.echo(f"  cannot annotate {result.frame_id}: {exc}", err=True)
        if image is not None:
            stem = f"{result.source_id}_{Path(name).stem}" if name else result.frame_id
            write_annotated(image, result, self.annotate, stem)


# --- publish -----------------------------------------------------------------------------------
@click.command()
@click.argument("source")
@click.option("-c", "--caption", "captions", multiple=True,
              help="A caption to find in every frame (repeatable).")
@click.option("--captions-file", type=click.Path(dir_okay=False),
              help="More captions, one a line.")
@click.option("--source-id", default=None, help="Name of this feed in results and metrics "
              "(default: from the file name, camera index or URL).")
@click.option("--fps", type=float, default=None,
              help="Frame-rate limit: recorded footage waits, live feeds drop early frames.")
@click.option("--live/--recorded", default=None,
              help="Read a video file as a live stream (or force recorded). Default: cameras "
              "and URLs are live, files are recorded.")
@click.option("--policy", type=click.Choice(BACKPRESSURE), default=None,
              help="Backpressure when the detect inbox reaches high_water: block (lose nothing) "
              "or drop-oldest (stay current). Default: drop-oldest for live feeds, else the "
              "backpressure setting (block).")
@click.option("--max-frames", type=int, default=None,
              help="Stop after reading this many frames (live feeds run until Ctrl-C).")
@click.option("--wait", is_flag=True, help="Await every frame's result and print it.")
@click.option("--timeout", default=600.0, show_default=True,
              help="With --wait: seconds to wait for the results.")
@click.option("--jsonl", "jsonl_path", default=None, metavar="FILE",
              help="With --wait: append the results as JSON lines ('-': stdout).")
@click.option("--annotate", "annotate_dir", type=click.Path(file_okay=False), default=None,
              help="With --wait: draw the boxes on each frame and save it in this folder "
              "(keeps the frames in memory until their results arrive).")
@click.option("--manifest", "manifest_path", type=click.Path(dir_okay=False), default=None,
              help="Append one JSON line per published frame (frame_id, source_id, name, path) "
              "so `spotline results --annotate` can find the image files later.")
@click.option("--metrics-port", type=int, default=None,
              help="Serve /metrics (frames published, dropped by reason) on this port.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def publish(source: str, captions: tuple[str, ...], captions_file: str | None,
            source_id: str | None, fps: float | None, live: bool | None, policy: str | None,
            max_frames: int | None, wait: bool, timeout: float, jsonl_path: str | None,
            annotate_dir: str | None, manifest_path: str | None, metrics_port: int | None,
            no_progress: bool) -> None:
    """Publish the frames of SOURCE into the running pipeline.

    SOURCE is an image, a folder of images, a video file, a TIL dataset (folder with vlm.jsonl,
    or the .jsonl itself: each image with its own captions), a stream URL (rtsp://, http://,
    file://) or a camera index (0). Frames that break the limits are reported and skipped.
    Needs `spotline up` (or SPOTLINE_REDIS_URL).
    """
    from spotline.producer.sources import classify, load_captions, open_source

    s = _ctx().settings
    if (jsonl_path or annotate_dir) and not wait:
        raise click.UsageError("--jsonl and --annotate need --wait (or use `spotline results`)")
    url = _url(s)
    try:
        if live is False and classify(source) in ("stream", "camera"):
            raise click.UsageError("--recorded: cameras and stream URLs are always live")
        caps = load_captions(captions, captions_file)
        src = open_source(source, caps, source_id=source_id, fps=fps, live=bool(live))
        _publish(s, url, src, _Opts(policy, max_frames, wait, timeout, jsonl_path,
                                    Path(annotate_dir) if annotate_dir else None,
                                    manifest_path, metrics_port, not no_progress))
    except SpotlineError as exc:
        raise _fail(exc) from None


@dataclass(frozen=True)
class _Opts:
    policy: str | None
    max_frames: int | None
    wait: bool
    timeout: float
    jsonl_path: str | None
    annotate: Path | None
    manifest_path: str | None
    metrics_port: int | None
    progress: bool


def _publish(s: Settings, url: str, src: Any, o: _Opts) -> None:
    from spotline.common.metrics import Metrics
    from spotline.producer.client import Client
    from spotline.producer.publisher import SourceFailed, default_policy, publish_source

    client = Client.connect(url, s)
    names: dict[str, str] = {}
    sink = _Sink(None, o.annotate)
    metrics = Metrics()
    if o.metrics_port is not None:
        metrics.serve(o.metrics_port)
    manifest = open(o.manifest_path, "a", encoding="utf-8") if o.manifest_path else None

    def published(frame: Any, fid: str) -> None:
        if o.wait:
            names[fid] = frame.name
            if o.annotate is not None:
                sink.images[fid] = frame.image
        if manifest is not None:
            manifest.write(json.dumps({"frame_id": fid, "source_id": frame.source_id,
                                       "name": frame.name,
                                       "path": _frame_path(src, frame.name)}) + "\n")

    policy = o.policy or default_policy(src, s)
    click.echo(f"publishing {src.kind} {src.source_id!r} (policy {policy}, high_water "
               f"{s.high_water})", err=True)
    failed: SourceFailed | None = None
    try:
        stats = publish_source(src, client, s, policy=policy, progress=o.progress,
                               metrics=metrics, max_frames=o.max_frames,
                               on_published=published, keep_ids=o.wait)
    except SourceFailed as exc:
        failed, stats = exc, exc.stats
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        return
    finally:
        if manifest is not None:
            manifest.close()
    click.echo(f"{src.source_id}: {stats.summary()}", err=True)
    for name, reason in stats.rejected:
        click.echo(f"  rejected {name}: {reason}", err=True)
    if o.wait and stats.frame_ids:
        _await_and_show(client, stats.frame_ids, names, o.timeout, o.jsonl_path, sink)
    client.close()
    if failed is not None:
        raise click.ClickException(str(failed))


def _await_and_show(client: Any, frame_ids: list[str], names: dict[str, str], timeout: float,
                    jsonl_path: str | None, sink: _Sink) -> None:
    from spotline.producer.client import ResultTimeout

    try:
        results = client.await_results(frame_ids, timeout=timeout)
    except ResultTimeout as exc:
        raise _fail(exc) from None
    with _jsonl(jsonl_path) as fh:
        sink.jsonl = fh
        for fid in frame_ids:
            sink(results[fid], names.get(fid))


# --- results -----------------------------------------------------------------------------------
@click.command()
@click.option("--follow", "-f", is_flag=True, help="Keep printing new results until Ctrl-C.")
@click.option("--from", "start", default=None, metavar="ID",
              help="Start after this results-stream id ('0': everything the stream holds). "
              "Default: everything without --follow, only new results with --follow.")
@click.option("--source", "source_id", default=None, help="Only results of this source id.")
@click.option("--jsonl", "jsonl_path", default=None, metavar="FILE",
              help="Append the results as JSON lines ('-': stdout instead of the summary).")
@click.option("--annotate", "annotate_dir", type=click.Path(file_okay=False), default=None,
              help="Draw each result on its image and save it here. The pipeline does not keep "
              "images, so this needs --manifest (image files only; for video frames use "
              "`spotline publish --wait --annotate DIR`).")
@click.option("--manifest", "manifest_path", type=click.Path(dir_okay=False), default=None,
              help="The file written by `spotline publish --manifest`: frame ids to images.")
@click.option("--count", type=int, default=None, help="Stop after this many results.")
def results(follow: bool, start: str | None, source_id: str | None, jsonl_path: str | None,
            annotate_dir: str | None, manifest_path: str | None, count: int | None) -> None:
    """Print the pipeline's results: one line per frame (id, source, status, latency, one box
    [left, top, width, height] per caption), optionally as JSON lines and annotated images."""
    from spotline.producer.client import Client

    s = _ctx().settings
    if annotate_dir and not manifest_path:
        raise click.UsageError("--annotate needs --manifest FILE (from `spotline publish "
                               "--manifest FILE`): the pipeline does not keep the images")
    manifest = _read_manifest(manifest_path) if manifest_path else None
    client = Client.connect(_url(s), s)
    with _jsonl(jsonl_path) as fh:
        sink = _Sink(fh, Path(annotate_dir) if annotate_dir else None, manifest)
        try:
            if follow:
                for _eid, result in client.subscribe(start or "$", source_id=source_id):
                    sink(result)
                    if count is not None and sink.count >= count:
                        break
            else:
                _replay(client, start or "0", source_id, count, sink)
        except KeyboardInterrupt:
            pass
        except SpotlineError as exc:
            raise _fail(exc) from None
        finally:
            client.close()
    if not follow and sink.count == 0:
        click.echo("no results", err=True)


def _replay(client: Any, start: str, source_id: str | None, count: int | None,
            sink: _Sink) -> None:
    last = start
    while True:
        rows = client.read_results(last)
        if not rows:
            return
        for eid, result in rows:
            last = eid
            if source_id is None or result.source_id == source_id:
                sink(result)
                if count is not None and sink.count >= count:
                    return


# --- ingest and jobs ---------------------------------------------------------------------------
@click.command()
@click.argument("paths", nargs=-1, required=True)
@click.option("-c", "--caption", "captions", multiple=True,
              help="A caption to find in every frame (repeatable; datasets bring their own).")
@click.option("--captions-file", type=click.Path(dir_okay=False),
              help="More captions, one a line.")
@click.option("--source-id", default=None, help="Source id for every path (default: per path).")
@click.option("--queue", "queue_name", default="spotline-ingest", show_default=True,
              help="RQ queue name.")
def ingest(paths: tuple[str, ...], captions: tuple[str, ...], captions_file: str | None,
           source_id: str | None, queue_name: str) -> None:
    """Queue bulk ingestion jobs (RQ), one per PATH: recorded videos, image folders, TIL
    datasets. Each job publishes every frame with block backpressure, records its progress and
    retries on Redis outages; bad inputs fail with the reason. Run them with
    `spotline jobs worker`, watch them with `spotline jobs list`."""
    from spotline.producer.jobs import enqueue_ingest
    from spotline.producer.sources import load_captions

    s = _ctx().settings
    url = _url(s)
    try:
        caps = load_captions(captions, captions_file)
        jobs = enqueue_ingest(paths, caps, s, url, queue_name=queue_name, source_id=source_id)
    except SpotlineError as exc:
        raise _fail(exc) from None
    for job, path in zip(jobs, paths, strict=True):
        click.echo(f"{job.id}  {path}")
    click.echo(f"queued {len(jobs)} job(s) on {queue_name!r}; run `spotline jobs worker`",
               err=True)


@click.group()
def jobs() -> None:
    """Bulk ingestion jobs (RQ): list them, run a worker."""


@jobs.command("list")
@click.option("--queue", "queue_name", default="spotline-ingest", show_default=True,
              help="RQ queue name.")
def jobs_list(queue_name: str) -> None:
    """List ingest jobs: id, status (queued, scheduled, started, finished, failed), path,
    progress (published/total, dropped, rejected) and the reason of failed ones."""
    from spotline.producer.jobs import list_jobs

    rows = list_jobs(_url(_ctx().settings), queue_name)
    if not rows:
        click.echo("no jobs")
    for row in rows:
        click.echo(row.line())


@jobs.command("worker")
@click.option("--queue", "queue_name", default="spotline-ingest", show_default=True,
              help="RQ queue name.")
@click.option("--burst", is_flag=True, help="Exit when the queue is empty.")
@click.option("--fork/--no-fork", default=True, show_default=True,
              help="Run each job in a forked work horse (RQ Worker) or in this process "
              "(SimpleWorker).")
def jobs_worker(queue_name: str, burst: bool, fork: bool) -> None:
    """Run an RQ worker for ingest jobs (with the scheduler for delayed retries) until Ctrl-C,
    or until the queue is empty with --burst."""
    from spotline.producer.jobs import run_jobs_worker

    s = _ctx().settings
    ran = run_jobs_worker(_url(s), queue_name, burst=burst, fork=fork,
                          logging_level=s.log_level)
    if burst:
        click.echo("ran jobs" if ran else "no jobs to run", err=True)


# --- eval --------------------------------------------------------------------------------------
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

    s = _ctx().settings
    if limit is not None and limit < 1:
        raise click.UsageError("--limit must be >= 1")
    try:
        images = load_til(dataset)[:limit]
        report = _run_eval(s, images, reference, t_max, batch_size, timeout, not no_progress)
    except SpotlineError as exc:
        raise _fail(exc) from None
    _show_report(report)
    from spotline.evaluate import write_report

    json_path, png_path = write_report(report, out_dir)
    click.echo(f"wrote {json_path} and {png_path}")


def _run_eval(s: Settings, images: list[Any], reference: bool, t_max: float, batch_size: int,
              timeout: float, progress: bool) -> Any:
    from spotline.evaluate import evaluate
    from spotline.up import LocalPipeline, running_url

    if reference:
        from spotline.reference import Reference

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
    from spotline.evaluate import evaluate
    from spotline.producer.client import Client
    from spotline.producer.sources import validate_frame

    client = Client.connect(url, s)

    def identify(imgs: list[bytes], caps: list[list[str]]) -> list[Any]:
        ids = [client.publish(img, c, source_id="eval", image_size=validate_frame(img, c, s))
               for img, c in zip(imgs, caps, strict=True)]
        found = client.await_results(ids, timeout=timeout)
        return [found[f].boxes for f in ids]

    try:
        return evaluate(images, identify, t_max=t_max, progress=progress, batch_size=batch_size)
    finally:
        client.close()


def _show_report(report: Any) -> None:
    click.echo(f"accuracy     {report.accuracy:.4f}  ({report.n_captions} captions, "
               f"{report.n_images} images)")
    click.echo(f"speed score  {report.speed_score:.4f}  ({report.total_seconds:.2f} s, "
               f"t_max {report.t_max:g} s)")
    click.echo(f"latency      p50 {1000 * report.latency_p50:.1f} ms, p95 "
               f"{1000 * report.latency_p95:.1f} ms, p99 {1000 * report.latency_p99:.1f} ms "
               f"(per image)")
    if report.errors:
        click.echo(f"errors       {len(report.errors)} (first: {report.errors[0]['error']})")
    if report.per_caption:
        width = min(40, max(len(c) for c in report.per_caption))
        click.echo("per caption:")
        for caption, row in sorted(report.per_caption.items(),
                                   key=lambda kv: (-kv[1]["accuracy"], kv[0])):
            click.echo(f"  {caption[:width]:<{width}}  {row['accuracy']:.3f}  "
                       f"({int(row['hits'])}/{int(row['n'])})")


COMMANDS: list[click.Command] = [publish, results, ingest, jobs, eval_cmd]

__all__ = ["COMMANDS", "eval_cmd", "ingest", "jobs", "publish", "results"]
