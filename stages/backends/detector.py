"""A YOLO detector exported by Ultralytics' own exporter (dynamic height and width), with the
pre- and post-processing of Ultralytics' predictor redone in numpy/OpenCV: letterbox to the
minimum stride-aligned rectangle, BGR→RGB, /255; class-aware NMS, boxes scaled back and clipped.
The test-time augmentation of Ultralytics' torch path (scales 1, 0.83, 0.67 with a left-right
flip on the middle one, merged before NMS) is done here too, so exported detectors keep it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .engine import Engine, release_memory

PAD_VALUE = 114  # Ultralytics' letterbox grey
TTA_SCALES = (1.0, 0.83, 0.67)
TTA_FLIPS = (False, True, False)  # left-right flip on the middle scale
TTA_PAD = 0.447  # scale_img's pad value (the ImageNet mean)
MAX_NMS = 30000  # candidates kept for NMS, best first
MAX_WH = 7680  # per-class box offset for class-aware NMS


@dataclass(frozen=True)
class Letterboxed:
    """A letterboxed image (1×3×H×W float32 RGB in [0, 1]) and how to map boxes back."""

    tensor: np.ndarray
    gain: tuple[float, float]  # (x, y) new / old
    pad: tuple[int, int]  # (left, top)
    orig: tuple[int, int]  # (height, width)


def letterbox(image: np.ndarray, imgsz: int, stride: int = 32, auto: bool = True) -> Letterboxed:
    """Ultralytics' LetterBox(imgsz, auto, stride) on a BGR uint8 image, then the predictor's
    BGR→RGB and /255."""
    import cv2

    h, w = image.shape[:2]
    r = min(imgsz / h, imgsz / w)
    new_w, new_h = max(round(w * r), 1), max(round(h * r), 1)
    dw, dh = imgsz - new_w, imgsz - new_h
    if auto:
        dw, dh = dw % stride, dh % stride
    dw, dh = dw / 2, dh / 2
    top, bottom = round(dh - 0.1), round(dh + 0.1)
    left, right = round(dw - 0.1), round(dw + 0.1)
    if (w, h) != (new_w, new_h):
        image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    image = cv2.copyMakeBorder(image, top, bottom, left, right, cv2.BORDER_CONSTANT,
                               value=(PAD_VALUE,) * 3)
    # BGR→RGB, HWC→CHW and /255 in float32, a channel at a time straight into the tensor (one
    # 18 MB array at 1600 px, not three)
    tensor = np.empty((1, 3, *image.shape[:2]), np.float32)
    for k in range(3):
        np.divide(image[:, :, 2 - k], 255.0, out=tensor[0, k], dtype=np.float32)
    return Letterboxed(tensor, (new_w / w, new_h / h), (left, top), (h, w))


def letterbox_geometry(h: int, w: int, imgsz: int, stride: int = 32
                       ) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """What ``letterbox`` (auto) does to an h × w image: (new_w, new_h) resized, (left, top)
    pad, (padded height, padded width)."""
    r = min(imgsz / h, imgsz / w)
    new_w, new_h = max(round(w * r), 1), max(round(h * r), 1)
    dw, dh = (imgsz - new_w) % stride, (imgsz - new_h) % stride
    return (new_w, new_h), (round(dw / 2 - 0.1), round(dh / 2 - 0.1)), (new_h + dh, new_w + dw)


def rescale_ultralytics(boxes: np.ndarray, h: int, w: int, imgsz: int,
                        stride: int = 32) -> np.ndarray:
    """Ultralytics' torch boxes (xyxy, frame pixels) mapped back with the letterbox that was
    really applied. Its scale_boxes infers the resize from the padded input (gain = min over
    padded / original sides); when the shorter side needed no padding and rounded down, that
    min picks the wrong side, the longer side comes out a pixel short, and boxes drift by up
    to ~0.2 % of the frame (4 px on a 1,762-px frame at imgsz 448). Unchanged (the same array)
    where its guess is right; the exported path's ``scale_boxes`` is exact throughout."""
    (new_w, new_h), (left, top), (ph, pw) = letterbox_geometry(h, w, imgsz, stride)
    gain = min(ph / h, pw / w)
    uw, uh = max(round(w * gain), 1), max(round(h * gain), 1)
    if (uw, uh) == (new_w, new_h) or not len(boxes):
        return boxes
    upx, upy = round((pw - uw) / 2 - 0.1), round((ph - uh) / 2 - 0.1)
    out = boxes.astype(np.float32, copy=True)
    out[:, [0, 2]] = ((out[:, [0, 2]] * (uw / w) + upx) - left) / (new_w / w)
    out[:, [1, 3]] = ((out[:, [1, 3]] * (uh / h) + upy) - top) / (new_h / h)
    out[:, [0, 2]] = out[:, [0, 2]].clip(0, w)
    out[:, [1, 3]] = out[:, [1, 3]].clip(0, h)
    return out


def scale_boxes(boxes: np.ndarray, box: Letterboxed) -> np.ndarray:
    """xyxy boxes from letterbox pixels to the original image's, clipped to it."""
    out = boxes.astype(np.float32, copy=True)
    out[:, [0, 2]] = (out[:, [0, 2]] - box.pad[0]) / box.gain[0]
    out[:, [1, 3]] = (out[:, [1, 3]] - box.pad[1]) / box.gain[1]
    out[:, [0, 2]] = out[:, [0, 2]].clip(0, box.orig[1])
    out[:, [1, 3]] = out[:, [1, 3]].clip(0, box.orig[0])
    return out


def xywh2xyxy(xywh: np.ndarray) -> np.ndarray:
    out = np.empty_like(xywh)
    half = xywh[:, 2:4] / 2
    out[:, :2] = xywh[:, :2] - half
    out[:, 2:4] = xywh[:, :2] + half
    return out


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Greedy NMS as torchvision.ops.nms: indices kept, best score first; a box is dropped when
    its IoU with a kept one is > ``iou``."""
    order = np.argsort(-scores, kind="stable")
    x1, y1, x2, y2 = (boxes[:, k] for k in range(4))
    areas = (x2 - x1) * (y2 - y1)
    keep: list[int] = []
    while order.size:
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]))
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]))
        inter = w * h
        union = areas[i] + areas[rest] - inter
        # two zero-area boxes overlap by nothing (torchvision's 0/0 is NaN, which keeps both too)
        overlap = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
        order = rest[~(overlap > iou)]
    return np.asarray(keep, dtype=np.int64)


def non_max_suppression(pred: np.ndarray, conf: float, iou: float,
                        max_det: int) -> tuple[np.ndarray, np.ndarray]:
    """One image's raw head output (4 + nc) × anchors → (xyxy N×4, scores N), best first: the
    best class per anchor, > conf, class-aware NMS, at most max_det (Ultralytics' rules)."""
    pred = pred.T  # anchors × (4 + nc)
    cls = pred[:, 4:]
    if cls.shape[1] == 0:
        return np.zeros((0, 4), np.float32), np.zeros(0, np.float32)
    best = cls.max(1)
    keep = best > conf
    pred, best, label = pred[keep], best[keep], cls[keep].argmax(1)
    if not len(pred):
        return np.zeros((0, 4), np.float32), np.zeros(0, np.float32)
    if len(pred) > MAX_NMS:
        top = np.argsort(-best, kind="stable")[:MAX_NMS]
        pred, best, label = pred[top], best[top], label[top]
    boxes = xywh2xyxy(pred[:, :4])
    kept = nms(boxes + (label * MAX_WH)[:, None], best, iou)[:max_det]
    return boxes[kept].astype(np.float32), best[kept].astype(np.float32)


def end2end_filter(pred: np.ndarray, conf: float, max_det: int) -> tuple[np.ndarray, np.ndarray]:
    """An end-to-end head's rows (x1, y1, x2, y2, score, class): confidence and max_det only."""
    rows = pred[pred[:, 4] > conf][:max_det]
    return rows[:, :4].astype(np.float32), rows[:, 4].astype(np.float32)


def scale_img(x: np.ndarray, ratio: float, gs: int, flip: bool = False) -> np.ndarray:
    """Ultralytics' scale_img: bilinear resize (half-pixel, no antialias) by ``ratio`` and pad
    right/bottom to a multiple of ``gs`` with 0.447; ``flip`` mirrors left-right first. One
    channel plane at a time, into the padded output: at 1600 px each whole-image float copy
    is 18 MB, and the detect worker's peak memory is set by this pass (docs/performance.md)."""
    import cv2

    if ratio == 1.0:
        return np.ascontiguousarray(x[..., ::-1]) if flip else x
    _, c, h, w = x.shape
    sh, sw = int(h * ratio), int(w * ratio)
    ph, pw = (math.ceil(v * ratio / gs) * gs for v in (h, w))
    out = np.full((1, c, ph, pw), TTA_PAD, np.float32)
    for k in range(c):
        plane = np.ascontiguousarray(x[0, k, :, ::-1]) if flip else x[0, k]
        resized = cv2.resize(plane, (sw, sh), interpolation=cv2.INTER_LINEAR)
        out[0, k, :sh, :sw] = resized[:ph, :pw]
    return out


def clip_augmented(outputs: list[np.ndarray], nl: int) -> list[np.ndarray]:
    """Ultralytics' _clip_augmented: drop the largest-stride anchors of the full-size pass and
    the smallest-stride anchors of the smallest pass (arrays are (4 + nc) × anchors)."""
    g = sum(4 ** x for x in range(nl))
    i = (outputs[0].shape[-1] // g) * 1
    outputs[0] = outputs[0][..., :-i]
    i = (outputs[-1].shape[-1] // g) * 4 ** (nl - 1)
    outputs[-1] = outputs[-1][..., i:]
    return outputs


class ExportedDetector:
    """Boxes and scores per BGR frame from an exported YOLO (one frame per call, as the torch
    path does on the CPU)."""

    def __init__(self, engine: Engine, meta: dict[str, Any]) -> None:
        self.engine = engine
        self.input = engine.input_names[0]
        self.stride = int(meta.get("stride", 32))
        self.nl = int(meta.get("nl", 3))
        self.end2end = bool(meta.get("end2end", False))
        self.can_augment = bool(meta.get("augment", not self.end2end))

    def forward(self, x: np.ndarray) -> np.ndarray:
        """(4 + nc) × anchors for one 1×3×H×W input."""
        return self.engine.run({self.input: x})[0][0]

    def augmented(self, x: np.ndarray) -> np.ndarray:
        """The three TTA passes, de-scaled, de-flipped and clipped, as one anchor set."""
        width = x.shape[3]
        outs = []
        for scale, flip in zip(TTA_SCALES, TTA_FLIPS, strict=True):
            xi = scale_img(x, scale, self.stride, flip)
            yi = self.forward(xi).copy()
            yi[:4] /= scale
            if flip:
                yi[0] = width - yi[0]
            outs.append(yi)
        return np.concatenate(clip_augmented(outs, self.nl), axis=-1)

    def predict(self, image: np.ndarray, imgsz: int, conf: float, iou: float, max_det: int,
                tta: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(boxes float32 N×4 xyxy in the image's pixels, scores float32 N), best first;
        ``imgsz`` 0 follows the image (its long side rounded up to the stride)."""
        if imgsz <= 0:
            imgsz = max(image.shape[:2])
        imgsz = max(math.ceil(imgsz / self.stride) * self.stride, self.stride)  # check_imgsz
        box = letterbox(image, imgsz, self.stride)
        if tta and self.can_augment:
            pred = self.augmented(box.tensor)
        else:
            pred = self.forward(box.tensor)
        if self.end2end:
            boxes, scores = end2end_filter(pred, conf, max_det)
        else:
            boxes, scores = non_max_suppression(pred, conf, iou, max_det)
        found = scale_boxes(boxes, box), scores
        del pred, box
        release_memory()
        return found
