"""Template matching between detections: where did a track's object go in a frame the
detector did not see?

ByteTrack's Kalman filter predicts a box from the track's past motion only; for small, fast
objects a few pixels of error lose the object (IoU > 0.5 on a 10-px box allows about 2 px).
So between keyframes each followed track is *measured* in the new frame: its look at its last
detection (the box's colour patch, the "template") is searched for in a window around the
predicted box by the sum of squared differences (``cv2.matchTemplate``, ``TM_SQDIFF``), and
the best place, if it is similar enough (1 - its RMS difference / 255), is fed to the track's
Kalman filter as a measurement. A track that cannot be found (occluded, turned, left the
window) makes the caller run the detector on the frame instead.

Why not a correlation with a margin of background around the box (``TM_CCOEFF_NORMED``, the
usual choice): a flat object has no texture to correlate, so the margin must carry the match,
and a still background in the margin pulled small moving objects back towards where they had
been (on the bench clips a steady lag of about three frames' motion); squared differences on
the box alone follow the object's own colours.

A frame's exposure changes under a template: cameras adjust gain and the clips' frames each
get their own brightness and contrast (±15%, ±20%), and squared differences then prefer any
place whose colours happen to match the old exposure (seed-13 clips: a grey square's match
jumped 37 px onto the sky when all its similarities fell from 0.94 to 0.84). So each template
keeps the per-channel mean and standard deviation of the frame it was cut from (``Exposure``),
and the window is brought to that exposure (a per-channel gain and offset) before it is
compared: a global correction, so an object's own colour still decides where it is.

Templates are small (at most ``TEMPLATE_SIDE`` px a side, downscaled from larger boxes) and
kept in the source's state in Redis with the tracks (stages/track.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

TEMPLATE_SIDE = 32  # px, the template's longer side at most (larger boxes are downscaled)
SEARCH = 0.5  # the window reaches this share of the box's longer side beyond the prediction
MIN_SEARCH = 6  # px, at least
# The exposure correction's gain is held within these: a frame whose contrast changed more is
# not the same view (a cut, a flat or blank frame), and a larger gain would only amplify noise.
GAIN_RANGE = (0.5, 2.0)


Exposure = tuple[tuple[float, float, float], tuple[float, float, float]]  # channel means, stds


def exposure(image: np.ndarray) -> Exposure:
    """A frame's per-channel mean and standard deviation (on every 4th pixel: plenty)."""
    mean, std = cv2.meanStdDev(np.ascontiguousarray(image[::4, ::4]))
    return (tuple(float(v) for v in mean.ravel()[:3]),  # type: ignore[return-value]
            tuple(float(v) for v in std.ravel()[:3]))


@dataclass(frozen=True)
class Template:
    """A track's look at its last detection: ``patch`` (uint8, H×W×3, the frame's channel
    order) covers the box, at ``scale`` (patch px per frame px); ``box`` is the detected xyxy
    box, whose size a match keeps; ``seen`` is the exposure of the frame it was cut from
    (None: not known, no correction)."""

    patch: np.ndarray
    scale: float
    box: np.ndarray
    seen: Exposure | None = None

    def to_state(self) -> list[object]:
        raw: list[object] = [self.patch, float(self.scale), np.asarray(self.box, np.float32)]
        if self.seen is not None:
            raw.append([list(self.seen[0]), list(self.seen[1])])
        return raw

    @classmethod
    def from_state(cls, raw: list[object]) -> Template:
        patch, scale, box = raw[:3]
        seen = None
        if len(raw) > 3:  # states saved before exposures were kept have none
            mean, std = raw[3]  # type: ignore[misc]
            seen = (tuple(float(v) for v in mean), tuple(float(v) for v in std))
        return cls(np.asarray(patch, np.uint8), float(scale),  # type: ignore[arg-type]
                   np.asarray(box, np.float32), seen)  # type: ignore[arg-type]


def make_template(image: np.ndarray, box: np.ndarray,
                  seen: Exposure | None = None) -> Template | None:
    """The template of the xyxy ``box`` in ``image`` (H×W×3 uint8), with the image's exposure
    (``seen``, when the caller has it already); None when the box leaves the image (an object
    at the border is left to the detector)."""
    x1, y1, x2, y2 = (float(v) for v in box)
    left, top, right, bottom = (int(round(v)) for v in (x1, y1, x2, y2))
    if right - left < 2 or bottom - top < 2:
        return None
    if left < 0 or top < 0 or right > image.shape[1] or bottom > image.shape[0]:
        return None
    patch = image[top:bottom, left:right]
    scale = min(1.0, TEMPLATE_SIDE / max(patch.shape[:2]))
    if scale < 1.0:
        patch = cv2.resize(patch, (max(1, round(patch.shape[1] * scale)),
                                   max(1, round(patch.shape[0] * scale))),
                           interpolation=cv2.INTER_AREA)
    return Template(np.ascontiguousarray(patch), scale, np.asarray(box, np.float32),
                    seen if seen is not None else exposure(image))


def match(image: np.ndarray, template: Template, predicted: np.ndarray,
          now: Exposure | None = None) -> tuple[np.ndarray, float] | None:
    """Find ``template`` near the xyxy ``predicted`` box in ``image``: (the xyxy box there,
    with the template's detected size; its similarity, 1 - the RMS difference as a share of
    255), or None when the search window does not fit in the image. With the image's exposure
    ``now`` and the template's, the window is first brought to the template's exposure."""
    width = float(template.box[2] - template.box[0])
    height = float(template.box[3] - template.box[1])
    cx = (float(predicted[0]) + float(predicted[2])) / 2
    cy = (float(predicted[1]) + float(predicted[3])) / 2
    reach = max(MIN_SEARCH, SEARCH * max(width, height))
    # the box's corner may land anywhere within ``reach`` of where the prediction puts it
    left = max(int(np.floor(cx - width / 2 - reach)), 0)
    top = max(int(np.floor(cy - height / 2 - reach)), 0)
    right = min(int(np.ceil(cx + width / 2 + reach)), image.shape[1])
    bottom = min(int(np.ceil(cy + height / 2 + reach)), image.shape[0])
    if right <= left or bottom <= top:
        return None
    window = image[top:bottom, left:right]
    if template.scale < 1.0:
        window = cv2.resize(window, (max(1, round(window.shape[1] * template.scale)),
                                     max(1, round(window.shape[0] * template.scale))),
                            interpolation=cv2.INTER_AREA)
    patch = template.patch
    if window.shape[0] < patch.shape[0] or window.shape[1] < patch.shape[1]:
        return None
    pixels = window.astype(np.float32)
    if now is not None and template.seen is not None:
        pixels = _to_exposure(pixels, now, template.seen)
    result = cv2.matchTemplate(pixels, patch.astype(np.float32), cv2.TM_SQDIFF)
    least, _, (bx, by), _ = cv2.minMaxLoc(result)
    rms = float(np.sqrt(max(least, 0.0) / patch.size)) / 255.0
    # to a fraction of a (scaled) pixel: the parabola through the minimum and its neighbours;
    # plus the part of the detected box's corner that the patch's whole pixels left out
    fx = _vertex(result[by, bx - 1:bx + 2]) if 0 < bx < result.shape[1] - 1 else 0.0
    fy = _vertex(result[by - 1:by + 2, bx]) if 0 < by < result.shape[0] - 1 else 0.0
    x1 = left + (bx + fx) / template.scale + _frac(template.box[0])
    y1 = top + (by + fy) / template.scale + _frac(template.box[1])
    return np.array([x1, y1, x1 + width, y1 + height], np.float32), 1.0 - rms


def _to_exposure(pixels: np.ndarray, now: Exposure, seen: Exposure) -> np.ndarray:
    """``pixels`` (float32, H×W×3) of a frame exposed as ``now``, as they would be under
    ``seen``: per channel, (x − mean_now) · std_seen / std_now + mean_seen."""
    mean_now, std_now = np.asarray(now[0], np.float32), np.asarray(now[1], np.float32)
    mean_seen, std_seen = np.asarray(seen[0], np.float32), np.asarray(seen[1], np.float32)
    gain = np.clip(std_seen / np.maximum(std_now, 1.0), *GAIN_RANGE)
    return (pixels - mean_now) * gain + mean_seen


def _vertex(values: np.ndarray) -> float:
    """Where the parabola through three equally spaced values has its vertex, from the middle
    one (in [-0.5, 0.5])."""
    a, b, c = (float(v) for v in values)
    curve = a - 2 * b + c
    return float(np.clip(0.5 * (a - c) / curve, -0.5, 0.5)) if curve > 0 else 0.0


def _frac(value: float) -> float:
    """What rounding to a whole pixel took off ``value``."""
    return float(value) - round(float(value))
