"""The held-out scene family and the domain-randomisation options of `spotline data synth`:
deterministic for a seed, in the TIL format with their metadata, the classic style unchanged,
and no training command accepts the held-out family."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from spotline.cli import cli
from spotline.common.errors import InputError
from spotline.data import synth

SMALL = {"sizes": (384, 640)}  # the family's look at small sizes: quick to render


def _digest(options: synth.SynthOptions, indices: range) -> str:
    h = hashlib.sha256()
    for i in indices:
        scene = synth.make_scene(options, i)
        h.update(scene.image.tobytes())
        h.update(repr(scene.record(f"image_{i}.jpg")).encode())
        h.update(str(scene.quality).encode())
    return h.hexdigest()


def test_the_classic_style_is_unchanged_by_default() -> None:
    """The same bytes as before the held-out family and the options existed."""
    options = synth.SynthOptions(seed=3, images=3, size=(384, 256))
    assert options.style == synth.CLASSIC and not options.randomised
    assert _digest(options, range(3)) == \
        "ab228cd9f4d7b9be84157917148c30bfbf64e839376e4f0adbf5d190d8993089"


def test_the_heldout_family_is_deterministic_per_seed_and_image() -> None:
    options = synth.heldout_options(seed=5, images=3, **SMALL)
    assert _digest(options, range(3)) == _digest(options, range(3))
    assert _digest(options, range(1, 2)) == \
        _digest(synth.heldout_options(seed=5, images=9, **SMALL), range(1, 2))
    assert _digest(options, range(2)) != _digest(synth.heldout_options(seed=6, **SMALL),
                                                 range(2))


def test_randomisation_options_are_deterministic_and_recorded() -> None:
    options = synth.SynthOptions(seed=2, images=2, size=(384, 256), sides=(8, 60),
                                 sizes=(384, 800), clutter=6, low_contrast=0.5, occlusion=0.5,
                                 rotate=True, motion_blur=0.5)
    assert options.randomised
    assert _digest(options, range(2)) == _digest(options, range(2))
    scene = synth.make_scene(options, 0)
    assert scene.meta == {"style": "classic", "background": scene.meta["background"]}
    assert scene.meta["background"] in synth.BACKGROUNDS
    assert 384 <= max(scene.image.shape[:2]) <= 800


def test_the_heldout_family_spans_sizes_aspects_and_backgrounds() -> None:
    """Frame sizes and backgrounds are the first draws of each image's generator: read them
    for 200 images without rendering."""
    options = synth.heldout_options(seed=31, images=200)
    sizes, kinds = [], []
    for i in range(200):
        rng = synth.rng_for(options.seed, i)
        sizes.append(synth.frame_size(options, rng))
        kinds.append(options.backgrounds[int(rng.integers(len(options.backgrounds)))])
    longs = [max(s) for s in sizes]
    assert 384 <= min(longs) < 500 and 1800 < max(longs) <= 1920
    aspects = {round(max(w, h) / min(w, h), 1) for w, h in sizes}
    assert len(aspects) >= 5
    assert any(h > w for w, h in sizes)  # some portrait
    assert set(kinds) == set(synth.HELDOUT_BACKGROUNDS)
    assert not set(synth.HELDOUT_BACKGROUNDS) & set(synth.BACKGROUNDS)  # another look


def test_heldout_datasets_are_til_with_style_background_and_their_options(
        tmp_path: Path) -> None:
    options = synth.heldout_options(seed=8, images=4, **SMALL)
    out = synth.synthesize(tmp_path / "held", options)["all"]
    vocab = set(synth.all_captions())
    lines = [json.loads(line) for line in (out / synth.DATASET_FILE).read_text().splitlines()]
    assert len(lines) == 4
    for line in lines:
        assert line["style"] == "heldout" and line["background"] in synth.HELDOUT_BACKGROUNDS
        import cv2

        image = cv2.imread(str(out / "images" / line["image"]))
        h, w = image.shape[:2]
        captions = [a["caption"] for a in line["annotations"]]
        assert captions and len(set(captions)) == len(captions) and set(captions) <= vocab
        for a in line["annotations"]:
            left, top, bw, bh = a["bbox"]
            assert 0 <= left and left + bw <= w and 0 <= top and top + bh <= h
            assert 4 <= max(bw, bh) <= 120 * 1.5  # rotation widens a box by up to √2
    family = json.loads((out / synth.FAMILY_FILE).read_text())
    assert family["style"] == "heldout" and family["seed"] == 8


def test_options_are_checked() -> None:
    with pytest.raises(ValueError, match="style"):
        synth.SynthOptions(style="other")
    with pytest.raises(ValueError, match="backgrounds"):
        synth.SynthOptions(backgrounds=("pale_sky",))  # the held-out family's, not classic's
    with pytest.raises(ValueError, match="low_contrast"):
        synth.SynthOptions(low_contrast=1.5)
    with pytest.raises(ValueError, match="object sides"):
        synth.SynthOptions(sizes=(384, 800), sides=(150, 200))


# --- training never sees the held-out family ---------------------------------------------------
@pytest.fixture(scope="module")
def heldout_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("family")
    return synth.synthesize(root / "held", synth.heldout_options(seed=4, images=2, **SMALL))["all"]


def test_refuse_heldout_knows_the_family_by_its_options_or_its_lines(
        heldout_dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="held-out"):
        synth.refuse_heldout(heldout_dataset)
    with pytest.raises(InputError, match="held-out"):
        synth.refuse_heldout(heldout_dataset / synth.DATASET_FILE)
    copied = tmp_path / "copied"  # its lines without synth.json: still refused
    shutil.copytree(heldout_dataset, copied)
    (copied / synth.FAMILY_FILE).unlink()
    with pytest.raises(InputError, match="held-out"):
        synth.refuse_heldout(copied)
    classic = synth.synthesize(tmp_path / "classic", synth.SynthOptions(seed=1, images=2))["all"]
    synth.refuse_heldout(classic)  # accepted


@pytest.mark.parametrize("command", [["finetune", "detector"],
                                     ["finetune", "scorer", "--from-scratch"]])
def test_training_commands_refuse_the_heldout_family(heldout_dataset: Path, tmp_path: Path,
                                                     command: list[str]) -> None:
    result = CliRunner().invoke(cli, [*command[:2], str(heldout_dataset), str(tmp_path / "run"),
                                      *command[2:]])
    assert result.exit_code != 0
    assert "held-out" in result.output or "held-out" in str(result.exception)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_training_commands_refuse_it_as_validation_data(heldout_dataset: Path,
                                                        tmp_path: Path) -> None:
    train = synth.synthesize(tmp_path / "train", synth.SynthOptions(seed=1, images=2))["all"]
    result = CliRunner().invoke(cli, ["finetune", "detector", str(train), str(tmp_path / "run"),
                                      "--val", str(heldout_dataset)])
    assert result.exit_code != 0
    assert "held-out" in result.output or "held-out" in str(result.exception)


def test_low_contrast_objects_are_fainter() -> None:
    """The same first object (the faint draw comes after it is placed), drawn faint: it
    differs less from the ground around it."""
    base = dict(seed=9, images=1, size=(384, 256), sides=(30, 60), blur_p=0.0)
    plain = synth.make_scene(synth.SynthOptions(**base), 0)
    faint = synth.make_scene(synth.SynthOptions(**base, low_contrast=1.0), 0)
    assert plain.objects[0].box == faint.objects[0].box
    left, top, w, h = plain.objects[0].box
    gaps = []
    for scene in (plain, faint):
        img = scene.image.astype(np.float32)
        inner = img[top + h // 3:top + 2 * h // 3, left + w // 3:left + 2 * w // 3]
        ring = img[max(0, top - 8):max(1, top - 2), left:left + w]
        if not ring.size:
            ring = img[top + h + 2:top + h + 8, left:left + w]
        gaps.append(float(np.abs(inner.mean((0, 1)) - ring.mean((0, 1))).sum()))
    assert gaps[1] < 0.8 * gaps[0]
