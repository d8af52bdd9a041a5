"""score: SigLIP (or CLIP) caption × crop scores. Caption embeddings are cached; the crops of
every envelope in a batch go through the image tower together."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from ..common.envelope import Envelope
from ..common.errors import ModelError
from ..common.settings import Settings
from ..common.topology import next_stage
from . import backends, runtime
from .base import Routed, Stage, check_crops
from .libs import offline_env

# Crops per image-tower call with score_chunk 0 (auto). On the CPU a larger call is no faster
# per crop for a large input (SigLIP-large-384 int8 on OpenVINO, 2 threads, 16 crops: 9.3-10.0 s
# in chunks of 1, 2, 4 or 8) and holds more activations (peak 959, 978, 1,011, 1,074 MiB), so
# auto keeps CPU_PIXELS input pixels per call: 2 crops at 384², 5 at 224². A small input pays a
# fixed cost per call instead (the demo SigLIP at 32²: ~1.8 ms a call + ~0.8 ms a crop), so its
# chunk grows, up to GPU_CHUNK; a GPU gains from large calls (docs/performance.md).
CPU_PIXELS = 2 * 384 * 384
GPU_CHUNK = 64


def cpu_chunk(input_size: tuple[int, int]) -> int:
    """Auto crops per image-tower call on the CPU for an input of (height, width)."""
    return max(1, min(GPU_CHUNK, CPU_PIXELS // max(1, input_size[0] * input_size[1])))


class Score(Stage):
    """Scores each crop against each caption: sigmoid(scale·cos + bias) for SigLIP."""

    name = "score"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.model: Any = None
        self.processor: Any = None
        self.device = "cpu"
        self.dtype: Any = None
        self.max_length = 64
        self.cache: OrderedDict[str, Any] = OrderedDict()
        self.cache_hits = 0
        self.cache_misses = 0
        self.exported: backends.ExportedScorer | None = None

    def setup(self) -> None:
        """Load the model and processor from a local directory, or the exported towers
        (settings ``backend``: numpy, tokenizers and one runtime; no torch)."""
        paths = runtime.resolve_weights(self.settings)
        backend, choice = backends.precision.choose(
            "scorer", self.settings, paths.scorer,
            runtime.export_threads(self.settings, self.name))
        precision, self.precision_choices = choice.precision, (choice,)
        if backend != "torch":
            self.exported = backends.load_scorer(
                paths.scorer, backend, precision,
                runtime.export_threads(self.settings, self.name), self.settings.device)
            self.max_length = self.exported.max_length
            self.model_name = f"{paths.scorer.name} ({backend} {precision})"
            self.device_name = self.exported.vision.provider
            return
        import torch

        self.device = runtime.resolve_device(self.settings)
        runtime.set_threads(self.settings, self.name)
        half = runtime.use_half(self.settings, self.device)
        self.dtype = torch.float16 if half else torch.float32
        self.model, self.processor = load_scorer(paths.scorer, self.device, self.dtype)
        tok = self.processor.tokenizer
        limit = getattr(self.model.config.text_config, "max_position_embeddings", 64)
        self.max_length = min(int(tok.model_max_length or limit), int(limit))
        self.model_name = paths.scorer.name
        self.device_name = self.device

    def use_threads(self, threads: int) -> int:
        """The next batch on ``threads`` threads (torch, or the exported vision tower: the text
        tower, which runs only for captions not in the cache, keeps its first count rather
        than a second copy of its weights)."""
        return runtime.apply_threads(threads, [self.exported.vision] if self.exported else [],
                                     self.settings.follow_copy_max_mb)

    def process(self, batch: list[Envelope]) -> list[Routed]:
        """All crops of the batch through the image tower at once; C×N scores per envelope."""
        if self.model is None and self.exported is None:
            self.setup()
        for env in batch:
            check_crops(env)
        crops = [crop for env in batch for crop in env.crops]
        images = self.image_embeds(crops)
        target = next_stage(self.name, self.settings)
        out: list[Routed] = []
        start = 0
        for env in batch:
            n = len(env.crops)
            texts = self.text_embeds(env.captions)
            scores = self.logits_to_scores(texts, images[start:start + n])
            start += n
            out.append((target, env.replace(crops=(), scores=scores)))
        return out

    # --- embeddings ----------------------------------------------------------------------------
    def text_embeds(self, captions: tuple[str, ...]) -> Any:
        """Normalised text embeddings (C×D, float32), from the LRU cache where possible."""
        missing = list(dict.fromkeys(c for c in captions if c not in self.cache))
        self.cache_hits += len(captions) - sum(1 for c in captions if c in missing)
        self.cache_misses += len(missing)
        if missing:
            for caption, emb in zip(missing, self._encode_texts(missing), strict=True):
                self.cache[caption] = emb
        for caption in captions:
            self.cache.move_to_end(caption)
        embeds = [self.cache[c] for c in captions]
        while len(self.cache) > self.settings.caption_cache_size:
            self.cache.popitem(last=False)
        if self.exported is not None:
            return np.stack(embeds) if embeds else np.zeros((0, 1), np.float32)
        import torch

        if not embeds:
            return torch.zeros((0, 1), dtype=torch.float32, device=self.device)
        return torch.stack(embeds)

    def _encode_texts(self, captions: list[str]) -> Any:
        prompts = [self.settings.prompt.format(caption=c) for c in captions]
        if self.exported is not None:
            return list(self.exported.text_embeds(prompts))
        import torch

        enc = self.processor.tokenizer(prompts, padding="max_length", truncation=True,
                                       max_length=self.max_length, return_tensors="pt")
        kwargs = {"input_ids": enc["input_ids"].to(self.device)}
        if "attention_mask" in enc and not self.is_siglip:
            kwargs["attention_mask"] = enc["attention_mask"].to(self.device)
        with torch.inference_mode():
            feats = _pooled(self.model.get_text_features(**kwargs))
        return _normalise(feats)

    @property
    def chunk(self) -> int:
        """Crops per image-tower call: ``score_chunk``, or by device when 0."""
        if self.settings.score_chunk > 0:
            return self.settings.score_chunk
        device = self.exported.vision.provider if self.exported is not None else self.device
        if any(k in str(device).lower() for k in ("cuda", "gpu", "tensorrt", "mps")):
            return GPU_CHUNK
        return cpu_chunk(self.input_size)

    @property
    def input_size(self) -> tuple[int, int]:
        """The image tower's input (height, width)."""
        if self.exported is not None:
            size = self.exported.meta["image_size"]
            return int(size[0]), int(size[1])
        size = self.processor.image_processor.size
        if "height" in size:
            return int(size["height"]), int(size["width"])
        edge = int(size.get("shortest_edge", 224))
        return edge, edge

    def image_embeds(self, crops: list[np.ndarray]) -> Any:
        """Normalised image embeddings (N×D, float32) of RGB crops, ``chunk`` at a time."""
        step = self.chunk
        if self.exported is not None:
            return self.exported.image_embeds(crops, step)
        import torch

        if not crops:
            return torch.zeros((0, 1), dtype=torch.float32, device=self.device)
        parts = []
        for i in range(0, len(crops), step):
            chunk = [c if c.flags.writeable else c.copy() for c in crops[i:i + step]]
            pixels = self.processor.image_processor(
                images=chunk, return_tensors="pt",
                input_data_format="channels_last")["pixel_values"]
            with torch.inference_mode():
                feats = self.model.get_image_features(
                    pixel_values=pixels.to(self.device, self.dtype))
            parts.append(_normalise(_pooled(feats)))
        return torch.cat(parts)

    def image_array(self, crops: list[np.ndarray]) -> np.ndarray:
        """Normalised image embeddings as a float32 numpy array, whatever the backend."""
        embeds = self.image_embeds(crops)
        return embeds if isinstance(embeds, np.ndarray) else embeds.float().cpu().numpy()

    def scores_for(self, captions: tuple[str, ...], embeds: np.ndarray) -> np.ndarray:
        """Captions × crops scores for image embeddings kept as numpy (e.g. per track)."""
        texts = self.text_embeds(captions)
        if len(embeds) == 0:
            return np.zeros((len(captions), 0), np.float32)
        images = np.ascontiguousarray(embeds, np.float32)
        if self.exported is None:
            import torch

            images = torch.from_numpy(images).to(texts.device)
        return self.logits_to_scores(texts, images)

    # --- scores ---------------------------------------------------------------------------------
    @property
    def is_siglip(self) -> bool:
        """SigLIP-family models have a logit bias and score with a sigmoid."""
        return getattr(self.model, "logit_bias", None) is not None

    def logits_to_scores(self, texts: Any, images: Any) -> np.ndarray:
        """C×N float32: SiglipModel's logits_per_text through a sigmoid (CLIP: the logits)."""
        if self.exported is not None:
            return self.exported.scores(texts, images)
        import torch

        if texts.shape[0] == 0 or images.shape[0] == 0:
            return np.zeros((texts.shape[0], images.shape[0]), np.float32)
        with torch.inference_mode():
            logits = texts @ images.t() * self.model.logit_scale.float().exp()
            if self.is_siglip:
                logits = torch.sigmoid(logits + self.model.logit_bias.float())
        return logits.cpu().numpy().astype(np.float32)


def load_scorer(directory: Path | str, device: str = "cpu", dtype: Any = None) -> tuple[Any, Any]:
    """(model, processor) from a local save_pretrained directory, offline."""
    offline_env()
    from transformers import AutoModel, AutoProcessor

    try:
        model = AutoModel.from_pretrained(str(directory), local_files_only=True, dtype=dtype)
        processor = AutoProcessor.from_pretrained(str(directory), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - any load failure is a ModelError
        raise ModelError(f"cannot load scorer {directory}: {type(exc).__name__}: {exc}") from exc
    for attr in ("get_text_features", "get_image_features", "logit_scale"):
        if not hasattr(model, attr):
            raise ModelError(f"{directory}: {type(model).__name__} is not a CLIP/SigLIP model")
    return model.to(device).eval(), processor


def _pooled(out: Any) -> Any:
    """transformers 5 returns an output object (pooler_output); 4.x a tensor."""
    if hasattr(out, "pooler_output"):
        return out.pooler_output
    if isinstance(out, tuple):
        return out[1]
    return out


def _normalise(feats: Any) -> Any:
    feats = feats.float()
    return feats / feats.norm(p=2, dim=-1, keepdim=True)
