"""`spotline bench backends`' whole-pipeline part: the streaming pipeline on exported models
against the torch in-process reference (frames/s and the ratio, latency p50/p99), and light
load (one frame at a time) against the in-process reference on the same exported models.

Three runs on the same frames: ``Reference`` with ``backend`` torch, ``Reference`` with the
settings' backend (auto: the fastest export there is) and precision, and ``LocalPipeline`` (one
worker process per stage) with that backend: a burst of every frame, then a few one at a time.
With ``compare_static`` the light-load frames once more with ``threads_policy`` static (each
stage on its fixed share), to show what cores that follow the work change. Figures, never
pass/fail; the targets (bench/report.py, docs/performance.md) are printed beside them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from spotline.common.settings import Settings

from .probes import percentiles
from .runs import bench_frames, run_reference, run_streaming, with_models

FPS_TARGET = 2.5  # streaming on exports ≥ 2.5× the torch in-process reference's frames/s
LIGHT_TARGET = 1.1  # light-load latency ≤ 1.1× the in-process reference's, same backends
MODELS = ("detector", "upscaler", "scorer")


def _p50(latencies: list[float]) -> float:
    return float(np.median(latencies))


def pipeline_vs_reference(settings: Settings, paths: dict[str, str], frames: int = 4,
                          light: int = 2, compare_static: bool = True,
                          say: Callable[[str], None] = print,
                          timeout_s: float = 3600.0) -> dict[str, Any]:
    """The three (or four) runs and their ratios, as one JSON-friendly dict."""
    base = with_models(settings, paths)
    exported = base if base.backend != "torch" else base.replace(backend="auto")
    shots = bench_frames(frames)
    say(f"[pipeline] torch in-process reference, {frames} frames one at a time...")
    ref_torch = run_reference(base.replace(backend="torch"), shots, batched=False)
    say(f"[pipeline] torch reference {ref_torch['fps']:.4f} frames/s; in-process reference on "
        f"the exports ({exported.backend} {precisions(exported)})...")
    ref_same = run_reference(exported, shots, batched=False)
    chosen = choices(exported, paths)  # what auto chose (measured by the reference's stages)
    say(f"[pipeline] exported reference {ref_same['fps']:.4f} frames/s; streaming on the "
        f"exports (threads_policy {exported.threads_policy})...")
    stream = run_streaming(exported, shots, {}, light=light, timeout_s=timeout_s)
    out: dict[str, Any] = {
        "frames": frames, "light_frames": light, "backend": exported.backend,
        "precision": precisions(exported, chosen), "threads_policy": exported.threads_policy,
        "precision_choices": {m: {"precision": c.precision, "reason": c.reason,
                                  "detail": c.detail} for m, c in chosen.items()},
        "reference_torch": _brief(ref_torch), "reference_exported": _brief(ref_same),
        "streaming": {"fps": stream["fps"], "steady_fps": stream["steady_fps"],
                      "latency": stream["latency"], "errors": stream["errors"],
                      "peak_rss_mb": stream["peak_rss_mb"],
                      "light_latency": percentiles(stream["light"]["latencies_s"])},
    }
    out["fps_ratio_vs_torch_reference"] = round(stream["fps"] / ref_torch["fps"], 3)
    out["steady_fps_ratio_vs_torch_reference"] = round(stream["steady_fps"] / ref_torch["fps"],
                                                       3)
    out["exported_reference_ratio_vs_torch"] = round(ref_same["fps"] / ref_torch["fps"], 3)
    n = len(stream["light"]["latencies_s"])
    out["light_ratio_vs_exported_reference"] = round(
        _p50(stream["light"]["latencies_s"]) / _p50(ref_same["latencies_s"][:n]), 3)
    if compare_static and exported.threads_policy != "static":
        say("[pipeline] light load again with threads_policy static (fixed shares)...")
        static = run_streaming(exported.replace(threads_policy="static"), shots, {},
                               light=light, burst=False, timeout_s=timeout_s)
        out["static_light_latency"] = percentiles(static["light"]["latencies_s"])
        out["static_light_ratio_vs_exported_reference"] = round(
            _p50(static["light"]["latencies_s"]) / _p50(ref_same["latencies_s"][:n]), 3)
    out["targets"] = {
        "fps_ratio": {"target": f">= {FPS_TARGET}", "value": out["fps_ratio_vs_torch_reference"],
                      "met": out["fps_ratio_vs_torch_reference"] >= FPS_TARGET},
        "light_ratio": {"target": f"<= {LIGHT_TARGET}",
                        "value": out["light_ratio_vs_exported_reference"],
                        "met": out["light_ratio_vs_exported_reference"] <= LIGHT_TARGET}}
    return out


def choices(settings: Settings, paths: dict[str, str]) -> dict[str, Any]:
    """Each exported model's precision choice as its stage makes it (export_precision auto:
    measured once per machine, then read back from the export folder)."""
    from spotline.stages import runtime
    from spotline.stages.backends import precision

    stages = {"detector": "detect", "upscaler": "upscale", "scorer": "score"}
    out: dict[str, Any] = {}
    for model in MODELS:
        if model == "upscaler" and not settings.upscale:
            continue
        out[model] = precision.choose(model, settings, paths[model],
                                      runtime.export_threads(settings, stages[model]))[1]
    return out


def precisions(settings: Settings, chosen: dict[str, Any] | None = None) -> str:
    """The export precision, or each model's where they differ (export_precision_<model>);
    with ``chosen`` (``choices``) what auto chose."""
    found = {m: c.precision for m, c in chosen.items()} if chosen else \
        {m: settings.precision_for(m) for m in MODELS}
    if len(set(found.values())) == 1:
        return found["detector"]
    return ", ".join(f"{m} {p}" for m, p in found.items())


def _brief(ref: dict[str, Any]) -> dict[str, Any]:
    return {"fps": ref["fps"], "latency": percentiles(ref["latencies_s"]),
            "load_s": ref["load_s"], "peak_rss_mb": ref["peak_rss_mb"]}


def lines(report: dict[str, Any]) -> str:
    """The whole-pipeline figures as Markdown lines."""
    rt, rx, s = report["reference_torch"], report["reference_exported"], report["streaming"]
    out = [
        f"whole pipeline, {report['frames']} frames ({report['backend']} "
        f"{report['precision']}, threads_policy {report['threads_policy']}):",
        f"- torch in-process reference: {rt['fps']:.4f} frames/s, latency p50 "
        f"{rt['latency']['p50_ms'] / 1000:.2f} s",
        f"- in-process reference on the exports: {rx['fps']:.4f} frames/s "
        f"({report['exported_reference_ratio_vs_torch']}× torch), latency p50 "
        f"{rx['latency']['p50_ms'] / 1000:.2f} s",
        f"- streaming on the exports: {s['fps']:.4f} frames/s (steady {s['steady_fps']:.4f}), "
        f"{report['fps_ratio_vs_torch_reference']}× the torch reference "
        f"(target ≥ {FPS_TARGET}); latency under load p50 {s['latency']['p50_ms'] / 1000:.2f} s,"
        f" p99 {s['latency']['p99_ms'] / 1000:.2f} s; errors {s['errors']}",
        f"- light load ({report['light_frames']} frames one at a time): p50 "
        f"{s['light_latency']['p50_ms'] / 1000:.2f} s, "
        f"{report['light_ratio_vs_exported_reference']}× the exported in-process reference's "
        f"(target ≤ {LIGHT_TARGET})",
        f"- peak RSS per worker (MiB): {s['peak_rss_mb']}",
    ]
    if "static_light_latency" in report:
        out.append(f"- light load with threads_policy static: p50 "
                   f"{report['static_light_latency']['p50_ms'] / 1000:.2f} s, "
                   f"{report['static_light_ratio_vs_exported_reference']}× the exported "
                   f"reference's")
    return "\n".join(out)


__all__ = ["choices", "lines", "pipeline_vs_reference", "precisions"]
