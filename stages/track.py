"""Track mode: one source's steps frame after frame, and the `track` stage that runs them.

``SourceState`` is everything a source carries from one frame to the next (its tracker, its
evidence, the last sequence number) and converts to and from plain data, so it can be kept in
Redis (common/trackstore.py) between frames handled by different workers. For each frame:

1. ``plan`` runs the tracker on the detector's boxes and decides, per box, whether its crop
   must be embedded or the track's cached embedding stands for it (stages/tracker.py);
2. the scorer embeds only the planned crops and scores captions × boxes (stages/score.py);
3. ``ground`` updates the evidence and picks each caption's box (stages/grounding.py).

Sequence numbers decide what the tracker sees: a frame after a gap ages the tracks by the gap;
a frame at or below the last one (late, or delivered again) is never fed to the tracker (that
would rewind it): it is grounded without tracks, every crop embedded, like per-frame mode.

``Track`` is the stage (``frames → detect → track → collect`` with ``tracking=true``): per
source, in sequence order, it loads the state from Redis, runs the steps above with the
upscaler and the scorer on the crops that need it, saves the state (compare-and-set on the
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
from .assign import Calibrator, ground
from .base import Routed, Stage, check_crops
from .detect import decode_frame
from .evidence import Evidence, EvidenceConfig
from .grounding import NO_TRACK, Grounded, ground_frame
from .memory import remember
from .templates import Template, exposure, make_template, match
from .tracker import ReuseConfig, SourceTracker, TrackerConfig, crop_changed, stale

STATE_VERSION = 1


@dataclass(frozen=True)
class TrackOptions:
    """Track mode's settings."""

    tracker: TrackerConfig = field(default_factory=TrackerConfig)
    reuse: ReuseConfig = field(default_factory=ReuseConfig)
    evidence: EvidenceConfig = field(default_factory=EvidenceConfig)
    joint: bool = True  # one box per caption where a frame has several captions
    abstain_below: float | None = None  # "not in view" under this calibrated probability
    detect_every: int = 1  # the detector runs on frames whose seq is a multiple of this
    settle: int = 2  # ...and on every frame while a track has fewer detections than this
    motion: float = 0.25  # ...or has moved more than this share of its size since its last
    match: float = 0.0  # between detections, find each track by its look (this similarity at
    # least, stages/templates.py; 0: off, the Kalman prediction alone)

    def __post_init__(self) -> None:
        if self.detect_every < 1 or self.settle < 0 or self.motion < 0 \
                or not 0.0 <= self.match <= 1.0:
            raise ValueError("detect_every >= 1, settle >= 0, motion >= 0 and 0 <= match <= 1 "
                             "are required")


@dataclass(frozen=True)
class Plan:
    """What the tracker made of a frame: each box's track id, which crops to embed, and
    whether the frame was tracked at all (False: late or repeated frame)."""

    seq: int
    track_ids: np.ndarray  # int64, NO_TRACK for untracked boxes
    embed: np.ndarray  # bool, True: embed this crop; False: use the cached embedding
    tracked: bool
    skipped: int = 0
    detected: bool = True  # False: the boxes are the tracker's Kalman predictions


class SourceState:
    """One source's tracker and evidence, and the last frame they have seen."""

    def __init__(self, options: TrackOptions | None = None) -> None:
        self.options = options or TrackOptions()
        self.tracker = SourceTracker(self.options.tracker)
        self.evidence = Evidence(self.options.evidence)
        self.templates: dict[int, Template] = {}  # track id -> its look at its last detection
        self.seq = -1

    def plan(self, seq: int, boxes: np.ndarray, det_scores: np.ndarray,
             cached: Mapping[int, CachedEmbedding] | None = None,
             image: np.ndarray | None = None) -> Plan:
        """Track the frame ``seq`` (if it is new) and decide which crops to embed. With the
        frame's ``image`` (BGR) and ``match`` on, each tracked box's template is taken anew."""
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        if seq <= self.seq:  # late or repeated: the tracker has moved on
            return Plan(seq, np.full(len(boxes), NO_TRACK, np.int64),
                        np.ones(len(boxes), bool), tracked=False)
        skipped = seq - self.seq - 1 if self.seq >= 0 else 0
        ids = self.tracker.update(boxes, det_scores, skipped=skipped)
        self.seq = seq
        if self.options.match > 0 and image is not None:
            self._take_templates(image, boxes, ids)
        plan = Plan(seq, ids, np.ones(len(boxes), bool), tracked=True, skipped=skipped)
        return self.with_cache(plan, boxes, cached) if cached else plan

    def needs_detection(self, seq: int) -> bool:
        """Whether frame ``seq`` needs the detector's boxes, or the tracks' predicted boxes
        will do: the detector runs on keyframes (``seq`` a multiple of ``detect_every``), on
        a source's first frames, after a gap longer than ``detect_every``, on late frames,
        while a track is young (matched in fewer than ``settle`` detections: its velocity is a
        guess) or none is followed, and when a track would have moved more than ``motion``
        times its smaller side since its last detection (its predicted box would likely miss
        it: small, fast objects; 0: never). Between, the tracks move along their Kalman
        prediction. With ``match`` on, a track with a template is found by its look instead
        (``propagate``), and only the others are held to ``motion``."""
        opts = self.options
        every = opts.detect_every
        if every <= 1 or seq % every == 0 or self.seq < 0 or not 0 < seq - self.seq <= every:
            return True
        measured = frozenset(self.templates) if opts.match > 0 else frozenset()
        return self.tracker.young(opts.settle) or (
            opts.motion > 0 and self.tracker.outrun(opts.motion, seq - self.seq, measured))

    def propagate(self, seq: int, size: tuple[int, int], image: np.ndarray | None = None
                  ) -> tuple[Plan, np.ndarray, np.ndarray] | None:
        """The plan for a new frame the detector did not see (see ``needs_detection``): the
        followed tracks' predicted boxes, clipped to the image (``size`` = width, height),
        with their track ids; returns (plan, xyxy boxes, scores).

        With ``match`` on and the frame's ``image`` (BGR), each confirmed track with a
        template is looked for near its prediction (stages/templates.py) and its box is where
        it was found, fed to its Kalman filter as a measurement. If one cannot be found (its
        best similarity under ``match``), nothing changes and None is returned: the caller
        runs the detector on the frame instead (``plan``)."""
        if seq <= self.seq:
            raise ValueError(f"frame {seq} is not after {self.seq}: detect it instead")
        measured: dict[int, np.ndarray] = {}
        if self.options.match > 0 and image is not None and self.templates:
            found = self._find(image)
            if found is None:
                return None
            measured = found
        skipped = seq - self.seq - 1 if self.seq >= 0 else 0
        boxes, scores, ids = self.tracker.predict(skipped=skipped)
        if measured:
            self.tracker.correct(measured)
            for i, tid in enumerate(ids.tolist()):
                if tid in measured:
                    boxes[i] = measured[tid]
        width, height = size
        boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, width)
        boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, height)
        inside = (boxes[:, 2] - boxes[:, 0] >= 1) & (boxes[:, 3] - boxes[:, 1] >= 1)
        boxes, scores, ids = boxes[inside], scores[inside], ids[inside]  # not out of view
        self.seq = seq
        return (Plan(seq, ids, np.ones(len(ids), bool), tracked=True, skipped=skipped,
                     detected=False), boxes, scores)

    def with_cache(self, plan: Plan, boxes: np.ndarray,
                   cached: Mapping[int, CachedEmbedding],
                   captions: Sequence[str] = ()) -> Plan:
        """The plan with a box's crop left out where its track's cached embedding stands for
        it (the cache is looked up by the track ids the plan gave).

        A crop is embedded when its track has nothing cached, on the track's keyframes, and
        when the crop changed (moved or resized). With the reuse ``contend_margin`` set and
        the frame's ``captions`` given, a changed crop is embedded only while its track
        ``contends`` for one of them: a fresh look is spent where it can change an answer."""
        if not plan.tracked:
            return plan
        reuse = self.options.reuse
        ids = [int(t) for t in plan.track_ids if t >= 0]
        embed = np.ones(len(plan.track_ids), bool)
        for i, tid in enumerate(plan.track_ids.tolist()):
            hit = cached.get(tid) if tid >= 0 else None
            if hit is None or stale(plan.seq, hit.seq, hit.box, reuse):
                continue
            embed[i] = crop_changed(boxes[i], hit.box, reuse) and (
                reuse.contend_margin is None or not captions
                or self.contends(tid, ids, captions))
        return dataclasses.replace(plan, embed=embed)

    def contends(self, track: int, tracks: Sequence[int], captions: Sequence[str]) -> bool:
        """Whether ``track`` competes for one of ``captions`` among the frame's ``tracks``:
        its posterior log-odds within the reuse ``contend_margin`` of the best, with another
        track as close, or no posterior yet. A track far behind, or far ahead of every other,
        keeps its answer whatever a fresh look of a moved crop says; keyframes refresh it."""
        margin = self.options.reuse.contend_margin
        assert margin is not None
        for caption in captions:
            posts = self.evidence.posteriors(caption, tracks)
            mine = posts.get(track)
            if mine is None:
                return True
            best = max(posts.values())
            if mine >= best - margin and sum(p >= best - margin for p in posts.values()) > 1:
                return True
        return False

    def _take_templates(self, image: np.ndarray, boxes: np.ndarray, ids: np.ndarray) -> None:
        """Each tracked box's template from this (detected) frame; those of removed tracks
        go."""
        seen = exposure(image)
        for box, tid in zip(boxes, ids.tolist(), strict=True):
            if tid < 0:
                continue
            template = make_template(image, box, seen)
            if template is None:
                self.templates.pop(tid, None)
            else:
                self.templates[tid] = template
        known = self.tracker.known()
        for tid in [t for t in self.templates if t not in known]:
            del self.templates[tid]

    def _find(self, image: np.ndarray) -> dict[int, np.ndarray] | None:
        """The tracks with a template, found near their predictions in ``image`` (track id ->
        xyxy box), or None when a confirmed one is not found well enough. An unconfirmed track
        (one detection, maybe the detector's flicker) not found stays where it was seen."""
        predicted, ids, confirmed = self.tracker.peek()
        now = exposure(image)
        found: dict[int, np.ndarray] = {}
        for box, tid, sure in zip(predicted, ids.tolist(), confirmed.tolist(), strict=True):
            template = self.templates.get(tid)
            if template is None:
                continue
            hit = match(image, template, box, now)
            if hit is not None and hit[1] >= self.options.match:
                found[tid] = hit[0]
            elif sure:
                return None
        return found

    def ground(self, plan: Plan, captions: Sequence[str], scores: np.ndarray,
               calibration: Calibrator | None = None) -> list[Grounded]:
        """Each caption's box in the planned frame, from its C×N scores."""
        opts = self.options
        return ground_frame(self.evidence, plan.seq, captions, scores, plan.track_ids,
                            joint=opts.joint, calibration=calibration,
                            abstain_below=opts.abstain_below)

    def alive(self) -> int:
        """Tracks followed now."""
        return self.tracker.alive()

    def to_state(self) -> dict[str, Any]:
        return {"v": STATE_VERSION, "seq": self.seq, "tracker": self.tracker.state(),
                "evidence": self.evidence.to_state(),
                "templates": [[tid, *t.to_state()] for tid, t in self.templates.items()]}

    @classmethod
    def from_state(cls, state: Mapping[str, Any] | None,
                   options: TrackOptions | None = None) -> SourceState:
        self = cls(options)
        if state is None:
            return self
        if state.get("v") != STATE_VERSION:
            raise ValueError(f"source state version {state.get('v')!r} is not {STATE_VERSION}")
        self.seq = int(state["seq"])
        self.tracker = SourceTracker.from_state(state["tracker"], self.options.tracker)
        self.evidence = Evidence.from_state(state["evidence"], self.options.evidence)
        self.templates = {int(raw[0]): Template.from_state(raw[1:])
                          for raw in state.get("templates", ())}
        return self


def fresh_embeddings(plan: Plan, boxes: np.ndarray,
                     embeddings: np.ndarray) -> dict[int, CachedEmbedding]:
    """The cache entries a frame makes: the tracked boxes whose crops were embedded."""
    out = {}
    for i in np.flatnonzero(plan.embed & (plan.track_ids >= 0)):
        out[int(plan.track_ids[i])] = CachedEmbedding(
            plan.seq, np.asarray(boxes[i], np.float32), np.asarray(embeddings[i], np.float32))
    return out


# --- the streaming stage ---------------------------------------------------------------------
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
                                switch_frames=settings.track_switch_frames),
        joint=settings.joint_assign,
        # not in view: resolved in setup, from the scorer's calibration (when there is one)
        abstain_below=None,
        detect_every=settings.track_detect_every, settle=settings.track_settle,
        motion=settings.track_redetect_motion, match=settings.track_match)


class Embedder:
    """The upscale and score stages' model code, used on chosen crops only."""

    def __init__(self, settings: Any) -> None:
        from .score import Score
        from .upscale import Upscale

        self.settings = settings
        # Their model code only: routed as in the per-frame pipeline, which has them.
        inner = settings.replace(tracking=False)
        self.upscale = Upscale(inner) if settings.upscale else None
        self.score = Score(inner)

    def setup(self) -> None:
        if self.upscale is not None:
            self.upscale.setup()
        self.score.setup()

    def embed(self, frame_id: str, crops: Sequence[np.ndarray]) -> np.ndarray:
        """Image embeddings (N×D float32) of plain crops, upscaled first when upscale is on."""
        from ..common.envelope import Envelope

        if not crops:
            return np.zeros((0, 0), np.float32)
        if self.upscale is not None:
            env = Envelope(frame_id=frame_id, crops=tuple(crops),
                           boxes=np.zeros((len(crops), 4), np.float32))
            crops = list(self.upscale.process([env])[0][1].crops)  # type: ignore[union-attr]
        return self.score.image_array(list(crops))

    def scores(self, captions: Sequence[str], embeds: np.ndarray) -> np.ndarray:
        """Captions × boxes scores (the score stage's formula) for image embeddings."""
        return self.score.scores_for(tuple(captions), embeds)


def combine(plan: Plan, fresh: np.ndarray,
            cached: Mapping[int, CachedEmbedding]) -> np.ndarray:
    """Every box's embedding: the fresh ones where the plan embedded, else the track's cached."""
    todo = np.flatnonzero(plan.embed)
    if len(plan.embed) == 0:
        return np.zeros((0, 0), np.float32)
    dim = fresh.shape[1] if len(todo) else len(next(iter(cached.values())).embedding)
    out = np.empty((len(plan.embed), dim), np.float32)
    if len(todo):
        out[todo] = fresh
    for i in np.flatnonzero(~plan.embed):
        out[i] = cached[int(plan.track_ids[i])].embedding
    return out


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
        caller that runs this stage's step in its own process (spotline/trackmode.py); a
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
        from . import calibration, runtime

        if self.store is None or self.cache is None:
            if not self.settings.redis_url:
                raise ConfigError("the track stage keeps each source's state in Redis: set "
                                  "redis_url (spotline up and the workers it starts do)")
            self.store, self.cache = open_stores(self.settings, ANSWERS_KEPT)
            self.alive = TracksAlive(self.store.t)  # spotline_tracks_alive, one per source
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
                                               abstain_threshold(self.settings, self.calibration))
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
