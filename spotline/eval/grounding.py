"""`spotline eval --calibrate` and `--grounding`: the scorer's calibration, fitted on a
labelled TIL dataset, and the lines that judge joint assignment and "not in view".

- ``fit_calibration``: every caption × box score of the dataset (the stages' own detect,
  upscale and score, in this process), labelled right when the box overlaps the caption's true
  box at IoU > 0.5; a temperature (or isotonic) calibration fitted on them, and with
  ``absent`` captions per image that name nothing in it a presence model and the "not in
  view" threshold that reaches a target abstention precision on the same data, are written
  beside the scorer (``calibration.json``). Fit on a validation split, judge on another.
- ``grounding_report``: on the same scores, accuracy with each caption's own argmax (the seed)
  and with joint assignment; and, with ``absent`` captions per image that name nothing in it,
  the precision and recall of "not in view" abstentions under a calibration.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from spotline.common.settings import Settings
from spotline.eval import hit
from spotline.pipeline.trackmode import FrameModels, PerFrame
from spotline.producer.dataset import TilImage
from spotline.stages import runtime
from spotline.stages.collect import ltwh
from spotline.stages.tracking import calibration as calib
from spotline.stages.tracking.assign import ground


@dataclass(frozen=True)
class Scored:
    """One image: its captions (the dataset's, then any absent ones), their true boxes (None:
    absent), the detector's boxes (xyxy) and the captions × boxes scores."""

    captions: tuple[str, ...]
    truth: tuple[Any, ...]
    boxes: np.ndarray
    scores: np.ndarray


def score_dataset(settings: Settings, images: Iterable[TilImage], absent: int = 0,
                  seed: int = 0) -> list[Scored]:
    """Scores of every image, with ``absent`` extra captions per image taken from the other
    images' captions (a caption that names nothing in this image)."""
    images = list(images)
    vocabulary = sorted({c for img in images for c in img.captions})
    rng = np.random.default_rng(seed)
    runner = PerFrame(FrameModels(settings))
    out = []
    for k, img in enumerate(images):
        pool = [c for c in vocabulary if c not in img.captions]
        extra = tuple(str(c) for c in rng.choice(pool, size=min(absent, len(pool)),
                                                 replace=False)) if absent and pool else ()
        captions = img.captions + extra
        _, scores, boxes = runner.frame_scored(f"cal-{k}", img.image_path.read_bytes(),
                                               captions)
        out.append(Scored(captions, img.boxes + (None,) * len(extra), boxes, scores))
    return out


def labelled_pairs(scored: Sequence[Scored]) -> tuple[np.ndarray, np.ndarray]:
    """(score, 1 if the box is the caption's) for every box of every caption that names an
    object of its image (captions naming nothing are the presence model's, not these)."""
    scores, labels = [], []
    for s in scored:
        for row, truth in enumerate(s.truth):
            if truth is None:
                continue
            for b in range(len(s.boxes)):
                scores.append(float(s.scores[row, b]))
                labels.append(float(hit(ltwh(s.boxes[b]), truth)))
    return np.asarray(scores), np.asarray(labels)


def fit_scored(scored: Sequence[Scored], method: str = "temperature",
               target_precision: float = calib.TARGET_PRECISION) -> calib.Calibration:
    """A calibration of the scores, and when some captions name nothing in their image, its
    presence model and "not in view" threshold (stages/tracking/calibration.py)."""
    cal = calib.fit(*labelled_pairs(scored), method)
    if not any(t is None for s in scored for t in s.truth):
        return cal
    frames = [(s.scores, s.captions, [t is not None for t in s.truth]) for s in scored]
    return calib.fit_presence(cal, frames, target_precision)


def fit_calibration(settings: Settings, images: Iterable[TilImage], method: str = "temperature",
                    save: bool = True, absent: int = 1,
                    target_precision: float = calib.TARGET_PRECISION
                    ) -> tuple[calib.Calibration, Path | None]:
    """Fit the scorer's calibration on a labelled dataset, with ``absent`` captions per image
    that name nothing in it for "not in view"; write it beside the scorer."""
    cal = fit_scored(score_dataset(settings, images, absent=absent), method, target_precision)
    if not save:
        return cal, None
    scorer_dir = runtime.resolve_weights(settings).scorer
    return cal, calib.save(cal, scorer_dir)


def grounding_report(scored: Sequence[Scored], calibration: Any = None,
                     abstain_below: float | None = None) -> dict[str, Any]:
    """Accuracy (visible captions) with argmax and with joint assignment; with a calibration
    and a threshold (``abstain_below``, else the calibration's own), accuracy with "not in
    view" and the abstentions' precision and recall over the captions naming nothing."""
    if abstain_below is None and calibration is not None:
        abstain_below = getattr(calibration, "threshold", None)
    abstaining = calibration is not None and abstain_below is not None
    tallies = {"argmax": [0, 0], "joint": [0, 0], "joint_not_in_view": [0, 0]}
    right = wrong = absent = 0
    for s in scored:
        modes = {"argmax": ground(s.scores, s.captions, joint=False),
                 "joint": ground(s.scores, s.captions, joint=True)}
        if abstaining:
            modes["joint_not_in_view"] = ground(s.scores, s.captions, joint=True,
                                                calibration=calibration,
                                                abstain_below=abstain_below)
        for name, picks in modes.items():
            for pick, truth in zip(picks, s.truth, strict=True):
                if truth is None:
                    continue
                box = None if pick.box is None else ltwh(s.boxes[pick.box])
                tallies[name][0] += hit(box, truth)
                tallies[name][1] += 1
        absent += sum(t is None for t in s.truth)
        if abstaining:
            for pick, truth in zip(modes["joint_not_in_view"], s.truth, strict=True):
                right += truth is None and pick.box is None
                wrong += truth is not None and pick.box is None
    out: dict[str, Any] = {name: (h / n if n else math.nan) for name, (h, n) in tallies.items()
                           if n}
    out["captions"] = tallies["argmax"][1]
    out["absent_captions"] = absent
    if abstaining:
        out["threshold"] = float(abstain_below)  # type: ignore[arg-type]
        out["presence_model"] = bool(getattr(calibration, "has_presence", False))
        out["abstained"] = right + wrong
        out["abstain_precision"] = right / (right + wrong) if right + wrong else math.nan
        out["abstain_recall"] = right / absent if absent else math.nan
    return out


def report_lines(report: dict[str, Any]) -> list[str]:
    """The grounding report as eval's two lines: joint assignment, and "not in view"."""
    n = report["captions"]
    lines = [f"joint assignment: accuracy {report['joint']:.4f} with one box per caption, "
             f"{report['argmax']:.4f} without (each caption its argmax); {n} captions in view"]
    if "joint_not_in_view" not in report:
        lines.append("not in view: not measured (needs the scorer's calibration with a "
                     "threshold: `spotline eval DATASET --calibrate`)")
        return lines
    what = ("P(in view)" if report["presence_model"] else "best box's calibrated probability")
    lines.append(f"not in view ({what} < {report['threshold']:.3f}): abstentions precision "
                 f"{report['abstain_precision']:.4f}, recall {report['abstain_recall']:.4f} "
                 f"({report['abstained']} abstained, {report['absent_captions']} captions "
                 f"naming nothing in their image); accuracy in view "
                 f"{report['joint_not_in_view']:.4f} with, {report['joint']:.4f} without")
    return lines
