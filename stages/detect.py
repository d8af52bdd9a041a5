"""detect: decode each frame, find boxes with Ultralytics YOLO (batched across frames), cut
the crops and fan them out in parts of at most ``crops_per_part``."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import numpy as np

from ..common.envelope import Envelope
from ..common.errors import InputError, ModelError
from ..common.images import crop_boxes, decode_bgr8, swap_rb
from ..common.limits import check_captions
from ..common.settings import Settings
from ..common.topology import COLLECT, TRACK, next_stage
from . import backends, runtime
from .backends import tiling
from .backends.detector import rescale_ultralytics
from .base import Routed, Stage
from .libs import offline_env, undo_ultralytics_pil_patch

# The seed warmed up on a blank frame of the competition's size.
WARMUP_SIZE = (1520, 870)  # width, height


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
        """Load the YOLO weights (.pt or architecture .yaml), or their export (settings
        ``backend``: no torch then), and warm up."""
        paths = runtime.resolve_weights(self.settings)
        backend, choice = backends.precision.choose(
            "detector", self.settings, paths.detector,
            runtime.export_threads(self.settings, self.name))
        precision, self.precision_choices = choice.precision, (choice,)
        if backend == "torch":
            self.device = runtime.resolve_device(self.settings)
            self.half = runtime.use_half(self.settings, self.device)
            self.model = load_detector(paths.detector)
            # after the import: importing Ultralytics turns OpenCV's threads off
            runtime.set_threads(self.settings, self.name)
            self.model_name = paths.detector.name
            self.device_name = self.device
        else:
            self.model = backends.load_detector(
                paths.detector, backend, precision,
                runtime.export_threads(self.settings, self.name), self.settings.device)
            self.model_name = f"{paths.detector.name} ({backend} {precision})"
            self.device_name = self.model.engine.provider
        self.crop_cap = runtime.crop_cap(self.settings, paths)
        blank = np.zeros((WARMUP_SIZE[1], WARMUP_SIZE[0], 3), np.uint8)
        for _ in range(self.settings.warmup):
            detect_frames(self.model, [blank], self.settings, self.device, self.half)

    def use_threads(self, threads: int) -> int:
        """The next predictions on ``threads`` threads (the export's engine, or torch)."""
        exported = isinstance(self.model, backends.ExportedDetector)
        return runtime.apply_threads(threads, [self.model.engine] if exported else [],
                                     self.settings.follow_copy_max_mb)

    def process(self, batch: list[Envelope]) -> list[Routed]:
        """Check and decode all frames (a bad one raises InputError), predict once, split into
        parts."""
        if self.model is None:
            self.setup()
        for env in batch:
            check_input(env, self.settings)
        images = [decode_frame(env, self.settings) for env in batch]
        todo = [i for i, env in enumerate(batch) if not left_to_track(env, self.settings)]
        found = dict(zip(todo, detect_frames(self.model, [images[i] for i in todo],
                                             self.settings, self.device, self.half),
                         strict=True))
        out: list[Routed] = []
        for i, (env, image) in enumerate(zip(batch, images, strict=True)):
            env = env.replace(image_size=(image.shape[1], image.shape[0]))
            if i not in found:  # the track stage predicts its boxes (it keeps the image)
                out.append((TRACK, env.replace(part=0, nparts=1)))
                continue
            boxes, scores = found[i]
            crops = crop_boxes(swap_rb(image), boxes, self.crop_cap)
            out += split_parts(env, boxes, scores, crops, self.settings)
        return out

    def find(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        """One BGR frame's boxes (xyxy), scores and crops, as ``process`` finds them."""
        if self.model is None:
            self.setup()
        boxes, scores = detect_frames(self.model, [image], self.settings, self.device,
                                      self.half)[0]
        return boxes, scores, crop_boxes(swap_rb(image), boxes, self.crop_cap)


def load_detector(path: Any) -> Any:
    """An Ultralytics YOLO from a local .pt, or built (random) from an architecture .yaml."""
    offline_env()
    from ultralytics import YOLO

    undo_ultralytics_pil_patch()
    try:
        return YOLO(str(path), task="detect")
    except Exception as exc:  # noqa: BLE001 - any load failure is a ModelError
        raise ModelError(f"cannot load detector {path}: {type(exc).__name__}: {exc}") from exc


def detect_frames(model: Any, images: list[np.ndarray], settings: Settings, device: str = "cpu",
                  half: bool = False) -> list[tuple[np.ndarray, np.ndarray]]:
    """(boxes float32 N×4 xyxy, scores float32 N) per BGR image, best first. Each frame runs
    at its ``tiling.plan`` size: ``imgsz``, or (imgsz 0) one that follows the frame, in tiles
    above ``imgsz_cap`` whose boxes are merged back (stages/backends/tiling.py)."""
    plans = [tiling.plan(im.shape[1], im.shape[0], settings.imgsz, settings.imgsz_cap,
                         settings.tile_overlap, settings.imgsz_scale) for im in images]
    inputs: list[np.ndarray] = []  # whole frames and tiles, in order
    sizes: list[int] = []
    for image, p in zip(images, plans, strict=True):
        views = [image] if p.tiles is None else \
            [np.ascontiguousarray(image[t.y:t.y + t.h, t.x:t.x + t.w]) for t in p.tiles]
        inputs += views
        sizes += [p.imgsz] * len(views)
    found = _predict(model, inputs, sizes, settings, device, half)
    out: list[tuple[np.ndarray, np.ndarray]] = []
    k = 0
    for image, p in zip(images, plans, strict=True):
        if p.tiles is None:
            out.append(found[k])
            k += 1
            continue
        n = len(p.tiles)
        out.append(tiling.merge_tiles(found[k:k + n], p.tiles, image.shape[1], image.shape[0],
                                      settings.iou, settings.max_det))
        k += n
    return out


def _predict(model: Any, images: list[np.ndarray], sizes: list[int], settings: Settings,
             device: str, half: bool) -> list[tuple[np.ndarray, np.ndarray]]:
    """Boxes and scores of each image at its size (frames or tiles), by either path."""
    if isinstance(model, backends.ExportedDetector):  # letterbox, TTA and NMS in numpy
        return [model.predict(image, size, settings.conf, settings.iou, settings.max_det,
                              settings.tta) for image, size in zip(images, sizes, strict=True)]
    found: list[tuple[np.ndarray, np.ndarray]] = [(np.zeros((0, 4), np.float32),
                                                   np.zeros(0, np.float32))] * len(images)
    stride = _stride(model)
    for indices in predict_groups(images, device, sizes):
        with _keep_threads():
            results = model.predict([images[i] for i in indices], imgsz=sizes[indices[0]],
                                    conf=settings.conf, iou=settings.iou,
                                    max_det=settings.max_det, augment=settings.tta,
                                    device=device, verbose=False, **_precision(half))
        for i, result in zip(indices, results, strict=True):
            boxes = result.boxes
            xyxy = boxes.xyxy.float().cpu().numpy().astype(np.float32).reshape(-1, 4)
            found[i] = (rescale_ultralytics(xyxy, *images[i].shape[:2],
                                            _checked_size(sizes[i], stride), stride),
                        boxes.conf.float().cpu().numpy().astype(np.float32).reshape(-1))
    return found


def _stride(model: Any) -> int:
    """The torch YOLO's largest stride (32 unless the model says otherwise)."""
    try:
        return int(model.model.stride.max())
    except (AttributeError, TypeError, ValueError):
        return 32


def _checked_size(imgsz: int, stride: int) -> int:
    """The size Ultralytics' check_imgsz makes of ``imgsz``: a multiple of the stride."""
    return max(math.ceil(imgsz / stride) * stride, stride)


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


def predict_groups(images: list[np.ndarray], device: str,
                   sizes: list[int] | None = None) -> list[list[int]]:
    """Which frames (or tiles) share a predict call: on an accelerator, those of one shape and
    input size (Ultralytics letterboxes a mixed batch to a square, which would make boxes
    depend on batch-mates; a frame's tiles are one such group); on the CPU each alone (no
    faster batched, and the boxes stay bit-identical whatever the batch)."""
    if not device.startswith(("cuda", "mps")):
        return [[i] for i in range(len(images))]
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault((*image.shape, sizes[i] if sizes else 0), []).append(i)
    return list(groups.values())


def _precision(half: bool) -> dict[str, Any]:
    """fp16 for predict: ``quantize=16`` on Ultralytics 8.4+, ``half=True`` before."""
    if not half:
        return {}
    from ultralytics.cfg import DEFAULT_CFG_DICT

    return {"quantize": 16} if "quantize" in DEFAULT_CFG_DICT else {"half": True}


def left_to_track(env: Envelope, settings: Settings) -> bool:
    """Track mode with ``track_detect_every`` N > 1: a numbered frame whose number is not a
    multiple of N goes to the track stage undetected; the tracks' Kalman predictions give
    its boxes there (or the track stage detects it, when they cannot: see
    ``SourceState.needs_detection``)."""
    every = settings.track_detect_every
    return (every > 1 and env.seq >= 0 and env.seq % every != 0
            and next_stage(Detect.name, settings) == TRACK)


def check_input(env: Envelope, settings: Settings) -> None:
    """The caption limits again (producers check them, but anything may write to the frames
    stream): InputError names the frame and the problem."""
    try:
        check_captions(env.captions, settings)
    except InputError as exc:
        raise InputError(f"frame {env.frame_id}: {exc}") from None


def decode_frame(env: Envelope, settings: Settings) -> np.ndarray:
    """The frame's image bytes as an 8-bit 3-channel BGR array; InputError names the frame."""
    try:
        return decode_bgr8(env.image or b"", settings.max_frame_bytes, settings.max_pixels)
    except InputError as exc:
        raise InputError(f"frame {env.frame_id}: {exc}") from None


def split_parts(env: Envelope, boxes: np.ndarray, scores: np.ndarray, crops: list[np.ndarray],
                settings: Settings) -> list[Routed]:
    """One frame's detections as parts of at most ``crops_per_part`` crops, routed onward.
    In track mode the track stage takes the frame whole (it tracks all its boxes at once),
    even without boxes (the source's sequence must not have holes)."""
    if next_stage(Detect.name, settings) == TRACK:
        # the image stays when the track stage takes its tracks' templates from it
        keep = env.image if settings.track_match > 0 and settings.track_detect_every > 1 \
            else None
        return [(TRACK, env.replace(image=keep, boxes=np.ascontiguousarray(boxes),
                                    det_scores=np.ascontiguousarray(scores), crops=tuple(crops),
                                    part=0, nparts=1))]
    if len(boxes) == 0:
        return [(COLLECT, env.replace(image=None, boxes=np.zeros((0, 4), np.float32),
                                        det_scores=np.zeros(0, np.float32), crops=(), part=0,
                                        nparts=1))]
    size = settings.crops_per_part
    nparts = math.ceil(len(boxes) / size)
    target = next_stage(Detect.name, settings)
    return [(target, env.replace(image=None, boxes=np.ascontiguousarray(boxes[part]),
                                 det_scores=np.ascontiguousarray(scores[part]),
                                 crops=tuple(crops[part]), part=k, nparts=nparts))
            for k, part in ((k, slice(k * size, (k + 1) * size)) for k in range(nparts))]
