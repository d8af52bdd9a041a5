"""Which extra brings a library spotline imports only when a role needs it (docs/install.md).

The core install runs the gateway, the collector, the sinks, the feeds and workers on exported
models; a model framework comes with an extra. A command or worker that reaches for a library
that is not installed says, in one line, which extra to add, instead of a traceback.
"""

from __future__ import annotations

from .errors import SpotlineError

# top-level module -> the extra that installs it
EXTRAS = {
    "torch": "torch", "torchvision": "torch", "ultralytics": "torch", "transformers": "torch",
    "safetensors": "torch", "lap": "torch",
    "realesrgan": "realesrgan", "basicsr": "realesrgan",
    "openvino": "openvino",
    "onnxruntime": "onnx",
    "onnx": "export",
    "nncf": "int8",
    "albumentations": "train", "scipy": "train",
    "matplotlib": "bench", "psutil": "bench",
    "paho": "mqtt",
}


# the model a stage loads (track mode's track stage loads the upscaler and scorer too; its
# detector is the one that needs a framework first)
STAGE_WEIGHTS = {"detect": "detector_weights", "track": "detector_weights",
                 "upscale": "upscaler_weights", "score": "scorer_dir"}


class MissingExtraError(SpotlineError):
    """A role's library is not installed; the message names the extra that brings it."""


def extra_for(module: str | None) -> str | None:
    """The extra that installs ``module`` (a dotted name is looked up by its top level)."""
    return EXTRAS.get((module or "").partition(".")[0])


def missing_extra(exc: ImportError, what: str) -> MissingExtraError | None:
    """One line for ``exc`` (an import of a library left out of this install) raised while
    doing ``what`` ("the detect stage on detector.pt"), or None when no extra brings it."""
    module = (exc.name or "").partition(".")[0]
    extra = extra_for(module)
    if extra is None:
        return None
    return MissingExtraError(f"{what} needs {module}, which this install lacks: "
                             f"pip install 'spotline[{extra}]'")


def stage_missing_extra(exc: ImportError, stage: str, settings: object) -> MissingExtraError | None:
    """``missing_extra`` for a stage's setup: names the stage and its model's file, and, for a
    model framework, that an export of the model runs without it."""
    weights = str(getattr(settings, STAGE_WEIGHTS.get(stage, ""), "") or "")
    model = weights.rstrip("/").rpartition("/")[2]
    what = f"the {stage} stage" + (f" on {model}" if model else "")
    error = missing_extra(exc, what)
    if error is not None and extra_for(exc.name) in ("torch", "realesrgan"):
        error = MissingExtraError(f"{error} (or `spotline export` the model and run the "
                                  f"export with spotline[openvino] or spotline[onnx])")
    return error


__all__ = ["EXTRAS", "STAGE_WEIGHTS", "MissingExtraError", "extra_for", "missing_extra",
           "stage_missing_extra"]
