"""`spotline export`: the configured models as ONNX and OpenVINO IR, beside each checkpoint
(spotline/export.py)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

from spotline.common.errors import SpotlineError

MODELS = ("detector", "upscaler", "scorer")


@click.command("export")
@click.option("--model", "models", multiple=True, type=click.Choice(MODELS),
              help="Which model to export (repeatable) [default: those the pipeline runs: all "
              "three, without the upscaler while upscaling is off].")
@click.option("--engine", "engines", multiple=True, type=click.Choice(["onnx", "openvino"]),
              help="Which format (repeatable) [default: both].")
@click.option("--precision", "precisions", multiple=True,
              type=click.Choice(["fp32", "fp16", "int8"]),
              help="Which precision (repeatable) [default: fp32].")
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
    from spotline.export_precision import load_calibration
    from spotline.stages.runtime import resolve_weights, used_models

    try:
        calib = load_calibration(calibration) if calibration else None
        kinds = models or used_models(obj.settings)  # no upscaler while upscaling is off
        paths = resolve_weights(obj.settings, kinds)
        sources = {"detector": paths.detector, "upscaler": paths.upscaler,
                   "scorer": paths.scorer}
        for kind in kinds:
            start = time.perf_counter()
            result = export_model(kind, Path(sources[kind]), engines or ("onnx", "openvino"),
                                  precisions or ("fp32",), calib)
            click.echo(f"{kind}: {sources[kind]} -> {result.directory} "
                       f"({', '.join(sorted(result.files))}; "
                       f"{time.perf_counter() - start:.1f} s)")
    except SpotlineError as exc:
        raise click.ClickException(str(exc)) from None
