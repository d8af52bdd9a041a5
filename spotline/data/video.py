"""Synthetic clips of moving shapes for video feeds: ``OUT/clip_NNN/clip.mp4`` and, beside it,
a per-frame ``vlm.jsonl`` (``{"frame": k, "image": "clip.mp4", "annotations": [...]}``, boxes
[left, top, width, height] as in the TIL format). Same vocabulary and look as the stills."""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np

from spotline.data import synth

FPS = 10.0


def write_clips(out: Path, options: synth.SynthOptions, clips: int, frames: int) -> list[Path]:
    """Write ``clips`` clips of ``frames`` frames each; returns the clip folders."""
    return [write_clip(out / f"clip_{k:03d}", options, k, frames) for k in range(clips)]


def write_clip(folder: Path, options: synth.SynthOptions, index: int, frames: int) -> Path:
    """One clip: a still background, objects moving in straight lines that bounce off the
    edges, fresh noise every frame."""
    rng = synth.rng_for(options.seed, 1_000_000 + index)
    width, height = options.size
    kind = options.backgrounds[int(rng.integers(len(options.backgrounds)))]
    background = np.clip(synth.BACKGROUND_FNS[kind](rng, height, width), 0, 255)
    n = int(rng.integers(options.objects[0], options.objects[1] + 1))
    lo, hi = options.sides
    movers = []
    for colour, shape in synth.choose_objects(rng, n, options.hard_negative):
        side = int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))
        mask = synth.render_mask(shape, side, rng)
        ys, xs = np.nonzero(mask > 0.5)
        tight = (int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1),
                 int(ys.max() - ys.min() + 1))
        pos = np.array([rng.uniform(0, width - tight[2]), rng.uniform(0, height - tight[3])])
        vel = rng.uniform(-4, 4, 2)
        movers.append((colour, shape, mask, tight, pos, vel, synth.fill_colour(colour, rng)))
    folder.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(folder / "clip.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), FPS,
                             (width, height))
    lines = []
    try:
        for frame in range(frames):
            canvas = background.astype(np.float32).copy()
            annotations = []
            for colour, shape, mask, tight, pos, vel, fill in movers:
                _bounce(pos, vel, tight, width, height)
                x, y = int(round(pos[0])) - tight[0], int(round(pos[1])) - tight[1]
                synth.draw_object(canvas, mask, fill, x, y, np.random.default_rng(frame),
                                  blur=False)
                annotations.append({"caption": synth.caption_of(colour, shape),
                                    "bbox": [x + tight[0], y + tight[1], tight[2], tight[3]]})
            noisy = synth.degrade(np.clip(canvas, 0, 255).round().astype(np.uint8),
                                  int(rng.integers(0, 2**31 - 1)))
            writer.write(cv2.cvtColor(noisy, cv2.COLOR_RGB2BGR))
            lines.append(json.dumps({"frame": frame, "image": "clip.mp4",
                                     "annotations": annotations}))
    finally:
        writer.release()
    (folder / synth.DATASET_FILE).write_text("".join(line + "\n" for line in lines))
    return folder


def _bounce(pos: np.ndarray, vel: np.ndarray, tight: tuple[int, int, int, int], width: int,
            height: int) -> None:
    pos += vel
    for axis, limit in ((0, width - tight[2]), (1, height - tight[3])):
        if pos[axis] < 0 or pos[axis] > limit:
            vel[axis] = -vel[axis]
            pos[axis] = min(max(pos[axis], 0.0), float(limit))
