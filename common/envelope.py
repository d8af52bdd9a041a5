"""The messages that travel between stages, as frozen dataclasses. Only common/codec.py knows
how they become bytes."""

from __future__ import annotations

import dataclasses
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np

SCHEMA_VERSION = 1
# The JSON form of a result as subscribers receive it (docs/results.md, docs/results.schema.json).
# Changes within v1 are additive only: new fields may appear, none is removed or changes meaning.
RESULT_SCHEMA = "spotline.result/v1"

# One trace row: (stage, enqueued, started, finished), unix seconds.
TraceRow = tuple[str, float, float, float]


def new_frame_id() -> str:
    """A globally unique frame id (hex, no separators that clash with key names)."""
    return uuid.uuid4().hex


@dataclass(frozen=True, eq=False)
class Envelope:
    """One frame, or one part of a frame, on its way through the pipeline.

    The frames stream carries ``image`` (the bytes as the feed sent them); detect replaces it
    with ``boxes``/``det_scores``/``crops`` split into ``part`` k of ``nparts``; score adds
    ``scores`` (captions × boxes of this part); collect joins the parts. ``error`` set by any
    stage makes the collector answer the frame with an error result.
    """

    frame_id: str
    source_id: str = "default"
    capture_time: float = 0.0
    captions: tuple[str, ...] = ()
    image_size: tuple[int, int] = (0, 0)  # (width, height) of the original frame
    image: bytes | None = None
    boxes: np.ndarray | None = None  # float32 N×4 xyxy, original pixels
    det_scores: np.ndarray | None = None  # float32 N
    crops: tuple[np.ndarray, ...] = ()  # uint8 H×W×3 RGB, one per box
    part: int = 0
    nparts: int = 1
    scores: np.ndarray | None = None  # float32 C×N
    trace: tuple[TraceRow, ...] = ()
    error: str | None = None
    v: int = SCHEMA_VERSION
    # Track mode (docs/architecture.md, "Tracks"): the frame's number in its source (set by
    # the producer; -1: none); set by the track stage: each box's track id, each caption's box
    # (index into boxes; -1: not in view) and its calibrated probability (nan: uncalibrated).
    seq: int = -1
    track_ids: np.ndarray | None = None  # int64 N, -1: untracked box
    picks: np.ndarray | None = None  # int64 C
    probs: np.ndarray | None = None  # float32 C
    # The frame's metadata as the producer gave it (a JSON object, common/meta.py), returned
    # unchanged on its result.
    meta: dict[str, Any] = field(default_factory=dict)

    def replace(self, **changes: Any) -> Envelope:
        return dataclasses.replace(self, **changes)

    def traced(self, stage: str, enqueued: float, started: float, finished: float) -> Envelope:
        """A copy with one more row in the timing trace."""
        return self.replace(trace=(*self.trace, (stage, enqueued, started, finished)))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Envelope):
            return NotImplemented
        return all(_same(getattr(self, f.name), getattr(other, f.name))
                   for f in dataclasses.fields(self))


@dataclass(frozen=True, eq=False)
class Result:
    """The answer for one frame: for each caption its box ``[left, top, width, height]``."""

    frame_id: str
    source_id: str
    capture_time: float
    captions: tuple[str, ...]
    boxes: tuple[tuple[float, float, float, float], ...]  # one per caption
    scores: tuple[float, ...]  # one per caption (nan when no box)
    image_size: tuple[int, int] = (0, 0)
    fallback: bool = False  # True when no box was found and fallback_box was used
    error: str | None = None
    trace: tuple[TraceRow, ...] = ()
    finished_time: float = field(default_factory=time.time)
    v: int = SCHEMA_VERSION
    # Track mode: each caption's track id (-1: none) and whether it is "not in view" (its box
    # is then the fallback box and its score the calibrated probability). Empty otherwise.
    track_ids: tuple[int, ...] = ()
    absent: tuple[bool, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)  # the frame's, unchanged

    def replace(self, **changes: Any) -> Result:
        return dataclasses.replace(self, **changes)

    def traced(self, stage: str, enqueued: float, started: float, finished: float) -> Result:
        """A copy with one more row in the timing trace, finished when that stage finished."""
        return self.replace(trace=(*self.trace, (stage, enqueued, started, finished)),
                            finished_time=finished)

    @property
    def latency(self) -> float:
        """Capture to result, in seconds."""
        return self.finished_time - self.capture_time

    def as_json(self) -> dict[str, Any]:
        """The result as subscribers receive it, in every sink and over HTTP (JSONL output,
        SSE, webhooks, MQTT): docs/results.md, validated by docs/results.schema.json."""
        return {
            "schema": RESULT_SCHEMA,
            "frame_id": self.frame_id,
            "source_id": self.source_id,
            "capture_time": self.capture_time,
            "finished_time": self.finished_time,
            "image_size": list(self.image_size),
            "error": self.error,
            "fallback": self.fallback,
            "results": [self._caption_json(k) for k in range(len(self.captions))],
            "trace": [list(row) for row in self.trace],
            "meta": self.meta,
        }

    def _caption_json(self, k: int) -> dict[str, Any]:
        s = self.scores[k]
        out: dict[str, Any] = {"caption": self.captions[k],
                               "bbox": [round(v, 2) for v in self.boxes[k]],
                               "score": None if s != s else round(s, 6)}
        if self.track_ids:
            out["track_id"] = self.track_ids[k]
        if self.absent and self.absent[k]:
            out["bbox"] = None  # not in view
        return out

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Result):
            return NotImplemented
        return all(_same(getattr(self, f.name), getattr(other, f.name))
                   for f in dataclasses.fields(self))


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        if not (isinstance(a, np.ndarray) and isinstance(b, np.ndarray)):
            return False
        return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b, equal_nan=True)
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float) and a != a and b != b:
        return True
    return bool(a == b)


def error_result(env: Envelope, reason: str,
                 fallback_box: tuple[int, ...] = (0, 0, 0, 0)) -> Result:
    """The answer for a frame that failed: every caption gets the fallback box and ``error``."""
    box = tuple(float(v) for v in fallback_box)
    return Result(frame_id=env.frame_id, source_id=env.source_id, capture_time=env.capture_time,
                  captions=env.captions, boxes=tuple(box for _ in env.captions),  # type: ignore[misc]
                  scores=tuple(float("nan") for _ in env.captions), image_size=env.image_size,
                  fallback=True, error=reason, trace=env.trace, meta=env.meta)


def strip(env: Envelope) -> Envelope:
    """An error envelope carries no pixels: the collector only needs the frame's identity."""
    return env.replace(image=None, crops=(), boxes=None, det_scores=None, scores=None, part=0,
                       nparts=1)


def merge_parts(parts: list[Envelope]) -> Envelope:
    """Join the parts of one frame (ordered by part index) into one envelope."""
    parts = sorted(parts, key=lambda p: p.part)
    head = parts[0]
    with_boxes = [p for p in parts if p.boxes is not None and len(p.boxes)]
    if with_boxes:
        boxes = np.concatenate([p.boxes for p in with_boxes])  # type: ignore[misc]
        det = np.concatenate([p.det_scores for p in with_boxes  # type: ignore[misc]
                              if p.det_scores is not None]) if all(
            p.det_scores is not None for p in with_boxes) else None
        scores = np.concatenate([p.scores for p in with_boxes], axis=1) if all(  # type: ignore
            p.scores is not None for p in with_boxes) else None
    else:
        boxes, det, scores = np.zeros((0, 4), np.float32), None, None
    rows: dict[str, list[float]] = {}
    for p in parts:
        for stage, enq, start, end in p.trace:
            if stage not in rows:
                rows[stage] = [enq, start, end]
            else:
                r = rows[stage]
                rows[stage] = [min(r[0], enq), min(r[1], start), max(r[2], end)]
    trace = tuple((s, *v) for s, v in rows.items())
    return head.replace(boxes=boxes, det_scores=det, scores=scores, crops=(), part=0, nparts=1,
                        trace=trace)  # type: ignore[arg-type]
