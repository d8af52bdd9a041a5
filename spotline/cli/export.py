"""`spotline export`: the configured models as ONNX and OpenVINO IR, beside each checkpoint
(spotline/export/)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

MODELS = ("detector", "upscaler", "scorer")


@click.command("export")
@click.option("--model", "models", multiple=True, type=click.Choice(MODELS),
              help="Which model to export (repeatable) [default: those the pipeline runs: all "
              "three, without the upscaler while upscaling is off].")
@click.option("--engine", "engines", multiple=True, type=click.Choice(["onnx", "openvino"]),
              help="Which format (repeatable) [default: both].")
@click.option("--precision", "precisions", multiple=True,
              type=click.Choice(["fp32", "fp16", "int8"]),
              help="Which precision (repeatable) [default: what export_precision auto "
              "chooses from on this machine: fp32, fp16 where it runs as bf16 (OpenVINO on "
              "AMX-BF16/AVX512_BF16), int8 where the CPU has VNNI/AMX-INT8 (calibrated on "
              "synthetic frames unless --calibration is given)].")
@click.option("--calibration", type=click.Path(exists=True, file_okay=False), default=None,
              help="int8 calibration images: a TIL dataset (its frames and box crops) or a "
              "folder of images. With it int8 is static (QDQ for ONNX Runtime; NNCF's for "
              "OpenVINO when nncf is installed: pip install spotline[int8]); without, dynamic.")
@click.pass_obj
def export(obj: Any, models: tuple[str, ...], engines: tuple[str, ...],
           precisions: tuple[str, ...], calibration: str | None) -> None:
    """Export the configured checkpoints (SPOTLINE_DETECTOR_WEIGHTS, _UPSCALER_WEIGHTS,
    _SCORER_DIR; the demo models when none is set) to `<checkpoint>.export/`, with a manifest
    holding the checkpoint's sha256. Workers then load them with SPOTLINE_BACKEND=auto,
    onnx or openvino, and refuse an export made from another checkpoint."""
    from spotline.export import export_model
    from spotline.export.precision import (
        auto_precisions,
        load_calibration,
        synthetic_calibration,
    )
    from spotline.stages.runtime import resolve_weights, used_models

    calib = load_calibration(calibration) if calibration else None
    engines = engines or ("onnx", "openvino")
    if not precisions:  # what auto measures here (stages/backends/precision.py)
        precisions = tuple(auto_precisions(engines, obj.settings.device))
        if "int8" in precisions and calib is None:
            calib = synthetic_calibration()
        click.echo(f"precisions for export_precision auto on this CPU: "
                   f"{', '.join(precisions)}", err=True)
    kinds = models or used_models(obj.settings)  # no upscaler while upscaling is off
    paths = resolve_weights(obj.settings, kinds)
    sources = {"detector": paths.detector, "upscaler": paths.upscaler,
               "scorer": paths.scorer}
    for kind in kinds:
        start = time.perf_counter()
        result = export_model(kind, Path(sources[kind]), engines, precisions, calib)
        click.echo(f"{kind}: {sources[kind]} -> {result.directory} "
                   f"({', '.join(sorted(result.files))}; "
                   f"{time.perf_counter() - start:.1f} s)")
