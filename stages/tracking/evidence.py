"""Evidence over time: which track a caption describes, decided over frames, not per frame.

For every (caption, track) pair of one source, a decaying log-odds accumulator sums the
logits of the pair's sigmoid scores, each frame's older evidence weighted down by ``decay``
per frame (by the sequence gap, so dropped frames age evidence the same as seen ones):

    num ← decay^gap · num + logit(score)        den ← decay^gap · den + 1

The posterior log-odds of the pair is ``num / den``, a recency-weighted mean of its logits: a
track seen once and a track seen for a minute are on one scale, and a track that is not in a
frame keeps its posterior (only its weight fades). A frame arriving late (sequence number
below the pair's last) adds its logit with the weight its age gives it, so the sums do not
depend on the order frames arrive in.

A caption's box is the track with the highest posterior among the tracks of the current
frame, with hysteresis: the incumbent track keeps the caption until another track of the
frame leads it by ``margin`` (log-odds) in ``switch_frames`` consecutive frames of the
caption. One outlier frame never flips it. If the incumbent is not in the frame, the best
track of the frame takes over at once (there is nothing to hold on to), unless ``hold`` is set:
then, for up to ``hold`` frames after the incumbent was last scored, a frame whose best track
trails the incumbent's posterior by more than ``hold_margin`` gives the caption no track
(``Decision.held``): the object it named is probably hidden, and the best of the rest a
look-alike. A track within ``hold_margin`` (the object back under a new id) takes over.

The whole state is plain numbers (``to_state``/``from_state``), so it lives in Redis between
frames and any worker can continue a source.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# Scores are clipped to [EPS, 1 - EPS] before logit: one 0.0 must not be -inf evidence.
EPS = 1e-6


@dataclass(frozen=True)
class EvidenceConfig:
    """How fast evidence fades and how much it takes to move a caption to another track."""

    decay: float = 0.8  # weight of a frame's evidence one frame later
    margin: float = 0.5  # log-odds lead a challenger needs
    switch_frames: int = 3  # consecutive frames of lead before the caption switches
    max_age: int = 300  # pairs unseen for more frames are forgotten
    max_captions: int = 64  # captions remembered per source (least recently used go)
    scores_are_logits: bool = False  # CLIP-style raw logits instead of sigmoid scores
    hold: int = 0  # frames a caption waits for its lost track (0: the best present takes over)
    hold_margin: float = 1.0  # log-odds within which a present track takes over while holding

    def __post_init__(self) -> None:
        if not 0.0 < self.decay <= 1.0:
            raise ValueError(f"decay must be in (0, 1], got {self.decay}")
        if self.margin < 0 or self.switch_frames < 1 or self.max_age < 1 \
                or self.max_captions < 1 or self.hold < 0 or self.hold_margin < 0:
            raise ValueError("margin >= 0, switch_frames >= 1, max_age >= 1, "
                             "max_captions >= 1, hold >= 0 and hold_margin >= 0 are required")


@dataclass
class _Pair:
    num: float = 0.0
    den: float = 0.0
    seq: int = -1

    @property
    def posterior(self) -> float:
        return self.num / self.den if self.den > 0 else -math.inf

    def add(self, seq: int, value: float, decay: float) -> None:
        if self.seq < 0:
            self.num, self.den, self.seq = value, 1.0, seq
        elif seq >= self.seq:
            fade = decay ** (seq - self.seq)
            self.num, self.den, self.seq = fade * self.num + value, fade * self.den + 1.0, seq
        else:  # a late frame: its evidence has already aged by the gap
            fade = decay ** (self.seq - seq)
            self.num, self.den = self.num + fade * value, self.den + fade


@dataclass
class _Caption:
    pairs: dict[int, _Pair] = field(default_factory=dict)
    chosen: int | None = None
    challenger: int | None = None
    streak: int = 0
    seq: int = -1
    flips: int = 0


@dataclass(frozen=True)
class Decision:
    """A caption's track in one frame (None: the frame has no track) and its posterior."""

    track: int | None
    posterior: float
    switched: bool = False
    held: bool = False  # no track: the caption waits for its lost track (``hold``)


class Evidence:
    """The evidence state of one source."""

    def __init__(self, config: EvidenceConfig | None = None) -> None:
        self.config = config or EvidenceConfig()
        self.captions: dict[str, _Caption] = {}

    def logit(self, score: float) -> float:
        """A score as evidence: its log-odds (clipped), or the score itself for logits."""
        if self.config.scores_are_logits:
            return float(score)
        p = min(max(float(score), EPS), 1.0 - EPS)
        return math.log(p / (1.0 - p))

    def update(self, seq: int, caption: str, scores: Mapping[int, float]) -> Decision:
        """Add one frame's scores (track id ≥ 0 → sigmoid score) for a caption; its decision."""
        if any(int(t) < 0 for t in scores):
            raise ValueError("track ids must be >= 0 (an untracked box has no evidence)")
        cap = self.captions.pop(caption, None) or _Caption()
        self.captions[caption] = cap  # most recently used last
        for track, score in scores.items():
            if score == score:  # nan: no evidence
                cap.pairs.setdefault(int(track), _Pair()).add(seq, self.logit(score),
                                                              self.config.decay)
        cap.seq = max(cap.seq, seq)
        self._forget(cap)
        decision = self._decide(cap, [int(t) for t in scores])
        while len(self.captions) > self.config.max_captions:
            self.captions.pop(next(iter(self.captions)))
        return decision

    def _forget(self, cap: _Caption) -> None:
        for track in [t for t, p in cap.pairs.items() if cap.seq - p.seq > self.config.max_age]:
            del cap.pairs[track]

    def _decide(self, cap: _Caption, present: list[int]) -> Decision:
        scored = [t for t in present if t in cap.pairs]
        if not scored:
            return Decision(None, -math.inf)
        best = max(scored, key=lambda t: (cap.pairs[t].posterior, -t))
        if cap.chosen is None or cap.chosen not in scored:
            if self._holds(cap, best):
                return Decision(None, cap.pairs[cap.chosen].posterior,  # type: ignore[index]
                                held=True)
            switched = cap.chosen is not None and cap.chosen != best
            return self._switch(cap, best, switched)
        incumbent = cap.pairs[cap.chosen].posterior
        if best == cap.chosen or cap.pairs[best].posterior - incumbent < self.config.margin:
            cap.challenger, cap.streak = None, 0
            return Decision(cap.chosen, incumbent)
        cap.streak = cap.streak + 1 if cap.challenger == best else 1
        cap.challenger = best
        if cap.streak >= self.config.switch_frames:
            return self._switch(cap, best, True)
        return Decision(cap.chosen, incumbent)

    def _holds(self, cap: _Caption, best: int) -> bool:
        """The caption's lost incumbent is recent and clearly better than ``best``."""
        lost = cap.pairs.get(cap.chosen) if cap.chosen is not None else None
        return (bool(self.config.hold) and lost is not None
                and cap.seq - lost.seq <= self.config.hold
                and cap.pairs[best].posterior < lost.posterior - self.config.hold_margin)

    @staticmethod
    def _switch(cap: _Caption, track: int, switched: bool) -> Decision:
        cap.chosen, cap.challenger, cap.streak = track, None, 0
        cap.flips += int(switched)
        return Decision(track, cap.pairs[track].posterior, switched)

    def posterior(self, caption: str, track: int) -> float:
        """The current posterior log-odds of a pair (-inf when never scored)."""
        cap = self.captions.get(caption)
        pair = cap.pairs.get(track) if cap else None
        return pair.posterior if pair else -math.inf

    def posteriors(self, caption: str, tracks: Sequence[int]) -> dict[int, float]:
        """The posterior log-odds of the caption's pairs with ``tracks`` that were scored."""
        cap = self.captions.get(caption)
        if cap is None:
            return {}
        return {t: cap.pairs[t].posterior for t in tracks if t in cap.pairs}

    def flips(self, caption: str) -> int:
        """How often the caption moved from one track to another."""
        cap = self.captions.get(caption)
        return cap.flips if cap else 0

    # --- state as plain data (msgpack-able: str, int, float, lists) ----------------------------
    def to_state(self) -> dict[str, Any]:
        return {"v": 1, "captions": [
            [name, cap.chosen if cap.chosen is not None else -1,
             cap.challenger if cap.challenger is not None else -1, cap.streak, cap.seq,
             cap.flips, [[t, p.num, p.den, p.seq] for t, p in cap.pairs.items()]]
            for name, cap in self.captions.items()]}

    @classmethod
    def from_state(cls, state: Mapping[str, Any] | None,
                   config: EvidenceConfig | None = None) -> Evidence:
        ev = cls(config)
        if not state:
            return ev
        if state.get("v") != 1:
            raise ValueError(f"evidence state version {state.get('v')!r} is not 1")
        for name, chosen, challenger, streak, seq, flips, pairs in state["captions"]:
            ev.captions[str(name)] = _Caption(
                pairs={int(t): _Pair(float(num), float(den), int(s)) for t, num, den, s in pairs},
                chosen=None if chosen < 0 else int(chosen),
                challenger=None if challenger < 0 else int(challenger),
                streak=int(streak), seq=int(seq), flips=int(flips))
        return ev
