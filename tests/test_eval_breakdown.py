"""`spotline eval`'s accuracy broken down by frame size, object size, colour and background:
the buckets, exact counts on a constructed dataset, and the command's lines and eval.json."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from spotline.common.settings import Settings, settings_env
from spotline.eval import bucket, colour_of, evaluate

# (width, height, background or None, [(caption, [l, t, w, h])])
SCENES = [
    (320, 200, "pale_sky", [("red star", [10, 10, 12, 10]), ("blue ring", [100, 50, 40, 40])]),
    (800, 450, "water", [("red cross", [200, 100, 70, 60]), ("grey square", [50, 50, 20, 30])]),
    (1700, 900, "water", [("white circle", [900, 400, 130, 100]),
                          ("red diamond", [10, 10, 9, 14])]),
    (1000, 600, None, [("green hexagon", [300, 300, 33, 33]), ("drone", [0, 0, 50, 10])]),
]


def write_dataset(root: Path) -> Path:
    (root / "images").mkdir(parents=True)
    lines = []
    for i, (w, h, background, notes) in enumerate(SCENES):
        ok, buf = cv2.imencode(".jpg", np.full((h, w, 3), 90, np.uint8))
        assert ok
        (root / "images" / f"image_{i}.jpg").write_bytes(buf.tobytes())
        line = {"image": f"image_{i}.jpg",
                "annotations": [{"caption": c, "bbox": b} for c, b in notes]}
        if background:
            line = {"image": line["image"], "style": "heldout", "background": background,
                    "annotations": line["annotations"]}
        lines.append(json.dumps(line))
    (root / "vlm.jsonl").write_text("\n".join(lines) + "\n")
    return root


def red_only(images: list[bytes], captions: list[list[str]]) -> list[list[list[float]]]:
    """The true box for red captions, a box far off for the others."""
    truth = {c: b for _, _, _, notes in SCENES for c, b in notes}
    return [[truth[c] if c.startswith("red") else [5000, 5000, 1, 1] for c in caps]
            for caps in captions]


def test_buckets_and_colours() -> None:
    edges = (640, 960, 1280, 1600)
    assert [bucket(v, edges) for v in (384, 639, 640, 959, 1279, 1599, 1600, 1920)] == \
        ["<640", "<640", "640-959", "640-959", "960-1279", "1280-1599", ">=1600", ">=1600"]
    assert colour_of("Grey hexagon") == "grey" and colour_of("grey") == "grey"
    assert colour_of("grey and white light aircraft") == "grey"
    assert colour_of("drone") == "other" and colour_of("") == "other"


def test_breakdown_counts_every_caption_in_its_buckets(tmp_path: Path) -> None:
    report = evaluate(write_dataset(tmp_path / "d"), red_only, progress=False, batch_size=2)
    assert report.accuracy == pytest.approx(3 / 8)
    b = report.breakdown
    assert list(b) == ["frame size", "object size", "colour", "background"]
    assert b["frame size"] == {
        "<640": {"n": 2, "hits": 1, "accuracy": 0.5},
        "640-959": {"n": 2, "hits": 1, "accuracy": 0.5},
        "960-1279": {"n": 2, "hits": 0, "accuracy": 0.0},
        ">=1600": {"n": 2, "hits": 1, "accuracy": 0.5}}
    assert {k: (v["hits"], v["n"]) for k, v in b["object size"].items()} == {
        "<16": (2, 2), "16-31": (0, 1), "32-63": (0, 3), "64-127": (1, 1), ">=128": (0, 1)}
    assert list(b["object size"]) == ["<16", "16-31", "32-63", "64-127", ">=128"]  # in order
    assert {k: (v["hits"], v["n"]) for k, v in b["colour"].items()} == {
        "blue": (0, 1), "green": (0, 1), "grey": (0, 1), "other": (0, 1), "red": (3, 3),
        "white": (0, 1)}
    assert {k: (v["hits"], v["n"]) for k, v in b["background"].items()} == {
        "(not recorded)": (0, 2), "pale_sky": (1, 2), "water": (2, 4)}
    assert json.loads(report.to_json())["breakdown"] == b


def test_eval_prints_the_breakdown_beside_the_total(tmp_path: Path, settings: Settings) -> None:
    from spotline.cli import cli

    dataset = write_dataset(tmp_path / "d")
    out = tmp_path / "report"
    env = settings_env(settings.replace(imgsz=320, warmup=0, tta=False, upscale=False))
    result = CliRunner().invoke(cli, ["eval", str(dataset), "--reference", "--out", str(out),
                                      "--no-progress"], env=env, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    text = result.output
    assert text.index("accuracy     ") < text.index("accuracy by frame size") < \
        text.index("per caption:")
    lines = {line.split(":")[0].strip(): line for line in text.splitlines()
             if line.startswith("  ") and ":" in line}
    assert "<640" in lines["frame size"] and ">=1600" in lines["frame size"]
    assert "(1/2)" in lines["frame size"] or "(0/2)" in lines["frame size"] \
        or "(2/2)" in lines["frame size"]
    assert "red" in lines["colour"] and "water" in lines["background"]
    report = json.loads((out / "eval.json").read_text())
    assert sum(v["n"] for v in report["breakdown"]["frame size"].values()) == 8
