"""Where the weights are and which device and threads run them.

Real weights are local paths in the settings (``resolve_path`` is the one place they become
absolute); nothing is downloaded. When the path of a model that runs is empty, the tiny random
stand-ins of stages/tiny.py are written once under ``data_dir/tiny-models`` and loaded by the
same code as real weights.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..common import cores
from ..common.cores import cpu_count
from ..common.errors import ModelError
from ..common.settings import Settings
from ..common.topology import TRACK, pipeline
from .tiny import TINY_DIR, ensure_tiny_models, tiny_paths

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class ModelPaths:
    """The three model locations a pipeline loads."""

    detector: Path
    upscaler: Path
    scorer: Path
    tiny: bool = False


def resolve_device(settings: Settings) -> str:
    """The torch device string: 'auto' picks cuda when available, else cpu."""
    if settings.device != "auto":
        return "cuda:0" if settings.device == "cuda" else settings.device
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"


def use_half(settings: Settings, device: str) -> bool:
    """fp16 only on CUDA, and only when the settings ask for it."""
    return bool(settings.half) and device.startswith("cuda")


# How the cores are shared (common/cores.py): score (SigLIP-large, the slowest real-size
# model) weighs 2, detect and upscale 1 each. ``threads_policy`` static keeps each stage on its
# share; follow (the default) re-decides before every batch from the other stages' backlogs.
THREAD_SHARES = {st: cores.SHARES[st] for st in ("detect", "upscale", "score")}


def threads_for(settings: Settings, stage: str | None = None) -> int:
    """Intra-op threads a stage's process starts with: ``torch_threads`` when set; else the
    stage's static share of the cores, at least 1 (2 cores: 1 each; 16: detect 4, upscale 4,
    score 8; with upscaling off, detect a third and score two thirds). ``stage=None`` is a
    process that runs every stage (the in-process reference): all cores. With
    ``threads_policy`` follow the worker changes it per batch (``apply_threads``)."""
    if settings.torch_threads > 0:
        return settings.torch_threads
    stages = pipeline(settings)
    if stage in THREAD_SHARES and stage not in stages and TRACK in stages:
        stage = TRACK  # the upscaler and scorer inside track mode's track stage
    return cores.static_threads(cpu_count(), stage, stages)


def export_threads(settings: Settings, stage: str | None = None) -> int:
    """Intra-op threads a stage loads its exported model with: ``threads_for``, except under
    threads_policy follow with no copies allowed (``follow_copy_max_mb`` 0): every core, so
    the one loaded model is never loaded again for the count follow gives a stage alone."""
    if (settings.torch_threads <= 0 and settings.threads_policy == "follow"
            and settings.follow_copy_max_mb == 0):
        return cpu_count()
    return threads_for(settings, stage)


def set_threads(settings: Settings, stage: str | None = None) -> int:
    """Set torch's (and OpenCV's) thread count for this process; returns it.

    Stages on one CPU that each used every core would fight: an OpenMP team that shares its
    cores with another busy process waits on its slowest thread (measured on 2 cores,
    SigLIP-large: 2 threads 11 s alone but 22 s beside a busy process; 1 thread 20 s either
    way; docs/performance.md)."""
    n = threads_for(settings, stage)
    apply_threads(n)
    return n


def apply_threads(n: int, engines: Sequence[Any] = (), copy_max_mb: int | None = None) -> int:
    """Run the next batch on ``n`` threads: the exported ``engines`` (each keeps a compiled
    model per thread count it was asked for, unless its weights are over ``copy_max_mb``:
    then it keeps its first count), else torch; OpenCV either way. Returns the count the
    model runs on (the fewest of the engines')."""
    import cv2

    cv2.setNumThreads(n)
    if engines:
        limit = None if copy_max_mb is None else copy_max_mb * 1024 * 1024
        counts = [engine.use_threads(n, limit) for engine in engines]
        return min((c for c in counts if c > 0), default=n)  # 0: the runtime's own default
    import torch

    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def crop_cap(settings: Settings, paths: ModelPaths) -> int:
    """The side crops are capped at when they are cut: the scorer's input size when nothing
    upscales them (a larger crop is only shrunk again), else 0 (uncapped)."""
    return 0 if settings.upscale else scorer_input_size(settings, paths.scorer)


# --- where the weights are --------------------------------------------------------------------
MODELS = ("detector", "upscaler", "scorer")
WEIGHT_KEYS = {"detector": "detector_weights", "upscaler": "upscaler_weights",
               "scorer": "scorer_dir"}


def resolve_path(value: str | Path, base: str | Path | None = None) -> Path:
    """The one place a configured path becomes a location: ``~`` expanded, a relative path
    taken relative to ``base`` (the packaged demo models: the repository) or else to the
    working directory, as the user typed it; made absolute, so that every stage, command and
    child process finds the same file (and the export beside it) wherever it was started."""
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = Path(base if base is not None else Path.cwd()) / path
    return Path(os.path.abspath(path))


def used_models(settings: Settings) -> tuple[str, ...]:
    """The models a pipeline with these settings runs: the upscaler only with upscaling on."""
    return tuple(m for m in MODELS if m != "upscaler" or settings.upscale)


def resolve_weights(settings: Settings, models: Sequence[str] | None = None) -> ModelPaths:
    """The configured model paths, absolute (``resolve_path``). A model of ``models`` (default:
    ``used_models``) with no path falls back to the tiny random stand-ins, written once under
    ``data_dir/tiny-models``; nothing is written, and nothing said about them, when every
    model that runs has a path (the others' fields then name stand-ins that may not exist)."""
    need = used_models(settings) if models is None else tuple(models)
    given = {m: getattr(settings, WEIGHT_KEYS[m]) for m in MODELS}
    for model, value in given.items():
        if value and not _is_bundled_yaml(value) and not resolve_path(value).exists():
            raise ModelError(f"{WEIGHT_KEYS[model]} {value!r} does not exist (weights are "
                             f"local paths; nothing is downloaded)")
    directory = resolve_path(settings.data_dir) / TINY_DIR
    missing = [m for m in need if not given[m]]
    tiny = ensure_tiny_models(directory) if missing else tiny_paths(directory)
    if missing:
        _warn_once("using tiny RANDOM models for %s (from %s): boxes and scores are arbitrary; "
                   "set SPOTLINE_DETECTOR_WEIGHTS / _UPSCALER_WEIGHTS / _SCORER_DIR for real "
                   "results", ", ".join(WEIGHT_KEYS[m] for m in missing), directory)
    paths = {m: tiny[m] if not value else Path(value) if _is_bundled_yaml(value)
             else resolve_path(value) for m, value in given.items()}
    return ModelPaths(**paths, tiny=bool(missing))


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


