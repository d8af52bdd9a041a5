"""What the exported backends' speed work added: OpenVINO's own static int8 (NNCF) from a
calibration set, a precision per model (export_precision_<model>), and ONNX Runtime's memory
arena kept on for fixed-shape models (SigLIP's towers) but off for the detector and upscaler,
whose input shapes vary. Tiny random models in the real formats; int8's error is reported,
not asserted (docs/performance.md has the real-size and accuracy figures)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from spotline.common.errors import ConfigError
from spotline.common.settings import load_settings, settings_env
from spotline.export import export_model
from spotline.stages import backends, libs
from spotline.stages.backends.manifest import export_dir, read_manifest

ENGINES = ("onnx", "openvino")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny models of their own: fp32 to both engines; the scorer's int8 as well (dynamic)."""
    from spotline.stages.tiny import write_tiny_models

    paths = write_tiny_models(tmp_path_factory.mktemp("int8") / "models")
    for kind in ("detector", "scorer", "upscaler"):
        export_model(kind, paths[kind], ENGINES, ("fp32",))
    export_model("scorer", paths["scorer"], ("onnx",), ("int8",))
    return paths


def test_precision_per_model_falls_back_to_export_precision() -> None:
    settings = load_settings(env={"SPOTLINE_EXPORT_PRECISION": "fp32",
                                  "SPOTLINE_EXPORT_PRECISION_SCORER": "int8"})
    assert [settings.precision_for(m) for m in ("detector", "upscaler", "scorer")] == \
        ["fp32", "fp32", "int8"]
    assert settings_env(settings)["SPOTLINE_EXPORT_PRECISION_SCORER"] == "int8"
    both = settings.replace(export_precision="fp16", export_precision_detector="int8")
    assert [both.precision_for(m) for m in ("detector", "upscaler", "scorer")] == \
        ["int8", "fp16", "int8"]
    with pytest.raises(ConfigError, match="export_precision_detector must be empty or one of"):
        settings.replace(export_precision_detector="bf16")


def test_stages_load_each_models_own_precision(tiny: dict[str, Path]) -> None:
    """export_precision int8 with the detector's and upscaler's fp32: the scorer loads its
    int8 export, the other two their fp32 ones (they have no int8 export, which would fail)."""
    from spotline.stages.detect import Detect
    from spotline.stages.score import Score
    from spotline.stages.upscale import Upscale

    settings = load_settings(env={}, detector_weights=str(tiny["detector"]),
                             upscaler_weights=str(tiny["upscaler"]),
                             scorer_dir=str(tiny["scorer"]), imgsz=320, warmup=0,
                             backend="onnx", export_precision="int8",
                             export_precision_detector="fp32", export_precision_upscaler="fp32")
    names = []
    for stage_class in (Detect, Upscale, Score):
        stage = stage_class(settings)
        stage.setup()
        names.append(stage.model_name)
    assert names[0].endswith("(onnx fp32)") and names[1].endswith("(onnx fp32)")
    assert names[2].endswith("(onnx int8)")
    with pytest.raises(Exception, match="int8"):  # the detector has no int8 export
        Detect(settings.replace(export_precision_detector="")).setup()


def test_onnx_arena_is_off_only_where_shapes_vary(tiny: dict[str, Path]) -> None:
    """SigLIP's towers (fixed shapes) keep ONNX Runtime's arena and memory pattern (27.7 ->
    19.8 s per 8 SigLIP-large crops); the detector and upscaler (any frame or crop size) run
    without them, for memory."""
    scorer = backends.load_scorer(tiny["scorer"], "onnx")
    detector = backends.load_detector(tiny["detector"], "onnx")
    upscaler = backends.load_upscaler(tiny["upscaler"], "onnx")
    for engine, kept in ((scorer.vision, True), (scorer.text, True),
                         (detector.engine, False), (upscaler.engine, False)):
        options = engine.session.get_session_options()
        assert (options.enable_cpu_mem_arena, options.enable_mem_pattern) == (kept, kept)


def _fake_quantize_layers(xml: Path) -> int:
    import openvino as ov

    model = ov.Core().read_model(str(xml))
    return sum(op.get_type_name() == "FakeQuantize" for op in model.get_ops())


def _int8_constants(xml: Path) -> int:
    import openvino as ov

    model = ov.Core().read_model(str(xml))
    return sum(op.get_type_name() == "Constant" and op.get_element_type() in (ov.Type.i8,
                                                                             ov.Type.u8)
               for op in model.get_ops())


def _assert_head_is_float(xml: Path) -> None:
    import openvino as ov

    from spotline.export.precision import _yolo_head_ops

    model = ov.Core().read_model(str(xml))
    head = _yolo_head_ops(model)
    assert head
    scope = head[-1].split("/", 1)[0]
    quantized = [op.get_friendly_name() for op in model.get_ops()
                 if op.get_type_name() == "FakeQuantize"]
    assert quantized and not [n for n in quantized if n.startswith(f"{scope}/")]


def test_openvino_int8_is_nncf_static_with_a_calibration_set(
        tiny: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """With --calibration and NNCF installed, OpenVINO's int8 is NNCF's static quantisation of
    the fp32 model (FakeQuantize layers that the CPU plugin runs as int8), ONNX Runtime's stays
    static QDQ; the manifest says which per engine. Both load and run."""
    pytest.importorskip("nncf")
    from spotline.export.precision import load_calibration

    calib = load_calibration(libs.ultralytics_assets())
    copies = {}
    for kind in ("detector", "scorer"):
        source = tmp_path / tiny[kind].name
        copy = shutil.copytree if tiny[kind].is_dir() else shutil.copyfile
        copy(tiny[kind], source)
        export_model(kind, source, ENGINES, ("int8",), calib)
        manifest = read_manifest(export_dir(source))
        assert manifest.meta["int8_openvino"]["method"] == "nncf"
        assert manifest.meta["int8_onnx"]["method"] == "static"
        part = "vision" if kind == "scorer" else "path"
        xml = manifest.path(export_dir(source), "openvino", "int8", part)
        assert _fake_quantize_layers(xml) > 0
        copies[kind] = source
    # SigLIP's text tower (not calibrated): int8 weights by NNCF's compression, no FakeQuantize
    manifest = read_manifest(export_dir(copies["scorer"]))
    assert manifest.meta["int8_openvino"]["text"] == "weights"
    text_xml = manifest.path(export_dir(copies["scorer"]), "openvino", "int8", "text")
    assert _fake_quantize_layers(text_xml) == 0 and _int8_constants(text_xml) > 0
    scorer = backends.load_scorer(copies["scorer"], "openvino", "int8")
    texts = scorer.text_embeds(["grey missile", "yellow helicopter"])
    assert texts.shape[0] == 2 and np.isfinite(texts).all()
    crops = [c[:48, :48].copy() for c in calib.crops]
    ref = backends.load_scorer(tiny["scorer"], "openvino").image_embeds(crops)
    got = backends.load_scorer(copies["scorer"], "openvino", "int8").image_embeds(crops)
    assert got.shape == ref.shape and np.isfinite(got).all()
    photo = calib.frames[0]
    ref_boxes, _ = backends.load_detector(tiny["detector"], "openvino").predict(
        photo, 320, 0.1, 0.5, 10)
    assert len(ref_boxes) > 0
    boxes, scores = backends.load_detector(copies["detector"], "openvino", "int8").predict(
        photo, 320, 0.1, 0.5, 10)
    assert boxes.shape[1:] == (4,) and np.isfinite(scores).all()
    # the Detect head stays float on both engines (quantised, its one output of boxes and
    # class scores shared one int8 range: the demo detector's ONNX int8 found nothing)
    assert len(backends.load_detector(copies["detector"], "onnx", "int8").predict(
        photo, 320, 0.1, 0.5, 10)[0]) > 0
    xml = read_manifest(export_dir(copies["detector"])).path(
        export_dir(copies["detector"]), "openvino", "int8")
    _assert_head_is_float(xml)
    with capsys.disabled():
        cos = float(np.mean(np.sum(ref * got, 1) / np.linalg.norm(ref, axis=1)
                            / np.linalg.norm(got, axis=1)))
        print(f"\nOpenVINO NNCF int8, tiny random models: SigLIP vision cosine to fp32 "
              f"{cos:.4f}; detector {len(boxes)} boxes (fp32 {len(ref_boxes)})")


def test_plain_openvino_int8_without_calibration_stays_dynamic(tiny: dict[str, Path],
                                                               tmp_path: Path) -> None:
    """Without a calibration set there is nothing to set NNCF's ranges: int8 is ONNX Runtime's
    dynamic quantisation, for both engines."""
    source = tmp_path / "upscaler.pth"
    shutil.copyfile(tiny["upscaler"], source)
    export_model("upscaler", source, ("openvino",), ("int8",))
    meta = read_manifest(export_dir(source)).meta
    assert meta["int8_openvino"] == {"method": "dynamic"} and "int8" not in meta
    xml = read_manifest(export_dir(source)).path(export_dir(source), "openvino", "int8")
    assert _fake_quantize_layers(xml) == 0
