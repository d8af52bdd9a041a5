"""Pipeline stages: model work only. Each stage is one module named after it."""

from __future__ import annotations

import importlib

from ..common.errors import ConfigError
from ..common.settings import Settings
from ..common.topology import ALL_STAGES
from .base import RESULT, Routed, Stage

# Imported lazily: loading a stage pulls in its model library.
STAGE_CLASSES = {name: f"{__name__}.{name}:{name.title()}" for name in ALL_STAGES}


def load_stage(name: str, settings: Settings, class_path: str | None = None) -> Stage:
    """Instantiate the stage for ``name`` (or a custom ``module:Class`` implementing Stage)."""
    path = class_path or STAGE_CLASSES.get(name)
    if path is None:
        raise ConfigError(f"unknown stage {name!r}; choose from {', '.join(STAGE_CLASSES)}")
    module_name, _, cls_name = path.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), cls_name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot load stage class {path!r}: {exc}") from None
    stage = cls(settings)
    if not isinstance(stage, Stage):
        raise ConfigError(f"{path} is not a Stage")
    if stage.name != name:
        raise ConfigError(f"{path} reads the {stage.name!r} inbox, not {name!r}")
    return stage


__all__ = ["RESULT", "Routed", "Stage", "STAGE_CLASSES", "load_stage"]
