"""The TIL dataset format: a folder with ``vlm.jsonl`` (one image a line, with its captions
and ground-truth boxes) and ``images/``. Producers feed it; the scorer reads its truth."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..common.errors import InputError

DATASET_FILE = "vlm.jsonl"

BoxLTWH = tuple[float, float, float, float]


@dataclass(frozen=True)
class TilImage:
    """One dataset image: its path and its (caption, [l, t, w, h]) ground truth."""

    image_path: Path
    annotations: tuple[tuple[str, BoxLTWH], ...]

    @property
    def captions(self) -> tuple[str, ...]:
        """The captions, in annotation order."""
        return tuple(c for c, _ in self.annotations)

    @property
    def boxes(self) -> tuple[BoxLTWH, ...]:
        """The ground-truth boxes, in annotation order."""
        return tuple(b for _, b in self.annotations)


def _parse_line(line: str, where: str, images_dir: Path, root: Path) -> TilImage:
    try:
        row = json.loads(line)
        name = row["image"]
        anns = tuple((str(a["caption"]), _box(a["bbox"])) for a in row["annotations"])
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{where}: not a TIL record ({type(exc).__name__}: {exc})") from None
    if not isinstance(name, str) or not name:
        raise InputError(f"{where}: 'image' must be a file name")
    path = images_dir / name
    if not path.is_file() and (root / name).is_file():
        path = root / name
    if not path.is_file():
        raise InputError(f"{where}: image not found: {path}")
    return TilImage(path, anns)


def _box(values: Any) -> BoxLTWH:
    box = tuple(float(v) for v in values)
    if len(box) != 4 or not all(math.isfinite(v) for v in box) or box[2] < 0 or box[3] < 0:
        raise ValueError(f"bbox must be [left, top, width >= 0, height >= 0], got {values!r}")
    return box  # type: ignore[return-value]


def load_til(path: str | Path) -> list[TilImage]:
    """Read a TIL dataset: a folder with vlm.jsonl and images/, or the path of vlm.jsonl."""
    path = Path(path)
    jsonl = path / DATASET_FILE if path.is_dir() else path
    if not jsonl.is_file():
        raise InputError(f"no TIL dataset at {path} (expected {DATASET_FILE} and images/)")
    root = jsonl.parent
    try:
        lines = jsonl.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read {jsonl}: {exc}") from None
    return [_parse_line(line, f"{jsonl}:{n}", root / "images", root)
            for n, line in enumerate(lines, 1) if line.strip()]
