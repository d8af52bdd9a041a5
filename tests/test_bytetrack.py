"""The numpy ByteTrack (stages/tracking/bytetrack.py) runs as Ultralytics 8.4's BYTETracker
does, which track mode was measured with: the same ids for every box, the same lost pool and the
same Kalman states, on easy and crowded scenes; and tracking imports neither torch nor
Ultralytics."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from ultralytics.trackers.byte_tracker import BYTETracker as UltralyticsBYTETracker

from spotline.stages.tracking import bytetrack
from spotline.stages.tracking.tracker import TrackerConfig, _Detections
from tests.conftest import ROOT
from tests.test_tracker import scene

CONFIGS = [TrackerConfig(), TrackerConfig(fuse_score=True), TrackerConfig(track_buffer=5)]


def crowded(frames: int, seed: int) -> list[tuple[np.ndarray, np.ndarray, None]]:
    """Eight objects crossing at their own speeds and sizes, each missing from a fifth of the
    frames, scores from 0.02 (under the low threshold) to 0.9, and up to two false boxes a
    frame."""
    rng = np.random.default_rng(seed)
    start, size = rng.uniform(0, 400, (8, 2)), rng.uniform(8, 60, (8, 2))
    velocity = rng.normal(0, 4, (8, 2))
    out = []
    for f in range(frames):
        centre = start + f * velocity
        boxes = np.concatenate([centre - size / 2, centre + size / 2], 1)[rng.random(8) > 0.2]
        boxes = (boxes + rng.normal(0, 2, boxes.shape)).astype(np.float32)
        corner = rng.uniform(0, 400, (int(rng.integers(0, 3)), 2))
        false = np.concatenate([corner, corner + 20], 1).astype(np.float32)
        scores = np.concatenate([rng.uniform(0.02, 0.9, len(boxes)),
                                 rng.uniform(0.05, 0.3, len(false))]).astype(np.float32)
        out.append((np.concatenate([boxes, false]), scores, None))
    return out


def run(tracker_class, frames, config: TrackerConfig) -> list:
    """Per frame: each box's track id, and (id, state, Kalman mean) of every followed and lost
    track."""
    tracker = tracker_class(config.args())
    out = []
    for boxes, scores, _ in frames:
        dets = _Detections(boxes, scores)
        tracker.update(dets)
        ids = [-1] * len(dets)
        for t in tracker.tracked_stracks:
            if t.frame_id == tracker.frame_id:
                ids[int(t.idx)] = int(t.track_id)
        pools = [(int(t.track_id), int(t.state), np.round(t.mean, 3).tolist())
                 for t in (*tracker.tracked_stracks, *tracker.lost_stracks)]
        out.append((ids, pools))
    return out


@pytest.mark.parametrize("config", CONFIGS)
def test_the_same_tracks_as_ultralytics(config):
    for seed in range(12):
        for frames in (scene(60, seed=seed), crowded(60, seed)):
            ours = run(bytetrack.BYTETracker, frames, config)
            theirs = run(UltralyticsBYTETracker, frames, config)
            for f, (a, b) in enumerate(zip(ours, theirs, strict=True)):
                assert a == b, (seed, f)


def test_the_assignment_leaves_pairs_over_the_limit_unmatched():
    cost = np.array([[0.1, 0.9], [0.95, 0.3], [0.2, 0.85]])
    matches, rows, cols = bytetrack._assign(cost, 0.8)
    assert matches == [(0, 0), (1, 1)] and rows == [2] and cols == []
    assert bytetrack._assign(np.zeros((0, 3)), 0.8) == ([], [], [0, 1, 2])
    assert bytetrack._assign(np.full((2, 2), 0.9), 0.8) == ([], [0, 1], [0, 1])


def test_tracking_imports_neither_torch_nor_ultralytics():
    code = ("import sys, numpy as np\n"
            "from spotline.stages.tracking.source import SourceState\n"
            "state = SourceState()\n"
            "for seq in range(1, 4):\n"
            "    state.plan(seq, np.array([[1, 2, 30, 40]], np.float32) + seq,\n"
            "               np.array([0.9], np.float32))\n"
            "assert state.to_state()['tracker']['tracked']['ints'].shape == (1, 7)\n"
            "print(sorted(m for m in ('torch', 'ultralytics') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stderr
