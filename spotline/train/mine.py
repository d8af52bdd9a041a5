"""Hard negatives from the detector itself: `spotline data mine DATASET OUT --detector PT`.

The detector is run over a dataset's images with the detect stage's own code (``detect_frames``,
the settings' image size and thresholds), and every detection that matches no ground-truth
object (IoU under ``iou_max``, and covering at most ``cover_max`` of any object) is a false
detection: a crop on background or clutter that the scorer will be shown in the pipeline and
must give a low score to every caption. OUT is the dataset again (its images linked, not
copied) with those boxes added to each line's ``negatives``; `spotline finetune scorer` cuts
part of its background crops there (``--hard-negatives``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from spotline.common.errors import InputError
from spotline.common.settings import Settings
from spotline.data.synth import DATASET_FILE, IMAGES_DIR, covered, refuse_heldout
from spotline.eval import iou_ltwh
from spotline.producer.dataset import TilImage, read_dataset


@dataclass(frozen=True)
class MineReport:
    out: Path
    images: int
    detections: int
    negatives: int  # false detections added


def false_detections(found: np.ndarray, record: TilImage, iou_max: float = 0.3,
                     cover_max: float = 0.5) -> list[list[int]]:
    """The detections (xyxy rows) that match no object of ``record``, as [l, t, w, h] ints."""
    out = []
    for x1, y1, x2, y2 in found.tolist():
        box = (x1, y1, x2 - x1, y2 - y1)
        if box[2] < 2 or box[3] < 2:
            continue
        if any(iou_ltwh(box, gt) >= iou_max or covered(gt, box) > cover_max
               for gt in record.boxes):
            continue
        out.append([int(round(v)) for v in box])
    return out


def mine(dataset: str | Path, detector: str | Path, out: str | Path, settings: Settings,
         progress: Callable[[int], None] | None = None) -> MineReport:
    """Write OUT: DATASET with the detector's false detections added to ``negatives``."""
    import cv2

    from spotline.stages.detect import detect_frames, load_detector

    refuse_heldout(dataset)
    src = Path(dataset)
    src = src if src.is_dir() else src.parent
    out = Path(out)
    if out.resolve() == src.resolve():
        raise InputError("OUT must be another folder than DATASET")
    records = read_dataset(src).records
    lines = [json.loads(raw) for raw in (src / DATASET_FILE).read_text().splitlines()
             if raw.strip()]
    if len(lines) != len(records):
        raise InputError(f"{src / DATASET_FILE}: blank or unreadable lines; run `spotline data "
                         "check` first")
    model = load_detector(detector)
    detections = added = 0
    for line, record in zip(lines, records, strict=True):
        image = cv2.imread(str(record.image_path), cv2.IMREAD_COLOR)
        if image is None:
            raise InputError(f"cannot decode {record.image_path}")
        found, _scores = detect_frames(model, [image], settings)[0]
        detections += len(found)
        negatives = false_detections(found, record)
        added += len(negatives)
        line["negatives"] = [*line.get("negatives", []), *negatives]
        if progress is not None:
            progress(1)
    out.mkdir(parents=True, exist_ok=True)
    link = out / IMAGES_DIR
    if link.is_symlink():
        link.unlink()
    if not link.exists():
        link.symlink_to((src / IMAGES_DIR).resolve(), target_is_directory=True)
    tmp = out / f".{DATASET_FILE}.tmp-{os.getpid()}"
    tmp.write_text("".join(json.dumps(line) + "\n" for line in lines))
    os.replace(tmp, out / DATASET_FILE)
    return MineReport(out, len(records), detections, added)
