"""The runs a bench makes: the in-process reference and the streaming pipeline on the same
frames (burst, then light load), Redis memory under a backlog, real-size architectures."""

from __future__ import annotations

import gc
import os
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from spotline.common.embedded import EmbeddedRedis
from spotline.common.envelope import Result
from spotline.common.settings import Settings
from spotline.common.topology import FRAMES

from .probes import (
    RssSampler,
    delta,
    entry_sizes,
    free_port_block,
    model_time,
    ms,
    percentiles,
    scrape,
    stage_phases,
    throughput,
    trace_breakdown,
)

REAL_DIR = "real-size-models"  # under data_dir: written once, reused by later runs
REAL_VERSION = "real-1"
BACKLOG_FRAMES = 1000
@dataclass(frozen=True)
class Frame:
    """One benchmark frame: encoded image bytes and its captions."""

    name: str
    image: bytes
    captions: tuple[str, ...]


def synthetic_frame(seed: int) -> bytes:
    """A 1520×870 JPEG: coloured shapes on a noisy sky (the competition's frame size)."""
    rng = np.random.default_rng(seed)
    img = rng.integers(90, 140, (870, 1520, 3), dtype=np.uint8)
    for _ in range(6):
        x, y = int(rng.integers(0, 1400)), int(rng.integers(0, 780))
        w, h = int(rng.integers(20, 120)), int(rng.integers(10, 90))
        cv2.rectangle(img, (x, y), (x + w, y + h), [int(c) for c in rng.integers(0, 255, 3)], -1)
    ok, buf = cv2.imencode(".jpg", img)
    assert ok
    return buf.tobytes()


def bench_frames(n: int) -> list[Frame]:
    """The bundled photos, then synthetic frames, ``n`` in all."""
    from spotline.pipeline.demo import DEMO_FRAMES, demo_images

    frames = [Frame(name, img, DEMO_FRAMES[name]) for name, img in demo_images().items()]
    seed = 0
    while len(frames) < n:
        frames.append(Frame(f"synthetic-{seed}", synthetic_frame(seed),
                            ("grey missile", "yellow helicopter")))
        seed += 1
    return frames[:n]


# --- small statistics helpers -----------------------------------------------------------------
def one_at_a_time(frames: Sequence[Frame], rounds: int,
                  run_one: Callable[[Frame], tuple[float, Result]]) -> dict[str, Any]:
    """Each frame alone (the next one sent when its result is back), ``rounds`` times; per
    frame the best round is kept (a shared machine only ever adds time)."""
    best: list[tuple[float, Result]] = []
    for rnd in range(max(1, rounds)):
        for i, frame in enumerate(frames):
            got = run_one(frame)
            if rnd == 0:
                best.append(got)
            elif got[0] < best[i][0]:
                best[i] = got
    latencies = [lat for lat, _ in best]
    return {"latency": percentiles(latencies), "latencies_s": [round(v, 4) for v in latencies],
            "overheads_s": [round(lat - model_time(r), 5) for lat, r in best],
            "stages": trace_breakdown([r for _, r in best]),
            "boxes": [[list(b) for b in r.boxes] for _, r in best]}


def run_reference(settings: Settings, frames: Sequence[Frame], batched: bool = True,
                  light: int | None = None, rounds: int = 1) -> dict[str, Any]:
    """Reference.identify on the frames: all at once (``batched``), and one at a time (the
    light-load latency; with ``batched=False`` also the throughput). Best of ``rounds``."""
    from spotline.pipeline.reference import Reference

    with RssSampler({"reference": os.getpid()}) as rss:
        t0 = time.perf_counter()
        ref = Reference(settings)
        load_s = time.perf_counter() - t0
        ref.identify([frames[0].image], [frames[0].captions])  # warm-up (first-call costs)
        out: dict[str, Any] = {"mode": "reference", "frames": len(frames),
                               "load_s": round(load_s, 2), "rounds": rounds}

        def run_one(frame: Frame, ref: Any = ref) -> tuple[float, Result]:
            t0 = time.perf_counter()
            result = ref.identify([frame.image], [frame.captions])[0]
            return time.perf_counter() - t0, result

        if batched:
            best = float("inf")
            for _ in range(max(1, rounds)):
                t0 = time.perf_counter()
                results = ref.identify([f.image for f in frames], [f.captions for f in frames])
                best = min(best, time.perf_counter() - t0)
            out["batched_fps"] = round(len(frames) / best, 4)
            out["errors"] = sum(r.error is not None for r in results)
        single = one_at_a_time(frames if light is None else frames[:light], rounds, run_one)
        out["single_fps"] = round(len(single["latencies_s"]) / sum(single["latencies_s"]), 4)
        out["fps"] = max(out.get("batched_fps", 0.0), out["single_fps"])
        out.update(single)
        out["load_avg_after"] = round(os.getloadavg()[0], 2)
        del ref, run_one
        gc.collect()
    out["peak_rss_mb"] = rss.peak_mb()
    return out


# --- 3. the streaming pipeline ----------------------------------------------------------------
def _bench_settings(settings: Settings, **changes: Any) -> Settings:
    """A namespace of its own; quiet workers unless the user asked for DEBUG."""
    level = settings.log_level if settings.log_level.upper() == "DEBUG" else "ERROR"
    return settings.replace(namespace=f"bench{uuid.uuid4().hex[:8]}", log_level=level,
                            **changes)


def run_streaming(settings: Settings, frames: Sequence[Frame], workers: dict[str, int],
                  light: int = 0, burst: bool = True, timeout_s: float = 900.0,
                  rounds: int = 1) -> dict[str, Any]:
    """LocalPipeline on the frames: a burst of all of them (throughput, latency under load),
    then ``light`` of them one at a time (light-load latency). Best of ``rounds``."""
    from spotline.pipeline.supervisor import LocalPipeline, pipeline_stages
    from spotline.producer.client import Client

    stages = pipeline_stages(settings)
    n_children = sum(workers.get(s, 1) for s in stages)
    s = _bench_settings(settings, metrics_port=free_port_block(n_children))
    pipe = LocalPipeline(s, workers=workers, metrics=True, ready_timeout=timeout_s)
    t0 = time.perf_counter()
    with pipe as url:
        start_s = time.perf_counter() - t0
        assert pipe.supervisor is not None
        children = pipe.supervisor.children
        ports = [c.metrics_port for c in children if c.metrics_port]
        pids = {c.name: c.proc.pid for c in children if c.proc}
        with RssSampler(pids) as rss:
            client = Client.connect(url, s)
            warm = client.publish(frames[0].image, frames[0].captions, source_id="bench-warmup")
            client.await_result(warm, timeout=timeout_s)
            out: dict[str, Any] = {}
            if burst:
                runs = [_burst(client, frames, timeout_s, lambda: scrape(ports), stages)
                        for _ in range(max(1, rounds))]
                out.update(max(runs, key=lambda r: r["fps"]), rounds=len(runs))
            if light:
                out["light"] = one_at_a_time(frames[:light], rounds,
                                             lambda f: _one_frame(client, f, timeout_s))
            out["redis"] = client.t.memory()
            out["inbox_lengths_after"] = {st: client.t.length(client.keys.inbox(st))
                                          for st in stages}
            client.close()
    from spotline.stages import runtime

    out.update({"mode": "streaming", "workers": {st: workers.get(st, 1) for st in stages},
                "threads": {st: runtime.threads_for(settings, st) for st in stages[:-1]},
                "start_s": round(start_s, 2), "peak_rss_mb": rss.peak_mb(),
                "load_avg_after": round(os.getloadavg()[0], 2),
                "redis_url": "unix" if url.startswith("unix://") else "tcp"})
    return out


def _burst(client: Any, frames: Sequence[Frame], timeout_s: float,
           metrics: Callable[[], dict[str, float]], stages: Sequence[str]) -> dict[str, Any]:
    """Every frame at once: throughput, latency under load, stage phases, entry sizes."""
    before = metrics()
    ids = [client.publish(f.image, f.captions, source_id="bench") for f in frames]
    got = client.await_results(ids, timeout=timeout_s)
    burst = [got[i] for i in ids]
    during = delta(metrics(), before)
    return {"frames": len(frames), **throughput(burst),
            "errors": sum(r.error is not None for r in burst),
            "latency": percentiles([r.latency for r in burst]),
            "stages": trace_breakdown(burst), "phases": stage_phases(during, stages),
            "entry_sizes": entry_sizes(during)}


def _one_frame(client: Any, frame: Frame, timeout_s: float) -> tuple[float, Result]:
    """Publish one frame and wait for its result: (seconds, result)."""
    t0 = time.perf_counter()
    fid = client.publish(frame.image, frame.captions, source_id="bench-light")
    result = client.await_result(fid, timeout=timeout_s)
    return time.perf_counter() - t0, result


def slowest_stage(run: dict[str, Any]) -> str:
    """The model stage whose batches kept it busy longest in a streaming run."""
    busy = {st: v["busy_total_s"] for st, v in run["stages"].items()
            if st in ("detect", "upscale", "score")}
    return max(busy, key=busy.__getitem__) if busy else "detect"


# --- 4. Redis memory under a backlog ----------------------------------------------------------
def backlog_memory(settings: Settings, frames: Sequence[Frame], n: int) -> dict[str, Any]:
    """Publish ``n`` frames with no worker running; Redis memory before, with, and after
    deleting the backlog."""
    from spotline.producer.client import Client

    s = _bench_settings(settings)
    with EmbeddedRedis() as server:
        client = Client.connect(server.url, s)
        t, inbox = client.t, client.keys.inbox(FRAMES)
        client.publish(frames[0].image, frames[0].captions)  # stream and group exist
        t.trim(inbox, 0, exact=True)
        base = t.memory()["used_memory"]
        payload = 0
        t0 = time.perf_counter()
        for i in range(n):
            f = frames[i % len(frames)]
            client.publish(f.image, f.captions, source_id="bench-backlog")
            payload += len(f.image)
        publish_s = time.perf_counter() - t0
        held = t.memory()
        backlog = t.backlog(FRAMES)
        t.delete_keys(inbox)
        after = t.memory()["used_memory"]
        client.close()
    grown = held["used_memory"] - base
    return {"frames": n, "backlog_entries": backlog, "image_bytes": payload,
            "used_memory_before": base, "used_memory_with_backlog": held["used_memory"],
            "used_memory_peak": held["used_memory_peak"],
            "used_memory_after_delete": after,
            "bytes_per_frame": round(grown / n), "ratio_to_image_bytes": round(grown / payload, 4),
            "publish_fps": round(n / publish_s, 1),
            "high_water": settings.high_water,
            "bound_at_high_water_bytes": round(grown / n * settings.high_water)}


# --- real-size architectures -----------------------------------------------------------------
def ensure_real_size_models(data_dir: str | Path) -> dict[str, Path]:
    """Random models of the seed's real sizes under data_dir, written once (~1.5 min)."""
    from spotline.stages.tiny import ensure_written, write_real_size_architectures

    return ensure_written(Path(data_dir) / REAL_DIR, REAL_VERSION,
                          write_real_size_architectures, "real-size random architectures")


def seed_settings(settings: Settings) -> Settings:
    """The settings without the demo models' overlay (imgsz 448, no TTA, no upscaling...):
    every command applies it when no weights are set, but real-size models run at the seed's
    settings. Values the user changed from the overlay's are kept."""
    import dataclasses

    from spotline.train.demo import demo_overlay, is_demo

    if not is_demo(settings):
        return settings
    defaults = {f.name: f.default for f in dataclasses.fields(Settings)}
    return settings.replace(**{k: defaults[k] for k, v in demo_overlay().items()
                               if k in defaults and getattr(settings, k) == v})


def with_models(settings: Settings, paths: Mapping[str, str | Path]) -> Settings:
    """The settings with ``paths`` (detector, upscaler, scorer) as the three models, and one
    warm-up prediction at most instead of the seed's three (11+ s each at real size on a
    2-core CPU)."""
    return settings.replace(detector_weights=str(paths["detector"]),
                            upscaler_weights=str(paths["upscaler"]),
                            scorer_dir=str(paths["scorer"]), warmup=min(settings.warmup, 1))


def real_settings(settings: Settings) -> Settings:
    """The settings with the real-size random architectures as weights, at the seed's
    settings."""
    return with_models(seed_settings(settings), ensure_real_size_models(settings.data_dir))


# --- the whole run ----------------------------------------------------------------------------
def run_models(settings: Settings, frames: Sequence[Frame], light: int,
               timeout_s: float, say: Callable[[str], None], label: str,
               like_for_like: bool = True, rounds: int = 1) -> dict[str, Any]:
    """Reference, streaming with one worker per stage (with light load), streaming with two
    workers for the slowest stage, and (tiny) light load with the reference's thread count,
    on the same frames."""
    from spotline.stages import runtime

    say(f"[{label}] reference pipeline in-process on {len(frames)} frames...")
    ref = run_reference(settings, frames, batched=label == "tiny",
                        light=None if label != "tiny" else light, rounds=rounds)
    say(f"[{label}] reference: {ref['fps']:.3f} frames/s; streaming, one worker per stage...")
    one = run_streaming(settings, frames, {}, light=light, timeout_s=timeout_s, rounds=rounds)
    slow = slowest_stage(one)
    say(f"[{label}] streaming: {one['fps']:.3f} frames/s; again with two {slow} workers...")
    two = run_streaming(settings, frames, {slow: 2}, timeout_s=timeout_s, rounds=rounds)
    say(f"[{label}] streaming ({slow}x2): {two['fps']:.3f} frames/s")
    for run in (one, two):
        run["ratio_vs_reference"] = round(run["fps"] / ref["fps"], 4)
        run["steady_ratio_vs_reference"] = round(run["steady_fps"] / ref["fps"], 4)
    same = None
    cores = runtime.cpu_count()
    if like_for_like and label == "tiny" and settings.torch_threads == 0 and cores > 1:
        say(f"[{label}] light load with every stage on {cores} threads (as the reference)...")
        same = run_streaming(settings.replace(torch_threads=cores), frames, {}, light=light,
                             burst=False, timeout_s=timeout_s, rounds=rounds)
    return {"frames": [f.name for f in frames], "reference": ref, "streaming": one,
            "streaming_scaled": two, "slowest_stage": slow,
            "light_load": light_load(ref, one, same)}


def _paired_median(a: Sequence[float], b: Sequence[float]) -> float:
    """Median of the per-frame differences a - b, in ms."""
    return ms(float(np.median(np.subtract(a, b[:len(a)]))))


def light_load(ref: dict[str, Any], auto: dict[str, Any],
               same: dict[str, Any] | None = None) -> dict[str, Any]:
    """Streaming against reference latency, one frame at a time, paired by frame: raw
    latency, and overhead (latency minus the frame's stage work, which the model-time noise
    of a shared CPU does not blur). ``auto``: the pipeline with its default thread shares;
    ``same``: with every stage on the reference's thread count (the like-for-like figure)."""
    like = (same or auto)["light"]
    n = len(like["latencies_s"])
    ref_lat, ref_over = ref["latencies_s"][:n], ref["overheads_s"][:n]
    out = {
        "frames": n,
        "same_threads": same is not None,
        "reference_p50_ms": ms(float(np.median(ref_lat))),
        "streaming_p50_ms": ms(float(np.median(like["latencies_s"]))),
        "extra_p50_ms": _paired_median(like["latencies_s"], ref_lat),
        "reference_overhead_p50_ms": ms(float(np.median(ref_over))),
        "streaming_overhead_p50_ms": ms(float(np.median(like["overheads_s"]))),
        "extra_overhead_p50_ms": _paired_median(like["overheads_s"], ref_over),
        "stages": like["stages"],
    }
    if auto.get("light"):
        out["auto_threads_p50_ms"] = ms(float(np.median(auto["light"]["latencies_s"])))
        out["auto_threads_extra_p50_ms"] = _paired_median(auto["light"]["latencies_s"], ref_lat)
    return out
