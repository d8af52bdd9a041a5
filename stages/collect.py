"""collect: for each caption of a joined frame, the best-scoring box as [left, top, width,
height]; a frame without boxes gets the configured fallback box and a flag."""

from __future__ import annotations

import math

import numpy as np

from ..common.envelope import Envelope, Result
from ..common.settings import Settings
from ..common.topology import next_stage
from .base import Routed, Stage


class Collect(Stage):
    """Turns merged frames (all parts joined) into results."""

    name = "collect"

    def process(self, batch: list[Envelope]) -> list[Routed]:
        """One result per merged frame."""
        target = next_stage(self.name, self.settings)
        return [(target, frame_result(env, self.settings)) for env in batch]


def frame_result(env: Envelope, settings: Settings) -> Result:
    """The argmax box per caption (or the fallback box when the frame has none); in track
    mode, the box the track stage picked for each caption."""
    if env.picks is not None:
        return tracked_result(env, settings)
    boxes = env.boxes if env.boxes is not None else np.zeros((0, 4), np.float32)
    n = len(env.captions)
    if len(boxes) == 0:
        fallback = tuple(float(v) for v in settings.fallback_box)
        picks: list[tuple[tuple[float, ...], float]] = [(fallback, math.nan)] * n
        return _result(env, picks, fallback=True)
    picks = [(ltwh(boxes[i]), s) for i, s in best_boxes(env.scores, len(boxes), n)]
    return _result(env, picks, fallback=False)


def best_boxes(scores: np.ndarray | None, nboxes: int, ncaptions: int) -> list[tuple[int, float]]:
    """(box index, score) per caption: the argmax of each row (first box if unscored)."""
    if scores is None or scores.shape != (ncaptions, nboxes):
        return [(0, math.nan)] * ncaptions
    best = np.argmax(scores, axis=1) if ncaptions else np.zeros(0, np.int64)
    return [(int(i), float(scores[row, i])) for row, i in enumerate(best)]


def ltwh(box: np.ndarray) -> tuple[float, float, float, float]:
    """xyxy → [left, top, width, height] (the seed's output: x1, y1, x2-x1, y2-y1)."""
    x1, y1, x2, y2 = (float(v) for v in box)
    return (x1, y1, x2 - x1, y2 - y1)


def _result(env: Envelope, picks: list[tuple[tuple[float, ...], float]], fallback: bool) -> Result:
    return Result(frame_id=env.frame_id, source_id=env.source_id, capture_time=env.capture_time,
                  captions=env.captions, boxes=tuple(b for b, _ in picks),  # type: ignore[misc]
                  scores=tuple(s for _, s in picks), image_size=env.image_size,
                  fallback=fallback, trace=env.trace, meta=env.meta)


def tracked_result(env: Envelope, settings: Settings) -> Result:
    """Track mode: each caption's picked box and its track; a caption not in view (pick -1)
    gets the fallback box, ``absent`` and its calibrated probability as its score."""
    picks = env.picks if env.picks is not None else np.zeros(0, np.int64)
    boxes = env.boxes if env.boxes is not None else np.zeros((0, 4), np.float32)
    ids = env.track_ids if env.track_ids is not None else np.full(len(boxes), -1, np.int64)
    probs = env.probs if env.probs is not None else np.full(len(env.captions), np.nan)
    fallback = tuple(float(v) for v in settings.fallback_box)
    out_boxes, scores, tracks, absent = [], [], [], []
    for row, pick in enumerate(int(p) for p in picks):
        inside = 0 <= pick < len(boxes)
        out_boxes.append(ltwh(boxes[pick]) if inside else fallback)
        if inside and env.scores is not None and env.scores.shape[1] == len(boxes):
            scores.append(float(env.scores[row, pick]))
        else:
            scores.append(float(probs[row]))
        tracks.append(int(ids[pick]) if inside else -1)
        absent.append(not inside)
    return Result(frame_id=env.frame_id, source_id=env.source_id, capture_time=env.capture_time,
                  captions=env.captions, boxes=tuple(out_boxes), scores=tuple(scores),
                  image_size=env.image_size, fallback=len(boxes) == 0, trace=env.trace,
                  track_ids=tuple(tracks), absent=tuple(absent), meta=env.meta)
