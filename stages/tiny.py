"""Tiny random stand-ins for the three models, in the real formats (an Ultralytics ``.pt``,
a Real-ESRGAN ``.pth`` with ``params``, a SigLIP ``save_pretrained`` directory), and the
real-size random architectures the benchmarks load. Deterministic: fixed seeds."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import math
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from .libs import offline_env, torchvision_shim, undo_ultralytics_pil_patch

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


def build_tokenizer(max_length: int, words: Sequence[str] = VOCAB_WORDS) -> Any:
    """A deterministic WordPiece fast tokenizer: known words whole, others letter by letter."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = list("abcdefghijklmnopqrstuvwxyz0123456789")
    vocab: dict[str, int] = {"<pad>": 0, "<unk>": 1, "</s>": 2}
    for token in (*words, *chars, *("##" + c for c in chars), *".,-'!?&/()"):
        vocab.setdefault(token, len(vocab))
    tok = Tokenizer(models.WordPiece(vocab, unk_token="<unk>", max_input_chars_per_word=64))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>",
                                                       special_tokens=[("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   eos_token="</s>", model_max_length=max_length)
