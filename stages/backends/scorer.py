"""SigLIP exported as two towers (vision with a dynamic batch, text at the tokenizer's fixed
length). The tokenizer runs through ``tokenizers`` (tokenizer.json); the image preprocessing in
numpy as SiglipImageProcessor does it (torchvision's antialiased uint8 bicubic resize to the
input size, bit for bit; ×1/255; (x − mean) / std); the score, sigmoid(exp(logit_scale)·cos +
logit_bias), in numpy with the scale and bias stored in the export's manifest."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .engine import Engine, release_memory

# PIL's resampling filters by the number transformers stores ("resample": 3 is bicubic).
_PIL_FILTERS = {0: "NEAREST", 1: "LANCZOS", 2: "BILINEAR", 3: "BICUBIC", 4: "BOX", 5: "HAMMING"}
# Filters resized exactly as torchvision's uint8 antialiased path does it: (support, kernel).
_SUPPORT = {2: 1.0, 3: 2.0}


def _cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                    np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0))


def _triangle(x: np.ndarray) -> np.ndarray:
    return np.clip(1.0 - np.abs(x), 0.0, None)


@functools.lru_cache(maxsize=256)
def _resize_weights(in_size: int, out_size: int, resample: int) -> tuple[np.ndarray, int]:
    """Integer weights (out × in, as float64 for BLAS) and their precision in bits, computed
    as torch's antialiased uint8 resize does (PIL's scheme, with int16 weights)."""
    scale = in_size / out_size
    support = _SUPPORT[resample] * (scale if scale >= 1.0 else 1.0)
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    kernel = _cubic if resample == 3 else _triangle
    weights = np.zeros((out_size, in_size), np.float64)
    for i in range(out_size):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        w = kernel((np.arange(lo, hi) - center + 0.5) * invscale)
        total = w.sum()
        weights[i, lo:hi] = w / total if total != 0 else w
    precision = 0
    top = weights.max()
    for precision in range(22):  # noqa: B007 - the loop finds the precision
        if int(0.5 + top * (1 << (precision + 1))) >= (1 << 15):
            break
    scaled = weights * (1 << precision)
    ints = np.where(scaled < 0, np.trunc(scaled - 0.5), np.trunc(scaled + 0.5))
    return ints, precision


def _resize_axis(image: np.ndarray, out_size: int, axis: int, resample: int) -> np.ndarray:
    """One separable pass on a uint8 H×W×C image (exact integer arithmetic in float64)."""
    weights, precision = _resize_weights(image.shape[axis], out_size, resample)
    pixels = image.astype(np.float64)
    if axis == 1:
        acc = np.einsum("ow,hwc->hoc", weights, pixels, optimize=True)
    else:
        acc = np.einsum("oh,hwc->owc", weights, pixels, optimize=True)
    acc = (acc.astype(np.int64) + (1 << (precision - 1))) >> precision
    return np.clip(acc, 0, 255).astype(np.uint8)


def resize_uint8(image: np.ndarray, height: int, width: int, resample: int = 3) -> np.ndarray:
    """Resize an RGB uint8 crop as SiglipImageProcessor does (torchvision's antialiased uint8
    resize, bit for bit: horizontal pass first, each pass rounded to uint8); filters other than
    bilinear and bicubic go through PIL."""
    if resample not in _SUPPORT:
        from PIL import Image

        mode = getattr(Image.Resampling, _PIL_FILTERS.get(resample, "BICUBIC"))
        return np.asarray(Image.fromarray(image).resize((width, height), mode))
    if image.shape[1] != width:
        image = _resize_axis(image, width, 1, resample)
    if image.shape[0] != height:
        image = _resize_axis(image, height, 0, resample)
    return image


class Tokenizer:
    """tokenizer.json, padded and truncated to ``max_length`` as the torch path asks
    (``padding="max_length", truncation=True``)."""

    def __init__(self, path: Path, max_length: int, pad_id: int, pad_token: str) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        self.tokenizer = HFTokenizer.from_file(str(path))
        self.tokenizer.enable_truncation(max_length=max_length)
        self.tokenizer.enable_padding(length=max_length, pad_id=pad_id, pad_token=pad_token)
        self.max_length = max_length

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        encoded = self.tokenizer.encode_batch(list(texts))
        return np.asarray([e.ids for e in encoded], dtype=np.int64).reshape(len(texts),
                                                                           self.max_length)


def preprocess(crops: Sequence[np.ndarray], meta: dict[str, Any]) -> np.ndarray:
    """RGB uint8 crops → N×3×H×W float32 pixel values, as SiglipImageProcessor makes them."""
    height, width = int(meta["image_size"][0]), int(meta["image_size"][1])
    resample = int(meta.get("resample", 3))
    mean = np.asarray(meta.get("image_mean", (0.5, 0.5, 0.5)), np.float32)
    std = np.asarray(meta.get("image_std", (0.5, 0.5, 0.5)), np.float32)
    rescale = np.float32(meta.get("rescale_factor", 1 / 255))
    out = np.empty((len(crops), 3, height, width), np.float32)
    for i, crop in enumerate(crops):
        if crop.shape[:2] != (height, width) and meta.get("do_resize", True):
            crop = resize_uint8(crop, height, width, resample)
        pixels = crop.astype(np.float32)
        if meta.get("do_rescale", True):
            pixels = pixels * rescale
        if meta.get("do_normalize", True):
            pixels = (pixels - mean) / std
        out[i] = pixels.transpose(2, 0, 1)
    return out


def normalise(feats: np.ndarray) -> np.ndarray:
    feats = feats.astype(np.float32)
    return feats / np.linalg.norm(feats, axis=-1, keepdims=True)


def sigmoid_scores(texts: np.ndarray, images: np.ndarray, logit_scale: float,
                   logit_bias: float | None) -> np.ndarray:
    """C×N: sigmoid(exp(logit_scale)·cos + logit_bias) (without a bias: the CLIP logits)."""
    if texts.shape[0] == 0 or images.shape[0] == 0:
        return np.zeros((texts.shape[0], images.shape[0]), np.float32)
    logits = (texts @ images.T) * np.float32(np.exp(logit_scale))
    if logit_bias is None:
        return logits.astype(np.float32)
    return (1.0 / (1.0 + np.exp(-(logits + np.float32(logit_bias))))).astype(np.float32)


class ExportedScorer:
    """Normalised text and image embeddings from the two exported towers, and their scores."""

    def __init__(self, vision: Engine, text: Engine, directory: Path,
                 meta: dict[str, Any]) -> None:
        self.vision, self.text, self.meta = vision, text, meta
        self.max_length = int(meta["max_length"])
        self.tokenizer = Tokenizer(directory / meta.get("tokenizer", "tokenizer.json"),
                                   self.max_length, int(meta.get("pad_id", 0)),
                                   str(meta.get("pad_token", "<pad>")))
        self.logit_scale = float(meta["logit_scale"])
        bias = meta.get("logit_bias")
        self.logit_bias = None if bias is None else float(bias)
        self.vision_input = vision.input_names[0]
        self.text_input = text.input_names[0]

    def text_embeds(self, prompts: Sequence[str]) -> np.ndarray:
        """C×D normalised embeddings of already-formatted prompts."""
        if not prompts:
            return np.zeros((0, 1), np.float32)
        ids = self.tokenizer(prompts)
        return normalise(self.text.run({self.text_input: ids})[0])

    def image_embeds(self, crops: Sequence[np.ndarray], chunk: int = 64) -> np.ndarray:
        """N×D normalised embeddings of RGB crops, ``chunk`` crops per call."""
        if not crops:
            return np.zeros((0, 1), np.float32)
        parts = [self.vision.run({self.vision_input: preprocess(crops[i:i + chunk],
                                                                self.meta)})[0]
                 for i in range(0, len(crops), chunk)]
        embeds = normalise(np.concatenate(parts))
        release_memory()
        return embeds

    def scores(self, texts: np.ndarray, images: np.ndarray) -> np.ndarray:
        return sigmoid_scores(texts, images, self.logit_scale, self.logit_bias)
