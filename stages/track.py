"""The `track` stage (``frames → detect → track → collect`` with ``tracking=true``).

Per source, in sequence order, ``Track`` loads the source's state from Redis, runs one source's
steps (stages/tracking/source.py: plan with the tracker, embed only the crops that need it with
the upscaler and the scorer, ground each caption), saves the state (compare-and-set on the
sequence number) and sends collect the frame with its track ids and picks. How this keeps
order with consumer groups and survives a worker's death: docs/architecture.md, "Tracks".
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..common.envelope import Envelope
from ..common.errors import ConfigError
from ..common.images import crop_boxes, swap_rb
from ..common.metrics import TracksAlive
from ..common.settings import Settings
from ..common.topology import next_stage
from ..common.trackstore import CachedEmbedding, EmbeddingCache, TrackStore, open_stores
from .base import Routed, Stage, check_crops
from .detect import decode_frame
from .memory import remember
from .tracking.assign import ground
from .tracking.evidence import EvidenceConfig
from .tracking.grounding import NO_TRACK
from .tracking.source import (
    Embedder,
    Plan,
    SourceState,
    TrackOptions,
    combine,
    fresh_embeddings,
)
from .tracking.tracker import ReuseConfig, TrackerConfig

ANSWERS_KEPT = 1024  # answers kept beside a source's state, for frames delivered again


def options_from(settings: Any) -> TrackOptions:
    """Track mode's options from the settings object."""
    return TrackOptions(
        tracker=TrackerConfig(track_buffer=settings.track_buffer),
        reuse=ReuseConfig(keyframe_every=settings.track_keyframe_every,
                          min_iou=settings.track_min_iou,
                          max_size_change=settings.track_max_size_change,
                          contend_margin=(settings.track_contend_margin
                                          if settings.track_contend_margin >= 0 else None)),
        evidence=EvidenceConfig(decay=settings.track_decay, margin=settings.track_margin,
                                switch_frames=settings.track_switch_frames,
                                hold=settings.track_hold, hold_margin=settings.track_hold_margin),
        joint=settings.joint_assign,
        # not in view: resolved in setup, from the scorer's calibration (when there is one)
        abstain_below=None,
        detect_every=settings.track_detect_every, settle=settings.track_settle,
        motion=settings.track_redetect_motion, match=settings.track_match)


@dataclass
class TrackStats:
    """What the track stage did (read by tests and the bench; metrics follow them)."""

    frames: int = 0
    untracked: int = 0  # frames answered without tracks (no seq, late, or delivered again)
    predicted: int = 0  # frames whose boxes were the tracks' Kalman predictions
    detected_here: int = 0  # frames the detect stage left undetected but that needed it
    replayed: int = 0  # frames delivered again after their answer was saved
    waited_s: float = 0.0  # time spent waiting for a missing earlier frame
    embedded: int = 0
    reused: int = 0
    flips: int = 0
    alive: dict[str, int] = field(default_factory=dict)  # tracks alive per source

    @property
    def reuse_ratio(self) -> float:
        total = self.embedded + self.reused
        return self.reused / total if total else 0.0


class Track(Stage):
    """Track mode's ordered stage: per source, in sequence order, ByteTrack on the boxes, the
    image tower only for crops without a usable cached embedding, evidence over time, one box
    per caption, "not in view"; state and cache in Redis (common/trackstore.py)."""

    name = "track"

    def __init__(self, settings: Settings, *, stores: tuple[Any, Any] | None = None,
                 embedder: Embedder | None = None, detector: Any = None) -> None:
        """``stores`` (a state store and an embedding cache with TrackStore's and
        EmbeddingCache's methods), ``embedder`` and ``detector`` (set up already) are for a
        caller that runs this stage's step in its own process (spotline/pipeline/trackmode.py); a
        worker leaves them out: the stage opens its stores on Redis and loads its models."""
        super().__init__(settings)
        self.options = options_from(settings)
        self._own_models = embedder is None
        self.embedder = embedder or Embedder(settings)
        self.store: TrackStore | None = stores[0] if stores else None
        self.cache: EmbeddingCache | None = stores[1] if stores else None
        self.alive: TracksAlive | None = None
        self.calibration: Any = None
        self.stats = TrackStats()
        self.detector: Any = detector  # the detect stage's code, for frames it left to this one
        self.crop_cap: int | None = None
        self._ready = False

    def setup(self) -> None:
        """Connect to the state's Redis, load the upscaler and scorer, and the calibration
        when "not in view" is on."""
        from . import runtime
        from .tracking import calibration

        if self.store is None or self.cache is None:
            if not self.settings.redis_url:
                raise ConfigError("the track stage keeps each source's state in Redis: set "
                                  "redis_url (spotline up and the workers it starts do)")
            self.store, self.cache = open_stores(self.settings, ANSWERS_KEPT)
            self.alive = TracksAlive(self.store.t)  # spotline_tracks_alive, one per source
        if self.metrics is not None:  # every source of boxes a series from the start (at 0),
            for by in ("detect", "track", "look"):  # for the dashboard's ratios of each
                self.metrics.track_boxes.labels(by)
        if self._own_models:
            self.embedder.setup()
        self.model_name = self.embedder.score.model_name
        self.device_name = self.embedder.score.device_name
        if calibration.not_in_view_mode(self.settings.not_in_view) != "false":
            # auto: abstain when the scorer has a calibration (the demo scorer's is committed);
            # true: it must have one
            scorer_dir = runtime.resolve_weights(self.settings).scorer
            self.calibration = calibration.load(scorer_dir)
            if self.calibration is None and self.settings.not_in_view == "true":
                raise ConfigError(f"not_in_view needs {calibration.calibration_path(scorer_dir)}"
                                  ": fit it with `spotline eval DATASET --calibrate`")
            self.options = dataclasses.replace(self.options, abstain_below=calibration.
                                               abstain_threshold(self.settings, self.calibration,
                                                                  tracked=True))
        self._ready = True

    def process(self, batch: list[Envelope]) -> list[Routed]:
        """Each source's frames of the batch in sequence order; one whole frame each to
        collect, with its track ids, picks and scores."""
        if not self._ready:
            self.setup()
        for env in batch:
            check_crops(env)
        target = next_stage(self.name, self.settings)
        ordered = sorted(range(len(batch)), key=lambda i: (batch[i].source_id, batch[i].seq, i))
        return [(target, self.frame(batch[i])) for i in ordered]

    def frame(self, env: Envelope) -> Envelope:
        """One frame of a source, tracked when it is the next one (see the module doc)."""
        if not self._ready:
            self.setup()
        assert self.store is not None and self.cache is not None
        self.stats.frames += 1
        if env.seq < 0:
            return self._untracked(env)
        last, saved = self._wait_turn(env)
        if env.seq <= last:  # delivered again (its answer was saved) or late
            return self._replayed(env) or self._untracked(env)
        state = SourceState.from_state(saved["source"] if saved else None, self.options)
        answer, fresh = self._track(env, state)
        self.cache.put(env.source_id, fresh)
        remember(self, env, answer, fresh)  # its source's past, for `spotline ask`
        if not self.store.save(env.source_id, env.seq, {"source": state.to_state()},
                               answer=(env.frame_id, answer)):
            # another worker saved this frame (or a later one) first: its answer stands
            return self._replayed(env) or self._untracked(env)
        self.stats.alive[env.source_id] = state.alive()
        if self.alive is not None:
            self.alive.note(env.source_id, env.seq, state.alive())
        self._count("tracked", env.source_id, answer["flips"])
        return _with_answer(env, answer)

    def _replayed(self, env: Envelope) -> Envelope | None:
        """The frame answered as it was when its state was saved (None: no answer kept)."""
        assert self.store is not None
        answer = self.store.answer(env.source_id, env.frame_id)
        if answer is None:
            return None
        self.stats.replayed += 1
        self._count("replayed")
        return _with_answer(env, answer)

    def _count(self, outcome: str, source: str = "", flips: int = 0) -> None:
        """The stage's series (common/metrics.py), when a worker runs it."""
        m = self.metrics
        if m is None:
            return
        m.track_frames.labels(outcome).inc()
        if outcome == "tracked" and flips:
            m.caption_flips.labels(m.source(source)).inc(flips)

    def _wait_turn(self, env: Envelope) -> tuple[int, dict[str, Any] | None]:
        """The source's saved state once the frame before this one is in it, or once this
        frame is ``track_reorder_ms`` old (its predecessor was dropped, or is late)."""
        assert self.store is not None
        deadline = env.capture_time + self.settings.track_reorder_ms / 1000.0
        started = time.monotonic()
        while True:
            last, saved = self.store.load(env.source_id)
            last = max(last, 0)  # producers number a source's frames from 1
            if env.seq <= last + 1 or time.time() >= deadline:
                self.stats.waited_s += time.monotonic() - started
                return last, saved
            time.sleep(0.005)

    def _detect(self, env: Envelope, bgr: np.ndarray | None = None) -> Envelope:
        """The frame with the detector's boxes and crops: as the detect stage sent it, or, for
        a frame it left undetected (``track_detect_every``), found here."""
        if env.boxes is not None:
            return env
        if self.detector is None:
            from .detect import Detect

            self.detector = Detect(self.settings)
            self.detector.setup()
        if bgr is None:
            bgr = decode_frame(env, self.settings)
        boxes, scores, crops = self.detector.find(bgr)
        self.stats.detected_here += 1
        return env.replace(image=None, boxes=boxes, det_scores=scores, crops=tuple(crops))

    def _observe(self, env: Envelope, state: SourceState) -> tuple[Envelope, Plan]:
        """The frame's boxes (the detector's, or the tracks' Kalman predictions where
        ``SourceState.needs_detection`` says they will do) and the tracker's plan."""
        bgr = None
        if env.boxes is None and not state.needs_detection(env.seq):
            bgr = decode_frame(env, self.settings)
            propagated = state.propagate(env.seq, (bgr.shape[1], bgr.shape[0]), bgr)
            if propagated is not None:  # else a track was not found: detect the frame
                plan, boxes, scores = propagated
                crops = crop_boxes(swap_rb(bgr), boxes, self._crop_cap())
                return env.replace(image=None, boxes=boxes, det_scores=scores,
                                   crops=tuple(crops)), plan
        if bgr is None and env.image and self.options.match > 0:  # for the tracks' templates
            bgr = decode_frame(env, self.settings)
        env = self._detect(env, bgr)
        assert env.boxes is not None and env.det_scores is not None
        return env, state.plan(env.seq, env.boxes, env.det_scores, image=bgr)

    def _crop_cap(self) -> int:
        """The crops' cap, as detect cuts them (the scorer's input size without upscaling)."""
        if self.crop_cap is None:
            from . import runtime

            self.crop_cap = runtime.crop_cap(self.settings,
                                             runtime.resolve_weights(self.settings))
        return self.crop_cap

    def _track(self, env: Envelope, state: SourceState) -> tuple[dict[str, Any],
                                                                   dict[int, CachedEmbedding]]:
        assert self.cache is not None
        detected_before = self.stats.detected_here
        env, plan = self._observe(env, state)
        assert env.boxes is not None
        boxes = env.boxes
        cached = self.cache.get(env.source_id, [t for t in plan.track_ids.tolist() if t >= 0])
        plan = state.with_cache(plan, boxes, cached, env.captions)
        todo = [int(i) for i in np.flatnonzero(plan.embed)]
        embeds = combine(plan, self.embedder.embed(env.frame_id, [env.crops[i] for i in todo]),
                         cached)
        scores = self.embedder.scores(env.captions, embeds)
        picks = state.ground(plan, env.captions, scores, self.calibration)
        flips = sum(p.switched for p in picks)
        self.stats.embedded += len(todo)
        self.stats.reused += len(boxes) - len(todo)
        self.stats.flips += flips
        if self.metrics is not None:
            self.metrics.track_crops.labels("embedded").inc(len(todo))
            self.metrics.track_crops.labels("reused").inc(len(boxes) - len(todo))
            by = ("look" if not plan.detected else
                  "track" if self.stats.detected_here > detected_before else "detect")
            self.metrics.track_boxes.labels(by).inc()
        self.stats.predicted += int(not plan.detected)
        answer = _answer(env, scores, plan.track_ids,
                         [-1 if p.box is None else p.box for p in picks],
                         [p.probability for p in picks])
        return {**answer, "flips": flips}, fresh_embeddings(plan, boxes, embeds)

    def _untracked(self, env: Envelope) -> Envelope:
        """Per-frame answer (every crop embedded), for frames that cannot be tracked."""
        env = self._detect(env)
        self.stats.untracked += 1
        self.stats.embedded += len(env.crops)
        self._count("untracked")
        embeds = self.embedder.embed(env.frame_id, list(env.crops))
        scores = self.embedder.scores(env.captions, embeds)
        picks = ground(scores, env.captions, joint=self.options.joint,
                       calibration=self.calibration, abstain_below=self.options.abstain_below)
        n = len(env.crops)
        return _with_answer(env, _answer(env, scores, np.full(n, NO_TRACK, np.int64),
                                         [-1 if p.box is None else p.box for p in picks],
                                         [p.probability for p in picks]))


def _answer(env: Envelope, scores: np.ndarray, track_ids: np.ndarray, picks: Sequence[int],
            probs: Sequence[float]) -> dict[str, Any]:
    boxes = env.boxes if env.boxes is not None else np.zeros((0, 4), np.float32)
    det = env.det_scores if env.det_scores is not None else np.ones(len(boxes), np.float32)
    return {"frame_id": env.frame_id, "scores": np.asarray(scores, np.float32),
            "boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
            "det_scores": np.asarray(det, np.float32).reshape(-1),
            "track_ids": np.asarray(track_ids, np.int64),
            "picks": np.asarray(picks, np.int64).reshape(-1),
            "probs": np.asarray(probs, np.float32).reshape(-1)}


def _with_answer(env: Envelope, answer: Mapping[str, Any]) -> Envelope:
    """The frame for collect: its boxes (the detector's or predicted) with the answer."""
    boxes = answer.get("boxes", env.boxes)
    return env.replace(image=None, crops=(), boxes=boxes,
                       det_scores=answer.get("det_scores", env.det_scores),
                       scores=answer["scores"], track_ids=answer["track_ids"],
                       picks=answer["picks"], probs=answer["probs"])
