"""What a bench run reads off the machine and the pipeline: percentiles, per-process RSS,
Prometheus scrapes (stage phases, entry sizes), trace breakdowns, machine and settings."""

from __future__ import annotations

import logging
import os
import platform
import socket
import statistics
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from spotline.common.envelope import Result
from spotline.common.settings import Settings

log = logging.getLogger("spotline.bench")

PERCENTILES = (50, 95, 99)
# Targets of the performance issue (docs/performance.md): figures, never a test failure.
def percentiles(values_s: Sequence[float]) -> dict[str, float]:
    """p50/p95/p99 and mean of durations in seconds, as milliseconds."""
    if not values_s:
        return {"n": 0}
    arr = np.asarray(values_s, dtype=np.float64) * 1000
    out: dict[str, float] = {f"p{p}_ms": float(np.percentile(arr, p)) for p in PERCENTILES}
    out["mean_ms"] = float(arr.mean())
    out["n"] = int(arr.size)
    return out


def ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


# --- 1. transport -----------------------------------------------------------------------------
class RssSampler:
    """Samples the resident set size of some processes in a thread; keeps each one's peak."""

    def __init__(self, pids: dict[str, int], every_s: float = 0.2) -> None:
        import psutil

        self.procs = {}
        for name, pid in pids.items():
            try:
                self.procs[name] = psutil.Process(pid)
            except psutil.Error:
                continue
        self.peak: dict[str, int] = dict.fromkeys(self.procs, 0)
        self._every = every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="rss-sampler")

    def sample(self) -> None:
        import psutil

        for name, proc in self.procs.items():
            try:
                self.peak[name] = max(self.peak[name], proc.memory_info().rss)
            except psutil.Error:
                pass

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            self.sample()

    def __enter__(self) -> RssSampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def peak_mb(self) -> dict[str, float]:
        return {name: round(v / 2**20, 1) for name, v in self.peak.items()}


# --- traces -----------------------------------------------------------------------------------
def trace_breakdown(results: Sequence[Result]) -> dict[str, dict[str, float]]:
    """Per stage, from each result's trace rows (stage, enqueued, started, finished):
    mean queue wait, mean busy time (decode + model of the batch the frame was in), mean hop
    into the stage (encode + commit of the stage before, or the producer's publish), the total
    busy time of its batches (each counted once) and the batch count. ``publish`` is the
    collector's publish of the result."""
    rows: dict[str, dict[str, list[float]]] = {}
    batches: dict[str, set[tuple[float, float]]] = {}
    for res in results:
        prev_end = res.capture_time
        for stage, enq, start, end in res.trace:
            r = rows.setdefault(stage, {"queue_wait": [], "busy": [], "hop_in": []})
            r["queue_wait"].append(max(0.0, start - enq))
            r["busy"].append(end - start)
            r["hop_in"].append(max(0.0, enq - prev_end))
            batches.setdefault(stage, set()).add((start, end))
            prev_end = end
        rows.setdefault("publish", {"queue_wait": [], "busy": [], "hop_in": []})[
            "hop_in"].append(max(0.0, res.finished_time - prev_end))
    out: dict[str, dict[str, float]] = {}
    for stage, r in rows.items():
        spans = batches.get(stage, set())
        out[stage] = {f"{k}_ms": ms(statistics.fmean(v)) if v else 0.0 for k, v in r.items()}
        out[stage]["busy_total_s"] = round(sum(e - s for s, e in spans), 4)
        out[stage]["batches"] = len(spans)
    return out


def model_time(result: Result) -> float:
    """Seconds the frame spent in stage work (the sum of its trace rows' busy times)."""
    return sum(end - start for _stage, _enq, start, end in result.trace)


# --- worker metrics ---------------------------------------------------------------------------
def free_port_block(n: int) -> int:
    """A base port with ``n`` free consecutive ports after it (for the workers' /metrics)."""
    for _ in range(50):
        base = int(np.random.default_rng().integers(20000, 40000))
        try:
            socks = []
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
        return base
    raise RuntimeError("no block of free ports for the workers' /metrics")


def scrape(ports: Sequence[int]) -> dict[str, float]:
    """Sum the workers' /metrics series we report over their ports: keys such as
    ``stage_seconds_sum|detect|model`` and ``entry_bytes_count|score``."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    totals: dict[str, float] = {}
    for port in ports:
        try:
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        except httpx.HTTPError as exc:
            log.warning("cannot scrape /metrics on port %d: %s", port, exc)
            continue
        for family in text_string_to_metric_families(text):
            if family.name not in ("spotline_stage_seconds", "spotline_entry_bytes",
                                   "spotline_batch_size"):
                continue
            for sample in family.samples:
                if not sample.name.endswith(("_sum", "_count", "_bucket")):
                    continue
                labels = [sample.labels.get(k, "") for k in ("stage", "phase", "stream", "le")]
                key = "|".join([sample.name.removeprefix("spotline_"),
                                *[v for v in labels if v]])
                totals[key] = totals.get(key, 0.0) + float(sample.value)
    return totals


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items()}


def stage_phases(m: dict[str, float], stages: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per stage and entry, in ms: queue wait, model, codec (decode + encode) and Redis (the
    commit), from the workers' histograms; also entries and mean batch size."""
    out = {}
    for stage in stages:
        def total(phase: str, what: str = "sum", stage: str = stage) -> float:
            return m.get(f"stage_seconds_{what}|{stage}|{phase}", 0.0)
        entries = total("queue_wait", "count")
        batches = m.get(f"batch_size_count|{stage}", 0.0)
        per = max(1.0, entries)
        out[stage] = {
            "entries": int(entries),
            "mean_batch": round(m.get(f"batch_size_sum|{stage}", 0.0) / batches, 2)
            if batches else 0.0,
            "queue_wait_ms": ms(total("queue_wait") / per),
            # the model phase is observed once per batch as batch time / batch size
            "model_ms": ms(total("model") / max(1.0, total("model", "count"))),
            "codec_ms": ms((total("decode") + total("encode")) / per),
            "redis_ms": ms(total("redis") / per),
        }
    return out


def entry_sizes(m: dict[str, float]) -> dict[str, dict[str, float]]:
    """Mean and bucketed max size of the entries written to each stream."""
    out = {}
    for key, count in m.items():
        if not key.startswith("entry_bytes_count|") or count <= 0:
            continue
        stream = key.split("|", 1)[1]
        mean = m.get(f"entry_bytes_sum|{stream}", 0.0) / count
        buckets = sorted((float(k.rsplit("|", 1)[1]), v) for k, v in m.items()
                         if k.startswith(f"entry_bytes_bucket|{stream}|"))
        max_le = next((le for le, c in buckets if c >= count), float("inf"))
        out[stream] = {"entries": int(count), "mean_bytes": round(mean),
                       "max_bytes_le": max_le if max_le != float("inf") else None}
    return out


# --- 2. the in-process reference --------------------------------------------------------------
def redis_memory(r: Any) -> dict[str, int]:
    info = r.info("memory")
    return {"used_memory": int(info["used_memory"]),
            "used_memory_peak": int(info["used_memory_peak"])}


def machine_info() -> dict[str, Any]:
    import torch

    from spotline.stages import runtime

    cpus = runtime.cpu_count()
    return {"cpus": cpus, "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.cuda.is_available(),
            "load_avg": [round(v, 2) for v in os.getloadavg()]}


def settings_info(settings: Settings) -> dict[str, Any]:
    from spotline.stages import runtime

    keys = ("imgsz", "tta", "warmup", "upscale", "max_det", "crops_per_part", "batch_detect",
            "batch_upscale", "batch_score", "batch_collect", "max_wait_ms", "block_ms",
            "torch_threads", "device")
    out: dict[str, Any] = {k: getattr(settings, k) for k in keys}
    out["threads"] = {st: runtime.threads_for(settings, st) for st in ("detect", "upscale",
                                                                       "score")}
    return out


def throughput(results: Sequence[Result]) -> dict[str, float]:
    """frames/s over the whole burst (first publish to last result: pipeline fill and drain
    included), and steady frames/s between the first and the last result."""
    done = sorted(r.finished_time for r in results)
    span = done[-1] - min(r.capture_time for r in results)
    steady = (len(done) - 1) / (done[-1] - done[0]) if len(done) > 2 and done[-1] > done[0] \
        else len(done) / span
    return {"fps": round(len(results) / span, 4), "steady_fps": round(steady, 4),
            "makespan_s": round(span, 3)}
