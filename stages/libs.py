"""The model libraries' quirks, handled in one place: keep them offline, alias the module
torchvision removed, and find the photos Ultralytics ships."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ..common.errors import ModelError
from ..common.images import undo_ultralytics_pil_patch

__all__ = ["offline_env", "torchvision_shim", "ultralytics_assets", "undo_ultralytics_pil_patch"]


def offline_env() -> None:
    """Tell the model libraries not to reach the network (call before importing them)."""
    for name in ("YOLO_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(name, "1")
    os.environ.setdefault("YOLO_VERBOSE", "False")


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
