"""``spotline export``: the detector, the upscaler and SigLIP's two towers as ONNX and OpenVINO
IR, at fp32, fp16 and int8, written beside each checkpoint in ``<name>.export/`` with a
manifest that records the checkpoint's sha256 (stages refuse a stale export).

- Detector: Ultralytics' own exporter (dynamic height and width), ONNX and OpenVINO.
- SigLIP: ``torch.onnx.export`` of a vision-tower wrapper (dynamic batch) and a text-tower
  wrapper (fixed length, the tokenizer's padding), then ``openvino.convert_model`` of the ONNX.
- Real-ESRGAN: ``torch.onnx.export`` with dynamic batch, height and width, then OpenVINO.
- fp16: ONNX Runtime's float16 converter (fp16 weights and compute, fp32 inputs/outputs: for
  CUDA); OpenVINO IR with fp16-compressed weights (run at bf16 where the CPU has it). int8:
  ONNX Runtime's dynamic quantisation (weights int8, activations quantised per call) of the
  fp32 ONNX, or static QDQ with a calibration set; OpenVINO IR of the same quantised ONNX, or
  with a calibration set and NNCF installed, NNCF's static int8 of the fp32 model.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from spotline.common.errors import ModelError
from spotline.export.precision import (
    Calibration,
    compress_openvino,
    ir_to_fp16,
    nncf_available,
    onnx_to_openvino,
    onnx_variants,
    quantize_openvino,
)
from spotline.stages.backends.manifest import (
    PRECISIONS,
    Manifest,
    export_dir,
    read_manifest,
    source_hash,
    write_manifest,
)

log = logging.getLogger(__name__)

ENGINES = ("onnx", "openvino")
MODELS = ("detector", "upscaler", "scorer")
OPSET = 17
# The size the detector is traced at (its export has dynamic height and width).
DETECTOR_TRACE_SIZE = 640


@dataclass
class ExportResult:
    """What one model's export wrote."""

    kind: str
    source: Path
    directory: Path
    files: dict[str, dict[str, str]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


# --- per model ------------------------------------------------------------------------------
def export_onnx_family(fp32_onnx: Path, stage: Path, name: str, engines: Iterable[str],
                       precisions: Iterable[str], part: str = "path",
                       feeds: Sequence[dict[str, np.ndarray]] | None = None,
                       transformer: bool = False, yolo_head: bool = False,
                       weights_only: bool = False) -> dict[str, dict[str, str]]:
    """From one fp32 ONNX file: the asked precisions as ONNX and as OpenVINO IR, placed in
    ``stage/<engine>-<precision>/<name>.<suffix>``; manifest entries keyed like that. OpenVINO
    int8 with calibration ``feeds`` is NNCF's (when installed); with ``weights_only`` and no
    feeds NNCF's int8 weight compression; else the int8 ONNX's."""
    precisions, engines = list(precisions), list(engines)
    ov_int8 = _openvino_int8(bool(feeds), weights_only) if "openvino" in engines else "onnx"
    needed = precisions if "onnx" in engines else \
        [p for p in precisions if p == "int8" and ov_int8 == "onnx"]
    variants = onnx_variants(fp32_onnx, needed, feeds, yolo_head)
    files: dict[str, dict[str, str]] = {}
    for precision in precisions:
        if "onnx" in engines:
            target = stage / f"onnx-{precision}" / f"{name}.onnx"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(variants[precision], target)
            files.setdefault(f"onnx-{precision}", {})[part] = _rel(target, stage)
        if "openvino" in engines:
            target = stage / f"openvino-{precision}" / f"{name}.xml"
            if precision == "int8" and ov_int8 == "nncf":
                quantize_openvino(fp32_onnx, target, feeds or [], transformer)
            elif precision == "int8" and ov_int8 == "weights":
                compress_openvino(fp32_onnx, target)
            else:
                src = variants["int8"] if precision == "int8" else fp32_onnx
                onnx_to_openvino(src, target, fp16=precision == "fp16")
            files.setdefault(f"openvino-{precision}", {})[part] = _rel(target, stage)
    return files


def _openvino_int8(calibrated: bool, weights_only: bool) -> str:
    """How OpenVINO's int8 is made: nncf (static, calibrated), weights (NNCF's weight
    compression) or onnx (the IR of the int8 ONNX: static QDQ or dynamic)."""
    if not nncf_available():
        return "onnx"
    if calibrated:
        return "nncf"
    return "weights" if weights_only else "onnx"


def export_detector(source: Path, stage: Path, engines: Iterable[str], precisions: Iterable[str],
                    calib: Calibration | None = None
                    ) -> tuple[dict[str, dict[str, str]], dict[str, Any]]:
    """Ultralytics' exporter (ONNX, and OpenVINO for fp32/fp16) on a copy of the checkpoint."""
    from spotline.stages import libs

    os.environ.setdefault("YOLO_AUTOINSTALL", "False")  # never pip-install during an export
    libs.offline_env()
    from ultralytics import YOLO

    libs.undo_ultralytics_pil_patch()
    engines, precisions = list(engines), list(precisions)
    with tempfile.TemporaryDirectory(dir=stage) as tmp:
        copy = Path(tmp) / "detector.pt"
        shutil.copyfile(source, copy)
        try:
            model = YOLO(str(copy), task="detect")
            meta = _detector_meta(model)
            onnx_file = Path(model.export(format="onnx", imgsz=DETECTOR_TRACE_SIZE, dynamic=True,
                                          simplify=False, device="cpu", verbose=False))
        except Exception as exc:  # noqa: BLE001 - any exporter failure is a ModelError
            raise ModelError(f"cannot export detector {source}: {type(exc).__name__}: "
                             f"{exc}") from exc
        fp32 = onnx_file.with_name("detector-fp32.onnx")
        onnx_file.rename(fp32)
        feeds = _detector_feeds(calib, meta["stride"]) if calib and "int8" in precisions else None
        files = export_onnx_family(fp32, stage, "detector", [e for e in engines if e == "onnx"],
                                   precisions, feeds=feeds, yolo_head=True)
        if "openvino" in engines:
            files.update(_detector_openvino(copy, stage, precisions, fp32, feeds))
    return files, meta


def _detector_feeds(calib: Calibration, stride: int) -> list[dict[str, np.ndarray]]:
    from spotline.stages.backends.detector import letterbox

    return [{"images": letterbox(f, DETECTOR_TRACE_SIZE, stride).tensor} for f in calib.frames]


def _detector_openvino(copy: Path, stage: Path, precisions: list[str], fp32_onnx: Path,
                       feeds: list[dict[str, np.ndarray]] | None) -> dict[str, dict[str, str]]:
    """OpenVINO IR through Ultralytics' exporter (fp32; fp16 compresses its weights); int8 by
    NNCF with a calibration set (when installed), else from the quantised ONNX (static QDQ with
    a calibration set, else dynamic)."""
    from ultralytics import YOLO

    out_dir = Path(YOLO(str(copy), task="detect").export(
        format="openvino", imgsz=DETECTOR_TRACE_SIZE, dynamic=True, device="cpu",
        verbose=False))
    xml = next(out_dir.glob("*.xml"))
    files: dict[str, dict[str, str]] = {}
    for precision in precisions:
        target = stage / f"openvino-{precision}" / "detector.xml"
        if precision == "fp32":
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(xml, target)
            shutil.copyfile(xml.with_suffix(".bin"), target.with_suffix(".bin"))
        elif precision == "fp16":
            ir_to_fp16(xml, target)
        elif feeds and nncf_available():
            quantize_openvino(xml, target, feeds, yolo_head=True)
        else:
            int8 = fp32_onnx.with_name("detector-int8.onnx")
            if not int8.exists():
                onnx_variants(fp32_onnx, ["int8"], feeds, yolo_head=True)
            onnx_to_openvino(int8, target)
        files[f"openvino-{precision}"] = {"path": _rel(target, stage)}
    return files


def _detector_meta(model: Any) -> dict[str, Any]:
    from ultralytics.nn.modules import Detect

    net = model.model
    head = net.model[-1]
    end2end = bool(getattr(head, "end2end", False) or getattr(net, "end2end", False))
    return {"stride": int(net.stride.max()), "nl": int(getattr(head, "nl", 3)),
            "nc": int(getattr(head, "nc", len(model.names))), "names": dict(model.names),
            "end2end": end2end, "augment": type(head) is Detect and not end2end}


def export_scorer(source: Path, stage: Path, engines: Iterable[str], precisions: Iterable[str],
                  calib: Calibration | None = None
                  ) -> tuple[dict[str, dict[str, str]], dict[str, Any]]:
    """SigLIP's vision tower (dynamic batch) and text tower as ONNX, then OpenVINO IR."""
    import torch

    from spotline.stages.score import load_scorer

    engines, precisions = list(engines), list(precisions)
    model, processor = load_scorer(source, "cpu", torch.float32)
    if getattr(model, "logit_bias", None) is None:
        raise ModelError(f"{source}: only SigLIP models are exported (CLIP's text tower needs "
                         f"an attention mask)")
    meta = _scorer_meta(model, processor)
    _save_tokenizer(processor.tokenizer, stage / "tokenizer.json")
    size = meta["image_size"]
    files: dict[str, dict[str, str]] = {}
    with tempfile.TemporaryDirectory(dir=stage) as tmp:
        vision = Path(tmp) / "vision-fp32.onnx"
        text = Path(tmp) / "text-fp32.onnx"
        _torch_export(_Tower(model, "image"), torch.rand(2, 3, *size), vision, "pixel_values",
                      "image_embeds", {0: "batch"})
        _torch_export(_Tower(model, "text"),
                      torch.full((2, meta["max_length"]), meta["pad_id"], dtype=torch.long), text,
                      "input_ids", "text_embeds", {0: "batch"})
        feeds = None
        if calib and "int8" in precisions:
            from spotline.stages.backends.scorer import preprocess

            feeds = [{"pixel_values": preprocess([c], meta)} for c in calib.crops]
        # the text tower's int8 is not calibrated (its embeddings are cached per caption):
        # dynamic for ONNX Runtime, int8 weights for OpenVINO (with NNCF)
        for path, part, part_feeds in ((vision, "vision", feeds), (text, "text", None)):
            found = export_onnx_family(path, stage, part, engines, precisions, part, part_feeds,
                                       transformer=True, weights_only=part == "text")
            for key, entry in found.items():
                files.setdefault(key, {}).update(entry)
    return files, meta


def _tower_class() -> Any:
    import torch

    class Tower(torch.nn.Module):
        """One SigLIP tower as a module: pooled (not normalised) features."""

        def __init__(self, model: Any, which: str) -> None:
            super().__init__()
            self.model, self.which = model, which

        def forward(self, x: Any) -> Any:
            if self.which == "image":
                out = self.model.get_image_features(pixel_values=x)
            else:
                out = self.model.get_text_features(input_ids=x)
            if hasattr(out, "pooler_output"):
                return out.pooler_output
            return out[1] if isinstance(out, tuple) else out

    return Tower


def _Tower(model: Any, which: str) -> Any:  # noqa: N802 - builds a torch module lazily
    return _tower_class()(model, which).eval()


def _torch_export(module: Any, example: Any, path: Path, input_name: str, output_name: str,
                  dynamic: dict[int, str]) -> Path:
    """torch.onnx.export (TorchScript exporter, which needs no onnxscript) with dynamic axes."""
    import warnings

    import torch

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), str(path), input_names=[input_name],
                          output_names=[output_name], opset_version=OPSET, dynamo=False,
                          dynamic_axes={input_name: dynamic, output_name: {0: "batch"}})
    return path


def _scorer_meta(model: Any, processor: Any) -> dict[str, Any]:
    tok = processor.tokenizer
    limit = int(getattr(model.config.text_config, "max_position_embeddings", 64))
    max_length = min(int(tok.model_max_length or limit), limit)
    ip = processor.image_processor
    size = ip.size
    if isinstance(size, dict) or hasattr(size, "get"):
        hw = (int(size.get("height") or size.get("shortest_edge")),
              int(size.get("width") or size.get("shortest_edge")))
    else:
        hw = (int(size), int(size))
    resample = getattr(ip, "resample", 3)
    return {"image_size": list(hw), "image_mean": [float(v) for v in ip.image_mean],
            "image_std": [float(v) for v in ip.image_std],
            "rescale_factor": float(ip.rescale_factor), "resample": int(resample),
            "do_resize": bool(ip.do_resize), "do_rescale": bool(ip.do_rescale),
            "do_normalize": bool(ip.do_normalize), "max_length": max_length,
            "pad_id": int(tok.pad_token_id if tok.pad_token_id is not None else 0),
            "pad_token": str(tok.pad_token or "<pad>"), "tokenizer": "tokenizer.json",
            "logit_scale": float(model.logit_scale.detach().float().item()),
            "logit_bias": float(model.logit_bias.detach().float().reshape(-1)[0].item()),
            "embed_dim": int(model.config.vision_config.hidden_size)}


def _save_tokenizer(tokenizer: Any, path: Path) -> None:
    """tokenizer.json for the ``tokenizers`` library (a slow tokenizer is converted first)."""
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer",
                                                                         None)
    if backend is None:
        from transformers.convert_slow_tokenizer import convert_slow_tokenizer

        try:
            backend = convert_slow_tokenizer(tokenizer)
        except Exception as exc:  # noqa: BLE001 - cannot convert: say so
            raise ModelError(f"cannot convert the scorer's tokenizer to tokenizer.json: "
                             f"{exc}") from exc
    path.parent.mkdir(parents=True, exist_ok=True)
    backend.save(str(path))


def export_upscaler(source: Path, stage: Path, engines: Iterable[str], precisions: Iterable[str],
                    calib: Calibration | None = None
                    ) -> tuple[dict[str, dict[str, str]], dict[str, Any]]:
    """Real-ESRGAN (SRVGG or RRDB) with dynamic batch, height and width."""
    import torch

    from spotline.stages import libs, upscale

    libs.torchvision_shim()
    loaded = torch.load(source, map_location="cpu", weights_only=True)
    state = upscale._state_dict(loaded, source)
    net, scale = upscale.build_upscaler_net(state)
    net.load_state_dict(state, strict=True)
    net.eval()
    with tempfile.TemporaryDirectory(dir=stage) as tmp:
        fp32 = Path(tmp) / "upscaler-fp32.onnx"
        _torch_export(net, torch.rand(1, 3, 24, 24), fp32, "image", "output",
                      {0: "batch", 2: "height", 3: "width"})
        feeds = None
        if calib and "int8" in precisions:
            from spotline.common.images import cap_crop

            feeds = [{"image": np.ascontiguousarray(
                cap_crop(c, 64).astype(np.float32).transpose(2, 0, 1)[None] / 255.0)}
                for c in calib.crops]
        files = export_onnx_family(fp32, stage, "upscaler", engines, precisions, feeds=feeds)
    return files, {"scale": int(scale)}


EXPORTERS: dict[str, Callable[..., tuple[dict[str, dict[str, str]], dict[str, Any]]]] = {
    "detector": export_detector, "upscaler": export_upscaler, "scorer": export_scorer}


def export_model(kind: str, source: Path | str, engines: Iterable[str] = ENGINES,
                 precisions: Iterable[str] = ("fp32",),
                 calibration: Calibration | None = None) -> ExportResult:
    """Export one checkpoint to ``<source>.export/``. Exports already there from the same
    checkpoint are kept (new ones are added); those of another checkpoint are replaced.
    int8 is static with a ``calibration`` set (SigLIP's text tower stays dynamic), else
    dynamic."""
    source = Path(source)
    engines, precisions = _check(kind, source, engines, precisions)
    digest = source_hash(source)
    directory = export_dir(source)
    # no ".pt" in the staging path: Ultralytics names its OpenVINO folder by replacing the
    # suffix everywhere in the path
    safe = directory.name.replace(".", "-")
    stage = Path(tempfile.mkdtemp(prefix=f".{safe}-tmp-", dir=directory.parent))
    try:
        files, meta = EXPORTERS[kind](source, stage, engines, precisions, calibration)
        if "int8" in precisions:  # per engine: an export of one engine keeps the other's
            how = calibration.describe() if calibration else {"method": "dynamic"}
            for engine in engines:
                nncf = engine == "openvino" and calibration is not None and nncf_available()
                meta[f"int8_{engine}"] = {**how, "method": "nncf"} if nncf else dict(how)
            if kind == "scorer" and "openvino" in engines and nncf_available():
                meta["int8_openvino"]["text"] = "weights"  # NNCF's int8 weight compression
            if "onnx" in engines:
                meta["int8"] = how
        manifest = Manifest(kind=kind, source=source.name, sha256=digest, files=files, meta=meta)
        _install(stage, directory, manifest)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return ExportResult(kind, source, directory, files)


def _check(kind: str, source: Path, engines: Iterable[str],
           precisions: Iterable[str]) -> tuple[list[str], list[str]]:
    if kind not in EXPORTERS:
        raise ModelError(f"unknown model {kind!r}; choose from {', '.join(MODELS)}")
    engines, precisions = list(dict.fromkeys(engines)), list(dict.fromkeys(precisions))
    bad = [e for e in engines if e not in ENGINES] + [p for p in precisions
                                                      if p not in PRECISIONS]
    if bad or not engines or not precisions:
        raise ModelError(f"engines must be among {ENGINES} and precisions among {PRECISIONS}; "
                         f"got {engines} and {precisions}")
    if not source.exists():
        raise ModelError(f"{kind} checkpoint {source} does not exist (export needs the "
                         f"checkpoint file, not an architecture name)")
    return engines, precisions


def _install(stage: Path, directory: Path, manifest: Manifest) -> None:
    """Move the staged exports into place: merged with an export of the same checkpoint, or
    replacing one of another (or a broken one). The manifest is written last."""
    old: Manifest | None = None
    if directory.is_dir():
        try:
            old = read_manifest(directory)
        except ModelError:
            old = None
        if old is None or old.sha256 != manifest.sha256 or old.kind != manifest.kind:
            shutil.rmtree(directory)
            old = None
    directory.mkdir(parents=True, exist_ok=True)
    for item in stage.iterdir():
        target = directory / item.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(item, target)
    if old is not None:
        manifest.files = {**old.files, **manifest.files}
        manifest.meta = {**old.meta, **manifest.meta}
    write_manifest(directory, manifest)
