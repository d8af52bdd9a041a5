"""Caption/crop training pairs from ground-truth boxes, cut and (optionally) upscaled by the
pipeline's own stage code, so that what the scorer is trained on is what it sees at inference.

``spotline data crops DATASET OUT`` writes ``OUT/crops.jsonl`` (one line per crop:
``{"image": "crop_12.png", "caption": ..., "source": ..., "bbox": [l, t, w, h]}``) and the crops
as lossless PNGs under ``OUT/images/``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from spotline.common.images import cap_crop, crop_boxes
from spotline.common.settings import Settings
from spotline.producer.dataset import Box, TilImage, read_dataset

CROPS_FILE = "crops.jsonl"


def load_rgb(path: Path) -> np.ndarray:
    """An image file as uint8 RGB, decoded as the detect stage decodes frames (EXIF applied)."""
    from spotline.common.errors import InputError

    data = np.fromfile(str(path), np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if image is None:
        raise InputError(f"cannot decode image {path}")
    return np.ascontiguousarray(image[..., ::-1])


def cut(rgb: np.ndarray, box: Box, cap: int = 0) -> np.ndarray:
    """The crop of an [l, t, w, h] box, cut exactly as the detect stage cuts its xyxy boxes
    (rounded, at least 1 px, capped at ``cap`` px)."""
    left, top, w, h = box
    xyxy = np.array([[left, top, left + w, top + h]], np.float32)
    return crop_boxes(rgb, xyxy, cap)[0]


class CropMaker:
    """Cuts crops like the pipeline: detect's crop (capped at the scorer's input size when
    upscaling is off), else the upscale stage's Real-ESRGAN and cap."""

    def __init__(self, settings: Settings, cap: int, upscaler: str | Path | None = None) -> None:
        self.settings = settings
        self.cap = cap
        self.upsampler: Any = None
        if upscaler:
            from spotline.stages.upscale import load_upscaler

            self.upsampler = load_upscaler(upscaler, "cpu", False)

    def __call__(self, rgb: np.ndarray, box: Box) -> np.ndarray:
        if self.upsampler is None:
            return cut(rgb, box, self.cap)
        from spotline.stages.upscale import upscale_crop

        up = upscale_crop(self.upsampler, cut(rgb, box), self.settings)
        return cap_crop(up, self.cap)


def iter_crops(records: list[TilImage], maker: CropMaker
               ) -> Iterator[tuple[TilImage, str, Box, np.ndarray]]:
    """(record, caption, box, RGB crop) for every ground-truth box."""
    for record in records:
        rgb = load_rgb(record.image_path)
        for caption, box in record.annotations:
            yield record, caption, box, maker(rgb, box)


def write_crops(dataset: str | Path, out: str | Path, maker: CropMaker, skip_bad: bool = False,
                progress: Callable[[int], None] | None = None) -> tuple[int, str]:
    """Write every ground-truth crop of ``dataset`` into ``out``; (crops written, summary)."""
    report = read_dataset(dataset, skip_bad=skip_bad)
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for n, (record, caption, box, crop) in enumerate(iter_crops(report.records, maker)):
        name = f"crop_{n}.png"
        cv2.imwrite(str(out / "images" / name), crop[..., ::-1])
        lines.append(json.dumps({"image": name, "caption": caption,
                                 "source": record.image_path.name, "bbox": list(box)}))
        if progress is not None:
            progress(1)
    tmp = out / f".{CROPS_FILE}.tmp-{os.getpid()}"
    tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    os.replace(tmp, out / CROPS_FILE)
    return len(lines), report.summary()
