"""The competition scorer: IoU, round(IoU) accuracy, speed score, TIL loading and reports."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from spotline.common.errors import InputError
from spotline.eval import (
    EvalReport,
    accuracy,
    evaluate,
    hit,
    iou_ltwh,
    speed_score,
    write_report,
)
from spotline.producer.dataset import TilImage, load_til, read_dataset

# --- IoU and accuracy ----------------------------------------------------------------------


def test_iou_hand_computed() -> None:
    assert iou_ltwh([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert iou_ltwh([0, 0, 10, 10], [0, 0, 5, 10]) == 0.5  # 50 / 100
    assert iou_ltwh([0, 0, 100, 1], [0, 0, 51, 1]) == pytest.approx(0.51)
    assert iou_ltwh([0, 0, 10, 10], [5, 5, 10, 10]) == pytest.approx(25 / 175)
    assert iou_ltwh([0, 0, 10, 10], [10, 0, 10, 10]) == 0.0  # touching edges
    assert iou_ltwh([0, 0, 10, 10], [50, 50, 3, 3]) == 0.0
    assert iou_ltwh([0, 0, 0, 0], [0, 0, 0, 0]) == 0.0  # empty union
    assert iou_ltwh([0, 0, -5, 10], [0, 0, 10, 10]) == 0.0  # negative size is empty


def test_round_iou_half_to_even() -> None:
    gt = [0, 0, 10, 10]
    assert hit([0, 0, 5, 10], gt) == 0  # IoU exactly 0.5 scores 0 (round half to even)
    assert hit([0, 0, 100, 1], [0, 0, 51, 1]) == 1  # IoU 0.51 scores 1
    assert hit([0, 0, 10, 10], gt) == 1
    assert hit([100, 100, 5, 5], gt) == 0  # no overlap
    assert hit(None, gt) == 0  # missing prediction
    assert hit([1, 2], gt) == 0  # malformed prediction
    assert hit([float("nan"), 0, 10, 10], gt) == 0


def test_accuracy_mean_over_captions() -> None:
    gts = [[0, 0, 10, 10], [0, 0, 51, 1], [20, 20, 10, 10], [0, 0, 10, 10]]
    preds = [[0, 0, 10, 10], [0, 0, 100, 1], [0, 0, 5, 5], None]
    assert accuracy(preds, gts) == 0.5  # hit, hit (0.51), miss, missing
    assert accuracy(preds[:2], gts) == 0.5  # absent predictions score 0
    assert accuracy([[0, 0, 5, 10]], [[0, 0, 10, 10]]) == 0.0  # exactly 0.5
    assert accuracy([], []) == 0.0
    with pytest.raises(ValueError):
        accuracy([[0, 0, 1, 1]] * 2, [[0, 0, 1, 1]])


def test_speed_score() -> None:
    assert speed_score(0) == 1.0
    assert speed_score(15) == 0.5
    assert speed_score(30) == 0.0
    assert speed_score(45) == 0.0
    assert speed_score(3, t_max=10) == pytest.approx(0.7)
    with pytest.raises(ValueError):
        speed_score(1, t_max=0)


# --- TIL datasets and evaluate -------------------------------------------------------------

ROWS = [
    {"image": "image_0.jpg", "annotations": [
        {"caption": "grey missile", "bbox": [10, 10, 20, 20]},
        {"caption": "red car", "bbox": [40, 0, 10, 10]}]},
    {"image": "image_1.jpg", "annotations": [
        {"caption": "grey missile", "bbox": [0, 0, 10, 10]},
        {"caption": "blue boat", "bbox": [30, 30, 10, 20]}]},
    {"image": "image_2.jpg", "annotations": [
        {"caption": "red car", "bbox": [5, 5, 5, 5]}]},
]


@pytest.fixture
def til(tmp_path: Path) -> Path:
    root = tmp_path / "til"
    (root / "images").mkdir(parents=True)
    for i, row in enumerate(ROWS):
        ok, buf = cv2.imencode(".jpg", np.full((60, 80, 3), 50 * i, np.uint8))
        assert ok
        (root / "images" / row["image"]).write_bytes(buf.tobytes())
    (root / "vlm.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return root


def test_load_til(til: Path) -> None:
    images = load_til(til)
    assert load_til(til / "vlm.jsonl") == images
    assert [i.image_path for i in images] == [til / "images" / r["image"] for r in ROWS]
    assert images[0].annotations == (("grey missile", (10.0, 10.0, 20.0, 20.0)),
                                     ("red car", (40.0, 0.0, 10.0, 10.0)))
    assert images[1].captions == ("grey missile", "blue boat")
    assert images[2].boxes == ((5.0, 5.0, 5.0, 5.0),)


@pytest.mark.parametrize("line", [
    "{not json",
    '{"annotations": []}',
    '{"image": "image_0.jpg", "annotations": [{"caption": "x", "bbox": [1, 2, 3]}]}',
    '{"image": "image_0.jpg", "annotations": [{"caption": "x", "bbox": [1, 2, -3, 4]}]}',
    '{"image": "missing.jpg", "annotations": []}',
    # the checks training makes: eval and publish read with the same reader
    '{"image": "image_0.jpg", "annotations": [{"caption": "x", "bbox": [1, 2, 0, 4]}]}',
    '{"image": "image_0.jpg", "annotations": [{"caption": " ", "bbox": [1, 2, 3, 4]}]}',
    '{"image": "image_0.jpg", "annotations": [{"caption": "x", "bbox": [1, 2, 3, 4]}, '
    '{"caption": "x", "bbox": [5, 6, 3, 4]}]}',
])
def test_load_til_bad_lines(til: Path, line: str) -> None:
    (til / "vlm.jsonl").write_text(json.dumps(ROWS[0]) + "\n" + line + "\n")
    with pytest.raises(InputError, match="vlm.jsonl:2"):
        load_til(til)


def test_load_til_is_the_training_reader_without_image_headers(til: Path) -> None:
    assert load_til(til) == read_dataset(til, check_images=False).records
    checked = read_dataset(til).records
    assert [i.annotations for i in checked] == [i.annotations for i in load_til(til)]
    assert all(i.width > 0 and i.height > 0 for i in checked)
    assert [i.line for i in checked] == [1, 2, 3]


def test_load_til_missing(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no TIL dataset"):
        load_til(tmp_path)


def _answers(images: list[bytes], captions: list[list[str]]) -> list[list[list[float]]]:
    """Image 0: both right; image 1: missile at IoU 0.5 (miss), boat right; image 2 raises."""
    assert len(images) == 1 and images[0][:2] == b"\xff\xd8"
    table = {
        ("grey missile", "red car"): [[10, 10, 20, 20], [40, 0, 10, 10]],
        ("grey missile", "blue boat"): [[0, 0, 5, 10], [30, 30, 10, 20]],
    }
    key = tuple(captions[0])
    if key not in table:
        raise RuntimeError("model exploded")
    return [table[key]]  # type: ignore[index]


def test_evaluate_scores_and_survives_errors(til: Path) -> None:
    report = evaluate(til, _answers, t_max=30, progress=False)
    assert isinstance(report, EvalReport)
    assert report.n_images == 3 and report.n_captions == 5
    assert report.accuracy == pytest.approx(3 / 5)
    assert report.per_caption == {
        "blue boat": {"n": 1, "hits": 1, "accuracy": 1.0},
        "grey missile": {"n": 2, "hits": 1, "accuracy": 0.5},
        "red car": {"n": 2, "hits": 1, "accuracy": 0.5},
    }
    assert report.errors == [{"image": str(til / "images" / "image_2.jpg"),
                              "error": "RuntimeError: model exploded"}]
    assert 0 < report.total_seconds < 5
    assert report.speed_score == pytest.approx(1 - report.total_seconds / 30)
    assert len(report.latencies) == 3
    assert 0 <= report.latency_p50 <= report.latency_p95 <= report.latency_p99


def test_evaluate_short_answers_and_batches(til: Path) -> None:
    calls: list[int] = []

    def first_box_only(images: list[bytes], captions: list[list[str]]) -> list:
        calls.append(len(images))
        return [[[10, 10, 20, 20]] for _ in images]

    report = evaluate(load_til(til), first_box_only, progress=False, batch_size=2)
    assert calls == [2, 1]
    assert report.n_captions == 5 and report.accuracy == pytest.approx(1 / 5)
    assert [e["error"] for e in report.errors] == ["expected 2 boxes, got 1"] * 2


def test_evaluate_wrong_result_count(til: Path) -> None:
    report = evaluate(til, lambda images, captions: [], progress=False)
    assert report.accuracy == 0.0 and len(report.errors) == 3
    assert "0 results for 1 images" in report.errors[0]["error"]


def test_report_json_and_png(til: Path, tmp_path: Path) -> None:
    report = evaluate(til, _answers, progress=False)
    json_path, png_path = write_report(report, tmp_path / "out")
    assert json_path == tmp_path / "out" / "eval.json"
    data = json.loads(json_path.read_text())
    assert data == json.loads(report.to_json())
    for key in ("accuracy", "speed_score", "total_seconds", "n_images", "n_captions",
                "latency_p50", "latency_p95", "latency_p99", "per_caption", "errors"):
        assert key in data
    assert data["per_caption"]["blue boat"] == {"n": 1, "hits": 1, "accuracy": 1.0}
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cv2.imread(str(png_path)).shape[0] >= 400
    assert "accuracy 0.6000" in report.summary()


def test_report_of_empty_run(tmp_path: Path) -> None:
    report = evaluate([], _answers, progress=False)
    assert report.accuracy == 0.0 and report.n_images == 0 and report.latency_p99 == 0.0
    write_report(report, tmp_path)
    assert (tmp_path / "eval.png").is_file()


def test_til_image_is_plain_data() -> None:
    img = TilImage(Path("x.jpg"), (("car", (1.0, 2.0, 3.0, 4.0)),))
    assert img.captions == ("car",) and img.boxes == ((1.0, 2.0, 3.0, 4.0),)
