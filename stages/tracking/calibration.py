"""Score calibration: raw scorer scores → probabilities that a box is the caption's.

SigLIP's sigmoid scores rank boxes well but are not probabilities: a right box often scores
0.01. "Not in view" (assign.py) needs a probability to compare with a threshold, so a
calibration is fitted on labelled (score, correct) pairs (`spotline eval --calibrate`) and
stored as a small JSON file beside the scorer (``<scorer_dir>/calibration.json``):

- ``temperature``: p = sigmoid(logit(s) / T + b), T and b fitted by minimising the negative
  log-likelihood with scipy (temperature scaling with a bias, i.e. Platt scaling in logit
  space: a bias is needed because the scores of right boxes are far below 0.5);
- ``isotonic``: a monotone step function fitted with ``scipy.optimize.isotonic_regression``,
  stored as knots and applied by linear interpolation between them.

Scores outside [0, 1] (CLIP's logits) are taken as logits as they are.

"Not in view" asks another question: is the caption's object in the frame at all? The best
box's calibrated probability answers it poorly (a caption naming nothing still has a best box,
and an object in view often scores low), so a calibration may also carry a *presence* model
(``fit_presence``): a logistic regression, fitted on captions of a labelled split some of which
name nothing in their image, of P(the caption's object is in view) on two features of the
captions × boxes logits: the caption's best logit, and its margin over the other captions of
the frame on that box (another caption that claims the box more strongly says this one is
probably absent). A frame with one distinct caption has no margin: a second regression on the
best logit alone answers it. The threshold is chosen on the same split: the lowest probability
whose abstentions reach a target precision there (``choose_threshold``), stored with the model.

Track mode asks the presence model about a caption's *posteriors*, its evidence over frames,
not one frame's scores, and a caption that persists over frames separates from one naming
nothing far better than on a still. So a calibration may carry a second threshold,
``track_threshold``, chosen the same way on clips that track mode ran through
(``choose_track_threshold``: each caption's presence on every frame, with the frames where it
waits for its lost track abstaining whatever the threshold). Track mode uses it where it exists,
and the stills' ``threshold`` otherwise.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ...common.errors import ConfigError

FILENAME = "calibration.json"
METHODS = ("temperature", "isotonic")
FORMAT_VERSION = 2
READS_VERSIONS = (1, 2)  # version 1: no presence model


def expit(x: np.ndarray | float) -> np.ndarray:
    """The logistic sigmoid (as scipy.special.expit: the core install has no scipy)."""
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def logit(p: np.ndarray | float) -> np.ndarray:
    """log(p / (1 - p)), the inverse of ``expit``."""
    p = np.asarray(p, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return np.log(p / (1.0 - p))


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
    # presence model (logistic regression on logits): weights of (best logit, bias) for frames
    # with one distinct caption, and of (best logit, margin over other captions, bias)
    presence_single: tuple[float, ...] = ()
    presence_multi: tuple[float, ...] = ()
    threshold: float | None = None  # "not in view" under this presence probability
    threshold_fit: dict[str, Any] = field(default_factory=dict)  # how it was chosen
    # track mode's "not in view" threshold on the same presence model of posteriors, chosen on
    # clips (None: track mode uses ``threshold``)
    track_threshold: float | None = None
    track_threshold_fit: dict[str, Any] = field(default_factory=dict)

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
        if (len(self.presence_single), len(self.presence_multi)) not in ((0, 0), (2, 3)):
            raise ValueError("a presence model needs 2 single-caption and 3 multi-caption "
                             "weights")
        for name in ("threshold", "track_threshold"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")

    def apply(self, scores: np.ndarray) -> np.ndarray:
        """Calibrated probabilities, same shape as ``scores`` (nan stays nan)."""
        scores = np.asarray(scores, dtype=np.float64)
        if self.method == "isotonic":
            out = np.interp(scores, self.knots_x, self.knots_y)
            return np.where(np.isnan(scores), np.nan, out)
        return expit(_logits(scores, self.space) / self.temperature + self.bias)

    @property
    def has_presence(self) -> bool:
        return bool(self.presence_multi)

    @property
    def tracked_threshold(self) -> float | None:
        """Track mode's threshold: the one fitted on clips, else the stills' one."""
        return self.track_threshold if self.track_threshold is not None else self.threshold

    def presence(self, scores: np.ndarray, captions: Sequence[str] | None = None) -> np.ndarray:
        """P(in view) of each caption (row) of a captions × boxes score matrix: the presence
        model's, or without one the best box's calibrated probability; 0 without boxes."""
        scores = np.asarray(scores, dtype=np.float64)
        if scores.shape[1] == 0:
            return np.zeros(scores.shape[0])
        if not self.has_presence:
            probs = self.apply(scores)
            return np.where(np.isnan(probs), -np.inf, probs).max(axis=1).clip(0.0, 1.0)
        feats, multi = presence_features(_logits(scores, self.space), captions)
        w1, w2 = np.asarray(self.presence_single), np.asarray(self.presence_multi)
        z = np.where(multi, feats @ w2[:2] + w2[2], feats[:, 0] * w1[0] + w1[1])
        return np.where(np.isfinite(feats[:, 0]), expit(z), 0.0)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("knots_x", "knots_y", "presence_single", "presence_multi"):
            data[key] = list(data[key])
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Calibration:
        if data.get("version") not in READS_VERSIONS:
            raise ValueError(f"calibration format version {data.get('version')!r} is not one "
                             f"of {READS_VERSIONS}")
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown calibration fields {sorted(unknown)}")
        data = dict(data, **{key: tuple(data.get(key, ())) for key in
                             ("knots_x", "knots_y", "presence_single", "presence_multi")})
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
    from scipy.optimize import minimize  # fitting only: spotline[train]

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
    from scipy.optimize import isotonic_regression  # fitting only: spotline[train]

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


# --- presence ("not in view") ------------------------------------------------------------------
MARGIN_CAP = 20.0  # |margin over other captions| is clipped to this (logits)
BIG = 50.0  # a +inf score (in logits)
L2 = 1e-4  # ridge on the presence weights (keeps a separable split finite)
TARGET_PRECISION = 0.9


def presence_features(logits: np.ndarray, captions: Sequence[str] | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
    """(C×2 features: best logit, margin over the other captions on that box; C flags: the
    frame has another distinct caption). Rows without a finite score get best = -inf."""
    z = np.asarray(logits, dtype=np.float64)
    z = np.where(np.isfinite(z), z, np.where(np.isposinf(z), BIG, -np.inf))
    n_rows = z.shape[0]
    texts = list(captions) if captions is not None else list(range(n_rows))
    if len(texts) != n_rows:
        raise ValueError(f"{len(texts)} captions for {n_rows} score rows")
    feats = np.zeros((n_rows, 2))
    multi = np.zeros(n_rows, dtype=bool)
    if z.shape[1] == 0:
        feats[:, 0] = -np.inf
        return feats, multi
    best_box = np.argmax(z, axis=1)
    feats[:, 0] = z[np.arange(n_rows), best_box]
    for r in range(n_rows):
        others = [k for k in range(n_rows) if texts[k] != texts[r]]
        if not others or not np.isfinite(feats[r, 0]):
            continue
        multi[r] = True
        rival = float(z[others, best_box[r]].max())
        feats[r, 1] = np.clip(feats[r, 0] - rival, -MARGIN_CAP, MARGIN_CAP)
    return feats, multi


def _logistic(x: np.ndarray, y: np.ndarray) -> tuple[float, ...]:
    """Weights (then bias) of a ridge-regularised logistic regression of 0/1 ``y`` on ``x``."""
    from scipy.optimize import minimize  # fitting only: spotline[train]

    design = np.c_[x, np.ones(len(x))]
    ridge = np.r_[np.full(x.shape[1], L2), 0.0]

    def loss(w: np.ndarray) -> tuple[float, np.ndarray]:
        p = expit(design @ w)
        return (nll(p, y) + float(ridge @ (w * w)),
                design.T @ (p - y) / len(y) + 2 * ridge * w)

    res = minimize(loss, np.zeros(design.shape[1]), jac=True, method="L-BFGS-B")
    return tuple(float(v) for v in res.x)


def fit_presence(calibration: Calibration,
                 frames: Sequence[tuple[np.ndarray, Sequence[str], Sequence[bool]]],
                 target_precision: float = TARGET_PRECISION) -> Calibration:
    """``calibration`` with a presence model and threshold fitted on ``frames``: (captions ×
    boxes scores, captions, whether each caption's object is in the image)."""
    if not 0.0 < target_precision <= 1.0:
        raise ValueError(f"target precision must be in (0, 1], got {target_precision}")
    feats, multi, present = [], [], []
    for scores, captions, in_view in frames:
        if len(in_view) != np.shape(scores)[0]:
            raise ValueError(f"{len(in_view)} labels for {np.shape(scores)[0]} score rows")
        f, m = presence_features(_logits(np.asarray(scores, np.float64), calibration.space),
                                 captions)
        feats.append(f)
        multi.append(m)
        present.append(np.asarray(in_view, dtype=np.float64))
    x, m, y = np.concatenate(feats), np.concatenate(multi), np.concatenate(present)
    keep = np.isfinite(x[:, 0])  # frames without boxes abstain anyway
    x, m, y = x[keep], m[keep], y[keep]
    if y.size == 0 or y.min() == y.max():
        raise ValueError("a presence model needs captions in view and captions that name "
                         "nothing in their image (eval's --absent)")
    if m.sum() < 2 or y[m].min() == y[m].max():
        raise ValueError("a presence model needs frames with several captions, some absent")
    fitted = dataclasses.replace(calibration, presence_single=_logistic(x[:, :1], y),
                                 presence_multi=_logistic(x[m], y[m]))
    probs = np.where(m, expit(x @ fitted.presence_multi[:2] + fitted.presence_multi[2]),
                     expit(x[:, 0] * fitted.presence_single[0] + fitted.presence_single[1]))
    threshold, how = choose_threshold(probs, y.astype(bool), target_precision)
    return dataclasses.replace(fitted, threshold=threshold, threshold_fit=how)


def choose_threshold(probs: np.ndarray, present: np.ndarray,
                     target_precision: float = TARGET_PRECISION) -> tuple[float, dict[str, Any]]:
    """The threshold under which abstaining catches the most absent captions at a precision of
    at least ``target_precision`` on these labels (0.0, never abstain, when none reaches it);
    with the precision and recall it had."""
    probs = np.asarray(probs, dtype=np.float64)
    absent = ~np.asarray(present, dtype=bool)
    order = np.argsort(probs, kind="stable")
    p, hits = probs[order], np.cumsum(absent[order])
    k = np.arange(1, p.size + 1)
    precision = hits / k
    cut = np.r_[p[1:] > p[:-1], True]  # abstain on the k lowest only between distinct values
    ok = np.flatnonzero(cut & (precision >= target_precision))
    how: dict[str, Any] = {"target_precision": target_precision, "captions": int(p.size),
                           "absent": int(absent.sum())}
    if not ok.size:
        return 0.0, {**how, "precision": math.nan, "recall": 0.0}
    i = int(ok[-1])
    threshold = float((p[i] + p[i + 1]) / 2 if i + 1 < p.size else min(1.0, p[i] + EPS))
    return threshold, {**how, "precision": float(precision[i]),
                       "recall": float(hits[i] / max(1, absent.sum()))}


def choose_track_threshold(presence: np.ndarray, held: np.ndarray, present: np.ndarray,
                           target_precision: float = TARGET_PRECISION
                           ) -> tuple[float, dict[str, Any]]:
    """Track mode's threshold, from each caption's presence on every frame of some clips, whether
    track mode held it back that frame (waiting for its lost track: it abstains whatever the
    threshold) and whether its object was in view: the threshold whose abstentions (held, or
    presence under it) catch the most captions not in view at ``target_precision`` (0.0 when
    only the held ones can); with the precision and recall the held and the threshold give
    together."""
    presence = np.asarray(presence, dtype=np.float64)
    held = np.asarray(held, dtype=bool)
    present = np.asarray(present, dtype=bool)
    if not presence.shape == held.shape == present.shape:
        raise ValueError("presence, held and present must have one shape")
    # held captions abstain at any threshold: they come first in the order of abstaining
    threshold, how = choose_threshold(np.where(held, -1.0, presence), present, target_precision)
    threshold = max(0.0, threshold)
    abstain = held | (presence < threshold)
    absent = ~present
    caught = int((abstain & absent).sum())
    return threshold, {**how, "held": int(held.sum()),
                       "precision": caught / int(abstain.sum()) if abstain.any() else math.nan,
                       "recall": caught / max(1, int(absent.sum()))}


def fit(scores: np.ndarray, correct: np.ndarray, method: str = "temperature") -> Calibration:
    """Fit a calibration of ``method`` (temperature or isotonic)."""
    if method == "temperature":
        return fit_temperature(scores, correct)
    if method == "isotonic":
        return fit_isotonic(scores, correct)
    raise ValueError(f"calibration method {method!r}: choose from {METHODS}")


def abstain_threshold(settings: Any, calibration: Calibration | None,
                      tracked: bool = False) -> float | None:
    """The "not in view" threshold the settings ask for, None for always a box.

    ``not_in_view`` false: None. Auto: with a calibration beside the scorer, the explicit
    not_in_view_threshold when set, else the one fitted with the calibration (for track mode,
    ``tracked``, its clips' ``track_threshold`` where it has one); None without a calibration,
    or with one fitted without captions that name nothing. True: the same, but what auto would
    answer None for is an error."""
    mode = not_in_view_mode(settings.not_in_view)
    if mode == "false":
        return None
    if calibration is None:
        if mode == "auto":
            return None
        raise ConfigError("not_in_view needs calibration.json beside the scorer: fit it with "
                          "`spotline eval DATASET --calibrate`")
    if settings.not_in_view_threshold > 0:
        return float(settings.not_in_view_threshold)
    fitted = calibration.tracked_threshold if tracked else calibration.threshold
    if fitted is None and mode == "true":
        raise ConfigError("not_in_view needs a threshold: refit the calibration with captions "
                          "that name nothing (`spotline eval DATASET --calibrate --absent 1`) "
                          "or set not_in_view_threshold")
    return fitted


def not_in_view_mode(value: Any) -> str:
    """The ``not_in_view`` setting as auto, true or false (a boolean is true or false)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    mode = str(value).lower()
    if mode not in ("auto", "true", "false"):
        raise ConfigError(f"not_in_view must be auto, true or false, got {value!r}")
    return mode


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
