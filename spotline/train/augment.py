"""The seed's crop augmentations through albumentations, with both of the seed's bugs fixed.

1. Channel order: albumentations works on the array it is given; ISONoise and the colour
   transforms assume RGB. The seed fed it crops in one order and its model another (and
   OpenCV-read images are BGR). Here crops are RGB end to end: the detect stage cuts RGB
   crops, these transforms get RGB, the SigLIP processor gets RGB.
2. Noise scale: the seed's ``GaussNoise(var_limit=2500)`` (a variance in 0–255 units) ran on
   images already scaled to 0–1, i.e. noise 255× too strong. Here the noise is given as the
   seed's variance in 0–255 units and converted to albumentations' std as a fraction of the
   maximum (``sqrt(var) / 255``), applied to uint8 crops before any normalisation.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

# The seed's best SigLIP recipe ("augv2"), with its noise variances in 0–255 units. Dropped:
# ToGray (colour is half of every caption here) and Perspective (crops of 10–80 px).
SEED_NOISE_VAR = (500.0, 5000.0)


def std_range(var_range: tuple[float, float], max_value: float = 255.0) -> tuple[float, float]:
    """albumentations' GaussNoise ``std_range`` (fractions of the maximum) for a variance range
    in pixel units: sqrt(var) / max."""
    lo, hi = var_range
    if lo < 0 or hi < lo:
        raise ValueError(f"variance range must be 0 <= lo <= hi, got {var_range}")
    return math.sqrt(lo) / max_value, math.sqrt(hi) / max_value


def crop_augmentations(strength: float = 1.0, seed: int | None = None) -> Any:
    """The augmentations for scorer crops (uint8 RGB in, uint8 RGB out). ``strength`` scales
    the noise variance (1.0: the seed's augv2 range 500–5000; 0: no noise)."""
    import albumentations as A

    var = (SEED_NOISE_VAR[0] * strength, SEED_NOISE_VAR[1] * strength)
    return A.Compose([
        A.GaussNoise(std_range=std_range(var), per_channel=True, p=0.5 if strength else 0.0),
        A.ISONoise(color_shift=(0.01, 0.03), intensity=(0.1, 0.5), p=0.5),
        A.MultiplicativeNoise(multiplier=(0.9, 1.1), p=0.5),
        A.AdvancedBlur(blur_limit=(3, 5), p=0.2),
        A.HorizontalFlip(p=0.5),
        A.VerticalFlip(p=0.5),
        A.RandomRotate90(p=0.5),
        A.CLAHE(p=0.1),
        A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.3, p=0.5),
        A.RandomGamma(p=0.2),
        A.ImageCompression(quality_range=(25, 75), p=0.5),
    ], seed=seed)


def apply(compose: Any, crop: np.ndarray) -> np.ndarray:
    """One augmented copy of an RGB uint8 crop (crops under 3 px pass through: blur and JPEG
    need a few pixels)."""
    if min(crop.shape[:2]) < 3:
        return crop
    return np.ascontiguousarray(compose(image=np.ascontiguousarray(crop))["image"])


def detector_augmentations() -> list[Any]:
    """The seed's YOLO "Augs V2" noise list for Ultralytics' ``augmentations=`` argument,
    noise variances converted as above (flips and rotations are Ultralytics' own)."""
    import albumentations as A

    return [
        A.GaussNoise(std_range=std_range((50.0, 1000.0)), per_channel=True, p=0.5),
        A.ISONoise(color_shift=(0.01, 0.04), intensity=(0.1, 0.5), p=0.3),
        A.MultiplicativeNoise(multiplier=(0.9, 1.1), p=0.3),
        A.AdvancedBlur(blur_limit=(3, 5), p=0.2),
        A.CLAHE(p=0.1),
        A.RandomGamma(p=0.2),
        A.ImageCompression(quality_range=(25, 75), p=0.5),
    ]
