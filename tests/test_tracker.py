"""ByteTrack per source with its state in plain arrays: restored-every-frame equals in-memory,
ids stay with their objects, and when a crop needs embedding again."""

from __future__ import annotations

import numpy as np
import pytest

from spotline.common.codec import decode_state, encode_state
from spotline.common.errors import DecodeError
from spotline.stages.tracking.tracker import (
    NO_TRACK,
    ReuseConfig,
    SourceTracker,
    TrackerConfig,
    iou,
    needs_embedding,
)


def scene(frames: int = 40, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Three objects moving steadily (small jitter); object 2 hides for frames 15–19.
    Per frame: (xyxy boxes, scores, true object of each box), boxes in a shuffled order."""
    rng = np.random.default_rng(seed)
    start = np.array([[20, 30, 60, 70], [200, 40, 260, 90], [120, 150, 150, 200]], np.float32)
    step = np.array([[3, 1, 3, 1], [-2, 2, -2, 2], [1, -2, 1, -2]], np.float32)
    out = []
    for f in range(frames):
        objs = [o for o in range(3) if not (o == 2 and 15 <= f < 20)]
        boxes = np.stack([start[o] + f * step[o] for o in objs])
        boxes += rng.normal(0, 0.5, boxes.shape).astype(np.float32)
        scores = rng.uniform(0.4, 0.9, len(objs)).astype(np.float32)
        order = rng.permutation(len(objs))
        out.append((boxes[order], scores[order], np.array(objs)[order]))
    return out


def test_restored_every_frame_equals_in_memory():
    memory = SourceTracker()
    state = None
    for boxes, scores, _ in scene():
        expected = memory.update(boxes, scores)
        restored = SourceTracker.from_state(decode_state(encode_state(state)) if state else None)
        got = restored.update(boxes, scores)
        state = restored.state()
        assert got.tolist() == expected.tolist()
    # The whole state is the same too, array for array.
    mine, theirs = memory.state(), state
    assert mine["frame_id"] == theirs["frame_id"] == 40
    assert mine["next_id"] == theirs["next_id"]
    for pool in ("tracked", "lost"):
        for name, arr in mine[pool].items():
            assert np.array_equal(arr, theirs[pool][name]), (pool, name)


def test_each_object_keeps_its_id():
    tracker = SourceTracker()
    seen: dict[int, set[int]] = {0: set(), 1: set(), 2: set()}
    for boxes, scores, objs in scene():
        ids = tracker.update(boxes, scores)
        assert NO_TRACK not in ids.tolist()
        for obj, tid in zip(objs, ids, strict=True):
            seen[int(obj)].add(int(tid))
    # One id per object, the hidden one re-found after 5 frames under its old id.
    assert all(len(ids) == 1 for ids in seen.values()), seen
    assert len(set().union(*seen.values())) == 3
    assert tracker.alive() == 3


def test_low_scores_and_empty_frames():
    tracker = SourceTracker(TrackerConfig())
    assert tracker.update(np.zeros((0, 4)), np.zeros(0)).tolist() == []
    ids = tracker.update(np.array([[0, 0, 10, 10], [50, 50, 70, 80]]), np.array([0.9, 0.01]))
    assert ids[0] > 0 and ids[1] == NO_TRACK  # below track_low_thresh: no track
    with pytest.raises(ValueError, match="2 boxes for 1 scores"):
        tracker.update(np.zeros((2, 4)), np.zeros(1))


def test_skipped_frames_age_lost_tracks():
    box = np.array([[10, 10, 40, 40]], np.float32)
    far = np.array([[200, 200, 230, 230]], np.float32)
    conf = np.array([0.9], np.float32)
    kept, aged = SourceTracker(TrackerConfig(track_buffer=5)), SourceTracker(
        TrackerConfig(track_buffer=5))
    for t in (kept, aged):
        first = t.update(box, conf)
        t.update(box, conf)
        t.update(far, conf)  # the object is lost; something else appears
    # Back after 3 frames it is re-found; after 3 frames plus 6 skipped ones it is gone.
    assert kept.update(box, conf, skipped=0).tolist() == first.tolist()
    assert aged.update(box, conf, skipped=6).tolist() != first.tolist()
    with pytest.raises(ValueError, match="skipped"):
        kept.update(box, conf, skipped=-1)


def test_state_refuses_other_versions_and_garbage():
    with pytest.raises(ValueError, match="version"):
        SourceTracker.from_state({"v": 99})
    with pytest.raises(DecodeError):
        decode_state(b"\xc1garbage")
    with pytest.raises(DecodeError, match="a list"):
        decode_state(b"\x90")
    with pytest.raises(TypeError):
        encode_state([1, 2])  # type: ignore[arg-type]


def test_state_is_small():
    tracker = SourceTracker()
    for boxes, scores, _ in scene():
        tracker.update(boxes, scores)
    assert len(encode_state(tracker.state())) < 4096


def test_needs_embedding():
    cfg = ReuseConfig(keyframe_every=10, min_iou=0.7, max_size_change=0.2)
    box = np.array([100, 100, 150, 200], np.float32)
    assert needs_embedding(5, box, None, None, cfg)  # nothing cached
    assert not needs_embedding(5, box, 1, box, cfg)
    assert needs_embedding(11, box, 1, box, cfg)  # keyframe
    assert needs_embedding(0, box, 1, box, cfg)  # older frame than the cached one
    assert not needs_embedding(5, box + 2, 1, box, cfg)  # small shift
    assert needs_embedding(5, box + np.array([30, 0, 30, 0]), 1, box, cfg)  # moved
    grown = np.array([100, 100, 162, 200], np.float32)  # 24% wider, IoU 0.81
    assert iou(grown, box) > 0.7
    assert needs_embedding(5, grown, 1, box, cfg)
    with pytest.raises(ValueError):
        ReuseConfig(keyframe_every=0)
