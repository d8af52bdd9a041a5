"""`spotline bench`: figures measured in one run on this machine (never pass/fail).

One invocation measures, in order:

1. transport: one pipeline hop (encode → commit script XADD + ack → XREADGROUP → decode) for a
   10-crop 96×96×3 entry and a 1520×870 JPEG frame, over TCP and over the embedded server's
   unix socket;
2. tiny models: the in-process reference (``Reference.identify``) and the streaming pipeline
   (``LocalPipeline``: embedded Redis, one worker process per stage, then two workers for the
   slowest stage) on the same frames (the bundled photos and synthetic 1520×870 frames):
   frames/s, end-to-end latency percentiles, per-stage model time against queue wait, codec
   and Redis time, peak RSS per worker and Redis peak memory; then light load (one frame at
   a time) against the reference's latency;
3. Redis memory under a 1,000-frame backlog (no workers), then after deleting it;
4. optionally (``real=True``) the same with real-size random architectures (YOLOv9c at the
   seed's imgsz with TTA, SRVGG x4v3, SigLIP-large-patch16-384) on a few frames.

The report is a JSON-friendly dict (documented in docs/performance.md); ``table()`` prints it
and ``write_png()`` draws it.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from spotline.common.settings import Settings

from .hop import transport_bench
from .probes import machine_info, settings_info
from .report import table, targets, transport_lines, write_json, write_png
from .runs import (
    BACKLOG_FRAMES,
    Frame,
    backlog_memory,
    bench_frames,
    real_settings,
    run_models,
    synthetic_frame,
)

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class BenchOptions:
    """What one `spotline bench` run measures."""

    quick: bool = False
    frames: int = 24  # tiny-model frames (photos first, then synthetic)
    iterations: int = 300  # transport round trips per message
    real: bool = False
    real_frames: int = 3
    backlog: int = BACKLOG_FRAMES
    light_frames: int = 8  # light-load frames (one at a time)
    rounds: int = 2  # tiny models: each measurement's best of this many rounds
    timeout_s: float = 900.0

    @classmethod
    def quick_run(cls, **changes: Any) -> BenchOptions:
        """Few frames and round trips, tiny models only: seconds, for tests."""
        values: dict[str, Any] = {"quick": True, "frames": 4, "iterations": 60, "backlog": 100,
                                  "light_frames": 2, "rounds": 1, "real": False}
        values.update(changes)
        return cls(**values)


# --- frames -----------------------------------------------------------------------------------
def run_bench(settings: Settings, options: BenchOptions,
              say: Callable[[str], None] = lambda _m: None) -> dict[str, Any]:
    """Everything `spotline bench` measures, as one JSON-friendly dict."""
    t_start = time.perf_counter()
    report: dict[str, Any] = {"version": 1, "quick": options.quick, "machine": machine_info(),
                              "settings": settings_info(settings)}
    say(f"transport: {options.iterations} hops per message over TCP and a unix socket...")
    report["transport"] = transport_bench(settings, options.iterations)
    frames = bench_frames(options.frames)
    report["tiny"] = run_models(settings, frames, min(options.light_frames, len(frames)),
                                options.timeout_s, say, "tiny", like_for_like=not options.quick,
                                rounds=options.rounds)
    say(f"redis memory under a {options.backlog}-frame backlog...")
    report["backlog"] = backlog_memory(settings, frames, options.backlog)
    if options.real:
        real = real_settings(settings)
        report["real_settings"] = settings_info(real)
        report["real"] = run_models(real, bench_frames(options.real_frames), 1,
                                    options.timeout_s * 4, say, "real")
    if not options.quick:  # accuracy beside throughput: a fast wrong answer is no figure
        say("demo models: accuracy on held-out synthetic frames...")
        from spotline.train.demo import bench_accuracy

        report["demo"] = bench_accuracy(settings)
    report["targets"] = targets(report)
    report["machine"]["load_avg_end"] = [round(v, 2) for v in os.getloadavg()]
    report["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    return report


# --- targets ----------------------------------------------------------------------------------
@contextmanager
def _quiet_libraries() -> Iterator[None]:
    """Model libraries print progress bars and config warnings: keep the table readable."""
    loggers = [logging.getLogger(n) for n in ("transformers", "ultralytics", "spotline.stages")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def main(settings: Settings, options: BenchOptions, json_path: str | None = None,
         png_path: str | None = None, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run, then write the JSON and PNG if asked; returns the report."""
    with _quiet_libraries():
        report = run_bench(settings, options, say)
    if json_path:
        write_json(report, json_path)
    if png_path:
        write_png(report, png_path)
    return report


__all__ = ["BenchOptions", "Frame", "main", "run_bench", "synthetic_frame", "table",
           "transport_bench", "transport_lines", "write_json", "write_png"]
