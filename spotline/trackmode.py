"""Video in one process, per-frame mode and track mode, with the pipeline's stage code.

Per-frame mode is the seed's method on every frame: every crop through the upscaler and the
image tower, each caption its argmax box. Track mode (stages/track.py) follows the boxes per
source with ByteTrack, embeds a track's crop only when it changed or on keyframes, weighs
evidence over frames and assigns one box per caption. Both use the same Detect, Upscale and
Score objects, so ``spotline bench --video`` compares the methods, not two implementations.

A source's tracking state can live in memory or in Redis (``store``): with Redis, each frame
loads the state, tracks, and saves it back, as a worker of the streaming track stage would.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .common.envelope import Envelope
from .common.settings import Settings
from .common.trackstore import CachedEmbedding, EmbeddingCache, TrackStore
from .stages import runtime
from .stages.assign import assign
from .stages.collect import ltwh
from .stages.detect import Detect
from .stages.grounding import NO_TRACK
from .stages.track import (
    Embedder,
    Plan,
    SourceState,
    TrackOptions,
    combine,
    fresh_embeddings,
)

BoxLTWH = tuple[float, float, float, float]


@dataclass(frozen=True)
class FrameAnswer:
    """One frame's answer: per caption its box ([l, t, w, h]; None: not in view), score,
    track id (NO_TRACK in per-frame mode), and how many crops went through the image tower."""

    boxes: tuple[BoxLTWH | None, ...]
    scores: tuple[float, ...]
    track_ids: tuple[int, ...]
    crops_embedded: int
    boxes_found: int
    switched: tuple[bool, ...] = ()
    detected: bool = True  # False: the boxes are the tracks' Kalman predictions


@dataclass
class Detected:
    """A frame after detect: its boxes (xyxy), detector scores and plain crops."""

    boxes: np.ndarray
    det_scores: np.ndarray
    crops: list[np.ndarray]


class FrameModels:
    """The detect stage and the track stage's embedder (upscale and score), set up once, used
    frame by frame."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.detect = Detect(settings)
        self.detect.setup()
        self.embedder = Embedder(settings)
        self.embedder.setup()
        runtime.set_threads(settings)  # one process runs every stage: all cores (auto)

    def detected(self, frame_id: str, image: bytes, captions: Sequence[str]) -> Detected:
        env = Envelope(frame_id=frame_id, source_id="video", captions=tuple(captions),
                       image=image)
        parts = sorted((e for _, e in self.detect.process([env])), key=lambda e: e.part)
        with_boxes = [p for p in parts if p.boxes is not None and len(p.boxes)]
        if not with_boxes:
            return Detected(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), [])
        return Detected(np.concatenate([p.boxes for p in with_boxes]),  # type: ignore[misc]
                        np.concatenate([p.det_scores for p in with_boxes]),  # type: ignore[misc]
                        [c for p in with_boxes for c in p.crops])

    def decode(self, frame_id: str, image: bytes) -> np.ndarray:
        """The frame as detect decodes it (BGR), for frames the detector skips."""
        from .stages.detect import decode_frame

        return decode_frame(Envelope(frame_id=frame_id, image=image), self.settings)

    def crops(self, bgr: np.ndarray, boxes: np.ndarray) -> list[np.ndarray]:
        """The boxes' crops, cut as detect cuts them."""
        from .common.images import crop_boxes, swap_rb

        return crop_boxes(swap_rb(bgr), boxes, self.detect.crop_cap)

    def embed(self, frame_id: str, crops: list[np.ndarray]) -> np.ndarray:
        """Image embeddings (N×D float32) of plain crops, upscaled first when upscale is on."""
        return self.embedder.embed(frame_id, crops)

    def scores(self, captions: Sequence[str], embeds: np.ndarray) -> np.ndarray:
        """Captions × boxes scores (the score stage's formula) for image embeddings."""
        return self.embedder.scores(captions, embeds)


class PerFrame:
    """The seed's method on each frame: every crop embedded, each caption its argmax."""

    def __init__(self, models: FrameModels, joint: bool = False) -> None:
        self.models = models
        self.joint = joint

    def frame(self, frame_id: str, image: bytes, captions: Sequence[str]) -> FrameAnswer:
        return self.frame_scored(frame_id, image, captions)[0]

    def frame_scored(self, frame_id: str, image: bytes,
                     captions: Sequence[str]) -> tuple[FrameAnswer, np.ndarray, np.ndarray]:
        """The answer, and the captions × boxes scores and xyxy boxes it came from."""
        det = self.models.detected(frame_id, image, captions)
        embeds = self.models.embed(frame_id, det.crops)
        scores = self.models.scores(captions, embeds)
        if len(det.boxes) == 0:
            return (FrameAnswer(tuple(None for _ in captions), tuple(np.nan for _ in captions),
                                tuple(NO_TRACK for _ in captions), 0, 0), scores, det.boxes)
        picks = assign(scores, joint=self.joint, captions=captions)
        answer = FrameAnswer(tuple(ltwh(det.boxes[i]) for i in picks),
                             tuple(float(scores[r, i]) for r, i in enumerate(picks)),
                             tuple(NO_TRACK for _ in captions), len(det.crops), len(det.boxes))
        return answer, scores, det.boxes


@dataclass
class TrackCounters:
    """What track mode did, summed over frames."""

    frames: int = 0
    detected: int = 0  # frames the detector ran on (the others: Kalman predictions)
    boxes: int = 0
    embedded: int = 0
    reused: int = 0
    flips: int = 0
    state_s: float = 0.0  # time spent loading and saving state (Redis)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def reuse_ratio(self) -> float:
        """Share of tracked crops answered from the embedding cache."""
        total = self.embedded + self.reused
        return self.reused / total if total else 0.0


class Tracked:
    """Track mode for any number of sources; state in memory, or in Redis with ``store``."""

    def __init__(self, models: FrameModels, options: TrackOptions | None = None,
                 store: TrackStore | None = None, cache: EmbeddingCache | None = None,
                 calibration: Any = None) -> None:
        self.models = models
        self.options = options or TrackOptions()
        self.store, self.cache = store, cache
        self.calibration = calibration
        self.states: dict[str, SourceState] = {}
        self.caches: dict[str, dict[int, CachedEmbedding]] = {}
        self.counters = TrackCounters()

    def _load(self, source: str) -> SourceState:
        if self.store is None:
            return self.states.setdefault(source, SourceState(self.options))
        started = time.perf_counter()
        _seq, state = self.store.load(source)
        out = SourceState.from_state(state, self.options)
        self.counters.state_s += time.perf_counter() - started
        return out

    def _cached(self, source: str, track_ids: Sequence[int]) -> dict[int, CachedEmbedding]:
        if self.cache is None:
            return self.caches.setdefault(source, {})
        return self.cache.get(source, [t for t in track_ids if t >= 0])

    def _save(self, source: str, state: SourceState, fresh: dict[int, CachedEmbedding]) -> None:
        if self.store is None:
            self.caches.setdefault(source, {}).update(fresh)
            return
        started = time.perf_counter()
        self.store.save(source, state.seq, state.to_state())
        if self.cache is not None:
            self.cache.put(source, fresh)
        self.counters.state_s += time.perf_counter() - started

    def frame(self, source: str, seq: int, frame_id: str, image: bytes,
              captions: Sequence[str]) -> FrameAnswer:
        state = self._load(source)
        det, plan = self._observe(state, seq, frame_id, image, captions)
        cached = self._cached(source, plan.track_ids.tolist())
        plan = state.with_cache(plan, det.boxes, cached, captions)
        embeds = self._embeddings(frame_id, det, plan, cached)
        scores = self.models.scores(captions, embeds)
        picks = state.ground(plan, captions, scores, self.calibration)
        self._save(source, state, fresh_embeddings(plan, det.boxes, embeds))
        self._count(plan, picks)
        return FrameAnswer(
            tuple(None if p.box is None else ltwh(det.boxes[p.box]) for p in picks),
            tuple(p.score for p in picks), tuple(p.track_id for p in picks),
            int(plan.embed.sum()), len(det.boxes), tuple(p.switched for p in picks),
            plan.detected)

    def _observe(self, state: SourceState, seq: int, frame_id: str, image: bytes,
                 captions: Sequence[str]) -> tuple[Detected, Plan]:
        """The frame's boxes, from the detector, or from the tracks' Kalman prediction when
        the source's state says they will do (``SourceState.needs_detection``)."""
        bgr = self.models.decode(frame_id, image)
        if not state.needs_detection(seq):
            propagated = state.propagate(seq, (bgr.shape[1], bgr.shape[0]), bgr)
            if propagated is not None:  # else a track was not found: detect the frame
                plan, boxes, scores = propagated
                return Detected(boxes, scores, self.models.crops(bgr, boxes)), plan
        boxes, det_scores, crops = self.models.detect.find(bgr)
        return (Detected(boxes, det_scores, crops),
                state.plan(seq, boxes, det_scores, image=bgr))

    def _embeddings(self, frame_id: str, det: Detected, plan: Plan,
                    cached: dict[int, CachedEmbedding]) -> np.ndarray:
        todo = [int(i) for i in np.flatnonzero(plan.embed)]
        return combine(plan, self.models.embed(frame_id, [det.crops[i] for i in todo]), cached)

    def _count(self, plan: Plan, picks: Sequence[Any]) -> None:
        c = self.counters
        c.frames += 1
        c.detected += int(plan.detected)
        c.boxes += len(plan.embed)
        c.embedded += int((plan.embed & (plan.track_ids >= 0)).sum())
        c.reused += int((~plan.embed).sum())
        c.flips += sum(1 for p in picks if p.switched)

