"""`spotline eval` on a tiny TIL-format set written by the test: the in-process reference
pipeline with tiny models, through the real CLI."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from spotline.common.settings import Settings, settings_env


def write_til(root: Path) -> Path:
    """3 images of 160x96 with a bright rectangle each, 2 captions per image."""
    (root / "images").mkdir(parents=True)
    lines = []
    for i in range(3):
        img = np.full((96, 160, 3), 40, np.uint8)
        cv2.rectangle(img, (20 + 10 * i, 15), (70 + 10 * i, 60), (230, 230, 230), -1)
        ok, buf = cv2.imencode(".jpg", img)
        assert ok
        (root / "images" / f"image_{i}.jpg").write_bytes(buf.tobytes())
        lines.append(json.dumps({"image": f"image_{i}.jpg", "annotations": [
            {"caption": "grey missile", "bbox": [20 + 10 * i, 15, 50, 45]},
            {"caption": "yellow helicopter" if i % 2 else "white drone",
             "bbox": [100, 60, 30, 20]}]}))
    (root / "vlm.jsonl").write_text("\n".join(lines) + "\n")
    return root


def invoke(settings: Settings, *args: str) -> str:
    from spotline.cli import cli
    result = CliRunner().invoke(cli, list(args), env=settings_env(settings),
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_eval_reference_writes_report(tmp_path: Path, settings: Settings) -> None:
    dataset = write_til(tmp_path / "til")
    out = tmp_path / "report"
    s = settings.replace(imgsz=320, warmup=0, tta=False)
    text = invoke(s, "eval", str(dataset), "--reference", "--t-max", "30", "--out", str(out),
                  "--limit", "2", "--batch-size", "2", "--no-progress")
    report = json.loads((out / "eval.json").read_text())
    assert 0.0 <= report["accuracy"] <= 1.0
    assert report["n_images"] == 2 and report["n_captions"] == 4  # --limit 2
    assert report["t_max"] == 30 and 0.0 <= report["speed_score"] <= 1.0
    assert report["errors"] == []
    assert set(report["per_caption"]) == {"grey missile", "white drone", "yellow helicopter"}
    assert (out / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for word in ("accuracy", "speed score", "p50", "p95", "p99", "per caption:",
                 "grey missile", f"wrote {out / 'eval.json'}"):
        assert word in text


def test_eval_rejects_a_bad_dataset(tmp_path: Path, settings: Settings) -> None:
    from spotline.cli import cli
    (tmp_path / "vlm.jsonl").write_text('{"image": "missing.jpg", "annotations": []}\n')
    result = CliRunner().invoke(cli, ["eval", str(tmp_path), "--reference"],
                                env=settings_env(settings))
    assert result.exit_code == 1
    assert "image not found" in result.output and "vlm.jsonl:1" in result.output


@pytest.mark.parametrize("command", ["publish", "results", "ingest", "jobs", "eval"])
def test_every_command_has_help(command: str) -> None:
    from spotline.cli import cli
    result = CliRunner().invoke(cli, [command, "--help"])
    assert result.exit_code == 0 and "Usage:" in result.output
    assert len(result.output.split("Options:")[0].strip().splitlines()) > 2  # a description
