"""In-process detector time per frame size: a fixed imgsz against the size that follows the
frame (and its tiles above the cap), with the demo detector on torch by default.

    .venv/bin/python tools/time_detect_sizes.py [--weights models/demo/detector.pt] [--runs 5]

Prints the CPU's matrix/vector flags and the load average beside the table: other processes
share the cores, so compare the ratios within one run only.
"""

from __future__ import annotations

import argparse
import re
import statistics
import time
from pathlib import Path

import numpy as np

from spotline.common.settings import load_settings
from spotline.stages.backends import tiling
from spotline.stages.detect import detect_frames, load_detector
from spotline.stages.runtime import set_threads

SIZES = ((384, 256), (960, 544), (1520, 870), (1920, 1080), (3840, 2160))


def cpu_flags() -> str:
    text = Path("/proc/cpuinfo").read_text()
    return " ".join(sorted(set(re.findall(r"\b(avx512[a-z_0-9]*|amx[a-z_0-9]*|avx2)\b", text))))


def frame(width: int, height: int) -> np.ndarray:
    """A pale sky with a few coloured squares (the detector has something to find)."""
    t = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    sky = np.array([210, 160, 110], np.float32) * (1 - t) + np.array([235, 215, 190]) * t
    image = np.broadcast_to(sky, (height, width, 3)).astype(np.uint8).copy()
    for k in range(6):
        x, y = (k * 997) % (width - 40), (k * 331) % (height - 40)
        image[y:y + 24, x:x + 24] = ((k * 70) % 255, 60, 220 - k * 30)
    return image


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--weights", default="models/demo/detector.pt")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--fixed", type=int, default=448)
    parser.add_argument("--scale", type=float, default=448 / 384, help="the follow scale")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    base = load_settings(env={}, detector_weights=args.weights, conf=0.1, iou=0.5, max_det=20,
                         tta=False, backend="torch", torch_threads=args.threads)
    set_threads(base, "detect")
    model = load_detector(args.weights)
    modes = {f"fixed {args.fixed}": base.replace(imgsz=args.fixed),
             f"follow x{args.scale:.3g}": base.replace(imgsz=0, imgsz_scale=args.scale)}
    print(f"cpu flags: {cpu_flags() or '-'}; load average before: "
          f"{Path('/proc/loadavg').read_text().strip()}")
    print(f"in-process detect_frames, torch, {args.threads} threads, ms: best (median) of "
          f"{args.runs}, the modes taking turns")
    print("| frame | " + " | ".join(f"{m}: input, ms" for m in modes) + " | ratio |")
    print("|---|" + "---|" * (len(modes) + 1))
    for width, height in SIZES:
        image = frame(width, height)
        runs: dict[str, list[float]] = {m: [] for m in modes}
        for settings in modes.values():
            detect_frames(model, [image], settings)  # warm this shape
        for _ in range(args.runs):  # the modes in turn: they share whatever load there is
            for mode, settings in modes.items():
                started = time.perf_counter()
                detect_frames(model, [image], settings)
                runs[mode].append(time.perf_counter() - started)
        cells, times = [], []
        for mode, settings in modes.items():
            p = tiling.plan(width, height, settings.imgsz, settings.imgsz_cap,
                            settings.tile_overlap, settings.imgsz_scale)
            ms = 1000 * min(runs[mode])
            times.append(ms)
            what = f"{p.imgsz}" if p.tiles is None else f"{len(p.tiles)} tiles at {p.imgsz}"
            cells.append(f"{what}, {ms:.0f} (median {1000 * statistics.median(runs[mode]):.0f})")
        print(f"| {width}x{height} | " + " | ".join(cells) + f" | {times[1] / times[0]:.1f}x |")
    print(f"load average after: {Path('/proc/loadavg').read_text().strip()}")


if __name__ == "__main__":
    main()
