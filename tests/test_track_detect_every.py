"""Track mode with the detector on every Nth frame only (``track_detect_every``): between
detections the tracks' Kalman predictions give the boxes, every frame still gets exactly one
answer, and a frame's state and answer are saved in one step."""

from __future__ import annotations

import numpy as np
import pytest

from spotline.common.collector import Collector
from spotline.common.trackstore import TrackStore
from spotline.common.transport import Transport
from spotline.common.worker import Worker
from spotline.producer.client import Client
from spotline.stages.collect import Collect
from spotline.stages.detect import Detect, left_to_track
from spotline.stages.track import Track
from spotline.stages.tracking.source import SourceState, TrackOptions
from spotline.stages.tracking.tracker import SourceTracker, iou
from tests.test_track_stage import CAPTIONS, still_frame
from tests.test_tracker import scene


def steady(frames: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Two objects moving at constant speed (no noise): xyxy boxes and scores per frame."""
    start = np.array([[20, 30, 60, 70], [200, 40, 260, 90]], np.float32)
    step = np.array([[3, 1, 3, 1], [-2, 2, -2, 2]], np.float32)
    return [(start + f * step, np.array([0.9, 0.8], np.float32)) for f in range(frames)]


def test_predicted_boxes_follow_the_motion():
    clip = steady(12)
    tracker = SourceTracker()
    for boxes, scores in clip[:8]:
        ids = tracker.update(boxes, scores)
    boxes, scores, predicted_ids = tracker.predict()
    assert sorted(predicted_ids.tolist()) == sorted(ids.tolist())
    order = np.argsort(predicted_ids)
    expected = clip[8][0][np.argsort(ids)]
    # The Kalman filter has learned the speed: the prediction is where the objects are.
    assert min(iou(a, b) for a, b in zip(boxes[order], expected, strict=True)) > 0.85
    assert scores.shape == (2,) and tracker.frame_count == 9
    # Two frames without the detector, then a detection: the same ids (nothing was lost).
    tracker.predict()
    again = tracker.update(*clip[10])
    assert again.tolist() == ids.tolist()


def test_prediction_survives_the_state_round_trip():
    memory, state = SourceTracker(), None
    for k, (boxes, scores, _) in enumerate(scene(30)):
        restored = SourceTracker.from_state(state)
        if k % 3 and k > 4:
            got, want = restored.predict()[2], memory.predict()[2]
        else:
            got, want = restored.update(boxes, scores), memory.update(boxes, scores)
        assert got.tolist() == want.tolist()
        state = restored.state()
    np.testing.assert_array_equal(state["tracked"]["mean"], memory.state()["tracked"]["mean"])


def _drive(state: SourceState, clip, seqs) -> tuple[list[int], list]:
    """Detect the frames the state asks the detector for, propagate the others: (the detected
    seqs, each propagated frame's (plan, boxes))."""
    detected, predicted = [], []
    for seq in seqs:
        if state.needs_detection(seq):
            detected.append(seq)
            state.plan(seq, *clip[seq])
        else:
            predicted.append(state.propagate(seq, (400, 300))[:2])
    return detected, predicted


def test_when_the_detector_runs():
    state = SourceState(TrackOptions(detect_every=3, settle=2, motion=0.0))
    clip = steady(12)
    detected, predicted = _drive(state, clip, range(1, 10))
    for plan, boxes in predicted:
        assert not plan.detected and len(boxes) == 2 and (plan.track_ids > 0).all()
    # First frames (young tracks: fewer than 2 detections), then every third frame.
    assert detected == [1, 2, 3, 6, 9]
    assert state.needs_detection(9) and state.needs_detection(14)  # late; after a long gap
    assert SourceState(TrackOptions()).needs_detection(5)  # detect_every 1: always
    with pytest.raises(ValueError):
        TrackOptions(detect_every=0)
    with pytest.raises(ValueError, match="not after"):
        state.propagate(9, (400, 300))
    # A track predicted out of the image is no box of the frame.
    _, boxes, _ = state.propagate(10, (400, 300))
    _, gone, _ = SourceState.from_state(state.to_state(), state.options).propagate(11, (20, 20))
    assert len(boxes) == 2 and len(gone) == 0


def test_small_fast_objects_are_detected_every_frame():
    """A 12 px object moving 4 px a frame outruns its prediction (a third of its size a frame):
    with ``motion`` on, nearly every frame is detected (the Kalman speed needs a few
    detections to grow to the object's); with it off, keyframes only."""
    start = np.array([[10, 10, 22, 22]], np.float32)
    clip = [(start + f * np.array([4, 0, 4, 0], np.float32), np.array([0.9], np.float32))
            for f in range(12)]
    runs = {}
    for motion in (0.25, 0.0):
        state = SourceState(TrackOptions(detect_every=3, settle=2, motion=motion))
        runs[motion] = _drive(state, clip, range(1, 12))[0]
    assert runs[0.0] == [1, 2, 3, 6, 9]
    assert len(runs[0.25]) >= 10 and set(runs[0.0]) <= set(runs[0.25]), runs


def test_state_and_answer_are_saved_together(redis_server, settings):
    t = Transport(settings, url=redis_server.url)
    store = TrackStore(t, ttl_s=60, answers_kept=2)
    for seq in (1, 2, 3):
        assert store.save("cam", seq, {"v": seq}, answer=(f"f{seq}", {"picks": [seq]}))
    assert store.answer("cam", "f3") == {"picks": [3]} and store.answer("cam", "f2")
    assert store.answer("cam", "f1") is None  # beyond the last 2
    # A stale save writes neither the state nor the answer.
    assert not store.save("cam", 2, {"v": 0}, answer=("zombie", {"picks": [0]}))
    assert store.answer("cam", "zombie") is None and store.load("cam") == (3, {"v": 3})
    t.close()


def test_workers_skip_the_detector_between_keyframes(redis_server, settings):
    s = settings.replace(redis_url=redis_server.url, tracking=True, imgsz=256, warmup=0,
                         max_det=4, tta=False, upscale=False, track_detect_every=3,
                         track_settle=1)
    t = Transport(s, url=redis_server.url)
    client = Client(t)
    image = still_frame()
    ids = [client.publish(image, CAPTIONS, source_id="cam") for _ in range(7)]
    detect, track = Detect(s), Track(s)
    Worker(detect, s, t, burst=True).run()
    track_worker = Worker(track, s, t, burst=True)
    track_worker.run()
    Collector(Collect(s), s, t, burst=True).run()
    got = [(fid, r) for _, r in client.read_results() for fid in [r.frame_id]]
    results = dict(got)
    assert len(got) == len(ids) and set(results) == set(ids), "one answer per frame"
    answers = [results[f] for f in ids]
    assert all(r.error is None and len(r.boxes) == 2 for r in answers)
    # Producers number frames from 1: detect finds the boxes of 3 and 6 only. The track
    # stage detects 1 (a new source) and 2 (its tracks are young: no detection matched yet);
    # 4, 5 and 7 are found by their look (track_match) in a still scene: the detector's boxes,
    # to within what matching a large box's downscaled patch allows (1% of its size).
    assert track.stats.predicted == 3 and track.stats.detected_here == 2
    # the same on the dashboard's series: where each tracked frame's boxes came from
    metric = track_worker.metrics.registry.get_sample_value
    assert {b: metric("spotline_track_boxes_total", {"by": b})
            for b in ("detect", "track", "look")} == {"detect": 2, "track": 2, "look": 3}
    assert len({r.track_ids for r in answers}) == 1 and min(answers[0].track_ids) > 0
    first = np.array(answers[0].boxes)
    for r in answers[1:]:
        np.testing.assert_allclose(np.array(r.boxes), first, atol=1.0 + 0.01 * first.max())
    t.close()


def test_detect_leaves_frames_to_track_only_in_track_mode(settings):
    from spotline.common.envelope import Envelope

    every = settings.replace(tracking=True, track_detect_every=3)
    assert [left_to_track(Envelope(frame_id="f", seq=k), every) for k in (-1, 1, 3, 4)] == [
        False, True, False, True]
    assert not left_to_track(Envelope(frame_id="f", seq=1),
                             settings.replace(track_detect_every=3))  # per-frame mode
    assert not left_to_track(Envelope(frame_id="f", seq=1),
                             settings.replace(tracking=True, track_detect_every=1))


def test_a_frame_delivered_again_long_after_gets_its_answer(redis_server, settings):
    """Its worker died after the save: the frame comes back after 11 newer frames of its
    source (the state used to keep the last 8 answers) and is answered as it was."""
    import time

    from tests.test_track_stage import detected

    s = settings.replace(redis_url=redis_server.url, tracking=True, imgsz=256, warmup=0,
                         max_det=3, tta=False, upscale=False, track_detect_every=1)
    frames = [f.replace(capture_time=time.time()) for f in detected(s, 12)]
    track = Track(s)
    first = [track.frame(f) for f in frames]
    again = track.frame(frames[0])
    assert track.stats.replayed == 1 and track.stats.untracked == 0
    assert again.track_ids.tolist() == first[0].track_ids.tolist() and min(again.track_ids) > 0
    assert again.picks.tolist() == first[0].picks.tolist()
    np.testing.assert_array_equal(again.boxes, first[0].boxes)
