"""The model libraries' quirks, handled in one place: keep them offline, alias the module
torchvision removed, and find the photos Ultralytics ships."""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path

from ..common.errors import ModelError
from ..common.images import undo_ultralytics_pil_patch

__all__ = ["offline_env", "quiet_library_defaults", "torchvision_shim", "ultralytics_assets",
           "undo_ultralytics_pil_patch"]

# transformers 5 prints a config (a debug line it builds even when nothing shows it) by
# comparing it with a default SiglipTextConfig(), whose own bos/eos ids (49406, 49407) lie
# outside its own vocabulary (32000): every SigLIP load, of any checkpoint, then warns about
# the library's defaults, not about the model loaded. Only those two lines are dropped.
_DEFAULT_SIGLIP_WARNING = re.compile(
    r"Model config: (bos|eos)_token_id must be `None` or an integer within the vocabulary "
    r"\(between 0 and 31999\), got 4940[67]\.")


def offline_env() -> None:
    """Tell the model libraries not to reach the network, nor to draw progress bars or warn
    about their own defaults (call before importing them)."""
    for name in ("YOLO_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(name, "1")
    os.environ.setdefault("YOLO_VERBOSE", "False")
    # no "Loading weights" bar on every start of a worker (nothing is downloaded anyway)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    quiet_library_defaults()


class _LibraryDefaultsFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _DEFAULT_SIGLIP_WARNING.match(record.getMessage())


def quiet_library_defaults() -> None:
    """Drop transformers' warnings about its own default SigLIP config (see above); any
    warning about the loaded model's config still shows."""
    logger = logging.getLogger("transformers.configuration_utils")
    if not any(isinstance(f, _LibraryDefaultsFilter) for f in logger.filters):
        logger.addFilter(_LibraryDefaultsFilter())


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
