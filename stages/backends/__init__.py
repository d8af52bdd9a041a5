"""Exported models without torch: OpenVINO IR (``.xml``) and ONNX (``.onnx``) runners with the
detector's, SigLIP's and Real-ESRGAN's pre- and post-processing in numpy/OpenCV.

Only ``spotline.common`` and third-party runtimes are imported here (never torch, Ultralytics
or transformers), so a stage on an exported model stays a small process. ``spotline export``
writes the exports and their manifest (``manifest.py``)."""

from __future__ import annotations

from pathlib import Path

from ...common.errors import ModelError
from . import precision
from .detector import ExportedDetector
from .engine import ENGINES, available, load_engine, x86_cpu
from .manifest import (
    PRECISIONS,
    Manifest,
    export_dir,
    has_exports,
    read_manifest,
    verified_manifest,
)
from .scorer import ExportedScorer
from .upscaler import ExportedUpscaler

BACKENDS = ("auto", "torch", *ENGINES)


def choose_backend(requested: str, source: Path | str, precision: str = "fp32",
                   device: str = "cpu") -> str:
    """The backend a model runs on: ``torch``, ``onnx`` or ``openvino``.

    ``auto`` takes the fastest one that has an export of ``source`` at ``precision`` and an
    installed runtime: OpenVINO on x86 CPUs (real-size on this 2-core machine: fp32 1.1–1.3×
    torch, against 0.7–1.0× for ONNX Runtime; NNCF int8 3.4–4.6×; docs/performance.md), ONNX
    Runtime elsewhere or on a CUDA device (``device`` cuda, or auto with a CUDA build of ONNX
    Runtime: its CUDA/TensorRT providers), and torch when there is no export."""
    if requested not in BACKENDS:
        raise ModelError(f"backend must be one of {', '.join(BACKENDS)}, got {requested!r}")
    if requested != "auto":
        return requested
    if not has_exports(source):
        return "torch"
    manifest = read_manifest(export_dir(source))
    cuda = device.startswith("cuda") or (device == "auto" and onnx_has_cuda())
    order = ("onnx", "openvino") if cuda or not x86_cpu() else ("openvino", "onnx")
    for engine in order:
        if manifest.has(engine, precision) and available(engine):
            return engine
    return "torch"


def onnx_has_cuda() -> bool:
    """Whether the installed ONNX Runtime build has the CUDA (or TensorRT) provider."""
    if not available("onnx"):
        return False
    import onnxruntime as ort

    return bool({"CUDAExecutionProvider", "TensorrtExecutionProvider"}
                & set(ort.get_available_providers()))


def _checked(source: Path | str, kind: str, engine: str,
             precision: str) -> tuple[Path, Manifest]:
    if engine not in ENGINES:
        raise ModelError(f"no exported backend {engine!r} (choose from {', '.join(ENGINES)})")
    if precision not in PRECISIONS:
        raise ModelError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return verified_manifest(source, kind)


def load_detector(source: Path | str, engine: str, precision: str = "fp32", threads: int = 0,
                  device: str = "cpu") -> ExportedDetector:
    """The export of the YOLO checkpoint ``source`` on ``engine``, checked against it."""
    directory, manifest = _checked(source, "detector", engine, precision)
    path = manifest.path(directory, engine, precision)
    return ExportedDetector(load_engine(path, threads, precision, device, varying_shapes=True),
                            manifest.meta)


def load_upscaler(source: Path | str, engine: str, precision: str = "fp32", threads: int = 0,
                  device: str = "cpu") -> ExportedUpscaler:
    """The export of the Real-ESRGAN checkpoint ``source`` on ``engine``, checked against it."""
    directory, manifest = _checked(source, "upscaler", engine, precision)
    path = manifest.path(directory, engine, precision)
    return ExportedUpscaler(load_engine(path, threads, precision, device, varying_shapes=True),
                            int(manifest.meta["scale"]))


def load_scorer(source: Path | str, engine: str, precision: str = "fp32", threads: int = 0,
                device: str = "cpu") -> ExportedScorer:
    """The two exported towers of the SigLIP directory ``source``, checked against it."""
    directory, manifest = _checked(source, "scorer", engine, precision)
    vision, text = (load_engine(manifest.path(directory, engine, precision, part), threads,
                                precision, device) for part in ("vision", "text"))
    return ExportedScorer(vision, text, directory, manifest.meta)


__all__ = ["BACKENDS", "ENGINES", "PRECISIONS", "ExportedDetector", "ExportedScorer",
           "ExportedUpscaler", "available", "choose_backend", "export_dir", "load_detector",
           "load_engine", "load_scorer", "load_upscaler", "precision"]
