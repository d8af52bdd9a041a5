"""Track mode for one source, frame after frame: the model-free steps around the scorer.

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
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..common.trackstore import CachedEmbedding
from .assign import Calibrator
from .evidence import Evidence, EvidenceConfig
from .grounding import NO_TRACK, Grounded, ground_frame
from .tracker import ReuseConfig, SourceTracker, TrackerConfig, needs_embedding

STATE_VERSION = 1


@dataclass(frozen=True)
class TrackOptions:
    """Track mode's settings."""

    tracker: TrackerConfig = field(default_factory=TrackerConfig)
    reuse: ReuseConfig = field(default_factory=ReuseConfig)
    evidence: EvidenceConfig = field(default_factory=EvidenceConfig)
    joint: bool = True  # one box per caption where a frame has several captions
    abstain_below: float | None = None  # "not in view" under this calibrated probability


@dataclass(frozen=True)
class Plan:
    """What the tracker made of a frame: each box's track id, which crops to embed, and
    whether the frame was tracked at all (False: late or repeated frame)."""

    seq: int
    track_ids: np.ndarray  # int64, NO_TRACK for untracked boxes
    embed: np.ndarray  # bool, True: embed this crop; False: use the cached embedding
    tracked: bool
    skipped: int = 0


class SourceState:
    """One source's tracker and evidence, and the last frame they have seen."""

    def __init__(self, options: TrackOptions | None = None) -> None:
        self.options = options or TrackOptions()
        self.tracker = SourceTracker(self.options.tracker)
        self.evidence = Evidence(self.options.evidence)
        self.seq = -1

    def plan(self, seq: int, boxes: np.ndarray, det_scores: np.ndarray,
             cached: Mapping[int, CachedEmbedding] | None = None) -> Plan:
        """Track the frame ``seq`` (if it is new) and decide which crops to embed."""
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        if seq <= self.seq:  # late or repeated: the tracker has moved on
            return Plan(seq, np.full(len(boxes), NO_TRACK, np.int64),
                        np.ones(len(boxes), bool), tracked=False)
        skipped = seq - self.seq - 1 if self.seq >= 0 else 0
        ids = self.tracker.update(boxes, det_scores, skipped=skipped)
        self.seq = seq
        plan = Plan(seq, ids, np.ones(len(boxes), bool), tracked=True, skipped=skipped)
        return self.with_cache(plan, boxes, cached) if cached else plan

    def with_cache(self, plan: Plan, boxes: np.ndarray,
                   cached: Mapping[int, CachedEmbedding]) -> Plan:
        """The plan with a box's crop left out where its track's cached embedding stands for
        it (the cache is looked up by the track ids the plan gave)."""
        if not plan.tracked:
            return plan
        embed = np.ones(len(plan.track_ids), bool)
        for i, tid in enumerate(plan.track_ids):
            hit = cached.get(int(tid)) if tid >= 0 else None
            if hit is not None:
                embed[i] = needs_embedding(plan.seq, boxes[i], hit.seq, hit.box,
                                           self.options.reuse)
        return dataclasses.replace(plan, embed=embed)

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
                "evidence": self.evidence.to_state()}

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
        return self


def fresh_embeddings(plan: Plan, boxes: np.ndarray,
                     embeddings: np.ndarray) -> dict[int, CachedEmbedding]:
    """The cache entries a frame makes: the tracked boxes whose crops were embedded."""
    out = {}
    for i in np.flatnonzero(plan.embed & (plan.track_ids >= 0)):
        out[int(plan.track_ids[i])] = CachedEmbedding(
            plan.seq, np.asarray(boxes[i], np.float32), np.asarray(embeddings[i], np.float32))
    return out
