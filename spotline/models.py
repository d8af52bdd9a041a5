"""Model files: where the weights are, which device runs them, and tiny random stand-ins.

Real weights are local paths in the settings; nothing is downloaded. When a path is empty,
tiny random-initialised checkpoints in the real formats (an Ultralytics ``.pt``, a Real-ESRGAN
``.pth`` with ``params``, a SigLIP ``save_pretrained`` directory) are written under
``data_dir/tiny-models`` and loaded by the same code as real weights.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from spotline.common.errors import ModelError
from spotline.common.settings import Settings

log = logging.getLogger(__name__)

# Bump when the tiny models change: older directories are then rewritten.
TINY_VERSION = "1"
TINY_DIR = "tiny-models"
DETECTOR_FILE = "detector.pt"
UPSCALER_FILE = "upscaler.pth"
SCORER_DIR = "scorer"
SEED = 0

# Words the tiny tokenizer knows whole (others are split into letters): the TIL 2024 caption
# vocabulary, the demo photos' objects and the prompt.
VOCAB_WORDS = (
    "this is a an the photo of picture and with on in "
    "grey gray white black red blue green yellow orange silver brown purple pink dark light "
    "camouflage commercial cargo fighter jet plane airplane aircraft airliner helicopter "
    "missile drone uav rocket bomber military small large "
    "person man men woman people bus car tie shirt suit face building window road sign wheel"
).split()


@dataclass(frozen=True)
class ModelPaths:
    """The three model locations a pipeline loads."""

    detector: Path
    upscaler: Path
    scorer: Path
    tiny: bool = False


# --- environment and devices ------------------------------------------------------------------
def offline_env() -> None:
    """Tell the model libraries not to reach the network (call before importing them)."""
    for name in ("YOLO_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(name, "1")
    os.environ.setdefault("YOLO_VERBOSE", "False")


def undo_ultralytics_pil_patch() -> None:
    """Importing Ultralytics replaces ``PIL.Image.open`` with a wrapper that pip-installs a
    HEIF plugin whenever Pillow cannot identify some bytes; put Pillow's own back."""
    patches = sys.modules.get("ultralytics.utils.patches")
    original = getattr(patches, "_image_open", None)
    if original is not None:
        from PIL import Image

        Image.open = original


def ultralytics_assets() -> Path:
    """The folder of photos Ultralytics ships (bus.jpg, zidane.jpg), found without importing it."""
    import importlib.util

    spec = importlib.util.find_spec("ultralytics")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("ultralytics is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "assets"


def torchvision_shim() -> None:
    """basicsr/realesrgan import a module torchvision removed; alias it before importing them."""
    import torchvision.transforms.functional as functional

    sys.modules.setdefault("torchvision.transforms.functional_tensor", functional)


def resolve_device(settings: Settings) -> str:
    """The torch device string: 'auto' picks cuda when available, else cpu."""
    if settings.device != "auto":
        return "cuda:0" if settings.device == "cuda" else settings.device
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"


def use_half(settings: Settings, device: str) -> bool:
    """fp16 only on CUDA, and only when the settings ask for it."""
    return bool(settings.half) and device.startswith("cuda")


# How the cores are shared when ``torch_threads`` is 0 (auto) and each model stage is its own
# process on one machine: score (SigLIP-large, the slowest real-size model) gets half, detect
# and upscale a quarter each; with upscaling off, score two thirds and detect one third.
THREAD_SHARES = {"detect": 1, "upscale": 1, "score": 2}


def cpu_count() -> int:
    """The cores this process may run on (its affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def threads_for(settings: Settings, stage: str | None = None) -> int:
    """Intra-op threads for a stage's process: ``torch_threads`` when set; else (auto) the
    stage's share of the cores, at least 1 (2 cores: 1 each; 16: detect 4, upscale 4,
    score 8). ``stage=None`` is a process that runs every stage (the in-process reference):
    all cores."""
    if settings.torch_threads > 0:
        return settings.torch_threads
    cores = cpu_count()
    if stage is None or stage not in THREAD_SHARES:
        return cores
    shares = {k: v for k, v in THREAD_SHARES.items() if k != "upscale" or settings.upscale}
    return max(1, cores * shares.get(stage, 1) // sum(shares.values()))


def set_threads(settings: Settings, stage: str | None = None) -> int:
    """Set torch's (and OpenCV's) thread count for this process; returns it.

    Stages on one CPU that each used every core would fight: an OpenMP team that shares its
    cores with another busy process waits on its slowest thread (measured on 2 cores,
    SigLIP-large: 2 threads 11 s alone but 22 s beside a busy process; 1 thread 20 s either
    way; docs/performance.md)."""
    import cv2
    import torch

    n = threads_for(settings, stage)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    cv2.setNumThreads(n)
    return n


# --- where the weights are --------------------------------------------------------------------
def resolve_weights(settings: Settings) -> ModelPaths:
    """The configured model paths; empty ones fall back to tiny random models (written once)."""
    given = {"detector_weights": settings.detector_weights,
             "upscaler_weights": settings.upscaler_weights, "scorer_dir": settings.scorer_dir}
    for key, value in given.items():
        if value and not Path(value).exists() and not _is_bundled_yaml(value):
            raise ModelError(f"{key} {value!r} does not exist (weights are local paths; "
                             f"nothing is downloaded)")
    tiny: dict[str, Path] = {}
    if not all(given.values()):
        tiny = ensure_tiny_models(Path(settings.data_dir) / TINY_DIR)
        missing = [k for k, v in given.items() if not v]
        _warn_once("using tiny RANDOM models for %s (from %s): boxes and scores are arbitrary; "
                    "set SPOTLINE_DETECTOR_WEIGHTS / _UPSCALER_WEIGHTS / _SCORER_DIR for real "
                    "results", ", ".join(missing), Path(settings.data_dir) / TINY_DIR)
    return ModelPaths(
        detector=Path(settings.detector_weights) if settings.detector_weights else tiny["detector"],
        upscaler=Path(settings.upscaler_weights) if settings.upscaler_weights else tiny["upscaler"],
        scorer=Path(settings.scorer_dir) if settings.scorer_dir else tiny["scorer"],
        tiny=bool(tiny))


_warned: set[str] = set()


def _warn_once(message: str, *args: Any) -> None:
    """Log a warning once per process (every stage resolves the weights)."""
    text = message % args
    if text not in _warned:
        _warned.add(text)
        log.warning(text)


def _is_bundled_yaml(value: str) -> bool:
    """An Ultralytics architecture name such as 'yolov9c.yaml' (built without a download)."""
    return value.endswith((".yaml", ".yml")) and os.sep not in value


def ensure_tiny_models(directory: Path) -> dict[str, Path]:
    """Write the tiny models once; a file lock lets concurrent processes share the result."""
    return ensure_written(directory, TINY_VERSION, write_tiny_models, "tiny random models")


def ensure_written(directory: Path, version: str, writer: Callable[[Path], object],
                   what: str) -> dict[str, Path]:
    """Run ``writer(directory)`` once per ``version`` (a marker file records it), under a file
    lock so concurrent processes share the result; returns the model paths in it."""
    directory.mkdir(parents=True, exist_ok=True)
    marker = directory / ".complete"
    with _locked(directory / ".lock"):
        if not (marker.is_file() and marker.read_text().strip() == version):
            log.warning("writing %s to %s (once)", what, directory)
            writer(directory)
            _atomic_write_text(marker, version)
    return tiny_paths(directory)


def tiny_paths(directory: Path) -> dict[str, Path]:
    """Where write_tiny_models puts each model."""
    return {"detector": directory / DETECTOR_FILE, "upscaler": directory / UPSCALER_FILE,
            "scorer": directory / SCORER_DIR}


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a+b") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def scorer_input_size(settings: Settings, scorer_dir: Path | str) -> int:
    """The side crops are capped at: the setting, or the scorer processor's input size."""
    if settings.scorer_input_size > 0:
        return settings.scorer_input_size
    directory = Path(scorer_dir)
    for name, key in (("preprocessor_config.json", None), ("processor_config.json",
                                                           "image_processor")):
        path = directory / name
        if path.is_file():
            config = json.loads(path.read_text(encoding="utf-8"))
            config = config.get(key, {}) if key else config
            size = _size_of(config)
            if size:
                return size
    raise ModelError(f"cannot read the scorer input size from {directory}; set "
                     f"SPOTLINE_SCORER_INPUT_SIZE")


def _size_of(config: dict[str, Any]) -> int:
    if config.get("do_center_crop") and isinstance(config.get("crop_size"), dict):
        return max(int(v) for v in config["crop_size"].values())
    size = config.get("size")
    if isinstance(size, int):
        return size
    if isinstance(size, dict) and size:
        return max(int(v) for v in size.values())
    return 0


# --- image helpers shared by the stages --------------------------------------------------------
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


# --- tiny random models ----------------------------------------------------------------------
def write_tiny_models(directory: Path | str) -> dict[str, Path]:
    """Write tiny random models in the real formats (deterministic: fixed seeds)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = tiny_paths(directory)
    write_yolo(paths["detector"], _tiny_yolo_cfg())
    write_srvgg(paths["upscaler"], num_feat=16, num_conv=4)
    write_siglip(paths["scorer"], _tiny_siglip_config(), max_length=16, image_size=64)
    return paths


def write_real_size_architectures(directory: Path | str) -> dict[str, Path]:
    """Random models of the seed's real sizes (YOLOv9c, x4v3, siglip-large-384): benchmarks."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = tiny_paths(directory)
    write_yolo(paths["detector"], "yolov9c.yaml", calibrate_size=320)
    write_srvgg(paths["upscaler"], num_feat=64, num_conv=32)
    write_siglip(paths["scorer"], _large_siglip_config(), max_length=64, image_size=384)
    return paths


def _tiny_yolo_cfg() -> dict[str, Any]:
    from ultralytics.nn.tasks import yaml_model_load

    undo_ultralytics_pil_patch()
    cfg = yaml_model_load("yolov8n.yaml")
    cfg["scales"] = {"t": [0.33, 0.0625, 256]}  # depth, width, max channels: ~0.2 M params
    cfg["scale"] = "t"
    return cfg


def write_yolo(path: Path, cfg: dict[str, Any] | str, calibrate_size: int = 256) -> Path:
    """A single-class Ultralytics checkpoint with random weights that still finds boxes."""
    offline_env()
    import torch
    from ultralytics.nn.tasks import DetectionModel

    undo_ultralytics_pil_patch()
    torch.manual_seed(SEED)
    model = DetectionModel(cfg, nc=1, verbose=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # reductions sum in a thread-dependent order: same bits anywhere
    try:
        _calibrate_yolo(model, calibrate_size)
    finally:
        torch.set_num_threads(threads)
    ckpt = {"model": model.half(), "ema": None, "optimizer": None, "epoch": -1,
            "train_args": {"task": "detect", "imgsz": 640, "single_cls": True},
            "date": "1970-01-01T00:00:00", "version": "spotline-random"}
    _atomic_torch_save(ckpt, path)
    return path


def _calibrate_yolo(model: Any, size: int) -> None:
    """Random convs with unit BN statistics fade to zero: set the BN statistics from
    synthetic images, bias the class logits so the top 0.5 % of anchors score > 0.5, and
    bias the box regression towards small boxes."""
    import torch

    gen = torch.Generator().manual_seed(SEED)
    images = torch.nn.functional.interpolate(torch.rand(4, 3, 16, 16, generator=gen),
                                             size=(size, size), mode="bilinear")
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # cumulative average over the calibration batch
    model.train()
    with torch.no_grad():
        model(images)
    model.eval()
    head = model.model[-1]
    logits: list[torch.Tensor] = []
    hooks = [seq[-1].register_forward_hook(lambda _m, _i, out: logits.append(out.flatten()))
             for seq in head.cv3]
    with torch.no_grad():
        model(images)
    for hook in hooks:
        hook.remove()
    shift = torch.quantile(torch.cat(logits).float(), 0.995)
    for seq in head.cv3:
        seq[-1].bias.data -= shift
    for seq in head.cv2:  # box sides: favour the first DFL bins, i.e. objects a few cells big
        seq[-1].weight.data.mul_(0.2)
        bias = seq[-1].bias.data.view(4, -1)
        bias.copy_(-torch.arange(bias.shape[1], dtype=bias.dtype).expand_as(bias))


def write_srvgg(path: Path, num_feat: int, num_conv: int, upscale: int = 4) -> Path:
    """A Real-ESRGAN SRVGGNetCompact state dict under 'params' (the x4v3 file's layout)."""
    import torch

    torchvision_shim()
    from realesrgan.archs.srvgg_arch import SRVGGNetCompact

    torch.manual_seed(SEED)
    net = SRVGGNetCompact(num_in_ch=3, num_out_ch=3, num_feat=num_feat, num_conv=num_conv,
                          upscale=upscale, act_type="prelu")
    last = net.body[-1]
    with torch.no_grad():  # a small residual: output ≈ nearest upsample + mild noise
        last.weight.mul_(0.05)
        last.bias.zero_()
    _atomic_torch_save({"params": net.state_dict()}, path)
    return path


def _atomic_torch_save(obj: Any, path: Path) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _tiny_siglip_config() -> dict[str, Any]:
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=16)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, image_size=64, patch_size=16)
    return {"text_config": text, "vision_config": vision}


def _large_siglip_config() -> dict[str, Any]:
    common = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                  num_attention_heads=16)
    return {"text_config": {**common, "max_position_embeddings": 64, "vocab_size": 32000},
            "vision_config": {**common, "image_size": 384, "patch_size": 16}}


def write_siglip(directory: Path, config: dict[str, Any], max_length: int,
                 image_size: int) -> Path:
    """A SigLIP save_pretrained directory with a tiny fast tokenizer and its image processor."""
    offline_env()
    import torch
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel, SiglipProcessor

    tokenizer = build_tokenizer(max_length)
    text = {"vocab_size": len(tokenizer), **config["text_config"], "pad_token_id": 0,
            "bos_token_id": 2, "eos_token_id": 2}
    torch.manual_seed(SEED)
    model = SiglipModel(SiglipConfig(text_config=text, vision_config=config["vision_config"]))
    with torch.no_grad():
        model.logit_scale.fill_(math.log(10.0))  # post_init zeroes them; spread the scores
        model.logit_bias.zero_()
    processor = SiglipProcessor(
        image_processor=SiglipImageProcessor(size={"height": image_size, "width": image_size}),
        tokenizer=tokenizer)
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.eval().save_pretrained(tmp)
    processor.save_pretrained(tmp)
    processor.image_processor.save_pretrained(tmp)  # preprocessor_config.json as on the hub
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)
    return directory


def build_tokenizer(max_length: int) -> Any:
    """A deterministic WordPiece fast tokenizer: known words whole, others letter by letter."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = list("abcdefghijklmnopqrstuvwxyz0123456789")
    vocab: dict[str, int] = {"<pad>": 0, "<unk>": 1, "</s>": 2}
    for token in (*VOCAB_WORDS, *chars, *("##" + c for c in chars), *".,-'!?&/()"):
        vocab.setdefault(token, len(vocab))
    tok = Tokenizer(models.WordPiece(vocab, unk_token="<unk>", max_input_chars_per_word=64))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>",
                                                       special_tokens=[("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   eos_token="</s>", model_max_length=max_length)
