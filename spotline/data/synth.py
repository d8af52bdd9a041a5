"""Synthetic aerial scenes of coloured shapes, in the TIL format (``vlm.jsonl`` + ``images/``).

Every image is rendered from its own random generator, seeded by ``(seed, index)``: the same
seed gives the same bytes, and an image does not depend on how many others are made.

The vocabulary is fixed so that other renderers can make compatible scenes: ten colours (fill
RGB ± 20 per channel) and eight shapes; a caption is ``"{colour} {shape}"`` and names exactly
one object of its image. The other objects share its colour or its shape often enough
(``hard_negative``) to be hard negatives. Scenes: a textured background (sky with clouds,
sea, fields, noise), 3–6 objects of 10–80 px with soft shadows, some overlap and blur, then the
seed's degradations: Gaussian and ISO noise, brightness/contrast, JPEG quality 25–75.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "orange": (245, 140, 20), "yellow": (240, 220, 30),
    "green": (40, 170, 60), "blue": (30, 80, 220), "purple": (140, 50, 190),
    "white": (245, 245, 245), "black": (20, 20, 20), "grey": (128, 128, 128),
    "pink": (250, 130, 190),
}
SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond", "hexagon", "ring")
COLOUR_JITTER = 20
BACKGROUNDS = ("sky", "sea", "fields", "noise")
DATASET_FILE = "vlm.jsonl"
IMAGES_DIR = "images"
SPLITS = ("train", "val", "test")
SUPERSAMPLE = 4  # shapes are drawn this much larger, then area-averaged: smooth edges


def caption_of(colour: str, shape: str) -> str:
    """The caption of an object: ``"{colour} {shape}"``."""
    return f"{colour} {shape}"


def all_captions() -> list[str]:
    """Every caption the vocabulary makes (80)."""
    return [caption_of(c, s) for c in COLOURS for s in SHAPES]


@dataclass(frozen=True)
class SynthOptions:
    """What a synthetic dataset looks like."""

    seed: int = 0
    images: int = 100
    size: tuple[int, int] = (384, 256)  # width, height
    objects: tuple[int, int] = (3, 6)
    sides: tuple[int, int] = (10, 80)  # object size in px (longer side)
    hard_negative: float = 0.75  # chance a new object shares colour or shape with one placed
    jpeg_quality: tuple[int, int] = (25, 75)
    max_overlap: float = 0.25  # of a placed object's box that a later one may cover
    blur_p: float = 0.15  # chance an object is blurred (motion/defocus)
    backgrounds: tuple[str, ...] = BACKGROUNDS

    def __post_init__(self) -> None:
        w, h = self.size
        lo, hi = self.sides
        if w < 64 or h < 64:
            raise ValueError(f"size must be at least 64x64, got {w}x{h}")
        if not 1 <= self.objects[0] <= self.objects[1] <= 12:
            raise ValueError(f"objects must be a range within 1..12, got {self.objects}")
        if not 4 <= lo <= hi <= min(w, h) // 2:
            raise ValueError(f"object sides must be within 4..{min(w, h) // 2}, got {self.sides}")
        if not 1 <= self.jpeg_quality[0] <= self.jpeg_quality[1] <= 100:
            raise ValueError(f"jpeg quality must be within 1..100, got {self.jpeg_quality}")
        unknown = set(self.backgrounds) - set(BACKGROUNDS)
        if unknown or not self.backgrounds:
            raise ValueError(f"backgrounds must be some of {BACKGROUNDS}, got {self.backgrounds}")


@dataclass
class SceneObject:
    """One rendered object: its caption and tight box [left, top, width, height]."""

    colour: str
    shape: str
    box: tuple[int, int, int, int]

    @property
    def caption(self) -> str:
        return caption_of(self.colour, self.shape)


@dataclass
class Scene:
    """An RGB image and its objects."""

    image: np.ndarray
    objects: list[SceneObject] = field(default_factory=list)
    quality: int = 75  # JPEG quality it is saved at

    def record(self, name: str) -> dict[str, Any]:
        """The scene's TIL line."""
        return {"image": name, "annotations": [{"caption": o.caption, "bbox": list(o.box)}
                                               for o in self.objects]}


def rng_for(seed: int, index: int) -> np.random.Generator:
    """The generator of image ``index`` of a dataset made with ``seed``."""
    return np.random.default_rng([int(seed), int(index)])


# --- backgrounds -------------------------------------------------------------------------------
def smooth_noise(rng: np.random.Generator, h: int, w: int, cell: float,
                 channels: int = 1) -> np.ndarray:
    """Low-frequency noise in [0, 1]: random values on a grid of ``cell`` px, cubic-upsampled."""
    gh, gw = max(2, int(h / cell) + 2), max(2, int(w / cell) + 2)
    grid = rng.random((gh, gw, channels), dtype=np.float32)
    out = cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)
    return np.clip(out.reshape(h, w, channels), 0.0, 1.0)


def fractal_noise(rng: np.random.Generator, h: int, w: int, cell: float, octaves: int = 4
                  ) -> np.ndarray:
    """Sum of smooth noises at halving cell sizes (clouds, waves, soil), in [0, 1], H×W."""
    total = np.zeros((h, w), np.float32)
    weight, norm = 1.0, 0.0
    for k in range(octaves):
        total += weight * smooth_noise(rng, h, w, max(2.0, cell / 2 ** k))[..., 0]
        norm += weight
        weight *= 0.5
    return total / norm


def _jitter(rng: np.random.Generator, rgb: Sequence[float], amount: float) -> np.ndarray:
    return np.clip(np.asarray(rgb, np.float32) + rng.uniform(-amount, amount, 3), 0, 255)


def sky(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A blue gradient with fractal clouds."""
    top, bottom = _jitter(rng, (95, 145, 210), 25), _jitter(rng, (175, 205, 235), 20)
    t = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None, None]
    img = top * (1 - t) + bottom * t + np.zeros((1, w, 1), np.float32)
    clouds = fractal_noise(rng, h, w, cell=rng.uniform(60, 160))
    cover = rng.uniform(0.35, 0.6)
    alpha = np.clip((clouds - cover) / 0.25, 0.0, 1.0)[..., None] * rng.uniform(0.6, 0.95)
    cloud = _jitter(rng, (235, 238, 242), 10) * (0.85 + 0.15 * clouds[..., None])
    return img * (1 - alpha) + cloud * alpha


def sea(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Deep water with swell, wave streaks and glints."""
    base = _jitter(rng, (25, 75, 110), 20)
    swell = fractal_noise(rng, h, w, cell=rng.uniform(40, 120))[..., None]
    img = base * (0.75 + 0.5 * swell)
    angle = rng.uniform(0, math.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    phase = xx * math.cos(angle) + yy * math.sin(angle)
    streaks = np.sin(phase / rng.uniform(2.5, 6.0) + 6 * swell[..., 0]) > 0.93
    img = img + streaks[..., None] * rng.uniform(25, 60)
    glint = smooth_noise(rng, h, w, cell=3)[..., 0] > 0.97
    return img + glint[..., None] * 70.0


def fields(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A patchwork of muted parcels with furrows, and sometimes a road."""
    palette = [(95, 120, 60), (120, 105, 70), (150, 140, 90), (80, 100, 55), (135, 120, 85),
               (105, 115, 75), (160, 150, 110)]
    img = np.zeros((h, w, 3), np.float32)
    for x0, y0, x1, y1 in _parcels(rng, 0, 0, w, h, depth=int(rng.integers(2, 5))):
        colour = _jitter(rng, palette[int(rng.integers(len(palette)))], 12)
        angle = rng.uniform(0, math.pi)
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        furrows = np.sin((xx * math.cos(angle) + yy * math.sin(angle)) / rng.uniform(1.5, 4.0))
        img[y0:y1, x0:x1] = colour * (1 + 0.06 * furrows[..., None])
    soil = fractal_noise(rng, h, w, cell=rng.uniform(20, 60))[..., None]
    img *= 0.85 + 0.3 * soil
    if rng.random() < 0.5:
        p1 = (int(rng.integers(0, w)), 0)
        p2 = (int(rng.integers(0, w)), h - 1)
        cv2.line(img, p1, p2, tuple(float(v) for v in _jitter(rng, (150, 148, 140), 15)),
                 int(rng.integers(3, 8)), cv2.LINE_AA)
    return img


def _parcels(rng: np.random.Generator, x0: int, y0: int, x1: int, y1: int, depth: int
             ) -> Iterator[tuple[int, int, int, int]]:
    """Guillotine cuts of a rectangle into parcels."""
    if depth == 0 or min(x1 - x0, y1 - y0) < 40:
        yield x0, y0, x1, y1
        return
    if (x1 - x0) > (y1 - y0):
        cut = int(rng.integers(x0 + (x1 - x0) // 4, x1 - (x1 - x0) // 4))
        yield from _parcels(rng, x0, y0, cut, y1, depth - 1)
        yield from _parcels(rng, cut, y0, x1, y1, depth - 1)
    else:
        cut = int(rng.integers(y0 + (y1 - y0) // 4, y1 - (y1 - y0) // 4))
        yield from _parcels(rng, x0, y0, x1, cut, depth - 1)
        yield from _parcels(rng, x0, cut, x1, y1, depth - 1)


def noise_background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Muted colour noise at two scales (terrain of no particular kind)."""
    base = _jitter(rng, (110, 110, 105), 30)
    coarse = smooth_noise(rng, h, w, cell=rng.uniform(30, 90), channels=3)
    fine = smooth_noise(rng, h, w, cell=rng.uniform(3, 8), channels=3)
    return base * (0.7 + 0.4 * coarse) + (fine - 0.5) * 25.0


BACKGROUND_FNS: dict[str, Callable[[np.random.Generator, int, int], np.ndarray]] = {
    "sky": sky, "sea": sea, "fields": fields, "noise": noise_background}


# --- shapes ------------------------------------------------------------------------------------
def _polygon(n: int, radius: float, rotation: float, inner: float | None = None) -> np.ndarray:
    """A regular polygon (or a star with ``inner`` radius), unit centre 0, as N×2."""
    if inner is None:
        angles = rotation + np.arange(n) * 2 * math.pi / n
        radii = np.full(n, radius)
    else:
        angles = rotation + np.arange(2 * n) * math.pi / n
        radii = np.where(np.arange(2 * n) % 2 == 0, radius, radius * inner)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _rotate(points: np.ndarray, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return points @ np.array([[c, s], [-s, c]], np.float64)


def shape_points(shape: str, rng: np.random.Generator) -> list[np.ndarray]:
    """Polygons of a shape in unit coordinates (about [-1, 1]); several for compound shapes."""
    small_tilt = rng.uniform(-0.2, 0.2)  # squares, diamonds, crosses stay recognisable
    if shape == "square":
        return [_rotate(np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], np.float64) * 0.8,
                        small_tilt)]
    if shape == "diamond":
        return [_rotate(np.array([[0, -1], [0.62, 0], [0, 1], [-0.62, 0]], np.float64),
                        small_tilt)]
    if shape == "triangle":
        return [_polygon(3, 1.0, rng.uniform(0, 2 * math.pi))]
    if shape == "star":
        return [_polygon(5, 1.0, rng.uniform(0, 2 * math.pi), inner=rng.uniform(0.38, 0.5))]
    if shape == "hexagon":
        return [_polygon(6, 1.0, rng.uniform(0, math.pi / 3))]
    if shape == "cross":
        t = rng.uniform(0.2, 0.3)
        arm = np.array([[-1, -t], [1, -t], [1, t], [-1, t]], np.float64)
        return [_rotate(arm, small_tilt), _rotate(arm[:, ::-1].copy(), small_tilt)]
    raise ValueError(f"unknown shape {shape!r}")


def render_mask(shape: str, side: int, rng: np.random.Generator) -> np.ndarray:
    """An anti-aliased alpha mask (float32 in [0, 1]) of a shape about ``side`` px across."""
    pad = 2
    size = side + 2 * pad
    big = np.zeros((size * SUPERSAMPLE, size * SUPERSAMPLE), np.uint8)
    centre = np.array([size / 2, size / 2]) * SUPERSAMPLE
    radius = side / 2 * SUPERSAMPLE
    if shape in ("circle", "ring"):
        axes = (int(radius), int(radius * rng.uniform(0.85, 1.0)))
        angle = float(rng.uniform(0, 180))
        c = (int(centre[0]), int(centre[1]))
        cv2.ellipse(big, c, axes, angle, 0, 360, 255, -1)
        if shape == "ring":
            k = rng.uniform(0.45, 0.6)
            cv2.ellipse(big, c, (int(axes[0] * k), int(axes[1] * k)), angle, 0, 360, 0, -1)
    else:
        for poly in shape_points(shape, rng):
            pts = np.round(poly * radius + centre).astype(np.int32)
            cv2.fillPoly(big, [pts], 255)
    return cv2.resize(big, (size, size), interpolation=cv2.INTER_AREA).astype(np.float32) / 255


def fill_colour(colour: str, rng: np.random.Generator) -> np.ndarray:
    """The colour's RGB with ± COLOUR_JITTER per channel."""
    return _jitter(rng, COLOURS[colour], COLOUR_JITTER)


# --- choosing and placing objects ---------------------------------------------------------------
def choose_objects(rng: np.random.Generator, n: int, hard_negative: float) -> list[tuple[str, str]]:
    """``n`` distinct (colour, shape) pairs; each new one shares the colour or the shape of a
    placed one with probability ``hard_negative``."""
    colours, shapes = list(COLOURS), list(SHAPES)
    chosen: list[tuple[str, str]] = []
    while len(chosen) < n:
        if chosen and rng.random() < hard_negative:
            colour, shape = chosen[int(rng.integers(len(chosen)))]
            if rng.random() < 0.5:
                shape = shapes[int(rng.integers(len(shapes)))]
            else:
                colour = colours[int(rng.integers(len(colours)))]
        else:
            colour = colours[int(rng.integers(len(colours)))]
            shape = shapes[int(rng.integers(len(shapes)))]
        if (colour, shape) not in chosen:
            chosen.append((colour, shape))
    return chosen


def _covered(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """The fraction of box ``a`` (l, t, w, h) that box ``b`` covers."""
    iw = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    return iw * ih / max(1, a[2] * a[3])


def place(rng: np.random.Generator, mask: np.ndarray, width: int, height: int,
          boxes: list[tuple[int, int, int, int]], max_overlap: float
          ) -> tuple[int, int, tuple[int, int, int, int]] | None:
    """Where the mask's top-left goes so its tight box is inside the image and overlaps the
    placed boxes little (both ways); None after 60 tries."""
    ys, xs = np.nonzero(mask > 0.5)
    if xs.size == 0:
        return None
    bx, by = int(xs.min()), int(ys.min())
    bw, bh = int(xs.max()) - bx + 1, int(ys.max()) - by + 1
    for _ in range(60):
        left = int(rng.integers(0, width - bw + 1))
        top = int(rng.integers(0, height - bh + 1))
        box = (left, top, bw, bh)
        if all(_covered(o, box) <= max_overlap and _covered(box, o) <= max_overlap
               for o in boxes):
            return left - bx, top - by, box
    return None


def _paste(canvas: np.ndarray, layer: np.ndarray, alpha: np.ndarray, x: int, y: int) -> None:
    """Alpha-blend a layer (h×w×3) onto the canvas at (x, y), clipped to the canvas."""
    h, w = alpha.shape
    H, W = canvas.shape[:2]
    x0, y0, x1, y1 = max(0, x), max(0, y), min(W, x + w), min(H, y + h)
    if x0 >= x1 or y0 >= y1:
        return
    a = alpha[y0 - y:y1 - y, x0 - x:x1 - x, None]
    canvas[y0:y1, x0:x1] = canvas[y0:y1, x0:x1] * (1 - a) + layer[y0 - y:y1 - y, x0 - x:x1 - x] * a


def draw_object(canvas: np.ndarray, mask: np.ndarray, colour: np.ndarray, x: int, y: int,
                rng: np.random.Generator, blur: bool) -> None:
    """A soft shadow, then the object with mild lighting (and blur when asked)."""
    h, w = mask.shape
    shadow = cv2.GaussianBlur(mask, (0, 0), 1.5) * rng.uniform(0.25, 0.45)
    dx, dy = int(rng.integers(1, 4)), int(rng.integers(1, 4))
    _paste(canvas, np.zeros((h, w, 3), np.float32), shadow, x + dx, y + dy)
    t = np.linspace(-1.0, 1.0, max(h, w), dtype=np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    light = (math.cos(angle) * t[None, :w] + math.sin(angle) * t[:h, None]) * 0.05 + 1.0
    layer = np.clip(colour[None, None, :] * light[..., None], 0, 255)
    alpha = mask
    if blur:
        sigma = rng.uniform(0.7, 1.4)
        alpha = cv2.GaussianBlur(mask, (0, 0), sigma)
    _paste(canvas, layer, alpha, x, y)


# --- scenes ------------------------------------------------------------------------------------
def _degrader(seed: int) -> Any:
    """The seed's degradations (albumentations, RGB uint8): Gaussian and ISO noise, then
    brightness/contrast. GaussNoise's std is a fraction of 255 here, i.e. on the pixels'
    own scale (the seed's second bug was a variance meant for 0–255 applied to 0–1)."""
    import albumentations as A

    return A.Compose([
        A.GaussNoise(std_range=(2 / 255, 12 / 255), p=0.7),
        A.ISONoise(color_shift=(0.01, 0.04), intensity=(0.1, 0.4), p=0.5),
        A.RandomBrightnessContrast(brightness_limit=0.15, contrast_limit=0.2, p=0.7),
    ], seed=seed)


_DEGRADE: dict[str, Any] = {}


def degrade(image: np.ndarray, seed: int) -> np.ndarray:
    """Noise and brightness/contrast, deterministic for ``seed``."""
    compose = _DEGRADE.get("compose")
    if compose is None:
        compose = _DEGRADE["compose"] = _degrader(0)
    compose.set_random_seed(seed)
    return compose(image=image)["image"]


def make_scene(options: SynthOptions, index: int) -> Scene:
    """Render image ``index`` of the dataset ``options`` describe (before JPEG)."""
    rng = rng_for(options.seed, index)
    width, height = options.size
    kind = options.backgrounds[int(rng.integers(len(options.backgrounds)))]
    canvas = np.clip(BACKGROUND_FNS[kind](rng, height, width), 0, 255).astype(np.float32)
    n = int(rng.integers(options.objects[0], options.objects[1] + 1))
    scene = Scene(canvas)
    boxes: list[tuple[int, int, int, int]] = []
    lo, hi = options.sides
    for colour, shape in choose_objects(rng, n, options.hard_negative):
        for _attempt in range(3):
            side = int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))
            mask = render_mask(shape, side, rng)
            spot = place(rng, mask, width, height, boxes, options.max_overlap)
            if spot is not None:
                break
        if spot is None:
            continue
        x, y, box = spot
        draw_object(canvas, mask, fill_colour(colour, rng), x, y, rng,
                    blur=rng.random() < options.blur_p)
        boxes.append(box)
        scene.objects.append(SceneObject(colour, shape, box))
    noise_seed = int(rng.integers(0, 2**31 - 1))
    scene.image = degrade(np.clip(canvas, 0, 255).round().astype(np.uint8), noise_seed)
    scene.quality = int(rng.integers(options.jpeg_quality[0], options.jpeg_quality[1] + 1))
    return scene


def encode_jpeg(rgb: np.ndarray, quality: int) -> bytes:
    """JPEG bytes of an RGB image (4:2:0, baseline: the same bytes on every run)."""
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()


# --- datasets ---------------------------------------------------------------------------------
def split_counts(total: int, ratios: Sequence[float]) -> list[int]:
    """Images per split for ``ratios`` (normalised), summing to ``total``."""
    if not ratios or any(r < 0 for r in ratios) or sum(ratios) <= 0:
        raise ValueError(f"ratios must be non-negative with a positive sum, got {ratios}")
    norm = [r / sum(ratios) for r in ratios]
    counts = [int(total * r) for r in norm]
    counts[0] += total - sum(counts)
    return counts


def write_split(out: Path, options: SynthOptions, indices: Sequence[int],
                progress: Callable[[int], None] | None = None) -> Path:
    """Render images ``indices`` into the TIL dataset ``out`` (vlm.jsonl + images/)."""
    images = out / IMAGES_DIR
    images.mkdir(parents=True, exist_ok=True)
    lines = []
    for index in indices:
        scene = make_scene(options, index)
        name = f"image_{index}.jpg"
        _write_bytes(images / name, encode_jpeg(scene.image, scene.quality))
        lines.append(json.dumps(scene.record(name)))
        if progress is not None:
            progress(1)
    _write_bytes(out / DATASET_FILE, ("\n".join(lines) + "\n").encode() if lines else b"")
    return out


def _write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def synthesize(out: str | Path, options: SynthOptions, split: str | None = None,
               ratios: Sequence[float] | None = None,
               progress: Callable[[int], None] | None = None) -> dict[str, Path]:
    """Write a dataset: into ``out`` itself, into ``out/split``, or into ``out/train``,
    ``out/val``, ``out/test`` by ``ratios``; returns {split name: folder}."""
    out = Path(out)
    if ratios:
        counts = split_counts(options.images, ratios)
        written, start = {}, 0
        for name, count in zip(SPLITS, counts, strict=False):
            written[name] = write_split(out / name, options, range(start, start + count), progress)
            start += count
        return written
    target = out / split if split else out
    return {split or "all": write_split(target, options, range(options.images), progress)}
