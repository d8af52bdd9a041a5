"""Images, in one place: one header reader (with one EXIF rule), decoding to 8-bit BGR, the
crop helpers the stages share, and JPEG encoding.

The header reader is Pillow's lazy ``Image.open`` (it reads the header only, never the pixels),
so a frame's size is known, and an oversized frame refused, before anything decodes it. Sizes
are those of the upright photo: an EXIF orientation that turns the picture swaps width and
height, as ``cv2.imdecode`` (which applies the orientation) and every viewer show it.
"""

from __future__ import annotations

import io
import struct
import sys
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import InputError
from .settings import Settings

JPEG_QUALITY = 95
# Formats Pillow identifies that OpenCV also decodes (MPO: camera JPEGs with extra frames).
DECODABLE = frozenset({"JPEG", "MPO", "PNG", "BMP", "WEBP", "TIFF", "PPM", "JPEG2000"})
# EXIF orientations that swap width and height (cv2.imdecode applies them).
_ROTATED = frozenset({5, 6, 7, 8})
_ORIENTATION_TAG = 0x0112
# JPEG start-of-frame markers (they carry the image size).
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


@dataclass(frozen=True)
class Header:
    """What an image's header says: its format and its upright size."""

    format: str
    width: int
    height: int

    @property
    def pixels(self) -> int:
        return self.width * self.height


def read_header(data: bytes) -> Header | None:
    """The image's format and upright (width, height) from its header; None when Pillow cannot
    identify the bytes. InputError when the header declares a decompression bomb."""
    from PIL import Image, UnidentifiedImageError

    undo_ultralytics_pil_patch()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as im:
                fmt, (w, h) = im.format or "", im.size
                rotated = _orientation(im) in _ROTATED
    except Image.DecompressionBombError as exc:
        # Over Pillow's own limit (> 2 x 89 Mpx) it gives no size: read it from the bytes.
        raw = _raw_size(data)
        if raw is None:
            raise InputError(f"image has too many pixels: {exc}") from None
        return raw
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError):
        return None
    return Header(fmt, h, w) if rotated else Header(fmt, w, h)


def _raw_size(data: bytes) -> Header | None:
    """A PNG's or JPEG's stored size, parsed by hand (pixel counts only: no EXIF needed)."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        width, height = struct.unpack(">II", data[16:24])
        return Header("PNG", width, height)
    i = 2 if data[:2] == b"\xff\xd8" else len(data)
    while i + 9 <= len(data) and data[i] == 0xFF:
        marker = data[i + 1]
        if marker in _JPEG_SOF:
            height, width = struct.unpack(">HH", data[i + 5:i + 9])
            return Header("JPEG", width, height)
        i += 1 if marker == 0xFF else 2 + struct.unpack(">H", data[i + 2:i + 4])[0]
    return None


def _orientation(im: Any) -> int:
    try:
        return int(im.getexif().get(_ORIENTATION_TAG, 1))
    except Exception:  # noqa: BLE001 - a broken EXIF block does not make the image unusable
        return 1


def image_size(image: bytes, settings: Settings | None = None) -> tuple[int, int]:
    """(width, height) read from the image header only; InputError if undecodable or too big.
    The producers' check: only formats the pipeline decodes get in."""
    max_pixels = (settings or Settings()).max_pixels
    header = read_header(image)
    if header is None:
        raise InputError("image could not be decoded (not a JPEG/PNG/BMP/WebP/TIFF)")
    w, h = header.width, header.height
    if header.format not in DECODABLE or w <= 0 or h <= 0:
        raise InputError(f"unsupported or empty image ({header.format} {w}x{h})")
    if header.pixels > max_pixels:
        raise InputError(f"image has too many pixels: {w}x{h} = {w * h} > {max_pixels}")
    return w, h


def decode_bgr8(data: bytes, max_bytes: int, max_pixels: int) -> np.ndarray:
    """Image bytes as an 8-bit 3-channel BGR array, upright; InputError says why not.

    Zero-sized and oversized images are refused from their header, before decoding. Bytes the
    header reader cannot identify are left to OpenCV (it decides, and refuses, itself)."""
    if not data:
        raise InputError("no image bytes")
    if len(data) > max_bytes:
        raise InputError(f"{len(data)} bytes is over max_frame_bytes {max_bytes}")
    header = read_header(data)
    if header is not None and min(header.width, header.height) <= 0:
        raise InputError(f"the image is {header.width}x{header.height} pixels (zero-sized)")
    if header is not None and header.pixels > max_pixels:
        raise InputError(f"{header.width}x{header.height} is over max_pixels {max_pixels}")
    import cv2

    # COLOR|ANYDEPTH: grey becomes 3-channel, alpha is dropped, 16-bit stays 16-bit (scaled in
    # to_bgr8) and, unlike IMREAD_UNCHANGED, EXIF orientation is applied: boxes are in the
    # coordinates of the upright photo, as every viewer (and annotate) shows it.
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_ANYDEPTH)
    if image is None or image.size == 0:
        raise InputError(f"cannot decode the image ({len(data)} bytes)")
    if image.shape[0] * image.shape[1] > max_pixels:
        raise InputError(f"{image.shape[1]}x{image.shape[0]} is over max_pixels {max_pixels}")
    return to_bgr8(image)


def to_bgr8(image: np.ndarray) -> np.ndarray:
    """Grey, BGRA, 16-bit or float images as contiguous uint8 BGR."""
    import cv2

    if image.dtype == np.uint16:
        image = (image.astype(np.float32) / 257.0).round().astype(np.uint8)
    elif image.dtype != np.uint8:
        image = image.astype(np.float32)
        top = 1.0 if float(np.nanmax(image)) <= 1.0 else 255.0
        image = np.clip(np.nan_to_num(image) * (255.0 / top), 0, 255).round().astype(np.uint8)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    elif image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    elif image.shape[2] != 3:
        raise InputError(f"unsupported image with {image.shape[2]} channels")
    return np.ascontiguousarray(image)


def encode_jpeg(frame: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    """A BGR frame as JPEG bytes."""
    import cv2

    ok, buf = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise InputError("could not JPEG-encode a video frame")
    return buf.tobytes()


# --- crops ------------------------------------------------------------------------------------
def crop_boxes(rgb: np.ndarray, boxes: np.ndarray, cap: int = 0) -> list[np.ndarray]:
    """Plain crops of the rounded xyxy boxes (no padding; at least 1×1 px), capped at ``cap``."""
    height, width = rgb.shape[:2]
    crops = []
    for x1f, y1f, x2f, y2f in boxes.tolist():
        x1, x2 = _span(x1f, x2f, width)
        y1, y2 = _span(y1f, y2f, height)
        crops.append(cap_crop(np.ascontiguousarray(rgb[y1:y2, x1:x2]), cap))
    return crops


def _span(lo: float, hi: float, limit: int) -> tuple[int, int]:
    """Rounded [lo, hi) inside [0, limit), widened to 1 px when empty."""
    a = min(max(0, round(lo)), limit - 1)
    b = min(max(0, round(hi)), limit)
    return a, max(b, a + 1)


def cap_crop(crop: np.ndarray, max_side: int) -> np.ndarray:
    """Shrink a crop (INTER_AREA, aspect kept) so no side exceeds ``max_side``."""
    h, w = crop.shape[:2]
    if max_side <= 0 or max(h, w) <= max_side:
        return crop
    import cv2

    scale = max_side / max(h, w)
    size = (max(1, min(max_side, round(w * scale))), max(1, min(max_side, round(h * scale))))
    return np.ascontiguousarray(cv2.resize(crop, size, interpolation=cv2.INTER_AREA))


def swap_rb(image: np.ndarray) -> np.ndarray:
    """RGB ↔ BGR (the same swap both ways), as a contiguous copy."""
    return np.ascontiguousarray(image[..., ::-1])


def undo_ultralytics_pil_patch() -> None:
    """Importing Ultralytics replaces ``PIL.Image.open`` with a wrapper that pip-installs a
    HEIF plugin whenever Pillow cannot identify some bytes; put Pillow's own back."""
    patches = sys.modules.get("ultralytics.utils.patches")
    original = getattr(patches, "_image_open", None)
    if original is not None:
        from PIL import Image

        Image.open = original
