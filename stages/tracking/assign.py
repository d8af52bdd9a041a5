"""Captions to boxes for one frame: jointly ("one box per caption") and with "not in view".

Each caption used to take its own argmax box, so two captions of one frame could take the same
box. ``assign`` instead solves the assignment problem on the captions × boxes score matrix
(Hungarian, ``linear_sum_assignment``, scipy's in numpy: lsap.py; maximising the total
score): one box per caption and one caption per box wherever there are at least as many boxes
as captions. Where captions outnumber boxes, every box still goes to the caption that the
optimal assignment gives it, and the captions left over take their own argmax (so several
captions share a box only when there are not enough boxes). Captions that are the same text
are grounded once and share the answer.

``ground`` adds "not in view": with a calibration (calibration.py) and a threshold, a
caption whose calibrated probability of being in view is below the threshold gets no box
(``box`` None) and that probability, instead of a box it probably does not describe; the other
captions are assigned among themselves.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .lsap import linear_sum_assignment


class Calibrator(Protocol):
    """Maps raw scores to calibrated probabilities (calibration.py)."""

    def apply(self, scores: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class Pick:
    """One caption's answer: the index of its box (None: not in view), the raw score of that
    box (of its best box when not in view) and its calibrated probability (nan: uncalibrated)."""

    box: int | None
    score: float
    probability: float = math.nan


def argmax_boxes(scores: np.ndarray) -> list[int]:
    """Each caption's own best box (the seed's rule)."""
    if scores.shape[1] == 0:
        raise ValueError("no boxes to choose from")
    return [int(i) for i in np.argmax(_finite(scores), axis=1)]


def assign(scores: np.ndarray, joint: bool = True,
           captions: Sequence[str] | None = None) -> list[int]:
    """The box index of each caption (rows of the C×N ``scores``), one-to-one where possible.

    ``joint=False``, or a single caption, is the per-caption argmax. ``captions``, when given,
    makes equal caption texts one row of the problem (they describe the same object).
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2:
        raise ValueError(f"scores must be captions × boxes, got shape {scores.shape}")
    if scores.shape[0] == 0:
        return []
    if captions is not None and len(captions) != scores.shape[0]:
        raise ValueError(f"{len(captions)} captions for {scores.shape[0]} score rows")
    rows, index = _unique_rows(scores.shape[0], captions)
    unique = scores[rows]
    if not joint or len(rows) == 1:
        picks = argmax_boxes(unique)
    else:
        picks = _hungarian(unique)
    return [picks[index[r]] for r in range(scores.shape[0])]


def _hungarian(scores: np.ndarray) -> list[int]:
    """Optimal one-to-one assignment; rows left without a box take their argmax."""
    finite = _finite(scores)
    picks = argmax_boxes(finite)
    rows, cols = linear_sum_assignment(finite, maximize=True)
    for r, c in zip(rows, cols, strict=True):
        picks[int(r)] = int(c)
    return picks


def _finite(scores: np.ndarray) -> np.ndarray:
    """nan/±inf scores (an unscored box) rank below every real score."""
    scores = np.asarray(scores, dtype=np.float64)
    ok = np.isfinite(scores)
    if ok.all():
        return scores
    low = float(scores[ok].min()) - 1.0 if ok.any() else 0.0
    high = float(scores[ok].max()) + 1.0 if ok.any() else 0.0
    out = np.where(ok, scores, low)
    return np.where(np.isposinf(scores), high, out)


def _unique_rows(n: int, captions: Sequence[str] | None) -> tuple[list[int], list[int]]:
    """(first row of each distinct caption, for every row the position of its distinct row)."""
    if captions is None:
        return list(range(n)), list(range(n))
    first: dict[str, int] = {}
    index = [first.setdefault(c, len(first)) for c in captions]
    rows = [captions.index(c) for c in first]
    return rows, index


def ground(scores: np.ndarray, captions: Sequence[str] | None = None, joint: bool = True,
           calibration: Calibrator | None = None,
           abstain_below: float | None = None) -> list[Pick]:
    """Every caption's pick: its assigned box, or ``box=None`` when "not in view".

    Abstaining needs both a ``calibration`` and ``abstain_below``: a caption abstains when its
    probability of being in view (``in_view``) is below the threshold. The captions that stay
    are then assigned jointly among themselves, so an absent caption never takes a box from a
    caption in view. A frame without boxes abstains for every caption (probability 0).
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2:
        raise ValueError(f"scores must be captions × boxes, got shape {scores.shape}")
    if scores.shape[1] == 0:
        return [Pick(None, math.nan, 0.0) for _ in range(scores.shape[0])]
    probs = (np.asarray(calibration.apply(scores), dtype=np.float64) if calibration is not None
             else np.full(scores.shape, math.nan))
    present = (in_view(calibration, scores, captions)
               if calibration is not None and abstain_below is not None else None)
    kept = [r for r in range(scores.shape[0])
            if present is None or present[r] >= abstain_below]
    boxes = dict(zip(kept, assign(scores[kept], joint=joint,
                                  captions=None if captions is None
                                  else [captions[r] for r in kept]), strict=True))
    picks = []
    for row in range(scores.shape[0]):
        if row in boxes:
            box = boxes[row]
            picks.append(Pick(box, float(scores[row, box]), float(probs[row, box])))
        else:
            best = int(np.argmax(_finite(scores[row:row + 1])[0]))
            picks.append(Pick(None, float(scores[row, best]), float(present[row])))
    return picks


def in_view(calibration: Calibrator, scores: np.ndarray,
            captions: Sequence[str] | None = None) -> np.ndarray:
    """Each caption's probability of being in view: the calibration's presence model when it
    has one (calibration.py), else its best box's calibrated probability."""
    presence = getattr(calibration, "presence", None)
    if presence is not None:
        return np.asarray(presence(scores, captions), dtype=np.float64)
    probs = np.asarray(calibration.apply(scores), dtype=np.float64)
    return np.where(np.isnan(probs), -np.inf, probs).max(axis=1)
