"""The detector's input size at any frame size (numpy only: the torch and exported paths share
it).

- ``imgsz`` > 0: every frame is letterboxed to that size (the seed's fixed 1600).
- ``imgsz`` 0: the size follows the frame, its long side times ``imgsz_scale`` rounded up to
  the stride, so an object keeps the scale the detector learned whatever the frame's size; up
  to ``imgsz_cap``. A frame whose long side is
  larger is cut into tiles of at most the cap, neighbours overlapping by at least
  ``tile_overlap`` of the tile side, each run at its own follow size; the tiles' boxes are
  shifted back to the frame and merged (``merge_tiles``).

The merge finds an object cut by a tile edge once, at its full box: a box that touches a tile
edge inside the frame is a piece; a piece and a box from another tile that overlap within the
two tiles' common region (IoU >= ``SEAM_IOU`` there) are one object, kept as the box of a tile
where it is whole, else as the union of the pieces. Then NMS across all tiles.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

STRIDE = 32
EDGE_PX = 2.0  # a box within this of a tile edge inside the frame is cut by it
SEAM_IOU = 0.5  # IoU, within two tiles' common region, of two views of one object


@dataclass(frozen=True)
class Tile:
    """A window of the frame: left, top, width, height in pixels."""

    x: int
    y: int
    w: int
    h: int


@dataclass(frozen=True)
class Plan:
    """How one frame is detected: at ``imgsz``, whole (``tiles`` None) or in tiles."""

    imgsz: int
    tiles: tuple[Tile, ...] | None = None


def follow_size(width: int, height: int, scale: float = 1.0, stride: int = STRIDE) -> int:
    """The long side times ``scale``, rounded up to the stride (at least one stride)."""
    return max(stride, math.ceil(round(max(width, height) * scale, 6) / stride) * stride)


def _starts(length: int, tile: int, overlap: float) -> list[int]:
    """Tile origins along one axis: evenly spread, the first at 0 and the last at the end,
    neighbours overlapping by at least ``overlap`` of the tile."""
    if length <= tile:
        return [0]
    step = max(1, tile - math.ceil(tile * overlap))
    n = 1 + math.ceil((length - tile) / step)
    return [round(k * (length - tile) / (n - 1)) for k in range(n)]


def tile_grid(width: int, height: int, cap: int, overlap: float) -> tuple[Tile, ...]:
    """Tiles of min(side, cap) covering a width × height frame, row by row."""
    tw, th = min(width, cap), min(height, cap)
    return tuple(Tile(x, y, tw, th) for y in _starts(height, th, overlap)
                 for x in _starts(width, tw, overlap))


def plan(width: int, height: int, imgsz: int, cap: int, overlap: float,
         scale: float = 1.0) -> Plan:
    """The detector's input size for a frame (its long side × ``scale``), and its tiles (of
    cap / scale frame pixels) when that is larger than the cap."""
    if imgsz > 0:
        return Plan(imgsz)
    if round(max(width, height) * scale, 6) <= cap:
        return Plan(follow_size(width, height, scale))
    tiles = tile_grid(width, height, max(STRIDE, math.floor(cap / scale)), overlap)
    return Plan(follow_size(tiles[0].w, tiles[0].h, scale), tiles)


def cut_edges(boxes: np.ndarray, tile: Tile, width: int, height: int,
              edge: float = EDGE_PX) -> np.ndarray:
    """Which of a tile's boxes (xyxy, tile pixels) touch one of its edges inside the frame."""
    return (((boxes[:, 0] <= edge) & (tile.x > 0))
            | ((boxes[:, 1] <= edge) & (tile.y > 0))
            | ((boxes[:, 2] >= tile.w - edge) & (tile.x + tile.w < width))
            | ((boxes[:, 3] >= tile.h - edge) & (tile.y + tile.h < height)))


def _clipped_iou(a: np.ndarray, b: np.ndarray, region: tuple[float, float, float, float]
                 ) -> float:
    """IoU of two xyxy boxes, each clipped to ``region`` first (0 when either is outside)."""
    lo, hi = np.array(region[:2] * 2), np.array(region[2:] * 2)
    a, b = np.clip(a, lo, hi), np.clip(b, lo, hi)
    area_a = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1])
    area_b = max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = area_a + area_b - inter
    return float(inter / union) if inter > 0 and union > 0 else 0.0


def _common(s: Tile, t: Tile) -> tuple[float, float, float, float] | None:
    """The region two tiles share (xyxy frame pixels), None when they do not overlap."""
    x0, y0 = max(s.x, t.x), max(s.y, t.y)
    x1, y1 = min(s.x + s.w, t.x + t.w), min(s.y + s.h, t.y + t.h)
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None


def _groups(boxes: np.ndarray, owner: np.ndarray, cut: np.ndarray, tiles: tuple[Tile, ...]
            ) -> list[list[int]]:
    """Boxes joined into one object: a cut box and a box from another tile that agree within
    the two tiles' common region (union-find over such pairs)."""
    parent = list(range(len(boxes)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in np.flatnonzero(cut):
        for j in range(len(boxes)):
            if owner[j] == owner[i] or (cut[j] and j < i):
                continue
            region = _common(tiles[owner[i]], tiles[owner[j]])
            if region is not None and _clipped_iou(boxes[i], boxes[j], region) >= SEAM_IOU:
                parent[root(int(i))] = root(j)
    groups: dict[int, list[int]] = {}
    for i in range(len(boxes)):
        groups.setdefault(root(i), []).append(i)
    return list(groups.values())


def merge_tiles(found: list[tuple[np.ndarray, np.ndarray]], tiles: tuple[Tile, ...],
                width: int, height: int, iou: float, max_det: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """Each tile's (boxes xyxy in tile pixels, scores) → the frame's (boxes, scores), best
    first: pieces of one object joined into its full box, then NMS at ``iou``."""
    from .detector import nms

    parts = [(b + np.array([t.x, t.y, t.x, t.y], np.float32), s, cut_edges(b, t, width, height),
              np.full(len(b), k)) for k, ((b, s), t) in enumerate(zip(found, tiles, strict=True))]
    boxes = np.concatenate([p[0] for p in parts]).astype(np.float32).reshape(-1, 4)
    scores = np.concatenate([p[1] for p in parts]).astype(np.float32).reshape(-1)
    cut = np.concatenate([p[2] for p in parts]).astype(bool)
    owner = np.concatenate([p[3] for p in parts]).astype(np.int64)
    if not len(boxes):
        return np.zeros((0, 4), np.float32), np.zeros(0, np.float32)
    merged, best = [], []
    for group in _groups(boxes, owner, cut, tiles):
        whole = [i for i in group if not cut[i]]
        if whole:
            merged.append(boxes[max(whole, key=lambda i: scores[i])])
        else:
            members = boxes[group]
            merged.append(np.concatenate([members[:, :2].min(0), members[:, 2:].max(0)]))
        best.append(scores[group].max())
    out_boxes = np.asarray(merged, np.float32).reshape(-1, 4)
    out_scores = np.asarray(best, np.float32)
    keep = nms(out_boxes, out_scores, iou)[:max_det]
    return out_boxes[keep], out_scores[keep]
