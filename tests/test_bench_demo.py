"""`spotline bench demo`: the demo models through the streaming pipeline on held-out frames
of a chosen size; the frames are the held-out family at exactly that size, and the report's
latency, stage times and accuracy come from the pipeline's own answers."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from spotline.bench.demo import demo_frames
from spotline.cli import cli


def test_demo_frames_are_heldout_scenes_of_the_size_asked() -> None:
    frames, truth = demo_frames((640, 360), 3)
    assert len(frames) == len(truth) == 3
    import cv2
    import numpy as np

    for frame, boxes in zip(frames, truth, strict=True):
        image = cv2.imdecode(np.frombuffer(frame.image, np.uint8), cv2.IMREAD_COLOR)
        assert image.shape[:2] == (360, 640)
        assert len(frame.captions) == len(boxes) >= 3
    assert demo_frames((640, 360), 3)[0] == frames  # deterministic


def test_bench_demo_runs_the_pipeline_and_reports(tmp_path: Path) -> None:
    out = tmp_path / "demo.json"
    got = CliRunner().invoke(cli, ["bench", "demo", "--size", "384x256", "--frames", "2",
                                   "--rounds", "1", "--json", str(out)])
    assert got.exit_code == 0, got.output
    assert "light load (2 frames of 384x256" in got.output and "machine:" in got.output
    report = json.loads(out.read_text())
    assert report["size"] == [384, 256] and report["frames"] == 2
    assert 0 < report["light_p50_ms"] <= report["light_p95_ms"]
    assert {"detect", "score", "collect"} <= set(report["light_stages"])
    assert 0.0 <= report["accuracy"] <= 1.0 and report["errors"] == 0
    assert report["settings"]["imgsz"] == 0 and "probe" in report
