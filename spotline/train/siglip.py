"""Building, saving and loading the SigLIP scorers that `spotline finetune scorer` trains:
a new small one with the SigLIP paper's logit init, or any local save_pretrained directory
through the score stage's own loader."""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import Any

from spotline.common.errors import ModelError
from spotline.stages.tiny import build_tokenizer

# Words the from-scratch tokenizer knows whole; others are spelled letter by letter.
SCRATCH_WORDS = (
    "this is a an the photo of picture and with on in "
    "grey gray white black red blue green yellow orange silver brown purple pink dark light "
    "circle square triangle star cross diamond hexagon ring "
    "camouflage commercial cargo fighter jet plane airplane aircraft airliner helicopter "
    "missile drone uav rocket bomber military small large boat ship"
).split()


# --- building and loading models ----------------------------------------------------------------
def write_scratch_scorer(directory: Path, image_size: int = 32, seed: int = 0,
                         max_length: int = 16) -> Path:
    """A new small SigLIP (ViT 4×128 on ``image_size`` crops, patch 8; 2-layer text tower)
    with the SigLIP paper's logit init, saved with its tokenizer and image processor."""
    import torch
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel, SiglipProcessor

    tokenizer = build_tokenizer(max_length, SCRATCH_WORDS)
    common = dict(hidden_size=128, intermediate_size=512, num_attention_heads=4)
    text = {**common, "num_hidden_layers": 2, "vocab_size": len(tokenizer),
            "max_position_embeddings": max_length, "pad_token_id": 0, "bos_token_id": 2,
            "eos_token_id": 2}
    vision = {**common, "num_hidden_layers": 4, "image_size": image_size, "patch_size": 8}
    torch.manual_seed(seed)
    model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
    with torch.no_grad():
        model.logit_scale.fill_(math.log(10.0))
        model.logit_bias.fill_(-10.0)
    processor = SiglipProcessor(
        image_processor=SiglipImageProcessor(size={"height": image_size, "width": image_size}),
        tokenizer=tokenizer)
    save_scorer(model, processor, directory)
    return directory


def save_scorer(model: Any, processor: Any, directory: Path) -> None:
    """model + processor + preprocessor_config.json, written atomically (rename at the end)."""
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    processor.image_processor.save_pretrained(tmp)
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)


def load_for_training(directory: Path, device: str) -> tuple[Any, Any]:
    """(model in train mode, processor) through the score stage's own loader."""
    from spotline.stages.score import load_scorer

    model, processor = load_scorer(directory, device)
    if getattr(model, "logit_bias", None) is None:
        raise ModelError(f"{directory}: not a SigLIP model (the sigmoid loss needs logit_bias)")
    return model.train(), processor


def crop_side(model: Any, processor: Any) -> int:
    """The side crops are capped at, as the detect stage caps them (the processor's size)."""
    size = getattr(processor.image_processor, "size", None) or {}
    if isinstance(size, dict) and size:
        return max(int(v) for v in size.values())
    return int(model.config.vision_config.image_size)
