"""What a bench run reads off the machine and the pipeline: percentiles, per-process RSS,
Prometheus scrapes (stage phases, entry sizes), trace breakdowns, machine and settings."""

from __future__ import annotations

import json
import logging
import os
import platform
import socket
import statistics
import threading
from collections.abc import Sequence
from pathlib import Path
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


# --- the machine: ISA flags and matmul peaks, printed before every bench ----------------------
PROBE_SIZE = 1024  # M = N = K of the probe's matmuls (2.1 GFLOP each)
PROBE_RUNS = 5  # best of this many after one warm-up


def _best_s(call: Any, runs: int) -> float:
    import time

    call()
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - t0)
    return best


def _torch_peaks(n: int, runs: int, threads: int) -> dict[str, float]:
    """torch fp32 and bf16 matmuls, and int8 (``torch._int_mm``) where this build has it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    ops = 2 * n ** 3
    out: dict[str, float] = {}
    try:
        for name, dtype in (("torch_fp32_gflops", torch.float32),
                            ("torch_bf16_gflops", torch.bfloat16)):
            a, b = torch.ones(n, n, dtype=dtype), torch.ones(n, n, dtype=dtype)
            out[name] = round(ops / _best_s(lambda a=a, b=b: a @ b, runs) / 1e9, 1)
        a8 = torch.ones(n, n, dtype=torch.int8)
        try:
            out["torch_int8_gops"] = round(ops / _best_s(lambda: torch._int_mm(a8, a8), runs)
                                           / 1e9, 1)
        except (RuntimeError, AttributeError, NotImplementedError):
            pass  # no int8 matmul on this build
    finally:
        torch.set_num_threads(before)
    return out


def _openvino_matmul(n: int, int8: bool) -> Any:
    """An OpenVINO model of one n×n matmul against constant weights; ``int8``: both operands
    behind FakeQuantize nodes (u8 activations, i8 weights), which the CPU plugin runs as an
    int8 matmul (VNNI/AMX) as it does NNCF's int8 models."""
    import openvino as ov
    from openvino import opset13 as ops

    x = ops.parameter([n, n], np.float32, name="x")
    w: Any = ops.constant(np.full((n, n), 0.5, np.float32))
    if int8:
        lo, hi = ops.constant(np.float32(0.0)), ops.constant(np.float32(2.55))
        wlo, whi = ops.constant(np.float32(-1.27)), ops.constant(np.float32(1.27))
        x_in: Any = ops.fake_quantize(x, lo, hi, lo, hi, 256)
        w = ops.fake_quantize(w, wlo, whi, wlo, whi, 255)
    else:
        x_in = x
    return ov.Model([ops.matmul(x_in, w, False, False)], [x])


def _openvino_peaks(n: int, runs: int, threads: int) -> dict[str, Any]:
    """OpenVINO's CPU plugin: f32 and bf16 with explicit INFERENCE_PRECISION_HINTs (its
    default is bf16 wherever the CPU has it), and int8; with the precision each ran at."""
    import openvino as ov

    core = ov.Core()
    x = np.ones((n, n), np.float32)
    ops = 2 * n ** 3
    out: dict[str, Any] = {}
    for name, int8, hint in (("openvino_f32_gflops", False, "f32"),
                             ("openvino_bf16_gflops", False, "bf16"),
                             ("openvino_int8_gops", True, "f32")):
        config = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY",
                  "INFERENCE_NUM_THREADS": threads}
        compiled = core.compile_model(_openvino_matmul(n, int8), "CPU", config)
        request = compiled.create_infer_request()
        out[name] = round(ops / _best_s(lambda r=request: r.infer({0: x}), runs) / 1e9, 1)
        if hint == "bf16":  # a CPU without bf16 units runs the bf16 hint at f32
            runs_as = compiled.get_property("INFERENCE_PRECISION_HINT")
            out["openvino_bf16_runs_as"] = runs_as.to_string() if hasattr(
                runs_as, "to_string") else str(runs_as)
    return out


def probe_cpu(matmul: bool = True, size: int = PROBE_SIZE, runs: int = PROBE_RUNS
              ) -> dict[str, Any]:
    """This machine as a bench sees it, measured in this process: the CPU's model and ISA
    flags (from /proc/cpuinfo), the threads the models get, the load average, and the peak
    fp32, bf16 and int8 matmul rates of ``size``³ matmuls (best of ``runs``) through torch
    and OpenVINO, each where installed (about a second in all on 2 cores)."""
    import importlib.util
    import time

    from spotline.stages import runtime
    from spotline.stages.backends.cpu import cpu_info

    t0 = time.perf_counter()
    cpu = cpu_info()
    threads = runtime.cpu_count()
    probe: dict[str, Any] = {"cpu_model": cpu.model, "isa": cpu.isa(), "threads": threads,
                             "load_avg_before": [round(v, 2) for v in os.getloadavg()],
                             "peaks": {}, "matmul": f"{size}x{size}x{size}, best of {runs}, "
                                                   "in-process"}
    if matmul:
        for module, measure in (("torch", _torch_peaks), ("openvino", _openvino_peaks)):
            if importlib.util.find_spec(module) is None:
                continue
            try:
                probe["peaks"].update(measure(size, runs, threads))
            except Exception as exc:  # noqa: BLE001 - a probe failure is reported, not fatal
                probe["peaks"][f"{module}_error"] = f"{type(exc).__name__}: {exc}"
    probe["probe_s"] = round(time.perf_counter() - t0, 2)
    return probe


def probe_lines(probe: dict[str, Any]) -> list[str]:
    """The probe as the lines a bench prints first."""
    have = [f for f, on in probe["isa"].items() if on]
    lacks = [f for f, on in probe["isa"].items() if not on]
    lines = [f"machine: {probe['cpu_model']}, {probe['threads']} threads; ISA "
             f"{' '.join(have) or 'none of the listed'}"
             + (f" (not: {' '.join(lacks)})" if lacks else "")]
    peaks = probe.get("peaks", {})
    parts = []
    for prefix, label in (("torch", "torch"), ("openvino", "OpenVINO")):
        cells = [f"{kind} {peaks[key]:,.0f}" for key, kind in (
            (f"{prefix}_fp32_gflops", "fp32"), (f"{prefix}_f32_gflops", "f32"),
            (f"{prefix}_bf16_gflops", "bf16"), (f"{prefix}_int8_gops", "int8"))
            if key in peaks]
        if prefix == "openvino" and peaks.get("openvino_bf16_runs_as") not in (None, "bf16"):
            cells.append(f"(bf16 hint runs as {peaks['openvino_bf16_runs_as']})")
        if cells:
            parts.append(f"{label} " + ", ".join(cells))
        if f"{prefix}_error" in peaks:
            parts.append(f"{label} failed: {peaks[f'{prefix}_error']}")
    if parts:
        lines.append(f"matmul peaks (GFLOPS, int8 GOPS; {probe['matmul']}): "
                     + "; ".join(parts))
    lines.append(f"load average before: {' '.join(f'{v:.2f}' for v in probe['load_avg_before'])}"
                 f" (probe {probe['probe_s']:.2f} s)")
    return lines


def end_load(probe: dict[str, Any]) -> str:
    """Record the load average after the bench in ``probe``; the line that says it."""
    probe["load_avg_after"] = [round(v, 2) for v in os.getloadavg()]
    return (f"load average after: {' '.join(f'{v:.2f}' for v in probe['load_avg_after'])} "
            f"(before: {' '.join(f'{v:.2f}' for v in probe['load_avg_before'])})")


def add_probe(command: Any) -> Any:
    """Make a `bench` subcommand (stream, real, backends, soak, video) start by probing and
    printing the machine (``probe_cpu``) and end with the load average; a --json report gets
    the probe as its ``probe`` field. Wraps the command's callback (cli/bench.py applies it to
    each subcommand)."""
    import functools

    import click

    original = command.callback

    @functools.wraps(original)
    def callback(*args: Any, **kwargs: Any) -> Any:
        probe = probe_cpu()
        for line in probe_lines(probe):
            click.echo(line)
        click.get_current_context().meta["spotline.probe"] = probe
        try:
            return original(*args, **kwargs)
        finally:
            click.echo(end_load(probe))
            json_path = kwargs.get("json_path")
            if json_path and Path(json_path).is_file():
                _add_to_json(Path(json_path), probe)

    command.callback = callback
    return command


def _add_to_json(path: Path, probe: dict[str, Any]) -> None:
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if isinstance(report, dict):
        report["probe"] = probe
        path.write_text(json.dumps(report, indent=2, default=str))
