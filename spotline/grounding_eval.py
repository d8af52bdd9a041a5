"""`spotline eval --calibrate` and `--grounding`: the scorer's calibration, fitted on a
labelled TIL dataset, and the lines that judge joint assignment and "not in view".

- ``fit_calibration``: every caption × box score of the dataset (the stages' own detect,
  upscale and score, in this process), labelled right when the box overlaps the caption's true
  box at IoU > 0.5; a temperature (or isotonic) calibration fitted on them is written beside
  the scorer (``calibration.json``).
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

from .common.settings import Settings
from .evaluate import hit
from .producer.dataset import TilImage
from .stages import calibration as calib
from .stages import runtime
from .stages.assign import ground
from .stages.collect import ltwh
from .trackmode import FrameModels, PerFrame


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
    """(score, 1 if the box is the caption's) for every caption × box."""
    scores, labels = [], []
    for s in scored:
        for row, truth in enumerate(s.truth):
            for b in range(len(s.boxes)):
                scores.append(float(s.scores[row, b]))
                labels.append(float(truth is not None and hit(ltwh(s.boxes[b]), truth)))
    return np.asarray(scores), np.asarray(labels)


def fit_calibration(settings: Settings, images: Iterable[TilImage], method: str = "temperature",
                    save: bool = True) -> tuple[calib.Calibration, Path | None]:
    """Fit the scorer's calibration on a labelled dataset; write it beside the scorer."""
    scores, labels = labelled_pairs(score_dataset(settings, images))
    cal = calib.fit(scores, labels, method)
    if not save:
        return cal, None
    scorer_dir = runtime.resolve_weights(settings).scorer
    return cal, calib.save(cal, scorer_dir)


def grounding_report(scored: Sequence[Scored], calibration: Any = None,
                     abstain_below: float = 0.5) -> dict[str, Any]:
    """Accuracy (visible captions) with argmax and with joint assignment; with a calibration,
    abstentions' precision and recall over the captions that name nothing in their image."""
    tallies = {"argmax": [0, 0], "joint": [0, 0], "joint_not_in_view": [0, 0]}
    right = wrong = absent = 0
    for s in scored:
        modes = {"argmax": ground(s.scores, s.captions, joint=False),
                 "joint": ground(s.scores, s.captions, joint=True)}
        if calibration is not None:
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
        if calibration is not None:
            for pick, truth in zip(modes["joint_not_in_view"], s.truth, strict=True):
                absent += truth is None
                right += truth is None and pick.box is None
                wrong += truth is not None and pick.box is None
    out: dict[str, Any] = {name: (h / n if n else math.nan) for name, (h, n) in tallies.items()
                           if n}
    out["captions"] = tallies["argmax"][1]
    if calibration is not None:
        out["threshold"] = abstain_below
        out["absent_captions"] = absent
        out["abstain_precision"] = right / (right + wrong) if right + wrong else math.nan
        out["abstain_recall"] = right / absent if absent else math.nan
    return out


def report_lines(report: dict[str, Any]) -> list[str]:
    """The grounding report as eval's lines."""
    lines = [f"accuracy, each caption its argmax:   {report['argmax']:.4f}",
             f"accuracy, one box per caption:       {report['joint']:.4f}"]
    if "joint_not_in_view" in report:
        lines.append(f"accuracy, + not in view (p<{report['threshold']}): "
                     f"{report['joint_not_in_view']:.4f}")
        lines.append(f"not in view: precision {report['abstain_precision']:.4f}, recall "
                     f"{report['abstain_recall']:.4f} over {report['absent_captions']} "
                     "captions naming nothing in their image")
    return lines
