"""spotline export and the exported backends, on tiny random models in the real formats.

Parity with the torch path at fp32: detector boxes within 1 px (with and without TTA), SigLIP
logits within 1e-3, Real-ESRGAN pixels within 1 level. int8 is reported, not asserted. A stale
export (made from another checkpoint) is refused; a stage on an exported model never imports
torch, Ultralytics or transformers."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest

from spotline.common.envelope import Envelope
from spotline.common.errors import ModelError
from spotline.common.settings import Settings, load_settings
from spotline.export import export_model
from spotline.stages import backends, libs
from spotline.stages.backends.manifest import export_dir, read_manifest

from .conftest import ROOT

ENGINES = ("onnx", "openvino")
PHOTOS = [cv2.imread(str(libs.ultralytics_assets() / name)) for name in ("bus.jpg", "zidane.jpg")]
CAPTIONS = ("grey missile", "yellow helicopter",
            "a very long caption about a zebra-striped qwzx object that the tokenizer truncates")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny models of their own (exports are written beside them), exported once: fp32 to both
    engines, and int8 to ONNX for the report."""
    from spotline.stages.tiny import write_tiny_models

    paths = write_tiny_models(tmp_path_factory.mktemp("export") / "models")
    for kind in ("detector", "scorer", "upscaler"):
        export_model(kind, paths[kind], ENGINES, ("fp32",))
    export_model("scorer", paths["scorer"], ("onnx",), ("int8",))
    return paths


def _settings(tiny: dict[str, Path], **changes: object) -> Settings:
    # parity is checked at fp32 (export_precision auto could take the scorer's int8 here)
    return load_settings(env={}, detector_weights=str(tiny["detector"]),
                         upscaler_weights=str(tiny["upscaler"]), scorer_dir=str(tiny["scorer"]),
                         imgsz=320, warmup=0, export_precision="fp32", **changes)


def test_manifest_records_the_checkpoint(tiny: dict[str, Path]) -> None:
    from spotline.stages.backends.manifest import source_hash

    manifest = read_manifest(export_dir(tiny["scorer"]))
    assert manifest.kind == "scorer" and manifest.source == "scorer"
    assert manifest.sha256 == source_hash(tiny["scorer"])
    assert {"onnx-fp32", "openvino-fp32", "onnx-int8"} <= set(manifest.files)
    assert set(manifest.files["onnx-fp32"]) == {"vision", "text"}
    assert manifest.meta["max_length"] == 16 and manifest.meta["image_size"] == [64, 64]
    for entry in manifest.files.values():
        for name in entry.values():
            assert (export_dir(tiny["scorer"]) / name).is_file()


@pytest.mark.parametrize("tta", [False, True], ids=["plain", "tta"])
def test_detector_parity(tiny: dict[str, Path], tta: bool) -> None:
    """Same boxes as Ultralytics' torch predict, to within 1 px, in the same order."""
    from spotline.stages.detect import detect_frames, load_detector

    settings = _settings(tiny, tta=tta)
    reference = detect_frames(load_detector(tiny["detector"]), PHOTOS, settings)
    assert sum(len(boxes) for boxes, _ in reference) > 0  # the tiny detector finds boxes
    for engine in ENGINES:
        model = backends.load_detector(tiny["detector"], engine)
        for image, (ref_boxes, ref_scores) in zip(PHOTOS, reference, strict=True):
            boxes, scores = model.predict(image, settings.imgsz, settings.conf, settings.iou,
                                          settings.max_det, tta=tta)
            assert boxes.shape == ref_boxes.shape, engine
            assert np.abs(boxes - ref_boxes).max() <= 1.0, engine
            assert np.abs(scores - ref_scores).max() <= 1e-3, engine


@pytest.mark.parametrize("cap", [2048, 512], ids=["follow", "tiled"])
def test_detector_parity_when_the_size_follows_the_frame(tiny: dict[str, Path],
                                                         cap: int) -> None:
    """imgsz 0 (each photo at its own long side, or in tiles above the cap, merged): the
    exports give the torch path's boxes, to within 1 px."""
    from spotline.stages.detect import detect_frames, load_detector

    settings = _settings(tiny, imgsz_cap=cap, tta=False).replace(imgsz=0)
    frames = [*PHOTOS, cv2.resize(PHOTOS[1], (900, 300))]  # and a wide, non-square one
    reference = detect_frames(load_detector(tiny["detector"]), frames, settings)
    assert sum(len(boxes) for boxes, _ in reference) > 0
    for engine in ENGINES:
        model = backends.load_detector(tiny["detector"], engine)
        for (boxes, scores), (ref_boxes, ref_scores) in zip(
                detect_frames(model, frames, settings), reference, strict=True):
            assert boxes.shape == ref_boxes.shape, engine
            assert np.abs(boxes - ref_boxes).max(initial=0) <= 1.0, engine
            assert np.abs(scores - ref_scores).max(initial=0) <= 1e-3, engine


def test_detector_preprocessing_is_ultralytics_own() -> None:
    """The exported detector's letterbox tensor and TTA inputs (made a channel at a time, to
    keep the detect worker's peak memory down) are Ultralytics' own: LetterBox + the
    predictor's BGR→RGB and /255 exactly, its scale_img on the (flipped) tensor within 1e-4
    (OpenCV's bilinear against torch's: 3.5e-5 at most on these photos, a 40th of a level)."""
    import torch
    from ultralytics.data.augment import LetterBox
    from ultralytics.utils.torch_utils import scale_img as ultralytics_scale_img

    from spotline.stages.backends.detector import TTA_FLIPS, TTA_SCALES, letterbox, scale_img

    for image in PHOTOS:
        ours = letterbox(image, 640, 32)
        boxed = LetterBox((640, 640), auto=True, stride=32)(image=image)
        reference = torch.from_numpy(
            np.ascontiguousarray(boxed[None, ..., ::-1].transpose(0, 3, 1, 2))).float() / 255
        assert ours.tensor.flags["C_CONTIGUOUS"]
        assert np.array_equal(ours.tensor, reference.numpy())
        for ratio, flip in zip(TTA_SCALES, TTA_FLIPS, strict=True):
            expected = ultralytics_scale_img(reference.flip(-1) if flip else reference, ratio,
                                             gs=32)
            got = scale_img(ours.tensor, ratio, 32, flip)
            assert got.shape == tuple(expected.shape) and got.flags["C_CONTIGUOUS"]
            np.testing.assert_allclose(got, expected.numpy(), atol=1e-4, rtol=0)


def _crops() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    noise = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
             for h, w in [(10, 20), (64, 64), (100, 37), (5, 5), (200, 300), (1, 9)]]
    photo = cv2.cvtColor(PHOTOS[0], cv2.COLOR_BGR2RGB)
    return [*noise, np.ascontiguousarray(photo[200:420, 50:260]),
            np.ascontiguousarray(photo[400:460, 600:700])]


def test_scorer_parity(tiny: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """The same token ids, and logits within 1e-3 of SiglipModel's at fp32; int8 reported."""
    import torch

    from spotline.stages.score import Score

    settings = _settings(tiny)
    stage = Score(settings.replace(backend="torch"))
    stage.setup()
    crops = _crops()
    prompts = [settings.prompt.format(caption=c) for c in CAPTIONS]
    ref_ids = stage.processor.tokenizer(prompts, padding="max_length", truncation=True,
                                        max_length=stage.max_length)["input_ids"]
    texts, images = stage.text_embeds(CAPTIONS), stage.image_embeds(crops)
    with torch.no_grad():
        ref = (texts @ images.t() * stage.model.logit_scale.exp()
               + stage.model.logit_bias).numpy()
    for engine, precision in (("onnx", "fp32"), ("openvino", "fp32"), ("onnx", "int8")):
        scorer = backends.load_scorer(tiny["scorer"], engine, precision)
        assert scorer.tokenizer(prompts).tolist() == [list(ids) for ids in ref_ids]
        t, i = scorer.text_embeds(prompts), scorer.image_embeds(crops)
        logits = t @ i.T * np.exp(scorer.logit_scale) + scorer.logit_bias
        gap = float(np.abs(logits - ref).max())
        with capsys.disabled():
            print(f"\nscorer {engine} {precision}: max |logit - torch| = {gap:.2e}")
        if precision == "fp32":
            assert gap <= 1e-3, engine
            expected = stage.logits_to_scores(texts, images)
            assert np.abs(scorer.scores(t, i) - expected).max() <= 1e-4


def test_upscaler_parity(tiny: dict[str, Path]) -> None:
    """The same pixels (±1 level) as RealESRGANer.enhance, pre-pads and sizes included."""
    from spotline.stages.upscale import load_upscaler, pre_pad_for, upscale_crop

    settings = _settings(tiny)
    torch_upsampler = load_upscaler(tiny["upscaler"])
    crops = [c for c in _crops() if min(c.shape[:2]) > settings.upscale_skip_side]
    for engine in ENGINES:
        model = backends.load_upscaler(tiny["upscaler"], engine)
        for crop in crops:
            ref = upscale_crop(torch_upsampler, crop, settings)
            out = model.enhance(crop, pre_pad_for(crop, settings), settings.upscale_factor)
            assert out.shape == ref.shape == (crop.shape[0] * 4, crop.shape[1] * 4, 3)
            assert np.abs(out.astype(int) - ref).max() <= 1, (engine, crop.shape)


def test_stale_export_is_refused(tiny: dict[str, Path], tmp_path: Path) -> None:
    """An export whose manifest hash is not the checkpoint's is refused, naming both hashes;
    exporting again fixes it."""
    import torch

    source = tmp_path / "upscaler.pth"
    shutil.copyfile(tiny["upscaler"], source)
    export_model("upscaler", source, ("onnx",), ("fp32",))
    backends.load_upscaler(source, "onnx")  # fresh: loads
    state = torch.load(source, weights_only=True)
    state["params"]["body.0.bias"] += 0.5  # another checkpoint under the same name
    torch.save(state, source)
    for engine in ("onnx", backends.choose_backend("auto", source)):
        with pytest.raises(ModelError, match="stale export.*sha256.*sha256.*spotline export"):
            backends.load_upscaler(source, engine)
    export_model("upscaler", source, ("onnx",), ("fp32",))
    backends.load_upscaler(source, "onnx")


def test_missing_exports_are_clear_errors(tiny: dict[str, Path], tmp_path: Path) -> None:
    source = tmp_path / "upscaler.pth"
    shutil.copyfile(tiny["upscaler"], source)
    assert backends.choose_backend("auto", source) == "torch"  # nothing exported: torch
    with pytest.raises(ModelError, match="no manifest.json; run `spotline export`"):
        backends.load_upscaler(source, "onnx")
    with pytest.raises(ModelError, match="no onnx int8 export.*it has: onnx-fp32"):
        backends.load_detector(tiny["detector"], "onnx", "int8")
    with pytest.raises(ModelError, match="backend must be one of"):
        backends.choose_backend("tensorflow", source)
    export_model("upscaler", source, ("onnx",), ("fp32",))
    assert backends.choose_backend("auto", source) == "onnx"  # the only export there
    assert backends.choose_backend("auto", tiny["upscaler"]) == (
        "openvino" if backends.x86_cpu() else "onnx")
    (export_dir(source) / "manifest.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ModelError, match="unreadable.*run `spotline export` again"):
        backends.load_upscaler(source, "onnx")
    with pytest.raises(ModelError, match="does not exist"):
        export_model("detector", tmp_path / "nope.pt")


LIGHT_WORKER = """
import json, sys
import numpy as np
from spotline.stages import backends
paths = json.loads(sys.argv[1])
for engine in ("onnx", "openvino"):
    det = backends.load_detector(paths["detector"], engine)
    boxes, scores = det.predict(np.full((90, 160, 3), 128, np.uint8), 320, 0.1, 0.1, 10, tta=True)
    up = backends.load_upscaler(paths["upscaler"], engine)
    assert up.enhance(np.zeros((12, 9, 3), np.uint8), 10, 4).shape == (48, 36, 3)
    sc = backends.load_scorer(paths["scorer"], engine)
    s = sc.scores(sc.text_embeds(["This is a photo of a bus."]),
                  sc.image_embeds([np.zeros((30, 20, 3), np.uint8)]))
    assert s.shape == (1, 1)
heavy = sorted(m for m in ("torch", "ultralytics", "transformers", "torchvision")
               if m in sys.modules)
print(json.dumps(heavy))
"""


def test_exported_backends_do_not_import_torch(tiny: dict[str, Path]) -> None:
    """Every exported model loads and runs in a process that never imports torch,
    Ultralytics or transformers."""
    arg = json.dumps({k: str(v) for k, v in tiny.items()})
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(LIGHT_WORKER), arg],
                         capture_output=True, text=True, cwd=ROOT, timeout=300, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_static_int8_with_a_calibration_set(tiny: dict[str, Path], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """`spotline export --precision int8 --calibration DIR` quantises statically (QDQ) from
    the folder's images; both engines load the result (its error is reported)."""
    from spotline.export.precision import load_calibration

    calib = load_calibration(libs.ultralytics_assets())
    assert len(calib.frames) == 2 and len(calib.crops) == 2
    source = tmp_path / "upscaler.pth"
    shutil.copyfile(tiny["upscaler"], source)
    export_model("upscaler", source, ENGINES, ("int8",), calib)
    meta = read_manifest(export_dir(source)).meta
    assert meta["int8"]["method"] == "static" and meta["int8"]["frames"] == 2
    crop = _crops()[6]
    ref = backends.load_upscaler(tiny["upscaler"], "onnx").enhance(crop, 10, 4)
    for engine in ENGINES:
        out = backends.load_upscaler(source, engine, "int8").enhance(crop, 10, 4)
        assert out.shape == ref.shape
        with capsys.disabled():
            print(f"\nupscaler {engine} int8 static: max |pixel - fp32| = "
                  f"{np.abs(out.astype(int) - ref).max()}")
    with pytest.raises(ModelError, match="no readable images"):
        load_calibration(tmp_path / "nothing-here")


def test_export_command(tiny: dict[str, Path], tmp_path: Path) -> None:
    """`spotline export` exports the configured checkpoint and says where it put it."""
    from click.testing import CliRunner

    from spotline.cli import cli

    source = tmp_path / "upscaler.pth"
    shutil.copyfile(tiny["upscaler"], source)
    env = {"SPOTLINE_UPSCALER_WEIGHTS": str(source),
           "SPOTLINE_DETECTOR_WEIGHTS": str(tiny["detector"]),
           "SPOTLINE_SCORER_DIR": str(tiny["scorer"])}
    result = CliRunner().invoke(cli, ["export", "--model", "upscaler", "--engine", "onnx",
                                      "--precision", "fp32"], env=env)
    assert result.exit_code == 0, result.output
    assert f"upscaler: {source} -> {export_dir(source)} (onnx-fp32;" in result.output
    assert read_manifest(export_dir(source)).files == {
        "onnx-fp32": {"path": "onnx-fp32/upscaler.onnx"}}
    bad = CliRunner().invoke(cli, ["export", "--model", "upscaler", "--calibration",
                                   str(tmp_path)], env=env)
    assert bad.exit_code != 0 and "no readable images for int8 calibration" in bad.output


# --- the stages on exported models ----------------------------------------------------------
def _frame_env(image: bytes, fid: str, *captions: str) -> Envelope:
    return Envelope(frame_id=fid, captions=captions or ("red bus",), image=image)


def _photo_bytes(name: str) -> bytes:
    return (libs.ultralytics_assets() / name).read_bytes()


@pytest.mark.parametrize("engine", ENGINES)
def test_stages_on_exported_models_match_torch(tiny: dict[str, Path], engine: str) -> None:
    """Detect → Upscale → Score with backend=onnx/openvino give torch's boxes (±1 px) and
    scores (±1e-3) on the same frames, TTA on."""
    from spotline.stages.detect import Detect
    from spotline.stages.score import Score
    from spotline.stages.upscale import Upscale

    frames = [_frame_env(_photo_bytes("bus.jpg"), "b", "grey missile", "red bus"),
              _frame_env(_photo_bytes("zidane.jpg"), "z", "man with a tie")]
    runs = {}
    for backend in ("torch", engine):
        settings = _settings(tiny, backend=backend, tta=True, max_det=4)
        stages = [Detect(settings), Upscale(settings), Score(settings)]
        for stage in stages:
            stage.setup()
        if backend != "torch":
            assert all(f"({engine} fp32)" in s.model_name for s in stages)
        envs = [env for _, env in stages[0].process(frames)]
        envs = [env for _, env in stages[1].process(envs)]
        runs[backend] = [env for _, env in stages[2].process(envs)]
    assert len(runs["torch"]) == len(runs[engine]) > 0
    for ref, out in zip(runs["torch"], runs[engine], strict=True):
        assert (ref.frame_id, ref.part, ref.nparts) == (out.frame_id, out.part, out.nparts)
        assert np.abs(ref.boxes - out.boxes).max() <= 1.0
        assert ref.scores.shape == out.scores.shape
        assert np.abs(ref.scores - out.scores).max() <= 1e-3


STAGE_WORKER = """
import json, sys
from spotline.common.envelope import Envelope
from spotline.common.settings import load_settings
from spotline.stages import load_stage
settings = load_settings()
image = open(sys.argv[1], "rb").read()
envs = [Envelope(frame_id="f", captions=("red bus",), image=image)]
for name in ("detect", "upscale", "score"):
    stage = load_stage(name, settings)
    stage.setup()
    envs = [env for _, env in stage.process(envs)]
import psutil
print(json.dumps({"heavy": sorted(m for m in ("torch", "ultralytics", "transformers",
                                              "torchvision") if m in sys.modules),
                  "rss_mb": psutil.Process().memory_info().rss / 2**20,
                  "scores": [env.scores.tolist() for env in envs]}))
"""


def test_stage_workers_on_exports_stay_light(tiny: dict[str, Path]) -> None:
    """The detect, upscale and score stages with backend=openvino (and onnx) run in a process
    that never imports torch, Ultralytics or transformers."""
    from .conftest import child_env

    for engine in ENGINES:
        settings = _settings(tiny, backend=engine)
        out = subprocess.run([sys.executable, "-c", STAGE_WORKER,
                              str(libs.ultralytics_assets() / "bus.jpg")],
                             env=child_env(settings, ""), cwd=ROOT, capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        report = json.loads(out.stdout.strip().splitlines()[-1])
        assert report["heavy"] == [], engine
        assert report["scores"], engine


def test_track_embedder_on_exported_models(tiny: dict[str, Path]) -> None:
    """The track stage's embedder (upscale + score on chosen crops) gives torch's embeddings
    and scores on the exported models too."""
    from spotline.stages.tracking.source import Embedder

    crops = _crops()[5:]
    captions = ("grey missile", "red bus")
    out = {}
    for backend in ("torch", "openvino"):
        embedder = Embedder(_settings(tiny, backend=backend))
        embedder.setup()
        embeds = embedder.embed("f", crops)
        out[backend] = (embeds, embedder.scores(captions, embeds),
                        embedder.scores(captions, embeds[:0]))
    (ref_e, ref_s, ref_empty), (e, s, empty) = out["torch"], out["openvino"]
    assert isinstance(e, np.ndarray) and e.shape == ref_e.shape
    assert np.abs(e - ref_e).max() <= 1e-3 and np.abs(s - ref_s).max() <= 1e-3
    assert empty.shape == ref_empty.shape == (2, 0)


def test_bench_backends_reports_time_and_memory(tiny: dict[str, Path]) -> None:
    """`bench backends`' measurement on one model: a time, an RSS and the heavy imports per
    backend (figures, not targets: only their presence is checked)."""
    from spotline.bench.backends import bench_backends, table

    paths = {k: str(v) for k, v in tiny.items()}
    report = bench_backends(_settings(tiny), paths, runs=1, engines=("onnx",),
                            precisions=("fp32",), cases=("upscaler",), say=lambda _m: None)
    row = report["cases"]["upscaler"]
    assert set(row) == {"torch", "onnx-fp32"}
    assert row["torch"]["heavy_imports"] and row["onnx-fp32"]["heavy_imports"] == []
    for figures in row.values():
        assert figures["median_s"] > 0 and figures["rss_mb"] > 0
    assert row["onnx-fp32"]["speedup"] > 0
    assert "| upscaler |" in table(report)


@pytest.mark.parametrize("shape", [(1, 1), (1, 3000), (3000, 1), (31, 33)])
def test_exported_detector_takes_any_frame_shape(tiny: dict[str, Path],
                                                 shape: tuple[int, int]) -> None:
    """Thin, tiny and odd-sized frames letterbox and predict (with TTA too) without error,
    boxes inside the frame."""
    for engine in ENGINES:
        model = backends.load_detector(tiny["detector"], engine)
        for tta in (False, True):
            boxes, scores = model.predict(np.full((*shape, 3), 200, np.uint8), 320, 0.1, 0.1,
                                          10, tta)
            assert boxes.shape == (len(scores), 4)
            assert (boxes[:, [0, 2]] <= shape[1]).all() and (boxes[:, [1, 3]] <= shape[0]).all()
            assert (boxes >= 0).all()
