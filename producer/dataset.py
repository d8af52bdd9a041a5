"""The TIL dataset format, and its one reader: a folder with ``vlm.jsonl`` (one image a line,
with its captions and ground-truth boxes) and ``images/``. Producers feed it (``publish``),
``spotline eval`` scores against it, and training reads it (spotline/data, spotline/train).

Reading is strict: every bad record is an error that names the file and line, or
(``skip_bad``) is skipped and counted by reason. Bad records: a line that is not JSON or not a
TIL record, a missing or unreadable image, a box that is not four numbers with a positive
width and height or (when the image headers are read) lies outside the image, an empty
caption, a caption repeated in one image.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..common.errors import InputError

DATASET_FILE = "vlm.jsonl"
IMAGES_DIR = "images"

Box = tuple[float, float, float, float]  # [left, top, width, height]


@dataclass(frozen=True)
class TilImage:
    """One dataset image: its path, its (caption, [l, t, w, h]) ground truth, its size (0, 0
    when the header was not read) and its line in vlm.jsonl."""

    image_path: Path
    annotations: tuple[tuple[str, Box], ...]
    width: int = 0
    height: int = 0
    line: int = 0
    negatives: tuple[Box, ...] = ()  # boxes that no caption names (clutter, false detections)

    @property
    def captions(self) -> tuple[str, ...]:
        """The captions, in annotation order."""
        return tuple(c for c, _ in self.annotations)

    @property
    def boxes(self) -> tuple[Box, ...]:
        """The ground-truth boxes, in annotation order."""
        return tuple(b for _, b in self.annotations)


@dataclass
class DatasetReport:
    """What reading a dataset found: records kept and records skipped (by reason)."""

    path: Path
    records: list[TilImage] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)  # the first few skip messages

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        boxes = sum(len(r.annotations) for r in self.records)
        text = f"{self.path}: {len(self.records)} images, {boxes} boxes"
        if self.skipped:
            reasons = ", ".join(f"{n} {k}" for k, n in sorted(self.skipped.items()))
            text += f"; skipped {self.n_skipped} bad records ({reasons})"
        return text


class BadRecord(InputError):
    """One bad dataset record; ``reason`` is its kind (for the skip counts)."""

    def __init__(self, where: str, reason: str, detail: str) -> None:
        super().__init__(f"{where}: {detail}")
        self.reason = reason


def dataset_file(path: str | Path) -> Path:
    """The vlm.jsonl of a dataset folder (or the file itself); InputError when absent."""
    path = Path(path)
    jsonl = path / DATASET_FILE if path.is_dir() else path
    if not jsonl.is_file():
        raise InputError(f"no TIL dataset at {path} (expected {DATASET_FILE} and {IMAGES_DIR}/)")
    return jsonl


def load_til(path: str | Path) -> list[TilImage]:
    """Every image of a TIL dataset (a folder with vlm.jsonl and images/, or the path of
    vlm.jsonl), for publishing and evaluation: BadRecord on the first bad record. The image
    headers are not read (the frames are checked when published), so sizes are (0, 0)."""
    return read_dataset(path, check_images=False).records


def read_dataset(path: str | Path, skip_bad: bool = False, check_images: bool = True
                 ) -> DatasetReport:
    """Every record of a TIL dataset, checked; raises BadRecord (file:line: what) on the first
    bad one unless ``skip_bad``, which counts them instead. ``check_images``: read each image's
    header for its size, and check the boxes lie inside it."""
    jsonl = dataset_file(path)
    report = DatasetReport(jsonl)
    try:
        raw = jsonl.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read {jsonl}: {exc}") from None
    for number, line in enumerate(raw.split(b"\n"), 1):
        if not line.strip():
            continue
        where = f"{jsonl}:{number}"
        try:
            report.records.append(parse_record(line, where, jsonl.parent, number, check_images))
        except BadRecord as exc:
            if not skip_bad:
                raise
            report.skipped[exc.reason] += 1
            if len(report.examples) < 5:
                report.examples.append(str(exc))
    return report


def parse_record(line: bytes, where: str, root: Path, number: int = 0,
                 check_images: bool = True) -> TilImage:
    """One vlm.jsonl line as a checked TilImage."""
    try:
        row = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadRecord(where, "corrupt line", f"not a JSON line ({exc})") from None
    if not isinstance(row, dict) or not isinstance(row.get("image"), str) or not row["image"]:
        raise BadRecord(where, "corrupt line", "not a TIL record (needs 'image' and "
                        "'annotations')")
    anns = row.get("annotations")
    if not isinstance(anns, list):
        raise BadRecord(where, "corrupt line", "'annotations' must be a list")
    image = _image_path(root, row["image"])
    if image is None:
        missing = root / IMAGES_DIR / row["image"]
        raise BadRecord(where, "missing image", f"image not found: {missing}")
    width, height = image_size(image, where) if check_images else (0, 0)
    parsed = tuple(_annotation(a, where, k, width, height) for k, a in enumerate(anns))
    counts = Counter(c for c, _ in parsed)
    repeated = [c for c, n in counts.items() if n > 1]
    if repeated:
        raise BadRecord(where, "duplicate caption",
                        f"caption {repeated[0]!r} appears {counts[repeated[0]]} times in one image "
                        "(a caption must name exactly one object)")
    return TilImage(image, parsed, width, height, number, _negatives(row, where, width, height))


def _negatives(row: dict[str, Any], where: str, width: int, height: int) -> tuple[Box, ...]:
    """The line's optional ``negatives``: boxes that no caption names (hard negatives for
    the scorer: clutter, the detector's false detections), checked like the annotations'."""
    raw = row.get("negatives", [])
    if not isinstance(raw, list):
        raise BadRecord(where, "corrupt line", "'negatives' must be a list of boxes")
    return tuple(_annotation({"caption": "(negative)", "bbox": b}, where, k, width, height)[1]
                 for k, b in enumerate(raw))


def _image_path(root: Path, name: str) -> Path | None:
    for candidate in (root / IMAGES_DIR / name, root / name):
        if candidate.is_file():
            return candidate
    return None


def image_size(path: Path, where: str) -> tuple[int, int]:
    """(width, height) from the image header; BadRecord when it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return int(im.size[0]), int(im.size[1])
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise BadRecord(where, "unreadable image", f"cannot read image {path}: {exc}") from None


def _annotation(ann: Any, where: str, k: int, width: int, height: int) -> tuple[str, Box]:
    if not isinstance(ann, dict):
        raise BadRecord(where, "corrupt line", f"annotation {k} is not an object")
    caption = ann.get("caption")
    if not isinstance(caption, str) or not caption.strip():
        raise BadRecord(where, "empty caption", f"annotation {k} has an empty caption")
    try:
        box = tuple(float(v) for v in ann["bbox"])
    except (KeyError, TypeError, ValueError):
        raise BadRecord(where, "bad box", f"annotation {k} ({caption!r}): bbox must be "
                        f"[left, top, width, height], got {ann.get('bbox')!r}") from None
    if len(box) != 4 or not all(math.isfinite(v) for v in box) or box[2] <= 0 or box[3] <= 0:
        raise BadRecord(where, "bad box", f"annotation {k} ({caption!r}): bbox must be "
                        f"[left, top, width > 0, height > 0], got {ann.get('bbox')!r}")
    left, top, w, h = box
    if width and (left < 0 or top < 0 or left + w > width or top + h > height):
        raise BadRecord(where, "box outside image", f"annotation {k} ({caption!r}): bbox "
                        f"{list(box)} lies outside the {width}x{height} image")
    return caption.strip(), box  # type: ignore[return-value]
