"""detect: decode each frame, find boxes with Ultralytics YOLO (batched across frames), cut
the crops and fan them out in parts of at most ``crops_per_part``."""

from __future__ import annotations

import contextlib
import logging
import math
import struct
from collections.abc import Iterator
from typing import Any

import numpy as np
from spotline.common.envelope import Envelope
from spotline.common.errors import InputError, ModelError
from spotline.common.limits import check_captions
from spotline.common.settings import Settings
from spotline.stages.base import Routed, Stage

from spotline import models

log = logging.getLogger(__name__)

# The seed warmed up on a blank frame of the competition's size.
WARMUP_SIZE = (1520, 870)  # width, height
# JPEG start-of-frame markers (they carry the image size).
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


class Detect(Stage):
    """YOLO boxes and plain crops for every frame of a batch."""

    name = "detect"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.model: Any = None
        self.device = "cpu"
        self.half = False
        self.crop_cap = 0

    def setup(self) -> None:
        """Load the YOLO weights (.pt or architecture .yaml) and warm up."""
        paths = models.resolve_weights(self.settings)
        self.device = models.resolve_device(self.settings)
        self.half = models.use_half(self.settings, self.device)
        self.model = load_detector(paths.detector)
        # after the import: importing Ultralytics turns OpenCV's threads off
        models.set_threads(self.settings, self.name)
        self.model_name = paths.detector.name
        self.device_name = self.device
        if not self.settings.upscale:
            self.crop_cap = models.scorer_input_size(self.settings, paths.scorer)
        blank = np.zeros((WARMUP_SIZE[1], WARMUP_SIZE[0], 3), np.uint8)
        for _ in range(self.settings.warmup):
            detect_frames(self.model, [blank], self.settings, self.device, self.half)

    def process(self, batch: list[Envelope]) -> list[Routed]:
        """Check and decode all frames (a bad one raises InputError), predict once, split into
        parts."""
        if self.model is None:
            self.setup()
        for env in batch:
            check_input(env, self.settings)
        images = [decode_frame(env, self.settings) for env in batch]
        found = detect_frames(self.model, images, self.settings, self.device, self.half)
        out: list[Routed] = []
        for env, image, (boxes, scores) in zip(batch, images, found, strict=True):
            crops = crop_boxes(models.swap_rb(image), boxes, self.crop_cap)
            out += split_parts(env.replace(image_size=(image.shape[1], image.shape[0])), boxes,
                               scores, crops, self.settings)
        return out


def load_detector(path: Any) -> Any:
    """An Ultralytics YOLO from a local .pt, or built (random) from an architecture .yaml."""
    models.offline_env()
    from ultralytics import YOLO

    models.undo_ultralytics_pil_patch()
    try:
        return YOLO(str(path), task="detect")
    except Exception as exc:  # noqa: BLE001 - any load failure is a ModelError
        raise ModelError(f"cannot load detector {path}: {type(exc).__name__}: {exc}") from exc


def detect_frames(model: Any, images: list[np.ndarray], settings: Settings, device: str = "cpu",
                  half: bool = False) -> list[tuple[np.ndarray, np.ndarray]]:
    """(boxes float32 N×4 xyxy, scores float32 N) per BGR image, best first."""
    found: list[tuple[np.ndarray, np.ndarray]] = [(np.zeros((0, 4), np.float32),
                                                   np.zeros(0, np.float32))] * len(images)
    for indices in predict_groups(images, device):
        with _keep_threads():
            results = model.predict([images[i] for i in indices], imgsz=settings.imgsz,
                                    conf=settings.conf, iou=settings.iou,
                                    max_det=settings.max_det, augment=settings.tta,
                                    device=device, verbose=False, **_precision(half))
        for i, result in zip(indices, results, strict=True):
            boxes = result.boxes
            found[i] = (boxes.xyxy.float().cpu().numpy().astype(np.float32).reshape(-1, 4),
                        boxes.conf.float().cpu().numpy().astype(np.float32).reshape(-1))
    return found


@contextlib.contextmanager
def _keep_threads() -> Iterator[None]:
    """Ultralytics' first predict sets torch to cores - 1 threads (at most 8) for the whole
    process (1 on a 2-core machine), whatever the stage or the reference chose, and runs with
    it: have it set ours instead (same threads, same bits), and put ours back regardless."""
    import torch
    from ultralytics.utils import torch_utils

    threads = torch.get_num_threads()
    torch_utils.NUM_THREADS = threads  # what its select_device sets on the CPU
    try:
        yield
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def predict_groups(images: list[np.ndarray], device: str) -> list[list[int]]:
    """Which frames share a predict call: on an accelerator, frames of one shape (Ultralytics
    letterboxes a mixed batch to a square, which would make boxes depend on batch-mates); on
    the CPU each frame alone (no faster batched, and the boxes stay bit-identical whatever
    the batch)."""
    if not device.startswith(("cuda", "mps")):
        return [[i] for i in range(len(images))]
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault(image.shape, []).append(i)
    return list(groups.values())


def _precision(half: bool) -> dict[str, Any]:
    """fp16 for predict: ``quantize=16`` on Ultralytics 8.4+, ``half=True`` before."""
    if not half:
        return {}
    from ultralytics.cfg import DEFAULT_CFG_DICT

    return {"quantize": 16} if "quantize" in DEFAULT_CFG_DICT else {"half": True}


def check_input(env: Envelope, settings: Settings) -> None:
    """The caption limits again (producers check them, but anything may write to the frames
    stream): InputError names the frame and the problem."""
    try:
        check_captions(env.captions, settings)
    except InputError as exc:
        raise InputError(f"frame {env.frame_id}: {exc}") from None


def decode_frame(env: Envelope, settings: Settings) -> np.ndarray:
    """The frame's image bytes as an 8-bit 3-channel BGR array; InputError names the frame."""
    data = env.image
    if not data:
        raise InputError(f"frame {env.frame_id}: no image bytes")
    if len(data) > settings.max_frame_bytes:
        raise InputError(f"frame {env.frame_id}: {len(data)} bytes is over max_frame_bytes "
                         f"{settings.max_frame_bytes}")
    _check_pixels(env.frame_id, data, settings.max_pixels)
    import cv2

    # COLOR|ANYDEPTH: grey becomes 3-channel, alpha is dropped, 16-bit stays 16-bit (scaled in
    # to_bgr8) and, unlike IMREAD_UNCHANGED, EXIF orientation is applied: boxes are in the
    # coordinates of the upright photo, as every viewer (and annotate) shows it.
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_ANYDEPTH)
    if image is None or image.size == 0:
        raise InputError(f"frame {env.frame_id}: cannot decode the image ({len(data)} bytes)")
    if image.shape[0] * image.shape[1] > settings.max_pixels:
        raise InputError(f"frame {env.frame_id}: {image.shape[1]}x{image.shape[0]} is over "
                         f"max_pixels {settings.max_pixels}")
    return to_bgr8(image)


def _check_pixels(frame_id: str, data: bytes, max_pixels: int) -> None:
    """Refuse zero-sized and oversized images from their header, before decoding them."""
    try:
        size = header_size(data)
    except InputError as exc:
        raise InputError(f"frame {frame_id}: {exc}") from None
    if size and min(size) <= 0:
        raise InputError(f"frame {frame_id}: the image is {size[0]}x{size[1]} pixels "
                         "(zero-sized)")
    if size and size[0] * size[1] > max_pixels:
        raise InputError(f"frame {frame_id}: {size[0]}x{size[1]} is over max_pixels {max_pixels}")


def header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the image header; None for unreadable data.

    PNG and JPEG headers are parsed here; other formats (BMP, WebP, TIFF...) are read lazily by
    Pillow, with Ultralytics' patch of ``PIL.Image.open`` undone first (it pip-installs a HEIF
    plugin whenever Pillow cannot identify some bytes)."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        width, height = struct.unpack(">II", data[16:24])
        return width, height
    if data[:2] != b"\xff\xd8":
        return _pillow_size(data)
    i = 2
    while i + 9 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker in _JPEG_SOF:
            height, width = struct.unpack(">HH", data[i + 5:i + 9])
            return width, height
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        i += 2 + struct.unpack(">H", data[i + 2:i + 4])[0]
    return None


def _pillow_size(data: bytes) -> tuple[int, int] | None:
    import io
    import warnings

    from PIL import Image

    models.undo_ultralytics_pil_patch()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as im:
                return int(im.size[0]), int(im.size[1])
    except Image.DecompressionBombError as exc:
        raise InputError(f"too many pixels: {exc}") from None
    except Exception:  # noqa: BLE001 - unreadable here: OpenCV decides (and refuses) later
        return None


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


def crop_boxes(rgb: np.ndarray, boxes: np.ndarray, cap: int = 0) -> list[np.ndarray]:
    """Plain crops of the rounded xyxy boxes (no padding; at least 1×1 px), capped at ``cap``."""
    height, width = rgb.shape[:2]
    crops = []
    for x1f, y1f, x2f, y2f in boxes.tolist():
        x1, x2 = _span(x1f, x2f, width)
        y1, y2 = _span(y1f, y2f, height)
        crops.append(models.cap_crop(np.ascontiguousarray(rgb[y1:y2, x1:x2]), cap))
    return crops


def _span(lo: float, hi: float, limit: int) -> tuple[int, int]:
    """Rounded [lo, hi) inside [0, limit), widened to 1 px when empty."""
    a = min(max(0, round(lo)), limit - 1)
    b = min(max(0, round(hi)), limit)
    return a, max(b, a + 1)


def split_parts(env: Envelope, boxes: np.ndarray, scores: np.ndarray, crops: list[np.ndarray],
                settings: Settings) -> list[Routed]:
    """One frame's detections as parts of at most ``crops_per_part`` crops, routed onward."""
    if len(boxes) == 0:
        return [("collect", env.replace(image=None, boxes=np.zeros((0, 4), np.float32),
                                        det_scores=np.zeros(0, np.float32), crops=(), part=0,
                                        nparts=1))]
    size = settings.crops_per_part
    nparts = math.ceil(len(boxes) / size)
    target = "upscale" if settings.upscale else "score"
    return [(target, env.replace(image=None, boxes=np.ascontiguousarray(boxes[part]),
                                 det_scores=np.ascontiguousarray(scores[part]),
                                 crops=tuple(crops[part]), part=k, nparts=nparts))
            for k, part in ((k, slice(k * size, (k + 1) * size)) for k in range(nparts))]
