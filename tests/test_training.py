"""Training, small and whole: synthesise a few images, check datasets, the sigmoid loss, the
augmentations, fine-tune each model for a few steps (loss going down), load the checkpoints
through the stages and run one frame through the pipeline."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from spotline.common.errors import InputError, ModelError
from spotline.common.settings import Settings, load_settings
from spotline.data import synth
from spotline.producer.dataset import BadRecord, read_dataset
from spotline.train import augment
from spotline.train.loss import caption_labels, sigmoid_loss

SIZE = (160, 112)


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 small synthetic images: train (10) and val (2)."""
    out = tmp_path_factory.mktemp("synth")
    synth.synthesize(out, synth.SynthOptions(seed=7, images=12, size=SIZE, sides=(10, 40)),
                     ratios=[10, 2, 0])
    return out


# --- synthesis ---------------------------------------------------------------------------------
def test_synth_is_deterministic_and_in_the_til_format(tmp_path: Path) -> None:
    from spotline.producer.dataset import load_til

    options = synth.SynthOptions(seed=3, images=4, size=SIZE, sides=(10, 40))
    a = synth.synthesize(tmp_path / "a", options)["all"]
    b = synth.synthesize(tmp_path / "b", options)["all"]
    c = synth.synthesize(tmp_path / "c", synth.SynthOptions(seed=4, images=4, size=SIZE,
                                                            sides=(10, 40)))["all"]
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)
    images = load_til(a)  # the reader `spotline eval` and `publish` use
    assert len(images) == 4
    vocab = set(synth.all_captions())
    for img in images:
        assert 3 <= len(img.captions) <= 6
        assert len(set(img.captions)) == len(img.captions)
        assert set(img.captions) <= vocab
        for left, top, w, h in img.boxes:
            assert left >= 0 and top >= 0 and left + w <= SIZE[0] and top + h <= SIZE[1]
            assert 4 <= max(w, h) <= 44


def test_hard_negatives_share_colour_or_shape() -> None:
    rng = np.random.default_rng(0)
    shared = 0
    for _ in range(200):
        pairs = synth.choose_objects(rng, 4, 0.75)
        assert len(set(pairs)) == 4
        colours = [c for c, _ in pairs]
        shapes = [s for _, s in pairs]
        shared += len(set(colours)) < 4 or len(set(shapes)) < 4
    assert shared > 150


def test_split_by_ratios_and_image_independence(tmp_path: Path) -> None:
    options = synth.SynthOptions(seed=1, images=5, size=SIZE, sides=(10, 30))
    parts = synth.synthesize(tmp_path / "r", options, ratios=[3, 2, 0])
    assert sorted(parts) == ["test", "train", "val"]
    whole = synth.synthesize(tmp_path / "w", options)["all"]
    # image 3 lands in val; it is the same bytes as image 3 of the unsplit set
    assert (parts["val"] / "images" / "image_3.jpg").read_bytes() == \
        (whole / "images" / "image_3.jpg").read_bytes()


def test_video_clips_have_per_frame_boxes(tmp_path: Path) -> None:
    import cv2

    from spotline.data.video import write_clips

    folder = write_clips(tmp_path, synth.SynthOptions(seed=2, images=1, size=SIZE,
                                                      sides=(10, 30)), 1, 6)[0]
    cap = cv2.VideoCapture(str(folder / "clip.mp4"))
    frames = 0
    while cap.read()[0]:
        frames += 1
    cap.release()
    lines = [json.loads(x) for x in (folder / "vlm.jsonl").read_text().splitlines()]
    assert frames == len(lines) == 6
    first, last = lines[0]["annotations"], lines[-1]["annotations"]
    assert [a["caption"] for a in first] == [a["caption"] for a in last]
    assert any(a["bbox"] != b["bbox"] for a, b in zip(first, last, strict=True))


# --- bad datasets ------------------------------------------------------------------------------
def _bad_set(tmp_path: Path, tiny_set: Path) -> Path:
    root = tmp_path / "bad"
    shutil.copytree(tiny_set / "train", root)
    good = (root / "vlm.jsonl").read_text().splitlines()
    row = json.loads(good[0])
    name = row["image"]
    lines = [
        good[0],
        "{not json",
        json.dumps({"image": "missing.jpg", "annotations": row["annotations"]}),
        json.dumps({"image": name, "annotations": [{"caption": "red star",
                                                    "bbox": [150, 100, 30, 30]}]}),
        json.dumps({"image": name, "annotations": [{"caption": " ", "bbox": [1, 1, 5, 5]}]}),
        json.dumps({"image": name, "annotations": [{"caption": "red star", "bbox": [1, 1, 5, 5]},
                                                   {"caption": "red star",
                                                    "bbox": [20, 20, 5, 5]}]}),
        good[1],
    ]
    (root / "vlm.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_bad_records_name_file_and_line_or_are_counted(tmp_path: Path, tiny_set: Path) -> None:
    root = _bad_set(tmp_path, tiny_set)
    with pytest.raises(BadRecord, match=r"vlm\.jsonl:2: not a JSON line"):
        read_dataset(root)
    report = read_dataset(root, skip_bad=True)
    assert len(report.records) == 2
    assert report.skipped == {"corrupt line": 1, "missing image": 1, "box outside image": 1,
                              "empty caption": 1, "duplicate caption": 1}
    assert "skipped 5 bad records" in report.summary()
    assert any("vlm.jsonl:4" in e and "outside" in e for e in report.examples)


def test_finetune_refuses_empty_split_and_missing_model_before_work(tmp_path: Path) -> None:
    from spotline.train.detector import DetectorRun, finetune_detector
    from spotline.train.scorer import ScorerRun, Trainer

    empty = tmp_path / "empty"
    (empty / "images").mkdir(parents=True)
    (empty / "vlm.jsonl").write_text("")
    with pytest.raises(InputError, match="no annotated images"):
        Trainer(ScorerRun(train=str(empty), out=str(tmp_path / "o"), from_scratch=True),
                Settings())
    with pytest.raises(ModelError, match="does not exist"):
        Trainer(ScorerRun(train=str(empty), out=str(tmp_path / "o"), base=str(tmp_path / "x")),
                Settings())
    with pytest.raises(InputError, match="has no images"):
        finetune_detector(DetectorRun(train=str(empty), out=str(tmp_path / "d")))
    assert not (tmp_path / "o").exists() and not (tmp_path / "d").exists()


# --- loss and augmentations --------------------------------------------------------------------
def _logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_sigmoid_loss_matches_a_hand_computed_value() -> None:
    import torch

    logits = torch.tensor([[2.0, -1.0, 0.5], [-3.0, 1.5, 0.0], [1.0, 2.0, -0.5]])
    rows = [[2.0, 1.0, -0.5], [3.0, 1.5, 0.0], [-1.0, -2.0, -0.5]]  # z * logit
    expected = sum(-sum(_logsig(v) for v in row) for row in rows) / 3
    assert float(sigmoid_loss(logits)) == pytest.approx(expected, rel=1e-6)
    # labels: caption-equality positives; background columns (None) are negatives everywhere
    labels = caption_labels(["a", "b"], ["a", "b", "a", None])
    assert labels.tolist() == [[True, False, True, False], [False, True, False, False]]


def test_sigmoid_loss_matches_transformers_siglip() -> None:
    import torch
    from transformers import SiglipConfig, SiglipModel

    torch.manual_seed(0)
    small = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                 num_attention_heads=2)
    model = SiglipModel(SiglipConfig(
        text_config={**small, "vocab_size": 50, "max_position_embeddings": 8},
        vision_config={**small, "image_size": 16, "patch_size": 8})).eval()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(10.0))
        model.logit_bias.fill_(-2.0)
        out = model(input_ids=torch.randint(0, 50, (4, 8)),
                    pixel_values=torch.randn(4, 3, 16, 16), return_loss=True)
    assert float(sigmoid_loss(out.logits_per_text)) == pytest.approx(float(out.loss), rel=1e-5)


def test_augmentations_fix_the_seeds_two_bugs() -> None:
    # noise: the seed's variance 2500 (0-255 units) is a std of 50/255 of the maximum
    assert augment.std_range((2500.0, 2500.0)) == pytest.approx((50 / 255, 50 / 255))
    import albumentations as A

    noise = A.Compose([A.GaussNoise(std_range=augment.std_range((400.0, 400.0)), p=1.0)],
                      seed=0)
    flat = np.full((64, 64, 3), 128, np.uint8)
    std = float(noise(image=flat)["image"].astype(np.float32).std())
    assert 15 < std < 25  # sqrt(400) = 20 grey levels, not 20 * 255
    # channel order: a red crop stays red through every augmentation (RGB in, RGB out)
    compose = augment.crop_augmentations(1.0, seed=0)
    red = np.zeros((24, 24, 3), np.uint8)
    red[..., 0] = 220
    for _ in range(20):
        r, g, b = augment.apply(compose, red).reshape(-1, 3).mean(axis=0)
        assert r > g + 60 and r > b + 60


# --- fine-tuning, checkpoints, the pipeline ----------------------------------------------------
@pytest.fixture(scope="module")
def scorer_run(tiny_set: Path, tmp_path_factory: pytest.TempPathFactory):
    from spotline.train.scorer import ScorerRun, finetune_scorer

    out = tmp_path_factory.mktemp("scorer")
    run = ScorerRun(train=str(tiny_set / "train"), val=str(tiny_set / "val"), out=str(out),
                    from_scratch=True, epochs=4, batch=24, lr=2e-3, warmup=0.0, augment=0.0,
                    jitter=0.0, background=0.0, image_size=16, keep=2, progress=False,
                    threads=2)
    return run, finetune_scorer(run, Settings(), say=lambda _m: None)


def test_scorer_loss_goes_down_and_checkpoints_load_in_the_score_stage(scorer_run) -> None:
    from spotline.stages.score import Score

    run, result = scorer_run
    losses = [e.loss for e in result.epochs]
    assert losses[-1] < losses[0]
    assert all(e.val_accuracy is not None for e in result.epochs)
    kept = sorted(p.name for p in Path(run.out).glob("epoch_*"))
    assert kept == ["epoch_003", "epoch_004"]
    stage = Score(load_settings(env={}, scorer_dir=str(result.final), scorer_input_size=16))
    stage.setup()
    crop = np.zeros((20, 20, 3), np.uint8)
    texts = stage.text_embeds(("red star", "blue ring"))
    scores = stage.logits_to_scores(texts, stage.image_embeds([crop]))
    assert scores.shape == (2, 1) and np.isfinite(scores).all()


def test_scorer_resumes_from_an_epoch(scorer_run, tmp_path: Path) -> None:
    from spotline.train.scorer import ScorerRun, Trainer

    run, _result = scorer_run
    resumed = ScorerRun(**{**run.__dict__, "resume": str(Path(run.out) / "epoch_003"),
                           "out": str(tmp_path), "from_scratch": True})
    trainer = Trainer(resumed, Settings())
    assert trainer.epoch == 3 and trainer.step == 3 * trainer.steps_per_epoch
    report = trainer.train_epoch()
    assert report.epoch == 4 and (tmp_path / "epoch_004" / "model.safetensors").is_file()


@pytest.fixture(scope="module")
def detector_run(tiny_set: Path, tmp_path_factory: pytest.TempPathFactory):
    from spotline.train.detector import DetectorRun, finetune_detector

    out = tmp_path_factory.mktemp("detector")
    losses: list[float] = []
    run = DetectorRun(train=str(tiny_set / "train"), val=str(tiny_set / "val"), out=str(out),
                      model="pico", epochs=3, imgsz=160, batch=4, lr=2e-3, threads=2)
    result = finetune_detector(run, on_progress=lambda i: losses.append(i["loss"]),
                               say=lambda _m: None)
    return result, losses


def test_detector_trains_and_loads_in_the_detect_stage(detector_run) -> None:
    result, losses = detector_run
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert result.weights.is_file() and 0.0 <= result.map50 <= 1.0


def test_one_frame_through_the_pipeline_with_the_trained_models(
        detector_run, scorer_run, tiny_set: Path, data_dir: Path) -> None:
    from spotline.pipeline.reference import Reference

    result, _ = detector_run
    _run, scorer = scorer_run
    settings = load_settings(env={}, data_dir=str(data_dir),
                             detector_weights=str(result.weights), scorer_dir=str(scorer.final),
                             upscale=False, imgsz=160, tta=False, warmup=1, conf=0.001)
    row = json.loads((tiny_set / "val" / "vlm.jsonl").read_text().splitlines()[0])
    image = (tiny_set / "val" / "images" / row["image"]).read_bytes()
    captions = [a["caption"] for a in row["annotations"]]
    [res] = Reference(settings).identify([image], [captions])
    assert res.error is None
    assert len(res.boxes) == len(captions)


def test_finetune_runs_as_an_rq_job_with_progress_in_meta(redis_server, tiny_set: Path,
                                                           tmp_path: Path) -> None:
    from rq.job import Job
    from rq.serializers import JSONSerializer

    from spotline.common.transport import connect
    from spotline.producer.jobs import run_jobs_worker
    from spotline.train.jobs import enqueue_finetune
    from spotline.train.scorer import ScorerRun

    run = ScorerRun(train=str(tiny_set / "train"), out=str(tmp_path / "job"), from_scratch=True,
                    epochs=2, batch=16, image_size=16, augment=0.0, threads=1)
    queue = f"train-{tmp_path.name}"
    job = enqueue_finetune("scorer", run, Settings(), redis_server.url, queue)
    run_jobs_worker(redis_server.url, queue, burst=True, fork=False, with_scheduler=False)
    done = Job.fetch(job.id, connection=connect(redis_server.url), serializer=JSONSerializer)
    assert done.get_status(refresh=True).value == "finished", done.latest_result()
    assert [e["epoch"] for e in done.meta["epochs_done"]] == [1, 2]
    result = done.return_value()
    assert Path(result["model"]).is_dir() and len(result["epochs"]) == 2


def test_demo_models_apply_only_without_weights_and_keep_user_settings(tmp_path: Path) -> None:
    from spotline.train import demo

    (tmp_path / demo.SETTINGS_FILE).write_text(
        'detector_weights = "models/demo/detector.pt"\nscorer_dir = "models/demo/scorer"\n'
        "upscale = false\nimgsz = 448\ntta = false\n")
    applied = demo.apply_demo_models(load_settings(env={}, conf=0.3), tmp_path)
    assert applied.detector_weights == str((demo.REPO / "models/demo/detector.pt").resolve())
    assert (applied.tta, applied.upscale, applied.conf) == (False, False, 0.3)
    # the training size becomes a scale: 448 on the plan's 384-px frames, any frame at 448/384
    assert (applied.imgsz, applied.imgsz_scale) == (0, pytest.approx(448 / 384))
    assert demo.is_demo(applied, tmp_path)
    user = load_settings(env={}, imgsz=640)
    assert demo.apply_demo_models(user, tmp_path).imgsz == 640  # what the user set stays
    for kept in (load_settings(env={}, models="tiny"),
                 load_settings(env={}, scorer_dir=str(tmp_path))):
        assert demo.apply_demo_models(kept, tmp_path) == kept
    assert demo.apply_demo_models(load_settings(env={}), tmp_path / "none").imgsz == 0
