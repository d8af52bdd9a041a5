"""Score calibration: raw scorer scores → probabilities that a box is the caption's.

SigLIP's sigmoid scores rank boxes well but are not probabilities: a right box often scores
0.01. "Not in view" (stages/assign.py) needs a probability to compare with a threshold, so a
calibration is fitted on labelled (score, correct) pairs (`spotline eval --calibrate`) and
stored as a small JSON file beside the scorer (``<scorer_dir>/calibration.json``):

- ``temperature``: p = sigmoid(logit(s) / T + b), T and b fitted by minimising the negative
  log-likelihood with scipy (temperature scaling with a bias, i.e. Platt scaling in logit
  space: a bias is needed because the scores of right boxes are far below 0.5);
- ``isotonic``: a monotone step function fitted with ``scipy.optimize.isotonic_regression``,
  stored as knots and applied by linear interpolation between them.

Scores outside [0, 1] (CLIP's logits) are taken as logits as they are.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import isotonic_regression, minimize
from scipy.special import expit, logit

FILENAME = "calibration.json"
METHODS = ("temperature", "isotonic")
FORMAT_VERSION = 1
# Probabilities are clipped into [EPS, 1 - EPS] before logit so a 0 or 1 stays finite.
EPS = 1e-7
MAX_KNOTS = 512


@dataclass(frozen=True)
class Calibration:
    """A fitted calibration; ``apply`` maps raw scores (any shape) to probabilities."""

    method: str
    space: str = "probability"  # how raw scores are read: "probability" or "logit"
    temperature: float = 1.0
    bias: float = 0.0
    knots_x: tuple[float, ...] = ()
    knots_y: tuple[float, ...] = ()
    fitted_on: int = 0
    nll: float = math.nan
    version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"calibration method {self.method!r}: choose from {METHODS}")
        if self.space not in ("probability", "logit"):
            raise ValueError(f"calibration space {self.space!r}: probability or logit")
        if self.method == "temperature" and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.method == "isotonic" and (len(self.knots_x) != len(self.knots_y)
                                          or not self.knots_x):
            raise ValueError("an isotonic calibration needs knots_x and knots_y of one length")

    def apply(self, scores: np.ndarray) -> np.ndarray:
        """Calibrated probabilities, same shape as ``scores`` (nan stays nan)."""
        scores = np.asarray(scores, dtype=np.float64)
        if self.method == "isotonic":
            out = np.interp(scores, self.knots_x, self.knots_y)
            return np.where(np.isnan(scores), np.nan, out)
        return expit(_logits(scores, self.space) / self.temperature + self.bias)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["knots_x"], data["knots_y"] = list(self.knots_x), list(self.knots_y)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Calibration:
        if data.get("version") != FORMAT_VERSION:
            raise ValueError(f"calibration format version {data.get('version')!r} is not "
                             f"{FORMAT_VERSION}")
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown calibration fields {sorted(unknown)}")
        data = dict(data, knots_x=tuple(data.get("knots_x", ())),
                    knots_y=tuple(data.get("knots_y", ())))
        return cls(**data)


def _logits(scores: np.ndarray, space: str) -> np.ndarray:
    if space == "logit":
        return scores
    return logit(np.clip(scores, EPS, 1 - EPS))


def score_space(scores: np.ndarray) -> str:
    """"probability" when every finite score is in [0, 1], else "logit"."""
    finite = scores[np.isfinite(scores)]
    return "probability" if finite.size and finite.min() >= 0 and finite.max() <= 1 else "logit"


def _check(scores: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64).ravel()
    correct = np.asarray(correct, dtype=np.float64).ravel()
    if scores.shape != correct.shape:
        raise ValueError(f"{scores.size} scores for {correct.size} labels")
    keep = np.isfinite(scores)
    scores, correct = scores[keep], correct[keep]
    if scores.size < 2 or correct.min(initial=1) == correct.max(initial=0):
        raise ValueError("calibration needs at least one right and one wrong labelled score")
    if not np.isin(correct, (0.0, 1.0)).all():
        raise ValueError("labels must be 0 (wrong box) or 1 (right box)")
    return scores, correct


def nll(probs: np.ndarray, correct: np.ndarray) -> float:
    """Mean negative log-likelihood of 0/1 labels under probabilities."""
    p = np.clip(np.asarray(probs, dtype=np.float64), EPS, 1 - EPS)
    y = np.asarray(correct, dtype=np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))


def fit_temperature(scores: np.ndarray, correct: np.ndarray) -> Calibration:
    """Temperature and bias minimising the NLL (L-BFGS-B on log T, b)."""
    scores, correct = _check(scores, correct)
    space = score_space(scores)
    z = _logits(scores, space)

    def loss(params: np.ndarray) -> tuple[float, np.ndarray]:
        log_t, bias = params
        inv_t = math.exp(-log_t)
        p = expit(z * inv_t + bias)
        value = nll(p, correct)
        resid = (p - correct) / z.size  # d NLL / d logit
        return value, np.array([float(-(resid * z * inv_t).sum()), float(resid.sum())])

    res = minimize(loss, np.zeros(2), jac=True, method="L-BFGS-B",
                   bounds=[(-7.0, 7.0), (-50.0, 50.0)])
    log_t, bias = (float(v) for v in res.x)
    return Calibration("temperature", space=space, temperature=math.exp(log_t), bias=bias,
                       fitted_on=int(scores.size), nll=float(res.fun))


def fit_isotonic(scores: np.ndarray, correct: np.ndarray) -> Calibration:
    """A monotone non-decreasing map, as at most MAX_KNOTS knots."""
    scores, correct = _check(scores, correct)
    order = np.argsort(scores, kind="stable")
    xs, ys = scores[order], correct[order]
    fitted = isotonic_regression(ys, increasing=True).x
    # One knot at each end of every constant block: interpolation is flat inside a block.
    edges = np.flatnonzero(np.diff(fitted) != 0)
    idx = np.unique(np.concatenate([[0], edges, edges + 1, [len(xs) - 1]]))
    if idx.size > MAX_KNOTS:
        idx = np.unique(np.linspace(0, len(xs) - 1, MAX_KNOTS).round().astype(int))
    kx, ky = xs[idx], fitted[idx]
    kx, first = np.unique(kx, return_index=True)  # equal scores: keep one knot
    ky = ky[first]
    probs = np.interp(scores, kx, ky)
    return Calibration("isotonic", space=score_space(scores),
                       knots_x=tuple(float(v) for v in kx), knots_y=tuple(float(v) for v in ky),
                       fitted_on=int(scores.size), nll=nll(probs, correct))


def fit(scores: np.ndarray, correct: np.ndarray, method: str = "temperature") -> Calibration:
    """Fit a calibration of ``method`` (temperature or isotonic)."""
    if method == "temperature":
        return fit_temperature(scores, correct)
    if method == "isotonic":
        return fit_isotonic(scores, correct)
    raise ValueError(f"calibration method {method!r}: choose from {METHODS}")


def calibration_path(scorer_dir: str | Path) -> Path:
    """Where the calibration of a scorer lives: beside its weights."""
    return Path(scorer_dir) / FILENAME


def save(calibration: Calibration, scorer_dir: str | Path) -> Path:
    """Write ``calibration.json`` into the scorer's directory (atomically); returns its path."""
    path = calibration_path(scorer_dir)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(calibration.to_json(), indent=1) + "\n")
    tmp.replace(path)
    return path


def load(scorer_dir: str | Path) -> Calibration | None:
    """The scorer's calibration, or None when it has none; a broken file is an error."""
    path = calibration_path(scorer_dir)
    if not path.is_file():
        return None
    try:
        return Calibration.from_json(json.loads(path.read_text()))
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path}: not a spotline calibration: {exc}") from None
