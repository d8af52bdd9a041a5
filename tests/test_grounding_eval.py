"""eval's grounding lines and calibration fit: pure report on scripted scores, and the whole
path on a small dataset with the tiny models."""

from __future__ import annotations

import json
import math

import cv2
import numpy as np

from spotline.common.settings import Settings
from spotline.eval.grounding import (
    Scored,
    fit_calibration,
    grounding_report,
    labelled_pairs,
    report_lines,
    score_dataset,
)
from spotline.pipeline.trackmode import FrameModels
from spotline.producer.dataset import load_til
from spotline.stages.tracking.calibration import Calibration


def test_report_on_scripted_scores():
    boxes = np.array([[0, 0, 10, 10], [50, 50, 60, 60]], np.float32)
    # Both captions prefer box 0; the second's truth is box 1; the third names nothing.
    scored = [Scored(("a", "b", "zzz"), ((0, 0, 10, 10), (50, 50, 10, 10), None), boxes,
                     np.array([[0.9, 0.1], [0.8, 0.7], [0.05, 0.1]]))]
    identity = Calibration("temperature")
    report = grounding_report(scored, identity, abstain_below=0.5)
    assert report["argmax"] == 0.5 and report["joint"] == 1.0
    assert report["joint_not_in_view"] == 1.0
    assert report["abstain_precision"] == 1.0 and report["abstain_recall"] == 1.0
    assert report["captions"] == 2 and report["absent_captions"] == 1
    lines = report_lines(report)
    assert len(lines) == 2 and "1.0000 with one box per caption, 0.5000 without" in lines[0]
    assert "precision 1.0000, recall 1.0000" in lines[1]
    no_cal = grounding_report(scored)
    assert "abstain_recall" not in no_cal and "not measured" in report_lines(no_cal)[1]
    # A calibration without its own threshold and none given: no "not in view" line.
    assert "joint_not_in_view" not in grounding_report(scored, identity)
    # Pairs come from the captions in view only (absent ones feed the presence model).
    scores, labels = labelled_pairs(scored)
    assert scores.tolist() == [0.9, 0.1, 0.8, 0.7]
    assert labels.tolist() == [1, 0, 0, 1]


def test_fit_on_a_small_dataset_with_the_tiny_models(tmp_path, data_dir):
    settings = Settings(data_dir=str(data_dir), imgsz=256, warmup=0, max_det=4, tta=False,
                        upscale=False)
    models = FrameModels(settings)
    (tmp_path / "images").mkdir()
    rng = np.random.default_rng(0)
    lines = []
    for k in range(3):
        img = rng.integers(60, 200, (160, 224, 3), dtype=np.uint8)
        cv2.rectangle(img, (20 + 10 * k, 30), (90, 100), (30, 30, 220), -1)
        ok, buf = cv2.imencode(".jpg", img)
        (tmp_path / "images" / f"{k}.jpg").write_bytes(buf.tobytes())
        # The truth is the tiny detector's own first box: a labelled set with right boxes.
        det = models.detected(f"d{k}", buf.tobytes(), ("x",))
        x1, y1, x2, y2 = (float(v) for v in det.boxes[0])
        lines.append(json.dumps({"image": f"{k}.jpg", "annotations": [
            {"caption": f"object {k}", "bbox": [x1, y1, x2 - x1, y2 - y1]}]}))
    (tmp_path / "vlm.jsonl").write_text("\n".join(lines) + "\n")
    images = load_til(tmp_path)
    cal, path = fit_calibration(settings, images, save=False)
    assert path is None and cal.fitted_on >= 3 and cal.temperature > 0
    assert cal.has_presence and cal.threshold is not None  # one absent caption per image
    scored = score_dataset(settings, images, absent=1)
    assert all(len(s.captions) == 2 and s.truth[1] is None for s in scored)
    report = grounding_report(scored, cal)
    assert report["captions"] == 3 and report["absent_captions"] == 3
    assert not math.isnan(report["argmax"])
