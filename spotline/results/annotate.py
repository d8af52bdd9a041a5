"""Draw a result's boxes and captions on its frame (demo, `spotline results --annotate`)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from spotline.common.envelope import Result

_COLOURS = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
            (145, 30, 180), (70, 240, 240), (240, 50, 230)]


def annotate(image: bytes | np.ndarray, result: Result) -> np.ndarray:
    """A BGR image with one labelled box per caption (red 'ERROR' banner for error results)."""
    img = cv2.imdecode(np.frombuffer(image, np.uint8), cv2.IMREAD_COLOR) if isinstance(
        image, bytes | bytearray) else image.copy()
    if img is None:
        raise ValueError("cannot decode the frame to annotate")
    scale = max(1.0, max(img.shape[:2]) / 1000)
    thick = max(1, int(2 * scale))
    for i, (caption, box, score) in enumerate(zip(result.captions, result.boxes, result.scores,
                                                  strict=True)):
        r, g, b = _COLOURS[i % len(_COLOURS)]
        left, top, width, height = (int(round(v)) for v in box)
        cv2.rectangle(img, (left, top), (left + width, top + height), (b, g, r), thick)
        label = caption if score != score else f"{caption} {score:.2f}"
        y = max(int(14 * scale), top - 4)
        cv2.putText(img, label, (left, y), cv2.FONT_HERSHEY_SIMPLEX, 0.5 * scale, (b, g, r),
                    thick, cv2.LINE_AA)
    if result.error:
        cv2.putText(img, f"ERROR: {result.error[:80]}", (10, int(30 * scale)),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.6 * scale, (0, 0, 255), thick, cv2.LINE_AA)
    return img


def write_annotated(image: bytes, result: Result, out_dir: Path, name: str | None = None) -> Path:
    """Annotate and save as JPEG in ``out_dir``; returns the path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name or result.frame_id}.jpg"
    cv2.imwrite(str(path), annotate(image, result))
    return path
