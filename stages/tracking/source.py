"""One source's steps in track mode, frame after frame (the algorithm of the `track` stage,
stages/track.py).

``SourceState`` is everything a source carries from one frame to the next (its tracker, its
evidence, its templates, the last sequence number) and converts to and from plain data, so it
can be kept in Redis (common/trackstore.py) between frames handled by different workers. For
each frame ``plan`` runs the tracker on the detector's boxes and decides, per box, whether its
crop must be embedded or the track's cached embedding stands for it (tracker.py); the
``Embedder`` embeds only the planned crops; ``ground`` updates the evidence and picks each
caption's box (grounding.py). Sequence numbers decide what the tracker sees: a frame after a
gap ages the tracks by the gap; a frame at or below the last one (late, or delivered again) is
never fed to the tracker (that would rewind it): it is grounded without tracks, every crop
embedded, like per-frame mode.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ...common.envelope import Envelope
from ...common.trackstore import CachedEmbedding
from .assign import Calibrator
from .evidence import Evidence, EvidenceConfig
from .grounding import NO_TRACK, Grounded, ground_frame
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
    # least, templates.py; 0: off, the Kalman prediction alone)

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
        template is looked for near its prediction (templates.py) and its box is where
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


class Embedder:
    """The upscale and score stages' model code, used on chosen crops only."""

    def __init__(self, settings: Any) -> None:
        from ..score import Score
        from ..upscale import Upscale

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
