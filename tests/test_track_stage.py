"""Track mode in the streaming pipeline: the envelope fields and their checks, the topology,
and detect → track → collect workers over a real Redis (burst mode)."""

from __future__ import annotations

import numpy as np
import pytest

from spotline.common import topology
from spotline.common.codec import decode, encode
from spotline.common.collector import Collector
from spotline.common.envelope import Envelope, Result
from spotline.common.errors import DecodeError
from spotline.common.metrics import TracksAlive
from spotline.common.transport import Transport
from spotline.common.worker import Worker
from spotline.pipeline.reference import Reference
from spotline.producer.client import Client
from spotline.stages import libs, load_stage
from spotline.stages.collect import Collect, frame_result
from spotline.stages.detect import Detect, split_parts
from spotline.stages.track import Track

CAPTIONS = ("red bus", "a person")


def test_track_fields_travel_and_are_checked():
    env = Envelope(frame_id="f", captions=("a", "b"), seq=7,
                   boxes=np.zeros((3, 4), np.float32), track_ids=np.array([4, -1, 9]),
                   picks=np.array([2, -1]), probs=np.array([0.9, 0.1], np.float32))
    assert decode(encode(env)) == env
    for bad in (dict(track_ids=np.array([1, 2])), dict(picks=np.array([0])),
                dict(track_ids=np.array([1.0, 2.0, 3.0])), dict(probs=np.array([1, 2]))):
        with pytest.raises(DecodeError, match="wrong type or shape"):
            decode(encode(env.replace(**bad)))
    res = Result(frame_id="f", source_id="s", capture_time=0.0, captions=("a", "b"),
                 boxes=((1.0, 2.0, 3.0, 4.0), (0.0, 0.0, 0.0, 0.0)), scores=(0.5, 0.1),
                 track_ids=(4, -1), absent=(False, True))
    assert decode(encode(res)) == res
    rows = res.as_json()["results"]
    assert rows[0]["track_id"] == 4 and rows[0]["bbox"] == [1.0, 2.0, 3.0, 4.0]
    assert rows[1]["bbox"] is None and rows[1]["track_id"] == -1
    with pytest.raises(DecodeError):
        decode(encode(res.replace(track_ids=(1,))))


def test_topology_and_detect_in_track_mode(settings):
    tracking = settings.replace(tracking=True)
    assert topology.pipeline(tracking) == ("detect", "track", "collect")
    assert topology.next_stage("detect", tracking) == "track"
    assert topology.next_stage("track", tracking) == "collect"
    assert "track" not in topology.pipeline(settings)
    env = Envelope(frame_id="f", captions=("a",), image=b"x")
    boxes = np.arange(48, dtype=np.float32).reshape(12, 4)
    crops = [np.zeros((4, 4, 3), np.uint8)] * 12
    routed = split_parts(env, boxes, np.ones(12, np.float32), crops,
                         tracking.replace(crops_per_part=5))
    assert [(t, e.nparts, len(e.crops)) for t, e in routed] == [("track", 1, 12)]
    empty = split_parts(env, boxes[:0], np.ones(0, np.float32), [], tracking)
    assert [t for t, _ in empty] == ["track"]  # no holes in the source's sequence
    assert isinstance(load_stage("track", tracking), Track)


def test_collect_uses_the_track_stage_picks(settings):
    env = Envelope(frame_id="f", captions=("a", "b"), boxes=np.array(
        [[0, 0, 10, 10], [20, 20, 30, 40]], np.float32), scores=np.array(
        [[0.2, 0.9], [0.3, 0.1]], np.float32), track_ids=np.array([5, 6]),
        picks=np.array([1, -1]), probs=np.array([0.8, 0.05], np.float32))
    res = frame_result(env, settings)
    assert res.boxes[0] == (20.0, 20.0, 10.0, 20.0) and res.track_ids == (6, -1)
    assert res.absent == (False, True) and res.boxes[1] == (0.0, 0.0, 0.0, 0.0)
    assert res.scores[0] == pytest.approx(0.9) and res.scores[1] == pytest.approx(0.05)


def still_frame() -> bytes:
    return (libs.ultralytics_assets() / "bus.jpg").read_bytes()


def test_workers_track_a_source(redis_server, settings):
    s = settings.replace(redis_url=redis_server.url, tracking=True, imgsz=256, warmup=0,
                         max_det=4, tta=False, upscale=False, track_keyframe_every=4)
    t = Transport(s, url=redis_server.url)
    client = Client(t)
    image = still_frame()
    ids = [client.publish(image, CAPTIONS, source_id="cam") for _ in range(6)]
    other = client.publish(image, CAPTIONS, source_id="cam2")
    unsequenced = client.publish(image, CAPTIONS, source_id="cam", sequenced=False)
    track = Track(s)
    Worker(Detect(s), s, t, burst=True).run()
    track_worker = Worker(track, s, t, burst=True)
    track_worker.run()
    Collector(Collect(s), s, t, burst=True).run()
    results = {r.frame_id: r for _, r in client.read_results()}
    assert set(results) == {*ids, other, unsequenced}
    tracked = [results[f] for f in ids]
    assert all(r.error is None and len(r.track_ids) == 2 for r in tracked)
    # A still camera: every caption keeps one track from the first frame to the last.
    assert len({r.track_ids for r in tracked}) == 1 and min(tracked[0].track_ids) > 0
    assert results[unsequenced].track_ids == (-1, -1)
    # An unnumbered frame is answered as the seed's method does (joint assignment aside).
    s_argmax = s.replace(joint_assign=False)
    ref = Reference(s_argmax).identify([image], [CAPTIONS])[0]
    (_, det), = Detect(s_argmax).process([Envelope(frame_id="u", captions=CAPTIONS,
                                                   image=image)])
    answer = frame_result(Track(s_argmax).frame(det), s_argmax)
    np.testing.assert_allclose(np.array(answer.boxes), np.array(ref.boxes), atol=0.05)
    np.testing.assert_allclose(np.array(answer.scores), np.array(ref.scores), atol=1e-4)
    assert track.stats.frames == 8 and track.stats.untracked == 1
    # cam: crops embedded on frames 1 and 5 only (keyframes every 4), reused on 4 frames;
    # cam2 and the unsequenced frame: embedded once each.
    assert track.stats.reused > 0 and track.stats.embedded == track.stats.reused
    assert track.stats.alive["cam"] >= 1
    metric = track_worker.metrics.registry.get_sample_value
    assert metric("spotline_track_crops_total", {"outcome": "reused"}) == track.stats.reused
    assert metric("spotline_track_frames_total", {"outcome": "tracked"}) == 7
    assert metric("spotline_track_frames_total", {"outcome": "untracked"}) == 1
    # tracks alive: kept in Redis (newest frame of a source wins) for the pipeline's exporter
    assert TracksAlive(t).read() == {"cam": track.stats.alive["cam"],
                                     "cam2": track.stats.alive["cam2"]}
    t.close()


def detected(s, n: int, source: str = "cam") -> list[Envelope]:
    """``n`` frames of the still image after detect (track mode: one whole part each)."""
    env = Envelope(frame_id="d", source_id=source, captions=CAPTIONS, image=still_frame())
    (_, det), = Detect(s).process([env])
    return [det.replace(frame_id=f"{source}-{k}", seq=k) for k in range(1, n + 1)]


def test_reorder_window_waits_for_the_frame_before(redis_server, settings):
    import threading
    import time

    s = settings.replace(redis_url=redis_server.url, tracking=True, imgsz=256, warmup=0,
                         max_det=3, tta=False, upscale=True, track_reorder_ms=20000)
    frames = detected(s, 4)
    first, second = Track(s), Track(s)  # two workers of the group
    now = time.time()
    out: dict[str, Envelope] = {}
    # Worker 2 got frame 2 first: it waits for frame 1, which worker 1 then tracks.
    waiting = threading.Thread(target=lambda: out.update(
        two=second.frame(frames[1].replace(capture_time=now))))
    second.setup()
    waiting.start()
    from tests.faultlib import wait_for
    wait_for(lambda: second.stats.frames == 1, timeout=30, what="frame 2 taken")
    out["one"] = first.frame(frames[0].replace(capture_time=now))
    waiting.join(timeout=60)
    assert second.stats.untracked == 0 and min(out["two"].track_ids) > 0
    assert out["one"].track_ids.tolist() == out["two"].track_ids.tolist()
    # Frame 4 is old (it queued): no wait, frame 3 is given up on and comes late.
    started = time.monotonic()
    four = first.frame(frames[3].replace(capture_time=now - 60))
    assert time.monotonic() - started < 15 and min(four.track_ids) > 0
    late = second.frame(frames[2].replace(capture_time=now - 60))
    assert late.track_ids.tolist() == [-1] * len(late.track_ids)
    assert second.stats.untracked == 1
    # Delivered again after its answer was saved: the same answer.
    again = second.frame(frames[3].replace(capture_time=now - 60))
    assert again.track_ids.tolist() == four.track_ids.tolist() and second.stats.replayed == 1
    assert again.picks.tolist() == four.picks.tolist()
