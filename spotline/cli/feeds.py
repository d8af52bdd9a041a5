"""Feeds in, results out: `spotline publish`, `results`, `ingest` and `jobs`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from spotline.common.settings import BACKPRESSURE, Settings

from .context import current, need_url
from .output import Sink, frame_path, jsonl, read_manifest


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
@click.option("--meta", "meta_text", default=None, metavar="JSON|@FILE",
              help="A JSON object every frame carries and its result returns unchanged (drone "
              "telemetry, camera pose: docs/results.md), inline or @file.json; at most "
              "meta_max_bytes.")
def publish(source: str, captions: tuple[str, ...], captions_file: str | None,
            source_id: str | None, fps: float | None, live: bool | None, policy: str | None,
            max_frames: int | None, wait: bool, timeout: float, jsonl_path: str | None,
            annotate_dir: str | None, manifest_path: str | None, metrics_port: int | None,
            no_progress: bool, meta_text: str | None) -> None:
    """Publish the frames of SOURCE into the running pipeline.

    SOURCE is an image, a folder of images, a video file, a TIL dataset (folder with vlm.jsonl,
    or the .jsonl itself: each image with its own captions), a stream URL (rtsp://, http://,
    file://) or a camera index (0). Frames that break the limits are reported and skipped.
    Needs `spotline up` (or SPOTLINE_REDIS_URL).
    """
    from spotline.producer.sources import classify, load_captions, open_source

    s = current().settings
    if (jsonl_path or annotate_dir) and not wait:
        raise click.UsageError("--jsonl and --annotate need --wait (or use `spotline results`)")
    url = need_url(s)
    if live is False and classify(source) in ("stream", "camera"):
        raise click.UsageError("--recorded: cameras and stream URLs are always live")
    meta = _meta(meta_text, s) if meta_text is not None else None
    caps = load_captions(captions, captions_file)
    src = open_source(source, caps, source_id=source_id, fps=fps, live=bool(live))
    _publish(s, url, src, _Opts(policy, max_frames, wait, timeout, jsonl_path,
                                Path(annotate_dir) if annotate_dir else None,
                                manifest_path, metrics_port, not no_progress, meta))


def _meta(text: str, s: Settings) -> dict[str, Any]:
    """--meta's JSON object, inline or from @FILE; a usage error says what is wrong."""
    from spotline.common.errors import InputError
    from spotline.common.meta import parse_meta

    if text.startswith("@"):
        try:
            text = Path(text[1:]).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise click.BadParameter(f"cannot read {text[1:]!r}: {exc}",
                                     param_hint="--meta") from None
    try:
        return parse_meta(text, s.meta_max_bytes)
    except InputError as exc:
        raise click.BadParameter(str(exc), param_hint="--meta") from None


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
    meta: dict[str, Any] | None = None


def _publish(s: Settings, url: str, src: Any, o: _Opts) -> None:
    from spotline.common.metrics import Metrics
    from spotline.producer.client import Client
    from spotline.producer.publisher import SourceFailed, default_policy, publish_source

    client = Client.connect(url, s, via="cli")
    names: dict[str, str] = {}
    sink = Sink(None, o.annotate)
    metrics = Metrics()
    if o.metrics_port is not None:
        metrics.serve(o.metrics_port, addr=s.metrics_host)
    manifest = open(o.manifest_path, "a", encoding="utf-8") if o.manifest_path else None

    def published(frame: Any, fid: str) -> None:
        if o.wait:
            names[fid] = frame.name
            if o.annotate is not None:
                sink.images[fid] = frame.image
        if manifest is not None:
            manifest.write(json.dumps({"frame_id": fid, "source_id": frame.source_id,
                                       "name": frame.name,
                                       "path": frame_path(src, frame.name)}) + "\n")

    policy = o.policy or default_policy(src, s)
    click.echo(f"publishing {src.kind} {src.source_id!r} (policy {policy}, high_water "
               f"{s.high_water})", err=True)
    failed: SourceFailed | None = None
    try:
        stats = publish_source(src, client, s, policy=policy, progress=o.progress,
                               metrics=metrics, max_frames=o.max_frames,
                               on_published=published, keep_ids=o.wait, meta=o.meta)
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
                    jsonl_path: str | None, sink: Sink) -> None:
    results = client.await_results(frame_ids, timeout=timeout)  # ResultTimeout: "Error: ..."
    with jsonl(jsonl_path) as fh:
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

    s = current().settings
    if annotate_dir and not manifest_path:
        raise click.UsageError("--annotate needs --manifest FILE (from `spotline publish "
                               "--manifest FILE`): the pipeline does not keep the images")
    manifest = read_manifest(manifest_path) if manifest_path else None
    client = Client.connect(need_url(s), s)
    with jsonl(jsonl_path) as fh:
        sink = Sink(fh, Path(annotate_dir) if annotate_dir else None, manifest)
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
        finally:
            client.close()
    if not follow and sink.count == 0:
        click.echo("no results", err=True)


def _replay(client: Any, start: str, source_id: str | None, count: int | None,
            sink: Sink) -> None:
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

    s = current().settings
    url = need_url(s)
    caps = load_captions(captions, captions_file)
    jobs = enqueue_ingest(paths, caps, s, url, queue_name=queue_name, source_id=source_id)
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

    rows = list_jobs(need_url(current().settings), queue_name)
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
    """Run an RQ worker for ingest and fine-tuning jobs (with the scheduler for delayed
    retries) until Ctrl-C, or until the queue is empty with --burst. It runs only spotline's
    own job functions (any other job fails, refused) and publishes with this process's Redis
    URL and secrets."""
    from spotline.producer.jobs import run_jobs_worker
    from spotline.train import jobs as _train_jobs  # noqa: F401  (registers the fine-tuning job)

    s = current().settings
    ran = run_jobs_worker(need_url(s), queue_name, burst=burst, fork=fork,
                          logging_level=s.log_level, settings=s)
    if burst:
        click.echo("ran jobs" if ran else "no jobs to run", err=True)


# --- eval --------------------------------------------------------------------------------------
