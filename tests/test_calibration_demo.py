"""The demo-model recipe's calibration step (`spotline models demo --calibrate`, also run by
--retrain): fitted on the val split beside the installed scorer, recorded in the manifest; and
the committed demo calibration is one that file format and the threshold rule accept."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np

from spotline.common.settings import Settings
from spotline.pipeline.trackmode import FrameModels
from spotline.stages.tiny import TINY_DIR, ensure_tiny_models
from spotline.stages.tracking import calibration
from spotline.train import demo

FAST = dict(imgsz=256, warmup=0, max_det=4, tta=False, upscale=False)


def val_split(root: Path, models: FrameModels) -> Path:
    """Four images of two captions each; each caption's truth is one of the tiny detector's
    own boxes (so right boxes exist for the fit)."""
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(5)
    lines = []
    for k in range(4):
        img = rng.integers(40, 220, (160, 224, 3), dtype=np.uint8)
        buf = cv2.imencode(".jpg", img)[1].tobytes()
        (root / "images" / f"{k}.jpg").write_bytes(buf)
        boxes = models.detected(f"v{k}", buf, ("x",)).boxes
        notes = [{"caption": f"thing {k} {j}",
                  "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]}
                 for j, b in enumerate(boxes[:2])]
        lines.append(json.dumps({"image": f"{k}.jpg", "annotations": notes}))
    (root / "vlm.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_models_demo_calibrate_fits_on_val_and_records_it(tmp_path, data_dir):
    tiny = ensure_tiny_models(Path(data_dir) / TINY_DIR)
    out = tmp_path / "demo"
    shutil.copytree(tiny["scorer"], out / "scorer")
    (out / demo.SETTINGS_FILE).write_text(
        f'detector_weights = "{tiny["detector"]}"\nscorer_dir = "{out / "scorer"}"\n'
        "upscale = false\nimgsz = 256\ntta = false\nwarmup = 0\nmax_det = 4\n")
    (out / demo.MANIFEST_FILE).write_text(json.dumps({"test": {"accuracy": 0.5}}))
    settings = Settings(data_dir=str(data_dir), **FAST)
    models = FrameModels(settings.replace(detector_weights=str(tiny["detector"]),
                                          scorer_dir=str(out / "scorer")))
    val_split(tmp_path / "work" / "data" / "val", models)
    plan = demo.DemoPlan(work=str(tmp_path / "work"), out=str(out), val_clips=1,
                         val_clip_frames=6, val_clip_size=(256, 160))
    said: list[str] = []
    fitted = demo.recalibrate(plan, settings, said.append)
    cal = calibration.load(out / "scorer")
    assert cal is not None and cal.has_presence and cal.threshold is not None
    assert fitted["split"] == "val" and fitted["seed"] == plan.val_seed
    assert fitted["threshold"] == round(cal.threshold, 4)
    manifest = json.loads((out / demo.MANIFEST_FILE).read_text())
    assert manifest["calibration"] == fitted and manifest["test"] == {"accuracy": 0.5}
    assert any("not in view under" in line for line in said)
    # track mode's own threshold, on val clips made at the val seed and run through track mode
    assert cal.track_threshold is not None and fitted["track"]["threshold"] == round(
        cal.track_threshold, 4)
    assert cal.track_threshold_fit["frames"] == 6 and fitted["track"]["target_precision"] == 0.9
    assert (tmp_path / "work" / "data" / "val-clips" / "clip_000" / "vlm.jsonl").is_file()
    assert manifest["plan"]["track_calibration_precision"] == 0.9


def test_the_committed_demo_calibration_loads_with_its_threshold():
    cal = calibration.load(demo.DEMO_DIR / "scorer")
    assert cal is not None and cal.has_presence
    assert cal.threshold is not None and 0.0 < cal.threshold < 1.0
    assert cal.threshold_fit["target_precision"] == demo.DemoPlan().calibration_precision
    manifest = json.loads((demo.DEMO_DIR / demo.MANIFEST_FILE).read_text())
    assert manifest["calibration"]["threshold"] == round(cal.threshold, 4)
    # track mode abstains at its own threshold, fitted on val clips
    assert cal.track_threshold is not None and 0.0 < cal.track_threshold < 1.0
    assert cal.track_threshold_fit["target_precision"] == \
        demo.DemoPlan().track_calibration_precision
    assert manifest["calibration"]["track"]["threshold"] == round(cal.track_threshold, 4)
