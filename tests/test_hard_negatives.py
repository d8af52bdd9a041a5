"""Domain randomisation for training and the scorer's hard negatives: the randomised style
(deterministic, its eight training grounds, the clutter's boxes recorded as negatives clear of
every object), `negatives` in TIL lines (read and checked like annotations), the scorer's
sampler cutting background crops there, and `spotline data mine` adding the detector's own
false detections."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from spotline.cli import cli
from spotline.common.errors import InputError
from spotline.common.settings import Settings
from spotline.data import synth
from spotline.producer.dataset import BadRecord, read_dataset
from spotline.train.demo import DEMO_DIR, DemoPlan
from spotline.train.mine import false_detections, mine
from spotline.train.scorer import CropSampler, ScorerRun
from tests.test_synth_family import _digest

SMALL = {"sizes": (384, 384)}


def test_the_randomised_style_is_deterministic_and_never_uses_heldout_grounds() -> None:
    options = synth.randomised_options(seed=4, images=3, **SMALL)
    assert options.style == synth.RANDOMISED and options.randomised
    assert _digest(options, range(3)) == _digest(options, range(3))
    assert _digest(options, range(1, 2)) == \
        _digest(synth.randomised_options(seed=4, images=7, **SMALL), range(1, 2))
    assert not set(synth.TRAINING_BACKGROUNDS) & set(synth.HELDOUT_BACKGROUNDS)
    with pytest.raises(ValueError, match="backgrounds"):
        synth.randomised_options(backgrounds=("pale_sky",))


@pytest.mark.parametrize("ground", ["tinted_sky", "ground", "roofs", "dark_water"])
def test_every_training_ground_renders_with_objects_on_it(ground: str) -> None:
    scene = synth.make_scene(synth.randomised_options(seed=1, images=1, backgrounds=(ground,),
                                                      **SMALL), 0)
    assert scene.meta["background"] == ground and scene.meta["style"] == "randomised"
    assert scene.image.dtype == np.uint8 and max(scene.image.shape[:2]) == 384
    assert scene.objects and float(scene.image.std()) > 5


def test_clutter_boxes_are_negatives_clear_of_every_object() -> None:
    options = synth.randomised_options(seed=2, images=20, clutter=8, **SMALL)
    found = 0
    for i in range(20):
        scene = synth.make_scene(options, i)
        h, w = scene.image.shape[:2]
        for neg in scene.meta.get("negatives", []):
            found += 1
            left, top, bw, bh = neg
            assert 0 <= left and 0 <= top and left + bw <= w and top + bh <= h
            assert min(bw, bh) >= 4
            for obj in scene.objects:
                assert synth.covered(tuple(neg), obj.box) <= 0.2
                assert synth.covered(obj.box, tuple(neg)) <= 0.2
    assert found >= 20  # about three marks an image survive


def test_classic_and_heldout_lines_carry_no_negatives() -> None:
    for options in (synth.SynthOptions(seed=1, images=2, clutter=6),
                    synth.heldout_options(seed=1, images=2, sizes=(384, 512))):
        assert all("negatives" not in synth.make_scene(options, i).meta for i in range(2))


def _dataset(tmp_path: Path, images: int = 4) -> Path:
    out = tmp_path / "set"
    synth.synthesize(out, synth.randomised_options(seed=7, images=images, **SMALL))
    return out


def test_negatives_are_read_and_checked_like_annotations(tmp_path: Path) -> None:
    path = _dataset(tmp_path)
    records = read_dataset(path).records
    lines = [json.loads(x) for x in (path / "vlm.jsonl").read_text().splitlines()]
    assert [list(map(list, r.negatives)) for r in records] == \
        [[[float(v) for v in b] for b in line.get("negatives", [])] for line in lines]
    lines[0]["negatives"] = [[1, 2, 0, 5]]
    (path / "vlm.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    with pytest.raises(BadRecord, match=r"vlm.jsonl:1: .*bbox"):
        read_dataset(path)
    lines[0]["negatives"] = "nope"
    (path / "vlm.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    with pytest.raises(BadRecord, match="'negatives' must be a list"):
        read_dataset(path)
    assert read_dataset(path, skip_bad=True).skipped == {"corrupt line": 1}


def test_the_sampler_cuts_background_crops_at_the_negatives(tmp_path: Path) -> None:
    path = _dataset(tmp_path)
    records = [r for r in read_dataset(path).records if r.negatives]
    assert records
    run = ScorerRun(train=str(path), out=str(tmp_path / "o"), from_scratch=True,
                    hard_negatives=1.0, jitter=0.0, augment=0.0)
    sampler = CropSampler(records, lambda image, box: box, run, np.random.default_rng(0))
    boxes = [sampler._background_box(records[k % len(records)]) for k in range(12)]
    allowed = {tuple(b) for r in records for b in r.negatives}
    assert all(tuple(b) in allowed for b in boxes)
    off = CropSampler(records, lambda image, box: box,
                      ScorerRun(train=str(path), out="o", from_scratch=True, hard_negatives=0.0,
                                augment=0.0), np.random.default_rng(0))
    assert not any(b is not None and tuple(b) in allowed
                   for b in (off._background_box(records[0]) for _ in range(12)))


def test_false_detections_match_no_object() -> None:
    record = read_dataset_record([("red star", (10.0, 10.0, 20.0, 20.0))])
    found = np.array([[10, 10, 30, 30],      # the star itself
                      [12, 12, 29, 28],      # nearly it
                      [0, 0, 80, 80],        # a box around it
                      [50, 50, 70, 66],      # background
                      [90, 5, 91, 30]],      # a sliver
                     np.float32)
    assert false_detections(found, record) == [[50, 50, 20, 16]]


def read_dataset_record(annotations: list[tuple[str, tuple[float, ...]]]):  # noqa: ANN201
    from spotline.producer.dataset import TilImage

    return TilImage(Path("x.jpg"), tuple(annotations), 100, 100)


def test_mine_adds_the_demo_detectors_false_detections(tmp_path: Path) -> None:
    path = _dataset(tmp_path, images=6)
    settings = Settings(imgsz=448, conf=0.05, iou=0.5, max_det=20)
    report = mine(path, DEMO_DIR / "detector.pt", tmp_path / "mined", settings)
    assert report.images == 6 and report.detections > 0
    before = read_dataset(path).records
    after = read_dataset(tmp_path / "mined").records
    assert [r.annotations for r in after] == [r.annotations for r in before]
    added = sum(len(a.negatives) - len(b.negatives) for a, b in zip(after, before, strict=True))
    assert added == report.negatives
    for rec, old in zip(after, before, strict=True):
        assert rec.negatives[:len(old.negatives)] == old.negatives
        for box in rec.negatives[len(old.negatives):]:
            assert all(false_detections(np.array([[box[0], box[1], box[0] + box[2],
                                                   box[1] + box[3]]], np.float32), rec))
    again = mine(path, DEMO_DIR / "detector.pt", tmp_path / "mined2", settings)
    assert (tmp_path / "mined2" / "vlm.jsonl").read_bytes() == \
        (tmp_path / "mined" / "vlm.jsonl").read_bytes() and again.negatives == report.negatives


def test_mine_refuses_the_heldout_family_and_its_own_folder(tmp_path: Path) -> None:
    held = tmp_path / "held"
    synth.synthesize(held, synth.heldout_options(seed=1, images=1, sizes=(384, 400)))
    with pytest.raises(InputError, match="held-out"):
        mine(held, DEMO_DIR / "detector.pt", tmp_path / "m", Settings())
    path = _dataset(tmp_path, images=1)
    with pytest.raises(InputError, match="another folder"):
        mine(path, DEMO_DIR / "detector.pt", path, Settings())


def test_mine_and_synth_on_the_command_line(tmp_path: Path) -> None:
    runner = CliRunner()
    out = runner.invoke(cli, ["data", "synth", str(tmp_path / "r"), "--style", "randomised",
                              "--sizes", "384-384", "--images", "2", "--seed", "3"])
    assert out.exit_code == 0, out.output
    assert json.loads((tmp_path / "r" / "synth.json").read_text())["style"] == "randomised"
    out = runner.invoke(cli, ["data", "mine", str(tmp_path / "r"), str(tmp_path / "m"),
                              "--detector", str(DEMO_DIR / "detector.pt"), "--imgsz", "448"])
    assert out.exit_code == 0, out.output
    assert "false detections added as negatives" in out.output


def test_the_demo_plan_trains_on_the_randomised_style_at_its_frame_size() -> None:
    plan = DemoPlan()
    options = plan.options(plan.train_seed, 3)
    assert options.style == synth.RANDOMISED and options.sizes == (384, 384)
    assert plan.test_seed not in (plan.train_seed, plan.val_seed)
