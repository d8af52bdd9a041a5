"""Precisions for `spotline export`: fp16 and int8 (dynamic, or static QDQ calibrated on a
dataset directory's frames and box crops) ONNX files derived from an fp32 one, and OpenVINO IR
made from ONNX or compressed to fp16."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from spotline.common.errors import ModelError

# --- calibration for static int8 ------------------------------------------------------------
CALIBRATION_IMAGES = 16
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


@dataclass
class Calibration:
    """Inputs that set static int8's activation ranges: frames (BGR) and object crops (RGB),
    the first images of a dataset directory in name order (deterministic)."""

    directory: str
    frames: list[np.ndarray]
    crops: list[np.ndarray]

    def describe(self) -> dict[str, Any]:
        return {"method": "static", "calibration": self.directory, "frames": len(self.frames),
                "crops": len(self.crops)}


def load_calibration(directory: Path | str, limit: int = CALIBRATION_IMAGES) -> Calibration:
    """A TIL dataset (vlm.jsonl: its frames and the crops of its boxes) or any folder of
    images (the frames and their centre crops)."""
    import cv2

    from spotline.common.images import crop_boxes
    from spotline.producer.dataset import DATASET_FILE, load_til

    directory = Path(directory)
    frames: list[np.ndarray] = []
    crops: list[np.ndarray] = []
    if (directory / DATASET_FILE).is_file():
        for item in load_til(directory)[:limit]:
            frame = cv2.imread(str(item.image_path), cv2.IMREAD_COLOR)
            if frame is None:
                continue
            frames.append(frame)
            boxes = np.asarray([(x, y, x + w, y + h) for x, y, w, h in item.boxes], np.float32)
            crops += crop_boxes(frame[..., ::-1].copy(), boxes.reshape(-1, 4))
    elif directory.is_dir():
        for path in sorted(p for p in directory.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
            frame = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if frame is not None:
                frames.append(frame)
                h, w = frame.shape[:2]
                crops.append(np.ascontiguousarray(frame[h // 4:h - h // 4,
                                                        w // 4:w - w // 4, ::-1]))
            if len(frames) >= limit:
                break
    if not frames:
        raise ModelError(f"no readable images for int8 calibration in {directory} (a TIL "
                         f"dataset with {DATASET_FILE}, or a folder of images)")
    return Calibration(str(directory), frames, crops[:limit * 4])


def synthetic_calibration(limit: int = CALIBRATION_IMAGES) -> Calibration:
    """Calibration for the int8 that ``spotline export`` makes by default, when no dataset is
    given: fixed synthetic frames (a gradient, noise, solid shapes) and crops of the same kind,
    other seeds than the held-out inputs export_precision auto checks drift on."""
    from spotline.stages.backends.precision import HELD_OUT_FRAME, held_out_image

    frames = [held_out_image(1000 + k, *HELD_OUT_FRAME) for k in range(limit)]
    crops = [np.ascontiguousarray(held_out_image(2000 + k, 96, 96)[..., ::-1])
             for k in range(limit)]
    return Calibration("synthetic", frames, crops)


def auto_precisions(engines: Iterable[str], device: str = "cpu") -> list[str]:
    """What ``export_precision auto`` can choose from on this machine, so what ``spotline
    export`` makes when no precision is given: fp32 (the reference), fp16 where it runs fast
    (OpenVINO at bf16 on AMX-BF16/AVX512_BF16; ONNX Runtime on CUDA) and int8 where the CPU
    has int8 units (AMX-INT8, AVX512_VNNI, AVX-VNNI)."""
    from spotline.stages.backends.precision import candidates

    found: list[str] = []
    for engine in engines:
        chosen, _why = candidates(engine, device, ("fp32", "fp16", "int8"))
        found += [p for p in chosen if p not in found]
    return found


# --- precisions shared by every model ---------------------------------------------------------
def onnx_variants(fp32: Path, precisions: Iterable[str],
                  feeds: Sequence[dict[str, np.ndarray]] | None = None,
                  yolo_head: bool = False) -> dict[str, Path]:
    """fp16 and int8 ONNX files derived from an fp32 one (fp32 itself included when asked).
    int8 is static (QDQ, calibrated on ``feeds``) when feeds are given, else dynamic.
    ``yolo_head``: static int8 leaves the YOLO Detect head in floating point (quantised, its
    one output tensor of boxes and class scores shared one uint8 range, and the demo detector
    found nothing)."""
    out: dict[str, Path] = {}
    for precision in precisions:
        target = fp32.with_name(fp32.stem.replace("-fp32", "") + f"-{precision}.onnx")
        if precision == "fp32":
            out[precision] = fp32
        elif precision == "fp16":
            _to_fp16(fp32, target)
            out[precision] = target
        elif precision == "int8":
            if feeds:
                _quantize_static(fp32, target, feeds, _onnx_yolo_head(fp32) if yolo_head else [])
            else:
                _quantize_dynamic(fp32, target)
            out[precision] = target
    return out


def _to_fp16(src: Path, dst: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    onnx.save(model, str(dst))


def _quantize_dynamic(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet_root_logger():
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)


def _onnx_yolo_head(path: Path) -> list[str]:
    """The nodes of the Detect head in an Ultralytics ONNX (under the last Sigmoid's scope)."""
    import onnx

    nodes = onnx.load(str(path), load_external_data=False).graph.node
    sigmoids = [n.name for n in nodes if n.op_type == "Sigmoid"]
    if not sigmoids:
        return []
    head = "/".join(sigmoids[-1].split("/")[:2]) + "/"  # "/model.22/"
    return [n.name for n in nodes if n.name.startswith(head)]


def _quantize_static(src: Path, dst: Path, feeds: Sequence[dict[str, np.ndarray]],
                     exclude: Sequence[str] = ()) -> None:
    """Static int8 in QDQ form (ONNX Runtime runs it with int8 kernels, OpenVINO reads the
    quantise/dequantise pairs as int8 layers): int8 per-channel weights, uint8 activations with
    min/max ranges from the calibration inputs. The calibrator holds every intermediate tensor
    of every input until the end (its CalibMaxIntermediateOutputs option drops them instead in
    onnxruntime 1.32): SigLIP-large needs several GiB per 16 crops."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.items, None)

    with _quiet_root_logger():
        quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=True, weight_type=QuantType.QInt8,
                        activation_type=QuantType.QUInt8,
                        calibrate_method=CalibrationMethod.MinMax,
                        nodes_to_exclude=list(exclude))


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """ONNX Runtime's quantiser logs every tensor (and advice) on the root logger."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        root.setLevel(level)


# --- OpenVINO's own static int8 (NNCF) ---------------------------------------------------------
NNCF_SAMPLES = 16  # calibration inputs NNCF runs (SigLIP-large: ~2 s each at fp32 on 2 cores)


def nncf_available() -> bool:
    """Whether NNCF (the optional ``int8`` extra) is installed."""
    import importlib.util

    return importlib.util.find_spec("nncf") is not None


def quantize_openvino(src: Path, dst: Path, feeds: Sequence[dict[str, np.ndarray]],
                      transformer: bool = False, yolo_head: bool = False) -> Path:
    """Static int8 IR through NNCF's post-training quantisation of an fp32 model (ONNX or IR):
    int8 weights and activations with ranges from ``feeds``, run by OpenVINO's own int8
    kernels (VNNI here). SigLIP-large's vision tower: 4.6 s per 8 crops against 17 s at fp32
    and 8.0 s for ONNX Runtime's dynamic int8 (docs/performance.md). ``transformer``: NNCF's
    transformer scheme (SmoothQuant, mixed preset). ``yolo_head``: the YOLO Detect head (box
    regression, DFL, sigmoids) stays in floating point, as Ultralytics' own int8 export does;
    quantised, it cost the demo detector 0.018 accuracy on the synthetic test split."""
    import nncf
    import openvino as ov

    model = ov.Core().read_model(str(src))
    samples = [next(iter(f.values())) for f in feeds][:NNCF_SAMPLES]
    options: dict[str, Any] = {"subset_size": len(samples)}
    if transformer:
        options["model_type"] = nncf.ModelType.TRANSFORMER
    else:
        options["preset"] = nncf.QuantizationPreset.MIXED
    if yolo_head:
        options["ignored_scope"] = nncf.IgnoredScope(names=_yolo_head_ops(model), validate=False)
    try:
        with _quiet_root_logger():
            quantized = nncf.quantize(model, nncf.Dataset(samples), **options)
    except Exception as exc:  # noqa: BLE001 - any quantiser failure is a ModelError
        raise ModelError(f"cannot quantise {src} with NNCF: {type(exc).__name__}: {exc}") from exc
    dst.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(quantized, str(dst))
    return dst


def compress_openvino(src: Path, dst: Path) -> Path:
    """int8 weights without calibration (NNCF's weight compression, computed in floating
    point): for SigLIP's text tower, whose int8 otherwise is the dynamic ONNX graph, which
    OpenVINO held at about 4 GB resident for SigLIP-large (docs/performance.md)."""
    import nncf
    import openvino as ov

    try:
        compressed = nncf.compress_weights(ov.Core().read_model(str(src)))
    except Exception as exc:  # noqa: BLE001 - any compression failure is a ModelError
        raise ModelError(f"cannot compress {src} with NNCF: {type(exc).__name__}: {exc}") from exc
    dst.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(compressed, str(dst))
    return dst


def _yolo_head_ops(model: Any) -> list[str]:
    """The names of the Detect head's operations in an Ultralytics IR: every op under the scope
    of the last Sigmoid (the head's class scores), and every Sigmoid."""
    ops = model.get_ordered_ops()
    sigmoids = [op.get_friendly_name() for op in ops if op.get_type_name() == "Sigmoid"]
    if not sigmoids:
        return []
    head = sigmoids[-1].split("/", 1)[0]
    return [op.get_friendly_name() for op in ops if op.get_type_name() == "Sigmoid"
            or op.get_friendly_name().startswith((f"{head}/", f"{head}.dfl"))]


def onnx_to_openvino(src: Path, dst: Path, fp16: bool = False) -> Path:
    """An OpenVINO IR (.xml + .bin) of an ONNX file, weights fp16-compressed when asked."""
    import openvino as ov

    dst.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(ov.convert_model(str(src)), str(dst), compress_to_fp16=fp16)
    return dst


def ir_to_fp16(src: Path, dst: Path) -> Path:
    import openvino as ov

    dst.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(ov.Core().read_model(str(src)), str(dst), compress_to_fp16=True)
    return dst
