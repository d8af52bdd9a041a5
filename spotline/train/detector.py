"""`spotline finetune detector`: a TIL dataset → an Ultralytics single-class dataset → the
seed's YOLO recipe (AdamW lr 1e-3, cosine; optionally an image-size schedule such as the
seed's 1280 then 1600) with its noise augmentations; writes ``OUT/detector.pt``, which the
detect stage loads unchanged, and reports validation mAP50.

Ultralytics hands its albumentations hook BGR images (it reads with OpenCV), so only
transforms that do not depend on the channel order are used there (spotline.train.augment);
the synthetic scenes carry ISO noise already.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from spotline.common.errors import InputError, ModelError
from spotline.data.synth import refuse_heldout
from spotline.producer.dataset import TilImage, read_dataset
from spotline.train import augment

log = logging.getLogger(__name__)

FINAL_FILE = "detector.pt"
CLASS_NAME = "object"
# A YOLOv8 narrower than "n" (width 0.125, depth 0.33): about a quarter of its FLOPs, enough
# for the synthetic shapes on a shared 2-core CPU.
PICO_SCALE = [0.33, 0.125, 256]


@dataclass
class DetectorRun:
    """One fine-tuning run of the detector (the CLI's options)."""

    train: str
    out: str
    val: str | None = None  # default: the last val_fraction of the training split
    val_fraction: float = 0.1
    model: str = "yolov8n.yaml"  # an architecture (from scratch) or a .pt to fine-tune
    epochs: int = 20
    imgsz: int = 640
    schedule: list[tuple[int, int]] = field(default_factory=list)  # (imgsz, epochs) phases
    batch: int = 16
    lr: float = 1e-3
    weight_decay: float = 5e-4
    noise: bool = True  # the seed's noise augmentations
    mosaic: float = 1.0
    workers: int = 0
    threads: int = 2
    seed: int = 0
    device: str = "auto"
    skip_bad: bool = False
    resume: bool = False  # continue OUT's interrupted phase from its last.pt
    progress: bool = True

    def phases(self) -> list[tuple[int, int]]:
        return list(self.schedule) or [(self.imgsz, self.epochs)]


@dataclass
class DetectorResult:
    weights: Path
    map50: float
    map50_95: float
    epochs: int


def parse_schedule(text: str | None) -> list[tuple[int, int]]:
    """``"1280:55,1600:7"`` → [(1280, 55), (1600, 7)]."""
    if not text:
        return []
    phases = []
    for part in text.split(","):
        try:
            size, epochs = (int(v) for v in part.split(":"))
        except ValueError:
            raise InputError(f"image-size schedule must look like 1280:55,1600:7, got {text!r}"
                             ) from None
        if size < 32 or epochs < 1:
            raise InputError(f"schedule phase {part!r}: size >= 32 and epochs >= 1 needed")
        phases.append((size, epochs))
    return phases


# --- the Ultralytics dataset -------------------------------------------------------------------
def yolo_labels(record: TilImage) -> str:
    """One label file's text: ``0 cx cy w h`` normalised, one line per box."""
    lines = []
    for _caption, (left, top, w, h) in record.annotations:
        cx, cy = (left + w / 2) / record.width, (top + h / 2) / record.height
        lines.append(f"0 {cx:.6f} {cy:.6f} {w / record.width:.6f} {h / record.height:.6f}")
    return "".join(line + "\n" for line in lines)


def _link(src: Path, dst: Path) -> None:
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def write_yolo_dataset(train: list[TilImage], val: list[TilImage], root: Path) -> Path:
    """images/{train,val} (hard links or copies), labels/{train,val}, data.yaml; returns it."""
    import yaml

    for split, records in (("train", train), ("val", val)):
        images, labels = root / "images" / split, root / "labels" / split
        shutil.rmtree(images, ignore_errors=True)
        shutil.rmtree(labels, ignore_errors=True)
        images.mkdir(parents=True)
        labels.mkdir(parents=True)
        for n, record in enumerate(records):
            stem = f"{n:06d}_{record.image_path.stem}"
            _link(record.image_path, images / f"{stem}{record.image_path.suffix}")
            (labels / f"{stem}.txt").write_text(yolo_labels(record))
    data = {"path": str(root.resolve()), "train": "images/train", "val": "images/val",
            "names": {0: CLASS_NAME}}
    path = root / "data.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def split_records(run: DetectorRun) -> tuple[list[TilImage], list[TilImage]]:
    """(train, val) records; errors before any work on an empty split."""
    for path in (run.train, run.val):
        if path:
            refuse_heldout(path)  # the held-out family is for evaluation only
    report = read_dataset(run.train, skip_bad=run.skip_bad)
    if report.skipped:
        log.warning("%s", report.summary())
    records = report.records
    if run.val:
        val_report = read_dataset(run.val, skip_bad=run.skip_bad)
        train, val = records, val_report.records
    else:
        n_val = max(1, int(round(len(records) * run.val_fraction))) if len(records) > 1 else 0
        train, val = records[:len(records) - n_val], records[len(records) - n_val:]
    if not train:
        raise InputError(f"the training split {run.train} has no images")
    if not val:
        raise InputError("the validation split is empty (give --val or more images)")
    return train, val


# --- training ----------------------------------------------------------------------------------
def _device(run: DetectorRun) -> str:
    import torch

    if run.device != "auto":
        return run.device
    return "0" if torch.cuda.is_available() else "cpu"


def build_model(spec: str, out: Path) -> Any:
    """A YOLO from a .pt (fine-tune), an architecture .yaml, or 'pico' (YOLOv8 at PICO_SCALE,
    written as OUT/yolov8-pico.yaml)."""
    from spotline.stages.detect import load_detector

    if spec == "pico":
        import yaml
        from ultralytics.nn.tasks import yaml_model_load

        cfg = {k: v for k, v in yaml_model_load("yolov8n.yaml").items()
               if k not in ("scale", "yaml_file", "ch")}
        cfg.update(nc=1, scales={"p": PICO_SCALE})
        spec = str(out / "yolov8-pico.yaml")
        Path(spec).write_text(yaml.safe_dump(cfg, sort_keys=False))
    elif not spec.endswith((".yaml", ".yml")) and not Path(spec).is_file():
        raise ModelError(f"detector {spec} does not exist (weights are local paths; nothing is "
                         "downloaded)")
    return load_detector(spec)


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    """Ultralytics sets torch's threads from its NUM_THREADS: make that ours."""
    import torch
    from ultralytics.utils import torch_utils

    before, saved = torch.get_num_threads(), torch_utils.NUM_THREADS
    torch.set_num_threads(n)
    torch_utils.NUM_THREADS = n
    try:
        yield
    finally:
        torch_utils.NUM_THREADS = saved
        torch.set_num_threads(before)


def train_args(run: DetectorRun, data: Path, imgsz: int, epochs: int, project: Path,
               name: str) -> dict[str, Any]:
    """The keyword arguments of one Ultralytics ``train`` phase."""
    device = _device(run)
    args: dict[str, Any] = dict(
        data=str(data), epochs=epochs, imgsz=imgsz, batch=run.batch, optimizer="AdamW",
        lr0=run.lr, weight_decay=run.weight_decay, cos_lr=True, single_cls=True,
        project=str(project.resolve()), name=name, exist_ok=True, workers=run.workers,
        device=device, seed=run.seed, deterministic=False, plots=False, amp=device != "cpu",
        mosaic=run.mosaic, close_mosaic=max(1, epochs // 5), warmup_epochs=min(3.0, epochs / 5),
        flipud=0.5, fliplr=0.5, verbose=False, val=True, patience=1000)
    if run.noise:
        args["augmentations"] = augment.detector_augmentations()
    return args


def finetune_detector(run: DetectorRun,
                      on_progress: Callable[[dict[str, Any]], None] | None = None,
                      say: Callable[[str], None] = print) -> DetectorResult:
    """Convert, train every phase of the schedule, copy the best weights to OUT/detector.pt."""
    from spotline.stages.detect import load_detector

    train, val = split_records(run)
    out = Path(run.out)
    out.mkdir(parents=True, exist_ok=True)
    data = write_yolo_dataset(train, val, out / "dataset")
    model = build_model(run.model, out)  # errors before any training
    say(f"detector: {len(train)} training images, {len(val)} validation images, phases "
        f"{run.phases()} (imgsz, epochs), lr {run.lr:g}, device {_device(run)}")
    done = 0
    weights = Path()
    for k, (imgsz, epochs) in enumerate(run.phases()):
        name = f"phase{k + 1}"
        last = out / name / "weights" / "last.pt"
        if k > 0:
            model = load_detector(weights)
        _add_progress(model, on_progress, done, sum(e for _, e in run.phases()), say)
        with _threads(run.threads):
            if run.resume and last.is_file():
                model = load_detector(last)
                model.train(resume=True)
            else:
                model.train(**train_args(run, data, imgsz, epochs, out, name))
        best = out / name / "weights" / "best.pt"
        weights = best if best.is_file() else last
        done += epochs
    final = out / FINAL_FILE
    shutil.copyfile(weights, final)
    map50, map5095 = validate(final, data, run.phases()[-1][0], run)
    say(f"detector: validation mAP50 {map50:.4f}, mAP50-95 {map5095:.4f} -> {final}")
    return DetectorResult(final, map50, map5095, done)


def _add_progress(model: Any, on_progress: Callable[[dict[str, Any]], None] | None,
                  done_before: int, total: int, say: Callable[[str], None]) -> None:
    def epoch_end(trainer: Any) -> None:
        if trainer.epoch >= trainer.epochs:  # its final validation calls it once more
            return
        metrics = {k: float(v) for k, v in (trainer.metrics or {}).items()
                   if isinstance(v, (int, float, np.floating))}
        info = {"phase": "epoch", "epoch": done_before + trainer.epoch + 1, "epochs": total,
                "map50": metrics.get("metrics/mAP50(B)"), "loss": _loss_sum(trainer)}
        say(f"detector epoch {info['epoch']}/{total}: mAP50 {info['map50'] or 0:.4f}, "
            f"loss {info['loss'] or 0:.4f}")
        if on_progress is not None:
            on_progress(info)

    model.add_callback("on_fit_epoch_end", epoch_end)


def _loss_sum(trainer: Any) -> float | None:
    """The epoch's mean training loss, summed over its parts (a dict on Ultralytics 8.4, a
    tensor before)."""
    tloss = getattr(trainer, "tloss", None)
    if tloss is None:
        return None
    if isinstance(tloss, dict):
        return float(sum(float(v) for v in tloss.values()))
    return float(tloss.sum())


def validate(weights: Path, data: Path, imgsz: int, run: DetectorRun) -> tuple[float, float]:
    """(mAP50, mAP50-95) of a .pt on the dataset's val split, loaded as the detect stage does."""
    from spotline.stages.detect import load_detector

    model = load_detector(weights)
    with _threads(run.threads):
        metrics = model.val(data=str(data), imgsz=imgsz, batch=run.batch, device=_device(run),
                            workers=run.workers, plots=False, verbose=False, single_cls=True,
                            project=str((Path(run.out) / "val").resolve()), exist_ok=True)
    return float(metrics.box.map50), float(metrics.box.map)
