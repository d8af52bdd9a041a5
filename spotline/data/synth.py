"""Synthetic aerial scenes of coloured shapes, in the TIL format (``vlm.jsonl`` + ``images/``).

Every image is rendered from its own random generator, seeded by ``(seed, index)``: the same
seed gives the same bytes, and an image does not depend on how many others are made.

The vocabulary is fixed so that other renderers can make compatible scenes: ten colours (fill
RGB ± 20 per channel) and eight shapes; a caption is ``"{colour} {shape}"`` and names exactly
one object of its image. The other objects share its colour or its shape often enough
(``hard_negative``) to be hard negatives. Scenes: a textured background (sky with clouds,
sea, fields, noise), 3–6 objects of 10–80 px with soft shadows, some overlap and blur, then the
seed's degradations: Gaussian and ISO noise, brightness/contrast, JPEG quality 25–75.

Two styles (``SynthOptions.style``):

- ``classic`` (the default; the demo models were trained on it): the scenes above.
- ``heldout``: a second family that no training command may use (``refuse_heldout``): another
  renderer's look, pale gradient skies with soft blobs in the vocabulary's colours, terrain,
  water and urban blocks, frames of 384–1920 px in several aspect ratios, objects of 8–120 px,
  some in clusters, rotated, motion-blurred, low-contrast or partly occluded, among clutter
  that is not in the vocabulary (other shapes, lines, text-like marks). ``heldout_options``
  gives its preset; its lines carry ``"style"`` and ``"background"``.

The domain-randomisation options (``sizes``, ``clutter``, ``low_contrast``, ``occlusion``,
``rotate``, ``motion_blur``) work with either style; off (the default) a classic scene is the
same bytes as before they existed.
"""

from __future__ import annotations

import dataclasses
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
# the training renderer's further grounds, for domain randomisation (never the held-out ones)
TRAINING_BACKGROUNDS = (*BACKGROUNDS, "tinted_sky", "ground", "roofs", "dark_water")
CLASSIC, HELDOUT, RANDOMISED = "classic", "heldout", "randomised"
STYLES = (CLASSIC, HELDOUT, RANDOMISED)
HELDOUT_BACKGROUNDS = ("pale_sky", "terrain", "water", "urban")
ASPECTS = (1.0, 4 / 3, 3 / 2, 16 / 9, 1.75, 2.0)  # width / height with sizes; some portrait
FAMILY_FILE = "synth.json"  # beside vlm.jsonl: the options a dataset was made with
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
    style: str = CLASSIC
    # domain randomisation (off by default)
    sizes: tuple[int, int] | None = None  # long side range: each image its own size and aspect
    clutter: int = 0  # marks not in the vocabulary per image, at most
    low_contrast: float = 0.0  # chance an object is drawn faint (blended into the background)
    occlusion: float = 0.0  # chance an object is partly covered by clutter drawn over it
    rotate: bool = False  # any rotation (squares, diamonds, crosses within ±30°)
    motion_blur: float = 0.0  # chance an object is smeared along a direction

    def __post_init__(self) -> None:
        w, h = self.size
        lo, hi = self.sides
        if w < 64 or h < 64:
            raise ValueError(f"size must be at least 64x64, got {w}x{h}")
        if not 1 <= self.objects[0] <= self.objects[1] <= 12:
            raise ValueError(f"objects must be a range within 1..12, got {self.objects}")
        short = min(w, h) if self.sizes is None else int(self.sizes[0] / max(ASPECTS))
        if self.sizes is not None and not 128 <= self.sizes[0] <= self.sizes[1] <= 4096:
            raise ValueError(f"sizes must be a range within 128..4096, got {self.sizes}")
        # with sizes, larger objects are capped to half of each image's shorter side
        if not 4 <= lo <= hi or (hi if self.sizes is None else lo) > short // 2:
            raise ValueError(f"object sides must be within 4..{short // 2}, got {self.sides}")
        if not 1 <= self.jpeg_quality[0] <= self.jpeg_quality[1] <= 100:
            raise ValueError(f"jpeg quality must be within 1..100, got {self.jpeg_quality}")
        if self.style not in STYLES:
            raise ValueError(f"style must be one of {STYLES}, got {self.style!r}")
        allowed = HELDOUT_BACKGROUNDS if self.style == HELDOUT else TRAINING_BACKGROUNDS
        unknown = set(self.backgrounds) - set(allowed)
        if unknown or not self.backgrounds:
            raise ValueError(f"backgrounds of style {self.style} must be some of {allowed}, got "
                             f"{self.backgrounds}")
        for name in ("low_contrast", "occlusion", "motion_blur"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a chance in [0, 1], got {getattr(self, name)}")
        if not 0 <= self.clutter <= 64:
            raise ValueError(f"clutter must be within 0..64, got {self.clutter}")

    @property
    def randomised(self) -> bool:
        """Any domain-randomisation option is on."""
        return bool(self.sizes or self.clutter or self.low_contrast or self.occlusion
                    or self.rotate or self.motion_blur)


def randomised_options(seed: int = 0, images: int = 100, **changes: Any) -> SynthOptions:
    """The training renderer with every domain-randomisation option on (``changes``
    override single fields): the classic scenes' objects and degradations on all eight
    training grounds, frames of 384–1920 px, objects of 8–120 px among clutter, faint,
    rotated, motion-blurred and partly covered objects."""
    preset: dict[str, Any] = dict(
        style=RANDOMISED, backgrounds=TRAINING_BACKGROUNDS, sizes=(384, 1920), objects=(3, 7),
        sides=(8, 120), clutter=6, low_contrast=0.15, occlusion=0.1, rotate=True,
        motion_blur=0.15)
    return SynthOptions(seed=seed, images=images, **{**preset, **changes})


def heldout_options(seed: int = 0, images: int = 100, **changes: Any) -> SynthOptions:
    """The held-out family's preset (``changes`` override single fields)."""
    preset: dict[str, Any] = dict(
        style=HELDOUT, backgrounds=HELDOUT_BACKGROUNDS, sizes=(384, 1920), objects=(3, 7),
        sides=(10, 120), hard_negative=0.75, jpeg_quality=(40, 90), max_overlap=0.15, blur_p=0.1,
        clutter=8, low_contrast=0.2, occlusion=0.15, rotate=True, motion_blur=0.2)
    return SynthOptions(seed=seed, images=images, **{**preset, **changes})


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
    meta: dict[str, Any] = field(default_factory=dict)  # extra fields of its line

    def record(self, name: str) -> dict[str, Any]:
        """The scene's TIL line (with ``meta``'s fields, e.g. style and background)."""
        return {"image": name, **self.meta,
                "annotations": [{"caption": o.caption, "bbox": list(o.box)}
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


# --- the training renderer's further grounds (domain randomisation) ---------------------------
def tinted_sky(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A sky of any tint (blue, grey, dusk, pale) whose fractal clouds are stained in places
    with the vocabulary's colours: ground the detector must learn is not an object."""
    top = rng.uniform(60, 250, 3).astype(np.float32)
    bottom = np.clip(top + rng.uniform(-40, 60, 3), 0, 255).astype(np.float32)
    t = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None, None]
    img = top * (1 - t) + bottom * t + np.zeros((1, w, 1), np.float32)
    names = list(COLOURS)
    for _ in range(int(rng.integers(1, 7))):
        stain = fractal_noise(rng, h, w, cell=rng.uniform(20, 120), octaves=3)
        alpha = np.clip((stain - rng.uniform(0.55, 0.75)) / 0.15, 0, 1) * rng.uniform(0.2, 0.7)
        colour = _jitter(rng, COLOURS[names[int(rng.integers(len(names)))]], 30)
        img = img * (1 - alpha[..., None]) + colour * alpha[..., None]
    return img


def ground(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Bare or grown ground: two earth colours mixed by fractal noise, speckle and tracks."""
    earth = [(120, 95, 65), (85, 110, 55), (170, 150, 110), (70, 70, 60), (150, 120, 90),
             (200, 190, 160), (60, 90, 50)]
    a = _jitter(rng, earth[int(rng.integers(len(earth)))], 15)
    b = _jitter(rng, earth[int(rng.integers(len(earth)))], 15)
    mix = fractal_noise(rng, h, w, cell=rng.uniform(30, 200), octaves=4)[..., None]
    img = a * (1 - mix) + b * mix
    img += (smooth_noise(rng, h, w, cell=rng.uniform(1.5, 4), channels=3) - 0.5) * 30.0
    for _ in range(int(rng.integers(0, 4))):
        pts = np.cumsum(rng.normal(0, 25, (8, 2)), axis=0) + rng.uniform(0, 1, 2) * (w, h)
        cv2.polylines(img, [pts.astype(np.int32)], False,
                      tuple(float(v) for v in _jitter(rng, (160, 140, 110), 30)),
                      int(rng.integers(1, 5)), cv2.LINE_AA)
    return img


def roofs(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Built-up ground: rectangles of roof, yard and car colours (white, grey, black, red
    tiles among them) scattered at random over asphalt, with thin lane marks."""
    img = np.zeros((h, w, 3), np.float32) + _jitter(rng, (80, 80, 85), 15)
    tones = [(235, 235, 230), (140, 140, 140), (40, 40, 45), (165, 80, 60), (110, 120, 130),
             (190, 180, 150), (90, 110, 80)]
    for _ in range(int(h * w / rng.uniform(900, 2500))):
        rw = int(rng.integers(6, 60))  # oblong (at least 3:2), so no roof passes for a square
        rh = max(3, int(rw / rng.uniform(1.5, 4.0)))
        if rng.random() < 0.5:
            rw, rh = rh, rw
        x, y = int(rng.integers(-rw, w)), int(rng.integers(-rh, h))
        colour = _jitter(rng, tones[int(rng.integers(len(tones)))], 15)
        cv2.rectangle(img, (x, y), (x + rw, y + rh), tuple(float(v) for v in colour), -1)
    for _ in range(int(rng.integers(0, 5))):
        x = int(rng.integers(0, w))
        cv2.line(img, (x, 0), (x + int(rng.integers(-w // 4, w // 4 + 1)), h - 1),
                 (220.0, 220.0, 200.0), 1, cv2.LINE_AA)
    return img * (0.9 + 0.2 * smooth_noise(rng, h, w, cell=rng.uniform(2, 6)))


def dark_water(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Near-black water under a dull sky: low light where dark objects are hard to see."""
    base = _jitter(rng, (20, 28, 38), 12)
    swell = fractal_noise(rng, h, w, cell=rng.uniform(15, 80), octaves=3)[..., None]
    img = base * (0.6 + 0.8 * swell)
    specks = smooth_noise(rng, h, w, cell=2)[..., 0] > rng.uniform(0.93, 0.99)
    return img + specks[..., None] * rng.uniform(20, 60)


# --- the held-out family's backgrounds (another renderer's look) -------------------------------
def _soft_blob(img: np.ndarray, rng: np.random.Generator, colour: np.ndarray,
               alpha: float) -> None:
    """A soft elliptical blob (Gaussian falloff) of ``colour`` blended into ``img``."""
    h, w = img.shape[:2]
    cx, cy = rng.uniform(0, w), rng.uniform(0, h)
    rx, ry = rng.uniform(0.04, 0.2) * max(w, h), rng.uniform(0.03, 0.15) * max(w, h)
    x0, x1 = int(max(0, cx - 3 * rx)), int(min(w, cx + 3 * rx + 1))
    y0, y1 = int(max(0, cy - 3 * ry)), int(min(h, cy + 3 * ry + 1))
    if x0 >= x1 or y0 >= y1:
        return
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    a = np.exp(-(((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2))[..., None] * alpha
    img[y0:y1, x0:x1] = img[y0:y1, x0:x1] * (1 - a) + colour * a


def pale_sky(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A pale gradient sky with soft cloud blobs in the vocabulary's colours and faint haze."""
    top, bottom = _jitter(rng, (205, 220, 238), 15), _jitter(rng, (238, 240, 245), 10)
    t = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None, None]
    img = top * (1 - t) + bottom * t + np.zeros((1, w, 1), np.float32)
    names = list(COLOURS)
    for _ in range(int(rng.integers(3, 10))):
        colour = _jitter(rng, COLOURS[names[int(rng.integers(len(names)))]], 25)
        _soft_blob(img, rng, colour, rng.uniform(0.15, 0.55))
    haze = fractal_noise(rng, h, w, cell=rng.uniform(150, 400), octaves=3)[..., None]
    return img * (1 - 0.25 * haze) + 250.0 * 0.25 * haze


def terrain(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Elevation-coloured terrain (lowland green to rock and snow) with contour lines."""
    height = fractal_noise(rng, h, w, cell=rng.uniform(120, 320), octaves=5)
    stops = np.array([0.0, 0.35, 0.5, 0.65, 0.8, 1.0], np.float32)
    palette = np.array([(70, 110, 60), (105, 135, 70), (150, 140, 95), (130, 110, 85),
                        (160, 155, 150), (235, 235, 235)], np.float32)
    palette = np.clip(palette + rng.uniform(-12, 12, (1, 3)), 0, 255)
    scaled = (height - height.min()) / max(1e-6, float(np.ptp(height)))
    img = np.stack([np.interp(scaled, stops, palette[:, k]) for k in range(3)], axis=-1)
    contour = np.abs(np.sin(scaled * rng.uniform(25, 60))) < 0.05
    return img.astype(np.float32) * (1 - 0.18 * contour[..., None])


def water(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Dark water (navy to teal) with ripples and a bright shore band at one edge."""
    deep, shallow = _jitter(rng, (15, 30, 50), 10), _jitter(rng, (30, 95, 105), 15)
    depth = fractal_noise(rng, h, w, cell=rng.uniform(100, 300), octaves=3)[..., None]
    img = deep * (1 - depth) + shallow * depth
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ripple = np.sin((xx * rng.uniform(0.05, 0.2) + yy) / rng.uniform(3, 8)
                    + 8 * depth[..., 0])
    img = img + (ripple > 0.8)[..., None] * rng.uniform(10, 25)
    if rng.random() < 0.5:
        band = int(rng.uniform(0.05, 0.15) * h)
        img[:band] = _jitter(rng, (190, 175, 140), 15) * (0.9 + 0.1 * depth[:band])
    return img


def urban(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """City blocks from above: roads between blocks of roofs in greys, slate and terracotta."""
    img = np.zeros((h, w, 3), np.float32) + _jitter(rng, (95, 95, 100), 10)
    roofs = [(150, 150, 150), (110, 115, 125), (170, 95, 70), (200, 195, 185), (80, 80, 85)]
    block = int(rng.integers(40, 110))
    road = int(rng.integers(6, 16))
    for y in range(road, h, block + road):
        for x in range(road, w, block + road):
            bw, bh = min(block, w - x), min(block, h - y)
            for _ in range(int(rng.integers(1, 5))):  # buildings in the block
                rw = int(rng.integers(bw // 3 + 1, bw + 1))
                rh = int(rng.integers(bh // 3 + 1, bh + 1))
                rx = x + int(rng.integers(0, bw - rw + 1))
                ry = y + int(rng.integers(0, bh - rh + 1))
                roof = _jitter(rng, roofs[int(rng.integers(len(roofs)))], 12)
                img[ry:ry + rh, rx:rx + rw] = roof
                img[ry + rh - 2:ry + rh, rx:rx + rw] *= 0.7  # a shadow edge
    grain = smooth_noise(rng, h, w, cell=rng.uniform(2, 5))
    return img * (0.92 + 0.16 * grain)


BACKGROUND_FNS: dict[str, Callable[[np.random.Generator, int, int], np.ndarray]] = {
    "sky": sky, "sea": sea, "fields": fields, "noise": noise_background,
    "tinted_sky": tinted_sky, "ground": ground, "roofs": roofs, "dark_water": dark_water,
    "pale_sky": pale_sky, "terrain": terrain, "water": water, "urban": urban}


# --- clutter: marks that are not in the vocabulary --------------------------------------------
CLUTTER_KINDS = ("line", "text", "bar", "crescent", "arrow", "dots")


def draw_clutter(canvas: np.ndarray, rng: np.random.Generator,
                 near: tuple[int, int, int, int] | None = None) -> None:
    """One mark that no caption names (a line, text-like marks, a thin bar, a crescent, an
    arrow, a row of dots), in any colour; ``near`` (l, t, w, h) puts it over that box's edge."""
    h, w = canvas.shape[:2]
    kind = CLUTTER_KINDS[int(rng.integers(len(CLUTTER_KINDS)))] if near is None else "bar"
    colour = tuple(float(v) for v in rng.uniform(0, 255, 3))
    if near is not None:  # over about a quarter of the box, from one side
        left, top, bw, bh = near
        x0 = left + int(rng.uniform(0.5, 0.8) * bw)
        y0 = top + int(rng.uniform(-0.2, 0.5) * bh)
        cv2.rectangle(canvas, (x0, y0), (x0 + bw, y0 + max(2, bh // 2)), colour, -1)
        return
    x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
    size = int(rng.integers(10, max(11, min(w, h) // 4)))
    if kind == "line":
        end = (x + int(rng.integers(-4, 5) * size), y + int(rng.integers(-4, 5) * size))
        cv2.line(canvas, (x, y), end, colour, int(rng.integers(1, 4)), cv2.LINE_AA)
    elif kind == "text":
        text = "".join(chr(int(rng.integers(65, 91))) for _ in range(int(rng.integers(2, 7))))
        ink = np.zeros((h, w), np.uint8)  # putText draws on 8-bit images only
        cv2.putText(ink, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, rng.uniform(0.3, 1.2), 255,
                    int(rng.integers(1, 3)), cv2.LINE_AA)
        _paste(canvas, np.broadcast_to(np.float32(colour), (h, w, 3)), ink / np.float32(255),
               0, 0)
    elif kind == "bar":
        angle = rng.uniform(0, 180)
        cv2.ellipse(canvas, (x, y), (size, max(1, size // int(rng.integers(4, 9)))), angle, 0,
                    360, colour, -1, cv2.LINE_AA)
    elif kind == "crescent":
        r = max(4, size // 2)
        cv2.circle(canvas, (x, y), r, colour, -1, cv2.LINE_AA)
        under = tuple(float(v) for v in canvas[min(max(y, 0), h - 1), min(max(x + r, 0), w - 1)])
        cv2.circle(canvas, (x + r // 2, y - r // 3), r, under, -1, cv2.LINE_AA)
    elif kind == "arrow":
        end = (x + int(rng.integers(-2, 3) * size), y + int(rng.integers(-2, 3) * size))
        cv2.arrowedLine(canvas, (x, y), end, colour, int(rng.integers(1, 4)), cv2.LINE_AA,
                        tipLength=0.3)
    else:  # dots
        for k in range(int(rng.integers(3, 8))):
            cv2.circle(canvas, (x + k * max(4, size // 3), y), int(rng.integers(1, 3)), colour, -1,
                       cv2.LINE_AA)


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


def covered(a: Sequence[float], b: Sequence[float]) -> float:
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
        if all(covered(o, box) <= max_overlap and covered(box, o) <= max_overlap
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
                rng: np.random.Generator, blur: bool, faint: bool = False,
                smear: bool = False) -> None:
    """A soft shadow, then the object with mild lighting (and blur when asked; ``faint``:
    blended into the background at 35–60 %; ``smear``: motion blur)."""
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
    if smear:
        alpha = motion_smear(alpha, rng)
    if faint:
        alpha = alpha * rng.uniform(0.35, 0.6)
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


def frame_size(options: SynthOptions, rng: np.random.Generator) -> tuple[int, int]:
    """(width, height) of one image: ``size``, or with ``sizes`` a long side in that range
    (uniform) at one of ASPECTS, a fifth of them portrait."""
    if options.sizes is None:
        return options.size
    long = rng.uniform(options.sizes[0], options.sizes[1])
    aspect = ASPECTS[int(rng.integers(len(ASPECTS)))]
    w, h = int(round(long / 2) * 2), int(round(long / aspect / 2) * 2)
    return (h, w) if rng.random() < 0.2 else (w, h)


def rotate_mask(mask: np.ndarray, shape: str, rng: np.random.Generator) -> np.ndarray:
    """The mask turned by a random angle (squares, diamonds, crosses by at most 30°, so that
    a square does not become a diamond), on a canvas large enough to hold it."""
    limit = 30.0 if shape in ("square", "diamond", "cross") else 180.0
    angle = rng.uniform(-limit, limit)
    h, w = mask.shape
    side = int(math.ceil(math.hypot(h, w))) + 2
    big = np.zeros((side, side), np.float32)
    y0, x0 = (side - h) // 2, (side - w) // 2
    big[y0:y0 + h, x0:x0 + w] = mask
    turn = cv2.getRotationMatrix2D((side / 2, side / 2), angle, 1.0)
    return cv2.warpAffine(big, turn, (side, side), flags=cv2.INTER_LINEAR)


def motion_smear(alpha: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The alpha mask smeared along a random direction by 3–9 px (motion blur)."""
    length = int(rng.integers(3, 10))
    kernel = np.zeros((length, length), np.float32)
    kernel[length // 2, :] = 1.0 / length
    turn = cv2.getRotationMatrix2D((length / 2 - 0.5, length / 2 - 0.5), rng.uniform(0, 180), 1)
    kernel = cv2.warpAffine(kernel, turn, (length, length))
    return cv2.filter2D(alpha, -1, kernel / max(1e-6, float(kernel.sum())))


def _near_cluster(rng: np.random.Generator, centres: list[tuple[float, float]],
                  width: int, height: int, mask: np.ndarray
                  ) -> tuple[int, int, tuple[int, int, int, int]] | None:
    """A spot close to one of ``centres`` for the mask's box, None when it falls outside."""
    ys, xs = np.nonzero(mask > 0.5)
    if xs.size == 0:
        return None
    bx, by = int(xs.min()), int(ys.min())
    bw, bh = int(xs.max()) - bx + 1, int(ys.max()) - by + 1
    cx, cy = centres[int(rng.integers(len(centres)))]
    spread = 0.12 * max(width, height)
    left, top = int(cx + rng.normal(0, spread)), int(cy + rng.normal(0, spread))
    if not (0 <= left <= width - bw and 0 <= top <= height - bh):
        return None
    return left - bx, top - by, (left, top, bw, bh)


def _spot(options: SynthOptions, rng: np.random.Generator, mask: np.ndarray, width: int,
          height: int, boxes: list[tuple[int, int, int, int]],
          centres: list[tuple[float, float]]) -> tuple[int, int, tuple[int, int, int, int]] | None:
    """Where an object goes: in the held-out family most near a cluster centre (if it fits
    without covering others), else anywhere (``place``)."""
    if centres and rng.random() < 0.6:
        spot = _near_cluster(rng, centres, width, height, mask)
        if spot is not None and all(covered(o, spot[2]) <= options.max_overlap
                                    and covered(spot[2], o) <= options.max_overlap
                                    for o in boxes):
            return spot
    return place(rng, mask, width, height, boxes, options.max_overlap)


def _object_mask(options: SynthOptions, rng: np.random.Generator, shape: str,
                 side: int) -> np.ndarray:
    mask = render_mask(shape, side, rng)
    return rotate_mask(mask, shape, rng) if options.rotate else mask


def make_scene(options: SynthOptions, index: int) -> Scene:
    """Render image ``index`` of the dataset ``options`` describe (before JPEG)."""
    rng = rng_for(options.seed, index)
    width, height = frame_size(options, rng)
    kind = options.backgrounds[int(rng.integers(len(options.backgrounds)))]
    canvas = np.clip(BACKGROUND_FNS[kind](rng, height, width), 0, 255).astype(np.float32)
    negatives = scatter_clutter(canvas, rng, options)
    n = int(rng.integers(options.objects[0], options.objects[1] + 1))
    scene = Scene(canvas)
    boxes: list[tuple[int, int, int, int]] = []
    lo, hi = options.sides
    hi = min(hi, min(width, height) // 2)
    centres = [(rng.uniform(0.15, 0.85) * width, rng.uniform(0.15, 0.85) * height)
               for _ in range(int(rng.integers(1, 3)))] if options.style == HELDOUT else []
    for colour, shape in choose_objects(rng, n, options.hard_negative):
        for _attempt in range(3):
            side = int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))
            mask = _object_mask(options, rng, shape, side)
            spot = _spot(options, rng, mask, width, height, boxes, centres)
            if spot is not None:
                break
        if spot is None:
            continue
        x, y, box = spot
        draw_object(canvas, mask, fill_colour(colour, rng), x, y, rng,
                    blur=rng.random() < options.blur_p,
                    faint=bool(options.low_contrast) and rng.random() < options.low_contrast,
                    smear=bool(options.motion_blur) and rng.random() < options.motion_blur)
        boxes.append(box)
        scene.objects.append(SceneObject(colour, shape, box))
    if options.occlusion:
        for box in boxes:
            if rng.random() < options.occlusion:
                draw_clutter(canvas, rng, near=box)
    noise_seed = int(rng.integers(0, 2**31 - 1))
    image = np.clip(canvas, 0, 255).round().astype(np.uint8)
    if options.style == HELDOUT:
        scene.image = heldout_degrade(image, rng)
    else:
        scene.image = degrade(image, noise_seed)
    scene.quality = int(rng.integers(options.jpeg_quality[0], options.jpeg_quality[1] + 1))
    if options.style == HELDOUT or options.randomised:
        scene.meta = {"style": options.style, "background": kind}
    negatives = [n for n in negatives  # the clutter's boxes clear of objects: hard negatives
                 if all(covered(tuple(n), b) <= 0.2 and covered(b, tuple(n)) <= 0.2
                        for b in boxes)]
    if negatives:
        scene.meta["negatives"] = negatives
    return scene


def scatter_clutter(canvas: np.ndarray, rng: np.random.Generator,
                    options: SynthOptions) -> list[list[int]]:
    """Up to ``options.clutter`` marks on the canvas; in the randomised style their boxes
    (the scorer's hard negatives), else []."""
    negatives: list[list[int]] = []
    for _ in range(int(rng.integers(0, options.clutter + 1)) if options.clutter else 0):
        before = canvas.copy() if options.style == RANDOMISED else None
        draw_clutter(canvas, rng)
        if before is not None:
            negatives += changed_box(before, canvas)
    return negatives


def changed_box(before: np.ndarray, after: np.ndarray) -> list[list[int]]:
    """[[left, top, width, height]] of the pixels a mark changed (visibly: by more than 8 in
    some channel), [] when it changed none or only a sliver (under 4 px either way)."""
    ys, xs = np.nonzero(np.abs(after - before).max(axis=2) > 8)
    if xs.size == 0:
        return []
    left, top = int(xs.min()), int(ys.min())
    w, h = int(xs.max()) - left + 1, int(ys.max()) - top + 1
    return [[left, top, w, h]] if min(w, h) >= 4 else []


def heldout_degrade(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The held-out family's camera: a slight vignette, Gaussian noise of σ 1–5 (no
    albumentations: another pipeline than the classic one's)."""
    h, w = image.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r2 = ((xx / w - 0.5) ** 2 + (yy / h - 0.5) ** 2) * 2
    vignette = 1.0 - rng.uniform(0.0, 0.2) * r2
    noisy = image.astype(np.float32) * vignette[..., None]
    noisy += rng.normal(0, rng.uniform(1, 5), noisy.shape).astype(np.float32)
    return np.clip(noisy, 0, 255).round().astype(np.uint8)


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
    _write_family(out, options)
    return out


def _write_family(out: Path, options: SynthOptions) -> None:
    """``synth.json`` beside vlm.jsonl for a held-out or randomised dataset: how it was made
    (``refuse_heldout`` reads its style)."""
    if options.style == HELDOUT or options.randomised:
        fields = dataclasses.asdict(options)
        _write_bytes(out / FAMILY_FILE, (json.dumps(fields, indent=1) + "\n").encode())


def refuse_heldout(path: str | Path) -> None:
    """Raise InputError when ``path`` (a dataset folder or its vlm.jsonl) holds the held-out
    family: its ``synth.json`` says so, or any line carries ``"style": "heldout"``. Every
    training command calls this on its data: the family measures what training never saw."""
    from spotline.common.errors import InputError

    path = Path(path)
    folder = path if path.is_dir() else path.parent
    jsonl = folder / DATASET_FILE if path.is_dir() else path
    family = folder / FAMILY_FILE
    style = None
    if family.is_file():
        try:
            style = json.loads(family.read_text(encoding="utf-8")).get("style")
        except (ValueError, AttributeError, OSError):
            style = None
    marker = f'"style": "{HELDOUT}"'.encode()
    if style == HELDOUT or (jsonl.is_file() and marker in jsonl.read_bytes()):
        raise InputError(f"{path} is the held-out scene family (style {HELDOUT}): it is for "
                         "evaluation only, never for training")


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
