"""`spotline finetune scorer`: the seed's SigLIP recipe on caption/crop pairs of a TIL dataset.

- Crops are cut from the ground-truth boxes by the pipeline's own code (spotline.data.crops),
  with a small random jitter of the box (detections are never exact) and, per batch, a few
  background crops that no caption names. A batch holds every object of the images it takes,
  so the other objects of an image (same colour or same shape) are in-batch hard negatives.
- Loss: the seed's sigmoid loss (spotline.train.loss) with a caption-equality label matrix.
- Optimiser: AdamW (lr 2e-5 to fine-tune, the seed's; 5e-4 from scratch), weight decay 1e-4,
  β2 0.99, cosine decay after a short warm-up, gradient accumulation, fp16/bf16 autocast only
  on CUDA.
- Each epoch writes ``OUT/epoch_NNN/``: a save_pretrained directory (model, tokenizer, image
  processor) that the score stage loads unchanged, plus the optimiser state for ``--resume``.
  The last epoch is also copied to ``OUT/scorer/``. Validation retrieval accuracy (the right
  crop for each caption among its image's crops) is reported after every epoch.

From scratch, transformers initialises ``logit_scale`` and ``logit_bias`` to 0 and a small
SigLIP then stays at chance (measured, shared/SEED-FACTS.md); the SigLIP paper's init
(scale log 10, bias -10) is used instead.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from spotline.common.errors import InputError, ModelError
from spotline.common.settings import Settings
from spotline.data.crops import CropMaker, load_rgb
from spotline.data.synth import refuse_heldout
from spotline.producer.dataset import Box, TilImage, read_dataset
from spotline.train import augment
from spotline.train.loss import caption_labels, sigmoid_loss
from spotline.train.siglip import crop_side, load_for_training, save_scorer, write_scratch_scorer

log = logging.getLogger(__name__)

FINETUNE_LR = 2e-5  # the seed's
SCRATCH_LR = 5e-4  # measured here: a 1 M-parameter SigLIP from scratch (SEED-FACTS.md)
STATE_FILE = "training_state.pt"
TRAINER_FILE = "trainer.json"
FINAL_DIR = "scorer"



@dataclass
class ScorerRun:
    """One fine-tuning run of the scorer (the CLI's options)."""

    train: str
    out: str
    val: str | None = None
    base: str | None = None  # a local SigLIP save_pretrained directory
    from_scratch: bool = False
    epochs: int = 10
    batch: int = 96  # crops per micro-batch
    accum: int = 1  # micro-batches per optimiser step
    lr: float | None = None  # default: FINETUNE_LR, or SCRATCH_LR from scratch
    weight_decay: float = 1e-4
    beta2: float = 0.99
    warmup: float = 0.05  # fraction of the optimiser steps
    augment: float = 0.25  # noise strength (1.0: the seed's augv2 variance 500–5000)
    jitter: float = 0.1  # box sides move by up to this fraction of the box size
    background: float = 0.1  # share of each batch that is background crops
    hard_negatives: float = 0.5  # of those, the share cut at a line's "negatives" when it has any
    image_size: int = 32  # from scratch: the crop side the new model sees (patch 8)
    upscaler: str | None = None  # Real-ESRGAN .pth: crops upscaled as the pipeline does
    resume: str | None = None  # an OUT/epoch_NNN directory
    keep: int = 2  # epoch directories kept (older ones are removed)
    threads: int = 2
    seed: int = 0
    skip_bad: bool = False
    progress: bool = True
    device: str = "auto"

    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (SCRATCH_LR if self.from_scratch
                                                    else FINETUNE_LR)


@dataclass
class EpochReport:
    epoch: int
    steps: int
    loss: float
    val_accuracy: float | None
    seconds: float


@dataclass
class ScorerResult:
    out: Path
    final: Path
    epochs: list[EpochReport] = field(default_factory=list)


# --- data --------------------------------------------------------------------------------------
class CropSampler:
    """Batches of (crop, caption or None) from a dataset's images held in memory."""

    def __init__(self, records: list[TilImage], maker: CropMaker, run: ScorerRun,
                 rng: np.random.Generator) -> None:
        self.records = records
        self.images = [load_rgb(r.image_path) for r in records]
        self.maker = maker
        self.run = run
        self.rng = rng
        self.aug = augment.crop_augmentations(run.augment, seed=int(rng.integers(2**31)))
        objects = sum(len(r.annotations) for r in records)
        self.per_image = max(1.0, objects / max(1, len(records)))

    def steps_per_epoch(self) -> int:
        crops = sum(len(r.annotations) for r in self.records)
        return max(1, math.ceil(crops / (self.run.batch * (1 - self.run.background))))

    def batch(self) -> tuple[list[np.ndarray], list[str | None]]:
        """Every object of randomly chosen images, jittered and augmented, plus background."""
        run = self.run
        n_bg = int(round(run.batch * run.background))
        crops: list[np.ndarray] = []
        captions: list[str | None] = []
        order = self.rng.permutation(len(self.records))
        for i in order:
            record = self.records[int(i)]
            if crops and len(crops) + len(record.annotations) > run.batch - n_bg:
                break
            for caption, box in record.annotations:
                crops.append(self._crop(int(i), self._jitter(box, record)))
                captions.append(caption)
        while len(crops) < run.batch:
            i = int(self.rng.integers(len(self.records)))
            box = self._background_box(self.records[i])
            if box is not None:
                crops.append(self._crop(i, box))
                captions.append(None)
        return crops, captions

    def _crop(self, i: int, box: Box) -> np.ndarray:
        crop = self.maker(self.images[i], box)
        return augment.apply(self.aug, crop) if self.run.augment >= 0 else crop

    def _jitter(self, box: Box, record: TilImage) -> Box:
        left, top, w, h = box
        j = self.run.jitter
        dl, dt, dr, db = self.rng.uniform(-j, j, 4) * np.array([w, h, w, h])
        x1 = min(max(0.0, left + dl), record.width - 1.0)
        y1 = min(max(0.0, top + dt), record.height - 1.0)
        x2 = max(min(float(record.width), left + w + dr), x1 + 1)
        y2 = max(min(float(record.height), top + h + db), y1 + 1)
        return (x1, y1, x2 - x1, y2 - y1)

    def _background_box(self, record: TilImage) -> Box | None:
        """A crop that no caption names: with ``hard_negatives``' chance one of the line's
        ``negatives`` (clutter, the detector's own false detections), jittered; else a box
        of object size that overlaps no object much."""
        from spotline.eval import iou_ltwh

        if record.negatives and self.rng.random() < self.run.hard_negatives:
            box = record.negatives[int(self.rng.integers(len(record.negatives)))]
            return self._jitter(box, record)
        sizes = [max(b[2], b[3]) for _, b in record.annotations] or [32.0]
        side = float(self.rng.choice(sizes)) * self.rng.uniform(0.7, 1.3)
        w = max(4.0, side * self.rng.uniform(0.8, 1.2))
        h = max(4.0, side * self.rng.uniform(0.8, 1.2))
        if w >= record.width or h >= record.height:
            return None
        box = (float(self.rng.uniform(0, record.width - w)),
               float(self.rng.uniform(0, record.height - h)), w, h)
        if any(iou_ltwh(box, b) > 0.2 for _, b in record.annotations):
            return None
        return box


# --- the training loop -------------------------------------------------------------------------
def check_run(run: ScorerRun) -> None:
    """Refuse a run that cannot start, before any work: no model, empty split, bad numbers."""
    if bool(run.base) == run.from_scratch:
        raise InputError("give a local SigLIP directory (--base) or --from-scratch (one of them)")
    if run.base and not Path(run.base).is_dir():
        raise ModelError(f"scorer directory {run.base} does not exist (weights are local paths; "
                         "nothing is downloaded)")
    if run.epochs < 1 or run.batch < 2 or run.accum < 1:
        raise InputError("epochs >= 1, batch >= 2 and accum >= 1 are needed")
    if not 0 <= run.background < 0.9:
        raise InputError(f"background share must be in [0, 0.9), got {run.background}")
    if not 0 <= run.hard_negatives <= 1:
        raise InputError(f"hard-negative share must be in [0, 1], got {run.hard_negatives}")


def _records(path: str, skip_bad: bool, what: str) -> list[TilImage]:
    refuse_heldout(path)  # the held-out family is for evaluation only
    report = read_dataset(path, skip_bad=skip_bad)
    if report.skipped:
        log.warning("%s", report.summary())
    records = [r for r in report.records if r.annotations]
    if not records:
        raise InputError(f"the {what} split {path} has no annotated images")
    return records


def _device(run: ScorerRun) -> str:
    import torch

    if run.device != "auto":
        return run.device
    return "cuda:0" if torch.cuda.is_available() else "cpu"


def _pooled(out: Any) -> Any:
    if hasattr(out, "pooler_output"):
        return out.pooler_output
    return out[1] if isinstance(out, tuple) else out


class Trainer:
    """The state of one run: model, optimiser, schedule, data."""

    def __init__(self, run: ScorerRun, settings: Settings,
                 on_progress: Callable[[dict[str, Any]], None] | None = None) -> None:
        import torch

        check_run(run)
        self.run, self.settings, self.on_progress = run, settings, on_progress
        torch.set_num_threads(max(1, run.threads))
        self.train_records = _records(run.train, run.skip_bad, "training")
        self.val_records = _records(run.val, run.skip_bad, "validation") if run.val else []
        self.device = _device(run)
        self.out = Path(run.out)
        self.out.mkdir(parents=True, exist_ok=True)
        start_dir = self._start_dir()
        self.model, self.processor = load_for_training(start_dir, self.device)
        torch.manual_seed(run.seed)
        self.rng = np.random.default_rng(run.seed)
        cap = crop_side(self.model, self.processor)
        self.maker = CropMaker(settings, cap, run.upscaler)
        self.sampler = CropSampler(self.train_records, self.maker, run, self.rng)
        self.steps_per_epoch = math.ceil(self.sampler.steps_per_epoch() / run.accum)
        self.total_steps = self.steps_per_epoch * run.epochs
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=run.learning_rate(),
                                           betas=(0.9, run.beta2),
                                           weight_decay=run.weight_decay)
        warm = max(1, int(self.total_steps * run.warmup))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warm) * 0.5 *
            (1 + math.cos(math.pi * min(1.0, s / max(1, self.total_steps)))))
        self.epoch = 0
        self.step = 0
        self.amp = self.device.startswith("cuda")
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp and not self._bf16())
        tok = self.processor.tokenizer
        self.max_length = min(int(tok.model_max_length or 64),
                              int(self.model.config.text_config.max_position_embeddings))
        if run.resume:
            self._load_state(Path(run.resume))

    def _start_dir(self) -> Path:
        run = self.run
        if run.resume:
            if not (Path(run.resume) / STATE_FILE).is_file():
                raise InputError(f"{run.resume} is not a checkpoint of this trainer (no "
                                 f"{STATE_FILE})")
            return Path(run.resume)
        if run.from_scratch:
            return write_scratch_scorer(self.out / "init", run.image_size, run.seed)
        return Path(run.base)  # type: ignore[arg-type]

    def _bf16(self) -> bool:
        import torch

        return self.amp and torch.cuda.is_bf16_supported()

    # --- one step ------------------------------------------------------------------------------
    def loss_on(self, crops: list[np.ndarray], captions: list[str | None]) -> Any:
        """The sigmoid loss of one micro-batch."""
        import torch

        rows = sorted({c for c in captions if c is not None})
        labels = caption_labels(rows, captions).to(self.device)
        pixels = self.processor.image_processor(images=crops, return_tensors="pt",
                                                input_data_format="channels_last")
        prompts = [self.settings.prompt.format(caption=c) for c in rows]
        enc = self.processor.tokenizer(prompts, padding="max_length", truncation=True,
                                       max_length=self.max_length, return_tensors="pt")
        dtype = torch.bfloat16 if self._bf16() else torch.float16
        with torch.autocast("cuda", dtype=dtype, enabled=self.amp):
            image = _pooled(self.model.get_image_features(
                pixel_values=pixels["pixel_values"].to(self.device)))
            text = _pooled(self.model.get_text_features(
                input_ids=enc["input_ids"].to(self.device)))
        image = image.float() / image.float().norm(dim=-1, keepdim=True)
        text = text.float() / text.float().norm(dim=-1, keepdim=True)
        logits = text @ image.t() * self.model.logit_scale.float().exp() \
            + self.model.logit_bias.float()
        return sigmoid_loss(logits, labels)

    def train_epoch(self) -> EpochReport:
        from tqdm import tqdm

        self.model.train()
        started = time.monotonic()
        losses: list[float] = []
        bar = tqdm(range(self.steps_per_epoch), disable=not self.run.progress, unit="step",
                   desc=f"scorer epoch {self.epoch + 1}/{self.run.epochs}")
        for _ in bar:
            self.optimizer.zero_grad(set_to_none=True)
            total = 0.0
            for _micro in range(self.run.accum):
                loss = self.loss_on(*self.sampler.batch()) / self.run.accum
                self.scaler.scale(loss).backward()
                total += float(loss.detach())
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            self.step += 1
            losses.append(total)
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
            self._report({"phase": "train", "epoch": self.epoch + 1, "step": self.step,
                          "total_steps": self.total_steps, "loss": round(total, 4)})
        self.epoch += 1
        val = self.validate() if self.val_records else None
        report = EpochReport(self.epoch, self.step, float(np.mean(losses)), val,
                             time.monotonic() - started)
        self._checkpoint(report)
        return report

    def _report(self, info: dict[str, Any]) -> None:
        if self.on_progress is not None:
            self.on_progress(info)

    # --- validation ----------------------------------------------------------------------------
    def validate(self) -> float:
        """Retrieval accuracy on the validation split: for each caption, is its own crop the
        best-scoring among its image's ground-truth crops?"""
        return retrieval_accuracy(self.model, self.processor, self.val_records, self.maker,
                                  self.settings.prompt, self.max_length, self.device)

    # --- checkpoints ---------------------------------------------------------------------------
    def _checkpoint(self, report: EpochReport) -> Path:
        import torch

        directory = self.out / f"epoch_{self.epoch:03d}"
        self.model.eval()
        save_scorer(self.model, self.processor, directory)
        torch.save({"optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "scaler": self.scaler.state_dict()}, directory / STATE_FILE)
        state = {"epoch": self.epoch, "step": self.step, "run": asdict(self.run),
                 "report": asdict(report), "rng": self.rng.bit_generator.state}
        (directory / TRAINER_FILE).write_text(json.dumps(state, indent=1, default=str))
        epochs = sorted(self.out.glob("epoch_[0-9][0-9][0-9]"))
        for old in epochs[:-self.run.keep] if self.run.keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        return directory

    def _load_state(self, directory: Path) -> None:
        import torch

        state = torch.load(directory / STATE_FILE, map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        info = json.loads((directory / TRAINER_FILE).read_text())
        self.epoch, self.step = int(info["epoch"]), int(info["step"])
        self.rng.bit_generator.state = info["rng"]

    def finish(self) -> Path:
        """Copy the last epoch's model to OUT/scorer (without the optimiser state)."""
        last = self.out / f"epoch_{self.epoch:03d}"
        final = self.out / FINAL_DIR
        tmp = self.out / f".{FINAL_DIR}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(last, tmp, ignore=shutil.ignore_patterns(STATE_FILE))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        shutil.rmtree(self.out / "init", ignore_errors=True)
        return final


def retrieval_accuracy(model: Any, processor: Any, records: list[TilImage], maker: CropMaker,
                       prompt: str, max_length: int, device: str) -> float:
    """Mean over captions of [its own crop scores highest among its image's crops]."""
    import torch

    model.eval()
    hits = total = 0
    with torch.inference_mode():
        for record in records:
            rgb = load_rgb(record.image_path)
            crops = [maker(rgb, box) for _, box in record.annotations]
            pixels = processor.image_processor(images=crops, return_tensors="pt",
                                               input_data_format="channels_last")
            enc = processor.tokenizer([prompt.format(caption=c) for c in record.captions],
                                      padding="max_length", truncation=True,
                                      max_length=max_length, return_tensors="pt")
            image = _pooled(model.get_image_features(
                pixel_values=pixels["pixel_values"].to(device))).float()
            text = _pooled(model.get_text_features(input_ids=enc["input_ids"].to(device))).float()
            scores = (text / text.norm(dim=-1, keepdim=True)) @ \
                (image / image.norm(dim=-1, keepdim=True)).t()
            best = scores.argmax(dim=1).cpu().numpy()
            hits += int((best == np.arange(len(record.captions))).sum())
            total += len(record.captions)
    model.train()
    return hits / max(1, total)


def finetune_scorer(run: ScorerRun, settings: Settings,
                    on_progress: Callable[[dict[str, Any]], None] | None = None,
                    say: Callable[[str], None] = print) -> ScorerResult:
    """Run every epoch (after ``--resume``'s), then write OUT/scorer."""
    trainer = Trainer(run, settings, on_progress)
    say(f"scorer: {len(trainer.train_records)} training images, "
        f"{len(trainer.val_records)} validation images, {trainer.steps_per_epoch} steps per "
        f"epoch, lr {run.learning_rate():g}, device {trainer.device}")
    result = ScorerResult(trainer.out, trainer.out / FINAL_DIR)
    while trainer.epoch < run.epochs:
        report = trainer.train_epoch()
        result.epochs.append(report)
        val = "-" if report.val_accuracy is None else f"{report.val_accuracy:.4f}"
        say(f"epoch {report.epoch}/{run.epochs}: loss {report.loss:.4f}, validation retrieval "
            f"accuracy {val}, {report.seconds:.0f} s")
        if on_progress is not None:
            on_progress({"phase": "epoch", **asdict(report)})
    trainer.finish()
    return result
