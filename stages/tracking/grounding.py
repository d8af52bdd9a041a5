"""Grounding a frame of a tracked source: evidence over time, one box per caption and "not in
view", put together (the pure part of track mode; evidence.py, assign.py).

For each caption of a frame:
1. the evidence of every tracked box of the frame is updated with this frame's score and the
   caption's hysteresis decision is taken (``Evidence.update``);
2. captions are assigned to boxes jointly on the posterior log-odds matrix, the box each
   caption's hysteresis chose weighted up by ``HOLD`` so the assignment keeps it unless two
   captions chose the same box (then the one-to-one solution settles it); boxes without a
   track (below the tracker's thresholds) have no history: they compete with the chosen box
   on this frame's logit alone;
3. before that, with a calibration and a threshold, a caption whose probability of being in
   view (``assign.in_view`` of the posteriors, read back as scores) is below the threshold is
   "not in view", and the other captions are assigned among themselves.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .assign import Calibrator, assign, in_view
from .evidence import Evidence

# Added to the log-odds of the box a caption's hysteresis chose: larger than any difference of
# two clipped logits (|logit| ≤ 14 for EPS = 1e-6), so only a clash between captions moves it.
HOLD = 100.0
# Joint assignment weighs captions' posteriors, but below this log-odds (P ≈ 0.018) a caption's
# evidence only says "not this box": differences down there must not decide which box it takes.
# Without the floor, a caption that names nothing in the frame (posteriors of -6 to -12, log-odds
# spread most in the tails) takes the box it finds least unlikely away from a caption in view
# with a smaller lead. Measured on three clip sets (README, "Track mode"): seed 7, 8×60 clips,
# one absent caption a frame: accuracy 0.788 -> 0.795; seed 11: 0.893 -> 0.896.
JOINT_FLOOR = -4.0
NO_TRACK = -1


@dataclass(frozen=True)
class Grounded:
    """A caption's answer in one frame: its box index (None: not in view), that box's track
    (NO_TRACK: untracked or none), the frame's raw score of the box, the calibrated probability
    of its posterior (nan without calibration), and whether the caption changed track."""

    box: int | None
    track_id: int
    score: float
    probability: float = math.nan
    switched: bool = False


def posterior_matrix(evidence: Evidence, seq: int, captions: Sequence[str], scores: np.ndarray,
                     track_ids: np.ndarray
                     ) -> tuple[np.ndarray, list[int | None], list[bool], list[bool]]:
    """Update the evidence with a frame; (captions × boxes posterior log-odds, the box each
    caption's hysteresis chose, whether it switched track, whether it waits for its lost
    track)."""
    scores = np.asarray(scores, dtype=np.float64)
    track_ids = np.asarray(track_ids, dtype=np.int64)
    post = np.empty_like(scores)
    chosen: list[int | None] = []
    switched: list[bool] = []
    held: list[bool] = []
    tracked = [int(b) for b in np.flatnonzero(track_ids >= 0)]
    for row, caption in enumerate(captions):
        decision = evidence.update(seq, caption,
                                   {int(track_ids[b]): float(scores[row, b]) for b in tracked})
        for b in range(scores.shape[1]):
            t = int(track_ids[b])
            post[row, b] = (evidence.posterior(caption, t) if t >= 0
                            else evidence.logit(scores[row, b]))
        box = (None if decision.track is None
               else int(np.flatnonzero(track_ids == decision.track)[0]))
        chosen.append(box)
        switched.append(decision.switched)
        held.append(decision.held)
    return post, chosen, switched, held


def ground_frame(evidence: Evidence, seq: int, captions: Sequence[str], scores: np.ndarray,
                 track_ids: np.ndarray, joint: bool = True,
                 calibration: Calibrator | None = None,
                 abstain_below: float | None = None) -> list[Grounded]:
    """Each caption's box in frame ``seq`` of a source (C×N raw ``scores``, N ``track_ids``)."""
    scores = np.asarray(scores, dtype=np.float64)
    track_ids = np.asarray(track_ids, dtype=np.int64).reshape(-1)
    if scores.shape != (len(captions), len(track_ids)):
        raise ValueError(f"scores of shape {scores.shape} for {len(captions)} captions and "
                         f"{len(track_ids)} boxes")
    if scores.shape[1] == 0:
        for caption in captions:
            evidence.update(seq, caption, {})
        return [Grounded(None, NO_TRACK, math.nan, 0.0) for _ in captions]
    post, chosen, switched, held = posterior_matrix(evidence, seq, captions, scores, track_ids)
    probs = _calibrated(post, calibration, evidence)
    present = (in_view(calibration, _as_scores(post, evidence), captions)
               if calibration is not None and abstain_below is not None else None)
    # not in view: improbable, or (when abstaining at all) waiting for its lost track
    kept = [r for r in range(len(captions))
            if present is None or (present[r] >= abstain_below and not held[r])]
    weighted = post.copy() if evidence.config.scores_are_logits else np.maximum(post, JOINT_FLOOR)
    weighted[:, track_ids < 0] += HOLD  # untracked boxes have no history: always eligible
    for row, box in enumerate(chosen):
        if box is not None:
            weighted[row, box] += HOLD
    boxes = dict(zip(kept, assign(weighted[kept], joint=joint,
                                  captions=[captions[r] for r in kept]), strict=True))
    out = []
    for row in range(len(captions)):
        if row not in boxes:  # not in view: the others were assigned without it
            best = int(np.argmax(post[row]))
            out.append(Grounded(None, NO_TRACK, float(scores[row, best]), float(present[row])))
            continue
        box = boxes[row]
        out.append(Grounded(box, int(track_ids[box]), float(scores[row, box]),
                            float(probs[row, box]), switched[row] and box == chosen[row]))
    return out


def _as_scores(post: np.ndarray, evidence: Evidence) -> np.ndarray:
    """Posterior log-odds read back as scores of the scorer's kind."""
    return post if evidence.config.scores_are_logits else 1.0 / (1.0 + np.exp(-post))


def _calibrated(post: np.ndarray, calibration: Calibrator | None,
                evidence: Evidence) -> np.ndarray:
    """Calibrated probabilities of posteriors, read back as scores of the scorer's kind."""
    if calibration is None:
        return np.full(post.shape, math.nan)
    return np.asarray(calibration.apply(_as_scores(post, evidence)), dtype=np.float64)
