"""`spotline calibrate` (= `eval --calibrate`) writes calibration.json beside the scorer, and
the track stage refuses "not in view" without one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import click
import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from spotline.cli.track import calibrate
from spotline.common.errors import ConfigError
from spotline.common.settings import Settings
from spotline.pipeline.trackmode import FrameModels
from spotline.stages.tiny import TINY_DIR, ensure_tiny_models
from spotline.stages.track import Track
from spotline.stages.tracking import calibration


def labelled_dataset(root: Path, models: FrameModels) -> Path:
    """Three images whose truth is the tiny detector's own first box (right boxes exist)."""
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(1)
    lines = []
    for k in range(3):
        img = rng.integers(60, 200, (160, 224, 3), dtype=np.uint8)
        ok, buf = cv2.imencode(".jpg", img)
        (root / "images" / f"{k}.jpg").write_bytes(buf.tobytes())
        x1, y1, x2, y2 = (float(v) for v in models.detected(f"d{k}", buf.tobytes(),
                                                             ("x",)).boxes[0])
        lines.append(json.dumps({"image": f"{k}.jpg", "annotations": [
            {"caption": f"object {k}", "bbox": [x1, y1, x2 - x1, y2 - y1]}]}))
    (root / "vlm.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_calibrate_writes_beside_the_scorer(tmp_path, data_dir, redis_server):
    tiny = ensure_tiny_models(Path(data_dir) / TINY_DIR)
    scorer = tmp_path / "scorer"
    shutil.copytree(tiny["scorer"], scorer)  # the fit writes into the scorer's folder
    fast = dict(imgsz=256, warmup=0, max_det=4, tta=False, upscale=False)
    s = Settings(data_dir=str(data_dir), detector_weights=str(tiny["detector"]),
                 upscaler_weights=str(tiny["upscaler"]), scorer_dir=str(scorer), **fast)
    dataset = labelled_dataset(tmp_path / "ds", FrameModels(s))
    env = {"SPOTLINE_DATA_DIR": str(data_dir), "SPOTLINE_DETECTOR_WEIGHTS": str(tiny["detector"]),
           "SPOTLINE_UPSCALER_WEIGHTS": str(tiny["upscaler"]), "SPOTLINE_SCORER_DIR": str(scorer),
           "SPOTLINE_IMGSZ": "256", "SPOTLINE_WARMUP": "0", "SPOTLINE_MAX_DET": "4",
           "SPOTLINE_TTA": "false", "SPOTLINE_UPSCALE": "false"}
    # Without a calibration, "not in view" cannot start.
    stage = Track(s.replace(redis_url=redis_server.url, tracking=True, not_in_view=True))
    with pytest.raises(ConfigError, match="calibration.json"):
        stage.setup()
    out = CliRunner().invoke(calibrate, [str(dataset)], env=env)
    assert out.exit_code == 0, out.output
    assert "written to" in out.output and str(scorer) in out.output
    cal = calibration.load(scorer)
    assert cal is not None and cal.method == "temperature" and cal.fitted_on >= 3
    stage.setup()  # now it can, at the threshold fitted with the calibration
    assert stage.calibration == cal and stage.options.abstain_below == cal.threshold
    bad = CliRunner().invoke(calibrate, [str(tmp_path / "nowhere")], env=env)
    assert bad.exit_code != 0


def test_bench_video_and_eval_grounding_options(tmp_path, data_dir, redis_server):
    """`spotline bench video` through the real CLI, and the options the CLI adds to `eval` (on
    a stand-in command of the same parameters: the wrapper touches nothing else)."""
    from spotline.cli import cli
    from spotline.cli.track import add_grounding_options
    from tests.test_videobench import write_clip

    called = []

    @click.command("eval")
    @click.argument("dataset")
    @click.option("--limit", type=int, default=None)
    def eval_cmd(dataset, limit):
        called.append("eval")

    add_grounding_options(eval_cmd)
    env = {"SPOTLINE_DATA_DIR": str(data_dir), "SPOTLINE_IMGSZ": "256", "SPOTLINE_WARMUP": "0",
           "SPOTLINE_MAX_DET": "3", "SPOTLINE_TTA": "false", "SPOTLINE_UPSCALE": "false",
           "SPOTLINE_REDIS_URL": redis_server.url}  # bench video's pipelines use it
    runner = CliRunner()
    for k in range(2):
        write_clip(tmp_path / "clips" / f"clip_{k:03d}", k, frames=2)
    out = runner.invoke(cli, ["bench", "video", str(tmp_path / "clips"), "--frames", "2",
                              "--json", str(tmp_path / "v.json")], env=env)
    assert out.exit_code == 0, out.output
    assert "through the streaming pipeline" in out.output and "track mode:" in out.output
    assert out.output.startswith("machine: ")  # the probe first, as every bench subcommand
    report = json.loads((tmp_path / "v.json").read_text())
    assert "in_process" not in report  # unless --in-process
    assert report["frames"] == 4 and report["pipeline"]["track"]["frames"] == 4
    dataset = tmp_path / "ds"
    (dataset / "images").mkdir(parents=True)
    ok, buf = cv2.imencode(".jpg", np.full((96, 128, 3), 90, np.uint8))
    (dataset / "images" / "a.jpg").write_bytes(buf.tobytes())
    (dataset / "vlm.jsonl").write_text(json.dumps({"image": "a.jpg", "annotations": [
        {"caption": "red star", "bbox": [1, 2, 30, 40]},
        {"caption": "blue ring", "bbox": [50, 20, 30, 30]}]}) + "\n")
    out = runner.invoke(eval_cmd, [str(dataset), "--grounding"], env=env)
    assert out.exit_code == 0, out.output
    assert called == ["eval"] and "one box per caption" in out.output
