"""Synthetic clips of moving shapes for video feeds: ``OUT/clip_NNN/clip.mp4`` and, beside it,
a per-frame ``vlm.jsonl`` (``{"frame": k, "image": "clip.mp4", "annotations": [...]}``, boxes
[left, top, width, height] as in the TIL format). Same vocabulary and look as the stills.

With ``hide`` P > 0 each object is, with chance P, hidden once for 3 to 6 frames in a row
(covered: not drawn, as if behind something the ground's colour; it keeps moving meanwhile and
shows again where its motion took it). Its caption stays in those frames' annotations with
``"bbox": null``: the object is in the clip but not in view, so the right answer is no box (what
results give as ``"bbox": null``). The spans come from a generator of their own: with ``hide``
0 (the default) a clip's bytes are those of earlier versions."""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np

from spotline.data import synth

FPS = 10.0
HIDDEN_FRAMES = (3, 6)  # a hidden object's frames out of view, LO-HI


def write_clips(out: Path, options: synth.SynthOptions, clips: int, frames: int,
                hide: float = 0.0) -> list[Path]:
    """Write ``clips`` clips of ``frames`` frames each; returns the clip folders."""
    return [write_clip(out / f"clip_{k:03d}", options, k, frames, hide) for k in range(clips)]


def write_clip(folder: Path, options: synth.SynthOptions, index: int, frames: int,
               hide: float = 0.0) -> Path:
    """One clip: a still background, objects moving in straight lines that bounce off the
    edges, fresh noise every frame; with ``hide``, objects hidden for a few frames (see the
    module doc)."""
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
    hidden = hidden_spans(options.seed, index, len(movers), frames, hide)
    folder.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(folder / "clip.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), FPS,
                             (width, height))
    lines = []
    try:
        for frame in range(frames):
            canvas = background.astype(np.float32).copy()
            annotations = []
            for k, (colour, shape, mask, tight, pos, vel, fill) in enumerate(movers):
                _bounce(pos, vel, tight, width, height)
                x, y = int(round(pos[0])) - tight[0], int(round(pos[1])) - tight[1]
                caption = synth.caption_of(colour, shape)
                if frame in hidden[k]:
                    annotations.append({"caption": caption, "bbox": None})
                    continue
                synth.draw_object(canvas, mask, fill, x, y, np.random.default_rng(frame),
                                  blur=False)
                annotations.append({"caption": caption,
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


def hidden_spans(seed: int, index: int, objects: int, frames: int,
                 hide: float) -> list[range]:
    """Per object of clip ``index``, the frames it is hidden (an empty range: none): with
    chance ``hide``, 3 to 6 frames in a row, after its first frame and before its last."""
    spans = [range(0)] * objects
    if hide <= 0:
        return spans
    rng = synth.rng_for(seed, 2_000_000 + index)  # not the clip's own: its bytes stay
    lo, hi = HIDDEN_FRAMES
    for k in range(objects):
        length = int(rng.integers(lo, hi + 1))
        chosen = rng.random() < hide
        if chosen and frames >= length + 2:
            start = int(rng.integers(1, frames - length))
            spans[k] = range(start, start + length)
    return spans


def _bounce(pos: np.ndarray, vel: np.ndarray, tight: tuple[int, int, int, int], width: int,
            height: int) -> None:
    pos += vel
    for axis, limit in ((0, width - tight[2]), (1, height - tight[3])):
        if pos[axis] < 0 or pos[axis] > limit:
            vel[axis] = -vel[axis]
            pos[axis] = min(max(pos[axis], 0.0), float(limit))
