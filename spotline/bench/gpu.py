"""`python -m spotline.bench.gpu`: the backends table on an accelerator (the GPU figures of
docs/performance.md), in one run
with a time budget, written as it goes (``gpu.json`` and ``gpu.txt`` in ``--out``).

Per model (YOLOv9c at the seed's imgsz with and without TTA, SRVGG x4v3, SigLIP-large-384's
vision tower for 8 and 32 crops and its text tower), with the same code the stages run: torch
fp32 and fp16 (settings ``device`` and ``half``), timed with CUDA synchronisation after
warm-ups (median of ``runs``); ONNX Runtime where its build has a provider for the device
(CUDA/TensorRT on a GPU; the row says why when it has none); then the in-process reference
(spotline/pipeline/reference.py: the pipeline's stage code, no Redis) at the seed's settings (imgsz
1600, TTA, upscaling on, fp16) on synthetic 1520×870 frames: frames/s and latency; and the
streaming pipeline (embedded redis-server, one worker process per stage) on the same frames.

Every section runs on its own: an error is recorded and the next section runs. Figures only,
never pass/fail (docs/performance.md)."""

from __future__ import annotations

import gc
import json
import platform
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click
import numpy as np

from spotline.bench.probes import end_load, probe_cpu, probe_lines
from spotline.common.settings import Settings, load_settings

SECTIONS = ("torch", "reference", "streaming", "onnx")  # in the order they run
CAPTIONS = ("grey missile", "yellow helicopter", "white commercial aircraft", "red drone")
VISION_BATCHES = (8, 32, 64)  # crops per SigLIP vision call
DETECT_BATCH = 8  # frames per detector call in the batched row (the detect stage batches frames)
ORT_GPU_NOTE = ("onnxruntime-gpu's cp312 x86-64 wheel (1.31.1) is 243 MiB: over the 64 MiB a "
                "device call can carry, and the device image's onnxruntime is a CPU build")


class Recorder:
    """The report so far: each figure is printed, appended to gpu.txt and gpu.json rewritten."""

    def __init__(self, out: Path | None, budget_s: float) -> None:
        self.out = out
        self.t0 = time.perf_counter()
        self.budget_s = budget_s
        self.report: dict[str, Any] = {"version": 1, "sections": {}}
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            (out / "gpu.txt").write_text("")

    def left_s(self) -> float:
        return self.budget_s - (time.perf_counter() - self.t0)

    def say(self, line: str) -> None:
        line = f"[{time.perf_counter() - self.t0:6.1f}s] {line}"
        print(line, flush=True)
        if self.out is not None:
            with (self.out / "gpu.txt").open("a") as fh:
                fh.write(line + "\n")

    def put(self, section: str, key: str, value: Any) -> None:
        self.report["sections"].setdefault(section, {})[key] = value
        self.report["elapsed_s"] = round(time.perf_counter() - self.t0, 1)
        if self.out is not None:
            (self.out / "gpu.json").write_text(json.dumps(self.report, indent=1, default=str))

    def section(self, name: str, run: Callable[[], None], needs_s: float = 0.0) -> None:
        """Run one section; an error (or too little budget left) is recorded, not raised."""
        if self.left_s() < needs_s:
            self.say(f"{name}: skipped, {self.left_s():.0f} s of the budget left")
            self.put(name, "skipped", f"budget: {self.left_s():.0f} s left, needs ~{needs_s:.0f}")
            return
        self.say(f"--- {name}")
        try:
            run()
        except Exception as exc:  # noqa: BLE001 - one section's failure must not end the run
            self.say(f"{name}: error {type(exc).__name__}: {exc}")
            self.put(name, "error", "".join(traceback.format_exception(exc)[-6:]))


# --- timing -----------------------------------------------------------------------------------
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def time_call(call: Callable[[], object], device: str, runs: int,
              warmup: int = 2) -> dict[str, Any]:
    """Median, min and max seconds of ``runs`` calls after ``warmup`` calls, each call
    bracketed by a device synchronisation (CUDA work is asynchronous)."""
    for _ in range(warmup):
        call()
    _sync(device)
    times = []
    for _ in range(max(1, runs)):
        t0 = time.perf_counter()
        call()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return {"median_s": round(statistics.median(times), 5), "min_s": round(min(times), 5),
            "max_s": round(max(times), 5), "runs": len(times)}


def _gpu_memory(device: str) -> dict[str, Any]:
    if not device.startswith("cuda"):
        return {}
    import torch

    peak = torch.cuda.max_memory_allocated() / 2**20
    torch.cuda.reset_peak_memory_stats()
    return {"peak_gpu_mb": round(peak, 1)}


def _release(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# --- inputs -----------------------------------------------------------------------------------
def _frame() -> np.ndarray:
    import cv2

    from spotline.bench.runs import synthetic_frame

    return cv2.imdecode(np.frombuffer(synthetic_frame(0), np.uint8), cv2.IMREAD_COLOR)


def _crops(side: int, n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (side, side, 3), dtype=np.uint8) for _ in range(n)]


# --- sections ---------------------------------------------------------------------------------
def probe(rec: Recorder) -> None:
    """The CPU first (bench/probes.py): its ISA flags and matmul peaks, the load average."""
    found = probe_cpu()
    for line in probe_lines(found):
        rec.say(line)
    for key, value in found.items():
        rec.put("probe", key, value)


def environment(rec: Recorder, device: str) -> None:
    """nvidia-smi, torch and CUDA, onnxruntime and its providers."""
    info: dict[str, Any] = {"python": platform.python_version(), "device": device}
    try:
        smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30)
        info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        info["nvidia_smi"] = f"unavailable: {exc}"
    rec.say(info["nvidia_smi"])
    from spotline.stages.libs import offline_env, torchvision_shim

    offline_env()  # before the model libraries are imported: no network
    import torch

    info.update(torch=torch.__version__, cuda=torch.version.cuda,
                cuda_available=torch.cuda.is_available(), cudnn=torch.backends.cudnn.version(),
                tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
                tf32_cudnn=torch.backends.cudnn.allow_tf32)
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        import onnxruntime as ort

        info.update(onnxruntime=ort.__version__, ort_providers=ort.get_available_providers())
    except ImportError as exc:
        info["onnxruntime"] = f"missing: {exc}"
    torchvision_shim()  # basicsr/realesrgan import a module torchvision removed
    for name in ("ultralytics", "transformers", "realesrgan", "basicsr", "cv2", "numpy"):
        try:
            info[name] = getattr(__import__(name), "__version__", "?")
        except Exception as exc:  # noqa: BLE001 - report any import failure
            info[name] = f"import failed: {type(exc).__name__}: {exc}"
    for key, value in info.items():
        if key != "nvidia_smi":
            rec.say(f"{key}: {value}")
            rec.put("environment", key, value)
    rec.put("environment", "nvidia_smi", info["nvidia_smi"])


def torch_models(rec: Recorder, settings: Settings, paths: dict[str, str], device: str,
                 runs: int) -> None:
    """Each model through the stages' torch code, fp32 then fp16 (fp16 only on CUDA)."""
    from spotline.stages import runtime

    for precision in ("fp32", "fp16"):
        if precision == "fp16" and not device.startswith("cuda"):
            rec.put("torch", "fp16", "skipped: fp16 runs on CUDA only (settings half)")
            continue
        s = settings.replace(device=device, half=precision == "fp16", backend="torch")
        for case, build in (("detector", _detector_calls), ("upscaler", _upscaler_calls),
                            ("scorer", _scorer_calls)):
            if rec.left_s() < 20:
                rec.put("torch", f"{case}-{precision}", "skipped: budget")
                continue
            try:
                t0 = time.perf_counter()
                calls = build(s, paths, runtime.resolve_device(s))  # cuda → cuda:0, as stages
                load_s = round(time.perf_counter() - t0, 2)
                for name, call in calls:
                    fig = {**time_call(call, device, runs), "load_s": load_s}
                    fig.update(_gpu_memory(device))
                    rec.put("torch", f"{name}-{precision}", fig)
                    rec.say(f"torch {precision} {name:>16}: {_fmt(fig)}")
            except Exception as exc:  # noqa: BLE001 - next model
                rec.say(f"torch {precision} {case}: error {type(exc).__name__}: {exc}")
                rec.put("torch", f"{case}-{precision}", f"error: {type(exc).__name__}: {exc}")
            finally:
                calls = []
                _release(device)


def _detector_calls(s: Settings, paths: dict[str, str], device: str) -> list[tuple[str, Any]]:
    from spotline.stages import runtime
    from spotline.stages.detect import detect_frames, load_detector

    model, frame = load_detector(paths["detector"]), _frame()
    half = runtime.use_half(s, device)
    plain, tta = s.replace(tta=False), s.replace(tta=True)
    frames = [frame] * DETECT_BATCH
    return [(f"detector@{s.imgsz}", lambda: detect_frames(model, [frame], plain, device, half)),
            (f"detector_tta@{s.imgsz}", lambda: detect_frames(model, [frame], tta, device, half)),
            (f"detector_x{DETECT_BATCH}@{s.imgsz}",
             lambda: detect_frames(model, frames, plain, device, half))]


def _upscaler_calls(s: Settings, paths: dict[str, str], device: str) -> list[tuple[str, Any]]:
    from spotline.bench.backends import UPSCALE_CROP
    from spotline.stages import runtime
    from spotline.stages.upscale import load_upscaler, upscale_crop

    up = load_upscaler(paths["upscaler"], device, runtime.use_half(s, device))
    crop = np.ascontiguousarray(np.resize(_crops(1, 1)[0], (*UPSCALE_CROP, 3)))
    return [("upscaler_60x100", lambda: upscale_crop(up, crop, s))]


def _scorer_calls(s: Settings, paths: dict[str, str], device: str) -> list[tuple[str, Any]]:
    from spotline.bench.backends import input_side
    from spotline.stages.score import Score

    stage = Score(s.replace(scorer_dir=paths["scorer"]))
    stage.setup()
    side = input_side(paths)
    calls: list[tuple[str, Any]] = []
    for n in VISION_BATCHES:
        crops = _crops(side, n)
        calls.append((f"scorer_vision_x{n}", lambda crops=crops: stage.image_embeds(crops)))
    prompts = list(CAPTIONS) * 2
    calls.append(("scorer_text_x8", lambda: stage._encode_texts(prompts)))
    return calls


def onnx_models(rec: Recorder, settings: Settings, paths: dict[str, str], device: str,
                runs: int) -> None:
    """ONNX Runtime on the device's provider (CUDA/TensorRT on a GPU, else the reason)."""
    import onnxruntime as ort

    from spotline.stages.backends.engine import onnx_providers

    present = ort.get_available_providers()
    wanted = onnx_providers(present, device)
    if device.startswith("cuda") and wanted[0] == "CPUExecutionProvider":
        reason = f"no CUDA/TensorRT provider in onnxruntime {ort.__version__} ({present}): " \
                 + ORT_GPU_NOTE
        rec.say(f"onnx: {reason}")
        rec.put("onnx", "missing", reason)
        return
    from spotline.bench.backends import ensure_exports

    precisions = ("fp32", "fp16") if device.startswith("cuda") else ("fp32",)
    for precision in precisions:
        if rec.left_s() < 20:
            rec.put("onnx", f"{precision}", "skipped: budget")
            continue
        try:  # one precision's failure (an export, a provider) leaves the other's rows
            ensure_exports(paths, ["onnx"], [precision], rec.say)
            provider, calls = _onnx_calls(settings, paths, precision, device)
        except Exception as exc:  # noqa: BLE001 - recorded, next precision
            rec.say(f"onnx {precision}: error {type(exc).__name__}: {exc}")
            rec.put("onnx", precision, f"error: {type(exc).__name__}: {exc}")
            continue
        rec.put("onnx", f"provider-{precision}", provider)
        for name, call in calls:
            fig = time_call(call, "cpu", runs)  # ORT returns host arrays: its calls block
            rec.put("onnx", f"{name}-{precision}", fig)
            rec.say(f"onnx {precision} {name:>16} ({provider}): {_fmt(fig)}")
        calls = []
        gc.collect()


def _onnx_calls(s: Settings, paths: dict[str, str], precision: str,
                device: str) -> tuple[str, list[tuple[str, Any]]]:
    """(provider, [(name, call)]): the exported models as the stages load them."""
    from spotline.stages import backends

    det = backends.load_detector(paths["detector"], "onnx", precision, 0, device)
    up = backends.load_upscaler(paths["upscaler"], "onnx", precision, 0, device)
    scorer = backends.load_scorer(paths["scorer"], "onnx", precision, 0, device)
    frame = _frame()
    crop = np.ascontiguousarray(np.resize(_crops(1, 1)[0], (60, 100, 3)))
    prompts = [s.prompt.format(caption=c) for c in CAPTIONS] * 2
    calls: list[tuple[str, Any]] = [
        (f"detector@{s.imgsz}", lambda: det.predict(frame, s.imgsz, s.conf, s.iou, s.max_det,
                                                    False)),
        (f"detector_tta@{s.imgsz}", lambda: det.predict(frame, s.imgsz, s.conf, s.iou,
                                                        s.max_det, True)),
        ("upscaler_60x100", lambda: up.enhance(crop, s.pre_pad_large, s.upscale_factor))]
    side = _input_side_of(paths)
    for n in VISION_BATCHES:
        crops = _crops(side, n)
        calls.append((f"scorer_vision_x{n}", lambda crops=crops: scorer.image_embeds(crops, 64)))
    calls.append(("scorer_text_x8", lambda: scorer.text_embeds(prompts)))
    return det.engine.provider, calls


def _input_side_of(paths: dict[str, str]) -> int:
    from spotline.bench.backends import input_side

    return input_side(paths)


def seed_settings(settings: Settings, paths: dict[str, str], device: str, real: bool) -> Settings:
    """The models as weights on the device in fp16; with ``real`` the seed's inference settings
    (imgsz 1600, conf 0.1, iou 0.1, max_det 10, TTA, upscaling, 3 warm-ups)."""
    s = settings.replace(detector_weights=paths["detector"], upscaler_weights=paths["upscaler"],
                         scorer_dir=paths["scorer"], device=device, half=True, backend="torch")
    if real:
        s = s.replace(imgsz=1600, conf=0.1, iou=0.1, max_det=10, tta=True, upscale=True,
                      warmup=3)
    return s


def reference_fps(rec: Recorder, settings: Settings, frames: int, rounds: int) -> None:
    """The in-process reference on synthetic 1520×870 frames with 4 captions each: all frames
    in one call (batched) and one at a time (latency), best of ``rounds``."""
    from spotline.bench.runs import Frame, run_reference, synthetic_frame

    batch = [Frame(f"synthetic-{i}", synthetic_frame(i), CAPTIONS) for i in range(frames)]
    out = run_reference(settings, batch, batched=True, light=None, rounds=rounds)
    out.update(_gpu_memory(settings.device))
    rec.put("reference", "settings", {k: getattr(settings, k) for k in (
        "device", "half", "imgsz", "conf", "iou", "max_det", "tta", "upscale", "warmup")})
    rec.put("reference", "figures", out)
    lat = out["latency"]
    rec.say(f"reference: batched {out.get('batched_fps')} frames/s, one at a time "
            f"{out['single_fps']} frames/s, latency p50 {lat['p50_ms']:.1f} ms "
            f"p99 {lat['p99_ms']:.1f} ms,"
            f" errors {out.get('errors')}, load {out['load_s']} s")
    for stage, fig in (out.get("stages") or {}).items():
        rec.say(f"  {stage}: {fig}")


def streaming_fps(rec: Recorder, settings: Settings, frames: int, rounds: int) -> None:
    """The streaming pipeline (embedded redis-server, one worker process per stage on the
    device) on the reference's frames: a burst of all of them, then light load."""
    from spotline.bench.runs import Frame, run_streaming, synthetic_frame
    from spotline.common.embedded import find_redis_server

    rec.put("streaming", "redis_server", find_redis_server())  # a clear error when none
    batch = [Frame(f"synthetic-{i}", synthetic_frame(i), CAPTIONS) for i in range(frames)]
    timeout_s = max(30.0, rec.left_s())
    out = run_streaming(settings, batch, {}, light=min(frames, 4), timeout_s=timeout_s,
                        rounds=rounds)
    rec.put("streaming", "figures", out)
    lat, light = out["latency"], out["light"]["latency"]
    rec.say(f"streaming: {out['fps']} frames/s (steady {out.get('steady_fps')}), burst latency "
            f"p50 {lat['p50_ms']:.1f} ms p99 {lat['p99_ms']:.1f} ms, "
            f"light-load p50 {light['p50_ms']:.1f} ms,"
            f" errors {out['errors']}, start {out['start_s']} s")
    ref = rec.report["sections"].get("reference", {}).get("figures")
    if ref and ref.get("fps"):
        rec.put("streaming", "ratio_vs_reference", round(out["fps"] / ref["fps"], 4))
        rec.say(f"streaming / reference frames/s: {out['fps'] / ref['fps']:.3f}")


def _fmt(fig: dict[str, Any]) -> str:
    text = (f"median {fig['median_s'] * 1000:9.2f} ms (min {fig['min_s'] * 1000:.2f}, "
            f"n {fig['runs']})")
    if "peak_gpu_mb" in fig:
        text += f", peak GPU {fig['peak_gpu_mb']:.0f} MiB"
    return text


# --- the whole run ----------------------------------------------------------------------------
def run(settings: Settings, device: str, real: bool, runs: int, frames: int, rounds: int,
        out: Path | None, budget_s: float, sections: Sequence[str] = SECTIONS) -> dict:
    """Every section in order within ``budget_s``; the report (also in ``out``)."""
    rec = Recorder(out, budget_s)
    rec.put("run", "options", {"device": device, "real": real, "runs": runs, "frames": frames,
                               "rounds": rounds, "budget_s": budget_s, "argv": sys.argv})
    rec.section("probe", lambda: probe(rec))
    rec.section("environment", lambda: environment(rec, device))
    paths: dict[str, str] = {}

    def build() -> None:
        from spotline.bench.backends import model_paths

        t0 = time.perf_counter()
        paths.update(model_paths(settings, real))
        rec.put("models", "paths", dict(paths))
        rec.put("models", "ready_s", round(time.perf_counter() - t0, 1))
        rec.say(f"models ready in {time.perf_counter() - t0:.1f} s: {paths}")

    rec.section("models", build)
    if not paths:
        return rec.report
    s = seed_settings(settings, paths, device, real)
    if "torch" in sections:
        rec.section("torch", lambda: torch_models(rec, s, paths, device, runs), needs_s=30)
    if "reference" in sections:
        rec.section("reference", lambda: reference_fps(rec, s, frames, rounds), needs_s=40)
    if "streaming" in sections:
        rec.section("streaming", lambda: streaming_fps(rec, s, frames, rounds), needs_s=60)
    if "onnx" in sections:
        rec.section("onnx", lambda: onnx_models(rec, s, paths, device, runs), needs_s=60)
    found = rec.report["sections"].get("probe", {})
    if "load_avg_before" in found:
        rec.say(end_load(found))  # records load_avg_after in the probe's section
        rec.put("probe", "load_avg_after", found["load_avg_after"])
    rec.say(f"done in {time.perf_counter() - rec.t0:.1f} s")
    return rec.report


@click.command("gpu")
@click.option("--device", default="cuda", show_default=True, help="cuda, cuda:N or cpu")
@click.option("--real/--configured", default=True, show_default=True,
              help="Real-size random architectures (written once under data_dir), or the "
              "configured weights (tiny random models when none are set).")
@click.option("--runs", type=click.IntRange(1), default=10, show_default=True,
              help="Timed calls per model after two warm-ups (the median is reported).")
@click.option("--frames", type=click.IntRange(1), default=8, show_default=True,
              help="Synthetic 1520×870 frames for the reference's frames/s.")
@click.option("--rounds", type=click.IntRange(1), default=2, show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for gpu.json and gpu.txt (written as the run goes).")
@click.option("--budget-s", type=float, default=240.0, show_default=True,
              help="Sections that would start past this many seconds are skipped.")
@click.option("--only", multiple=True, type=click.Choice(SECTIONS),
              help="Run only these sections (repeatable).")
def bench_gpu(device: str, real: bool, runs: int, frames: int, rounds: int, out: Path | None,
              budget_s: float, only: tuple[str, ...]) -> None:
    """Time each model on an accelerator (torch fp32/fp16, ONNX Runtime's CUDA/TensorRT
    providers where present), then frames/s at the seed's settings: the in-process reference
    and the streaming pipeline. tools/gpu_bench.sh runs it on a machine without network."""
    ctx = click.get_current_context()
    obj = ctx.find_root().obj
    settings = obj.settings if obj is not None and hasattr(obj, "settings") else load_settings()
    report = run(settings, device, real, runs, frames, rounds, out, budget_s,
                 only or SECTIONS)
    click.echo(f"elapsed {report.get('elapsed_s')} s" + (f"; wrote {out}" if out else ""))


if __name__ == "__main__":
    bench_gpu()  # pylint: disable=no-value-for-parameter
