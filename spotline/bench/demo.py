"""`spotline bench demo`: the demo models through the streaming pipeline on frames of a size
users run (held-out scenes rendered at ``size``, never training data): light-load latency
(each frame alone, the next sent when its result is back), per-stage times, accuracy (IoU >
0.5) of those answers, then a burst of the same frames (throughput). Workers as `spotline up`
starts them (one per stage), frames published by the Python client."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from spotline.common.settings import Settings

from .runs import Frame, run_streaming

HELDOUT_SEED = 41  # not a training, validation or test seed, nor the held-out figures' 31


def demo_frames(size: tuple[int, int], n: int, seed: int = HELDOUT_SEED
                ) -> tuple[list[Frame], list[list[list[int]]]]:
    """``n`` held-out-family frames of exactly ``size`` (width, height) and their truth boxes
    (one per caption, in caption order)."""
    from spotline.data import synth

    options = synth.heldout_options(seed=seed, images=n, sizes=None, size=size)
    frames, truth = [], []
    for i in range(n):
        scene = synth.make_scene(options, i)
        frames.append(Frame(f"heldout-{seed}-{i}", synth.encode_jpeg(scene.image, scene.quality),
                            tuple(o.caption for o in scene.objects)))
        truth.append([list(o.box) for o in scene.objects])
    return frames, truth


def bench_demo(settings: Settings, size: tuple[int, int], n: int, rounds: int,
               say: Callable[[str], None]) -> dict[str, Any]:
    """The run: demo models with the user's other settings; raises when none are installed."""
    from spotline.eval import accuracy
    from spotline.train.demo import WEIGHT_KEYS, apply_demo_models, is_demo

    demo = apply_demo_models(settings.replace(**{k: "" for k in WEIGHT_KEYS}, models="demo"))
    if not is_demo(demo):
        raise RuntimeError("no demo models under models/demo")
    frames, truth = demo_frames(size, n)
    say(f"demo models, {n} held-out frames of {size[0]}x{size[1]}, one worker per stage; "
        f"detector imgsz {demo.imgsz or 'follows the frame'} (scale {demo.imgsz_scale:.3f}, "
        f"cap {demo.imgsz_cap}), backend {demo.backend}")
    run = run_streaming(demo, frames, {}, light=n, burst=True, rounds=rounds)
    light = run["light"]
    # the light-load answers, frame by frame in publishing order (best round kept per frame)
    answers = [box for boxes in light["boxes"] for box in boxes]
    lat = np.asarray(light["latencies_s"]) * 1000
    out = {"size": list(size), "frames": n, "rounds": rounds,
           "light_p50_ms": round(float(np.percentile(lat, 50)), 1),
           "light_p95_ms": round(float(np.percentile(lat, 95)), 1),
           "light_stages": light["stages"], "burst_fps": run.get("fps"),
           "burst_latency": run.get("latency"), "errors": run.get("errors"),
           "peak_rss_mb": run.get("peak_rss_mb"),
           "settings": {"imgsz": demo.imgsz, "imgsz_scale": round(demo.imgsz_scale, 4),
                        "imgsz_cap": demo.imgsz_cap, "backend": demo.backend,
                        "export_precision": demo.export_precision}}
    if answers:
        out["accuracy"] = round(accuracy(answers, [b for t in truth for b in t]), 4)
    return out


def lines(report: dict[str, Any]) -> list[str]:
    """The bench's printed table."""
    w, h = report["size"]
    out = [f"light load ({report['frames']} frames of {w}x{h}, each alone, best of "
           f"{report['rounds']}): p50 {report['light_p50_ms']:.1f} ms, p95 "
           f"{report['light_p95_ms']:.1f} ms"]
    for stage, v in report["light_stages"].items():
        out.append(f"  {stage:<10} busy {v['busy_ms']:7.1f} ms, queue {v['queue_wait_ms']:6.1f} "
                   f"ms, hop in {v['hop_in_ms']:6.1f} ms (means)")
    if "accuracy" in report:
        out.append(f"accuracy of those answers (IoU > 0.5): {report['accuracy']:.4f}")
    if report.get("burst_fps") is not None:
        out.append(f"burst of the same frames: {report['burst_fps']:.2f} frames/s, "
                   f"{report.get('errors', 0)} errors")
    return out
