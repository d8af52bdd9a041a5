"""`spotline bench backends`: each model's time per backend (torch eager, ONNX Runtime,
OpenVINO; fp32 and int8) and the resident memory of a process that runs it.

Every (model, backend, precision) runs in a fresh child process, so its resident set is that
of a worker holding only that model and its runtime: torch's path imports torch, Ultralytics,
transformers; the exported path numpy, OpenCV, tokenizers and one runtime. Figures, never
pass/fail (docs/performance.md)."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from spotline.common.settings import Settings, settings_env

# (case, model kind): what is timed.
CASES = (("detector", "detector"), ("detector_tta", "detector"), ("upscaler", "upscaler"),
         ("scorer_vision", "scorer"), ("scorer_text", "scorer"))
HEAVY = ("torch", "ultralytics", "transformers", "torchvision")
CROPS = 8  # crops per SigLIP vision call (the figure: 8 crops)
UPSCALE_CROP = (60, 100)  # height, width of the crop Real-ESRGAN upscales


def _frame() -> np.ndarray:
    import cv2

    from spotline.bench.runs import synthetic_frame

    return cv2.imdecode(np.frombuffer(synthetic_frame(0), np.uint8), cv2.IMREAD_COLOR)


def _crops(side: int, n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (side, side, 3), dtype=np.uint8) for _ in range(n)]


def _captions(n: int) -> list[str]:
    words = ("grey missile", "yellow helicopter", "white commercial aircraft", "red drone",
             "black fighter jet", "green camouflage helicopter", "blue cargo aircraft",
             "orange light aircraft")
    return [words[i % len(words)] for i in range(n)]


# --- the child: load one model on one backend, time it ----------------------------------------
def _torch_call(case: str, settings: Settings, paths: dict[str, str]) -> Callable[[], object]:
    from spotline.stages import runtime

    runtime.set_threads(settings, None)
    if case.startswith("detector"):
        from spotline.stages.detect import detect_frames, load_detector

        model, frame = load_detector(paths["detector"]), _frame()
        tta = settings.replace(tta=case == "detector_tta")
        return lambda: detect_frames(model, [frame], tta)
    if case == "upscaler":
        from spotline.stages.upscale import load_upscaler, upscale_crop

        upsampler, crop = load_upscaler(paths["upscaler"]), _crops(1, 1)[0]
        crop = np.ascontiguousarray(np.resize(crop, (*UPSCALE_CROP, 3)))
        return lambda: upscale_crop(upsampler, crop, settings)
    from spotline.stages.score import Score

    stage = Score(settings.replace(backend="torch", scorer_dir=paths["scorer"]))
    stage.setup()
    if case == "scorer_vision":
        crops = _crops(input_side(paths), CROPS)
        return lambda: stage.image_embeds(crops)
    captions = _captions(CROPS)
    return lambda: stage._encode_texts(captions)


def _exported_call(case: str, engine: str, precision: str, settings: Settings,
                   paths: dict[str, str], threads: int) -> Callable[[], object]:
    from spotline.stages import backends

    if case.startswith("detector"):
        model, frame = backends.load_detector(paths["detector"], engine, precision,
                                              threads), _frame()
        tta = case == "detector_tta"
        return lambda: model.predict(frame, settings.imgsz, settings.conf, settings.iou,
                                     settings.max_det, tta)
    if case == "upscaler":
        up = backends.load_upscaler(paths["upscaler"], engine, precision, threads)
        crop = np.ascontiguousarray(np.resize(_crops(1, 1)[0], (*UPSCALE_CROP, 3)))
        return lambda: up.enhance(crop, settings.pre_pad_large, settings.upscale_factor)
    scorer = backends.load_scorer(paths["scorer"], engine, precision, threads)
    if case == "scorer_vision":
        crops = _crops(input_side(paths), CROPS)
        return lambda: scorer.image_embeds(crops)
    prompts = [settings.prompt.format(caption=c) for c in _captions(CROPS)]
    return lambda: scorer.text_embeds(prompts)


def input_side(paths: dict[str, str]) -> int:
    config = json.loads((Path(paths["scorer"]) / "preprocessor_config.json").read_text())
    size = config["size"]
    return int(size["height"]) if isinstance(size, dict) else int(size)


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """Load, warm up once, time ``runs`` calls; the process's resident set afterwards."""
    import psutil

    from spotline.common.settings import load_settings

    settings = load_settings()
    threads = int(spec["threads"])
    start = time.perf_counter()
    if spec["backend"] == "torch":
        call = _torch_call(spec["case"], settings, spec["paths"])
    else:
        call = _exported_call(spec["case"], spec["backend"], spec["precision"], settings,
                              spec["paths"], threads)
    load_s = time.perf_counter() - start
    call()  # warm-up
    times = []
    for _ in range(int(spec["runs"])):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return {"median_s": round(statistics.median(times), 4), "runs": len(times),
            "load_s": round(load_s, 2),
            "rss_mb": round(psutil.Process().memory_info().rss / 2**20, 1),
            "heavy_imports": sorted(m for m in HEAVY if m in sys.modules)}


# --- the parent -------------------------------------------------------------------------------
def ensure_exports(paths: dict[str, str], engines: Sequence[str],
                   precisions: Sequence[str] | Mapping[str, Sequence[str]],
                   say: Callable[[str], None]) -> None:
    """Export what is missing (or stale) once; later runs reuse the exports. ``precisions``:
    the same for every model, or per model kind."""
    from spotline.common.errors import ModelError
    from spotline.export import export_model
    from spotline.export.precision import synthetic_calibration
    from spotline.stages.backends.manifest import export_dir, read_manifest, source_hash

    for kind in ("detector", "upscaler", "scorer"):
        source = Path(paths[kind])
        try:
            manifest = read_manifest(export_dir(source))
            fresh = manifest.sha256 == source_hash(source)
            have = set(manifest.files) if fresh else set()
        except ModelError:
            have = set()
        wanted = precisions[kind] if isinstance(precisions, Mapping) else precisions
        missing = [p for p in wanted if any(f"{e}-{p}" not in have for e in engines)]
        if missing:
            say(f"exporting {kind} ({', '.join(engines)}; {', '.join(missing)})...")
            t0 = time.perf_counter()
            # int8 static, calibrated on synthetic frames, as `spotline export` makes it
            export_model(kind, source, engines, missing,
                         synthetic_calibration() if "int8" in missing else None)
            say(f"  {time.perf_counter() - t0:.1f} s")


def run_child(spec: dict[str, Any], settings: Settings, timeout_s: float) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPOTLINE_")}
    env.update(settings_env(settings))
    proc = subprocess.run([sys.executable, "-m", "spotline.bench.backends", json.dumps(spec)],
                          capture_output=True, text=True, env=env, timeout=timeout_s)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": " | ".join(tail)}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_backends(settings: Settings, paths: dict[str, str], runs: int = 3,
                   engines: Sequence[str] = ("onnx", "openvino"),
                   precisions: Sequence[str] = ("fp32", "fp16", "int8"),
                   cases: Sequence[str] = tuple(c for c, _ in CASES), threads: int = 0,
                   say: Callable[[str], None] = print, timeout_s: float = 1800.0,
                   skip: Sequence[str] = ()) -> dict[str, Any]:
    """{case: {"torch": figures, "onnx-fp32": figures, ...}} with speed-ups against torch;
    ``skip`` leaves out some "engine-precision" keys. fp16 runs on OpenVINO only, and only
    where the CPU runs it as bf16 (ONNX Runtime's fp16 on a CPU is emulated: slow)."""
    from spotline.stages import backends, runtime
    from spotline.stages.backends.cpu import cpu_info

    threads = threads or runtime.cpu_count()
    settings = settings.replace(torch_threads=threads, backend="torch")
    engines = [e for e in engines if backends.available(e)]
    bf16 = cpu_info().bf16
    if "fp16" in precisions:
        skip = [*skip, "onnx-fp16", *([] if bf16 else ["openvino-fp16"])]
        if not bf16 or "openvino" not in engines:
            precisions = [p for p in precisions if p != "fp16"]
    ensure_exports(paths, engines, precisions, say)
    report: dict[str, Any] = {"threads": threads, "runs": runs, "imgsz": settings.imgsz,
                              "paths": paths, "cases": {},
                              "openvino_fp16_runs_as": "bf16" if bf16 else "f32"}
    for case in cases:
        row: dict[str, Any] = {}
        for backend, precision in [("torch", "fp32"), *((e, p) for p in precisions
                                                         for e in engines)]:
            key = backend if backend == "torch" else f"{backend}-{precision}"
            if key in skip:
                continue
            spec = {"case": case, "backend": backend, "precision": precision, "paths": paths,
                    "runs": runs, "threads": threads}
            row[key] = run_child(spec, settings, timeout_s)
            say(f"{case:>14} {key:>14}: {_fmt(row[key])}")
        base = row["torch"].get("median_s")
        for figures in row.values():
            if base and figures.get("median_s"):
                figures["speedup"] = round(base / figures["median_s"], 2)
        report["cases"][case] = row
    return report


def _export_precisions(settings: Settings, kind: str, engines: Sequence[str]) -> list[str]:
    """The exports a pipeline at ``export_precision[_<kind>]`` loads: that one, or with auto
    what auto measures on this machine."""
    precision = settings.precision_for(kind)
    if precision != "auto":
        return [precision]
    from spotline.export.precision import auto_precisions

    return auto_precisions(engines, settings.device)


def _fmt(figures: dict[str, Any]) -> str:
    if "error" in figures:
        return f"error: {figures['error']}"
    return (f"{figures['median_s'] * 1000:9.1f} ms  RSS {figures['rss_mb']:7.1f} MiB  "
            f"heavy imports: {','.join(figures['heavy_imports']) or 'none'}")


def table(report: dict[str, Any]) -> str:
    """A Markdown table: median time per call, speed-up against torch, RSS."""
    keys: list[str] = []
    for row in report["cases"].values():
        keys += [k for k in row if k not in keys]
    runs_as = report.get("openvino_fp16_runs_as")
    head = "| model | " + " | ".join(f"{k} (runs {runs_as})" if k == "openvino-fp16" and runs_as
                                     else k for k in keys) + " |"
    lines = [head, "|" + "---|" * (len(keys) + 1)]
    for case, row in report["cases"].items():
        cells = []
        for key in keys:
            f = row.get(key, {})
            if "median_s" not in f:
                cells.append("error" if "error" in f else "—")
            else:
                speed = f" ({f['speedup']}×)" if key != "torch" and "speedup" in f else ""
                cells.append(f"{_ms(f['median_s'])}{speed}, {f['rss_mb']:.0f} MiB")
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ms(seconds: float) -> str:
    return f"{seconds:.2f} s" if seconds >= 1 else f"{seconds * 1000:.1f} ms"


def model_paths(settings: Settings, real: bool) -> dict[str, str]:
    """The real-size random architectures (written once under data_dir), or the configured
    weights (tiny random models when none are set)."""
    if real:
        from spotline.bench.runs import ensure_real_size_models

        found = ensure_real_size_models(settings.data_dir)
        return {k: str(found[k]) for k in ("detector", "upscaler", "scorer")}
    from spotline.stages.runtime import MODELS, resolve_weights

    paths = resolve_weights(settings, MODELS)  # all three are timed, the upscaler too
    return {"detector": str(paths.detector), "upscaler": str(paths.upscaler),
            "scorer": str(paths.scorer)}


def run_backends(settings: Settings, real: bool, runs: int | None, part: str,
                 pipeline_frames: int, say: Callable[[str], None]) -> dict[str, Any]:
    """`spotline bench backends`: each model per backend (``part`` "models"), the whole
    pipeline on the exports against the torch in-process reference ("pipeline"), or both
    ("all"); ``real`` for the real-size models at the seed's settings. The report."""
    if real:  # real-size models at the seed's settings, not the demo models' overlay
        from spotline.bench.runs import seed_settings

        settings = seed_settings(settings)
    paths = model_paths(settings, real)
    report: dict[str, Any] = {"real": real, "cases": {}}
    if part != "pipeline":
        report.update(bench_backends(settings, paths, runs=runs or (1 if real else 3), say=say))
    if part != "models":
        from spotline.bench import exported

        engines = [settings.backend] if settings.backend in ("onnx", "openvino") else \
            ["onnx", "openvino"]
        ensure_exports(paths, engines, {k: _export_precisions(settings, k, engines)
                                        for k in paths}, say)
        report["pipeline"] = exported.pipeline_vs_reference(
            settings, paths, frames=pipeline_frames, say=say)
    report["real"] = real
    report["load_avg_end"] = [round(v, 2) for v in os.getloadavg()]
    return report


if __name__ == "__main__":  # the child process
    print(json.dumps(child(json.loads(sys.argv[1]))))
