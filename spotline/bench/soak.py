"""`spotline bench soak MINUTES`: a local pipeline fed at a fixed rate for that long.

It reports each process's resident memory (RSS) at the start, after the warm-up and at the end,
the slope of each after the warm-up (least squares over samples every ``sample_s``), Redis'
``used_memory`` at the same three points, and whether every frame got exactly one result
(results == frames). Target, for a pipeline meant to run for weeks: after the warm-up no
process grows by more than 20 MiB, and nothing is lost.

With ``clips`` (``spotline data synth --video`` folders) it publishes their frames in order,
looping, with their captions, as one source: in track mode (``tracking=true``) the track stage
then keeps that source's memory for `spotline ask`, and the report adds the memory as it grew
(records, bytes against the cap, minutes kept), its bytes per source-minute, and the time of
an answer over the whole window by the product's ``Asker`` (the first loads the text tower,
then five more; docs/ask.md).
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from spotline.common.errors import InputError
from spotline.common.settings import Settings
from spotline.common.transport import FRAME_FIELD, Transport

log = logging.getLogger(__name__)

GROWTH_LIMIT_MIB = 20.0
CAPTIONS = ("grey missile", "yellow helicopter")
SOURCE = "soak"


def soak_frame(seed: int, width: int = 640, height: int = 480) -> bytes:
    """A small JPEG with a few coloured boxes on a noisy background."""
    import cv2

    rng = np.random.default_rng(seed)
    img = rng.integers(90, 140, (height, width, 3), dtype=np.uint8)
    for _ in range(4):
        x, y = int(rng.integers(0, width - 80)), int(rng.integers(0, height - 60))
        w, h = int(rng.integers(20, 80)), int(rng.integers(10, 60))
        cv2.rectangle(img, (x, y), (x + w, y + h), [int(c) for c in rng.integers(0, 255, 3)], -1)
    ok, buf = cv2.imencode(".jpg", img)
    assert ok
    return buf.tobytes()


@dataclass
class Series:
    """One process's RSS over the run: (seconds since start, bytes)."""

    samples: list[tuple[float, int]] = field(default_factory=list)
    at_warm: int | None = None

    def add(self, t: float, rss: int) -> None:
        self.samples.append((t, rss))

    def slope_mib_per_min(self, after_s: float) -> float:
        pts = [(t, v) for t, v in self.samples if t >= after_s]
        if len(pts) < 3:
            return float("nan")
        ts = np.array([t for t, _ in pts]) / 60.0
        vs = np.array([v for _, v in pts]) / 2**20
        return float(np.polyfit(ts, vs, 1)[0])


@dataclass
class SoakReport:
    seconds: float
    rate: float
    warmup_s: float
    frames: int = 0
    results: int = 0
    duplicates: int = 0
    errors: int = 0
    rss: dict[str, dict[str, float]] = field(default_factory=dict)
    redis_used_memory: dict[str, int] = field(default_factory=dict)
    memory: dict[str, Any] | None = None  # the ask memory of the source (track mode)

    @property
    def lossless(self) -> bool:
        return self.results == self.frames and self.duplicates == 0

    def worst_growth_mib(self) -> float:
        return max((r["end_mib"] - r["warm_mib"] for r in self.rss.values()), default=0.0)

    def lines(self) -> list[str]:
        out = [f"soak: {self.seconds / 60:.1f} min at {self.rate:g} frames/s, warm-up "
               f"{self.warmup_s:.0f} s",
               f"{'process':<14} {'start MiB':>10} {'warm MiB':>9} {'end MiB':>8} "
               f"{'growth':>7} {'slope MiB/min':>14}"]
        for name, r in self.rss.items():
            out.append(f"{name:<14} {r['start_mib']:>10.1f} {r['warm_mib']:>9.1f} "
                       f"{r['end_mib']:>8.1f} {r['end_mib'] - r['warm_mib']:>+7.1f} "
                       f"{r['slope_mib_per_min']:>+14.3f}")
        m = self.redis_used_memory
        out.append(f"redis used_memory: start {m.get('start', 0) / 2**20:.1f} MiB, warm "
                   f"{m.get('warm', 0) / 2**20:.1f} MiB, end {m.get('end', 0) / 2**20:.1f} MiB")
        verdict = "ok" if self.lossless else "LOST OR DOUBLED"
        out.append(f"frames {self.frames}, results {self.results} (errors {self.errors}, "
                   f"duplicates {self.duplicates}): results == frames: "
                   f"{self.results == self.frames} [{verdict}]")
        growth = self.worst_growth_mib()
        verdict_growth = "met" if growth <= GROWTH_LIMIT_MIB else "MISSED"
        out.append(f"largest growth after warm-up: {growth:+.1f} MiB (target <= "
                   f"{GROWTH_LIMIT_MIB:.0f} MiB: {verdict_growth})")
        if self.memory is not None:
            out.extend(memory_lines(self.memory))
        return out

    def as_json(self) -> dict[str, Any]:
        return {"seconds": self.seconds, "rate": self.rate, "warmup_s": self.warmup_s,
                "frames": self.frames, "results": self.results, "errors": self.errors,
                "duplicates": self.duplicates, "rss": self.rss,
                "redis_used_memory": self.redis_used_memory,
                "worst_growth_mib": self.worst_growth_mib(), "lossless": self.lossless,
                "memory": self.memory}


def memory_lines(m: dict[str, Any]) -> list[str]:
    """The ask memory's part of the report."""
    if not m["samples"]:
        return ["ask memory: none kept (is track mode on, SPOTLINE_TRACKING=true?)"]
    peak = max(b for _, _, b, _ in m["samples"])
    verdict = "within" if peak <= m["cap_bytes"] else "OVER"
    out = [f"ask memory of source {m['source']!r}: cap {m['cap_bytes']:,} bytes, retention "
           f"{m['retention_min']:g} min, embeddings {m['precision']}",
           f"{'minute':>7} {'records':>8} {'bytes':>11} {'kept (min)':>11}"]
    step = max(1, len(m["samples"]) // 12)
    shown = m["samples"][::step] + ([m["samples"][-1]] if (len(m["samples"]) - 1) % step
                                    else [])
    for t, n, b, kept in shown:
        out.append(f"{t / 60:>7.1f} {n:>8} {b:>11,} {kept:>11.2f}")
    out.append(f"peak {peak:,} bytes: {verdict} the cap; {m['bytes_per_minute'] / 1000:.0f} KB "
               f"per source-minute (the last sample's bytes over the minutes it keeps)")
    if m.get("answer_ms"):
        after = m["answer_ms"][1:]
        out.append(f"an answer over the whole window ({m['answer_records']} records, caption "
                   f"{m['answer_caption']!r}): first {m['answer_ms'][0]:.0f} ms (text tower "
                   f"loaded), then median {float(np.median(after)):.0f} ms "
                   f"({', '.join(f'{v:.0f}' for v in after)}); best track p={m['answer_p']}")
    return out


class _Memory:
    """The source's ask memory (the stage's own store), sampled beside the RSS."""

    def __init__(self, settings: Settings, transport: Transport) -> None:
        from spotline.common.trackmemory import MemoryStore

        self.settings = settings
        self.transport = transport
        self.store = MemoryStore.for_settings(settings, transport)
        self.t0 = time.monotonic()
        self.samples: list[tuple[float, int, int, float]] = []  # t, records, bytes, minutes

    def sample(self) -> None:
        st = self.store.stats(SOURCE)
        if st["records"]:
            self.samples.append((time.monotonic() - self.t0, int(st["records"]),
                                 int(st["bytes"]), (st["newest"] - st["oldest"]) / 60.0))

    def report(self) -> dict[str, Any]:
        last = self.samples[-1] if self.samples else (0.0, 0, 0, 0.0)
        return {"source": SOURCE, "cap_bytes": self.store.max_bytes,
                "retention_min": self.store.retention_s / 60.0,
                "precision": self.settings.ask_precision, "samples": self.samples,
                "bytes_per_minute": last[2] / last[3] if last[3] > 0 else 0.0}

    def ask(self, caption: str, seconds: float, repeats: int = 6) -> dict[str, Any]:
        """One caption asked over the whole window ``repeats`` times by the product's Asker."""
        from spotline.results.ask import Asker

        asker = Asker(self.settings, self.transport)
        times = []
        answer = None
        for _ in range(repeats):
            t0 = time.perf_counter()
            answer = asker.ask(caption, [SOURCE], since_s=seconds + 60.0)
            times.append((time.perf_counter() - t0) * 1000.0)
        assert answer is not None
        best = answer.matches[0].probability if answer.matches else float("nan")
        return {"answer_ms": times, "answer_caption": caption,
                "answer_records": self.store.stats(SOURCE)["records"],
                "answer_p": None if np.isnan(best) else round(float(best), 3)}


class _Meter:
    """RSS of named processes and Redis' used_memory, sampled on demand."""

    def __init__(self, pids: dict[str, int], transport: Transport,
                 memory: _Memory | None = None) -> None:
        import psutil

        self.procs = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.series = {name: Series() for name in pids}
        self.t = transport
        self.t0 = time.monotonic()
        self.memory = memory

    def sample(self) -> None:
        import psutil

        if self.memory is not None:
            self.memory.sample()
        t = time.monotonic() - self.t0
        for name, proc in self.procs.items():
            try:
                self.series[name].add(t, proc.memory_info().rss)
            except psutil.Error:  # a restarted worker: the supervisor says so in the log
                pass

    def used_memory(self) -> int:
        return self.t.memory()["used_memory"]

    def mark_warm(self) -> None:
        for s in self.series.values():
            if s.samples:
                s.at_warm = s.samples[-1][1]


def clip_frames(clips: str | os.PathLike[str]) -> list[tuple[bytes, tuple[str, ...]]]:
    """Every frame of the clips under ``clips`` (a clip folder or a folder of them), in order,
    with its captions."""
    from spotline.bench.video import find_clips, load_clip

    return [(f.image, f.captions) for folder in find_clips(clips) for f in load_clip(folder)]


def run_soak(settings: Settings, seconds: float, rate: float = 1.0,
             warmup_s: float | None = None, sample_s: float = 10.0,
             echo: Callable[[str], None] = print,
             clips: str | os.PathLike[str] | None = None) -> SoakReport:
    """Run the pipeline locally, publish ``rate`` frames/s for ``seconds``, and measure."""
    from spotline.pipeline.supervisor import LocalPipeline
    from spotline.producer.client import Client

    warmup_s = min(120.0, seconds / 5) if warmup_s is None else warmup_s
    s = settings.replace(namespace=f"soak{uuid.uuid4().hex[:8]}")
    report = SoakReport(seconds=seconds, rate=rate, warmup_s=warmup_s)
    frames = (clip_frames(clips) if clips is not None
              else [(soak_frame(i), CAPTIONS) for i in range(8)])
    if not frames:
        raise InputError(f"{clips}: no frames")
    pipe = LocalPipeline(s, ready_timeout=600)
    with pipe as url:
        client = Client.connect(url, s)
        assert pipe.supervisor is not None
        pids = {c.name: c.proc.pid for c in pipe.supervisor.children if c.proc}
        if pipe.server is not None and pipe.server.proc is not None:
            pids["redis-server"] = pipe.server.proc.pid
        pids["soak (client)"] = os.getpid()
        mem = _Memory(s, client.t) if s.tracking and s.ask_memory else None
        meter = _Meter(pids, client.t, mem)
        meter.sample()
        report.redis_used_memory["start"] = meter.used_memory()
        echo(f"soak: pipeline ready ({', '.join(pids)}); publishing {rate:g} frames/s for "
             f"{seconds:.0f} s")
        ids = _publish(client, frames, seconds, rate, warmup_s, sample_s, meter, report, echo)
        results = client.await_results(ids, timeout=max(120.0, 60 / rate))
        meter.sample()
        report.redis_used_memory["end"] = meter.used_memory()
        report.frames = len(ids)
        report.results = len(results)
        report.errors = sum(1 for r in results.values() if r.error)
        report.duplicates = _duplicates(client, set(ids))
        if mem is not None:
            report.memory = mem.report()
            if mem.samples:
                report.memory |= mem.ask(frames[0][1][0], seconds)
        client.close()
    for name, series in meter.series.items():
        if not series.samples:
            continue
        warm = series.at_warm if series.at_warm is not None else series.samples[0][1]
        report.rss[name] = {"start_mib": series.samples[0][1] / 2**20, "warm_mib": warm / 2**20,
                            "end_mib": series.samples[-1][1] / 2**20,
                            "slope_mib_per_min": series.slope_mib_per_min(warmup_s)}
    return report


def _publish(client: Any, frames: list[tuple[bytes, tuple[str, ...]]], seconds: float,
             rate: float, warmup_s: float, sample_s: float, meter: _Meter, report: SoakReport,
             echo: Callable[[str], None]) -> list[str]:
    """Publish at a fixed rate (a schedule, not a sleep after each: no drift)."""
    ids: list[str] = []
    start = time.monotonic()
    next_sample = start + sample_s
    warm_marked = False
    n = 0
    while True:
        now = time.monotonic()
        if now - start >= seconds:
            break
        if not warm_marked and now - start >= warmup_s:
            meter.sample()
            meter.mark_warm()
            report.redis_used_memory["warm"] = meter.used_memory()
            warm_marked = True
            echo(f"soak: warm-up done after {warmup_s:.0f} s ({len(ids)} frames)")
        if now >= next_sample:
            meter.sample()
            next_sample += sample_s
        due = start + n / rate
        if now < due:
            time.sleep(min(due - now, 0.5))
            continue
        image, captions = frames[n % len(frames)]
        ids.append(client.publish(image, captions, source_id=SOURCE))
        n += 1
    if not warm_marked:
        meter.mark_warm()
        report.redis_used_memory["warm"] = meter.used_memory()
    return ids


def _duplicates(client: Any, ids: set[str]) -> int:
    """Entries in the results stream for these frames beyond one each (each entry names its
    frame in its FRAME_FIELD)."""
    counts: Counter[str] = Counter()
    for _, fields in client.t.entries(client.keys.results):
        fid = fields.get(FRAME_FIELD, b"").decode()
        if fid in ids:
            counts[fid] += 1
    return sum(c - 1 for c in counts.values() if c > 1)
