"""Per-frame and track mode in one process with the tiny models: track mode embeds fewer
crops, and keeping the state in Redis changes no answer."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from spotline.common.trackstore import EmbeddingCache, TrackStore
from spotline.common.transport import Transport
from spotline.pipeline.trackmode import FrameModels, PerFrame, Tracked
from spotline.stages import libs
from spotline.stages.tracking.source import TrackOptions
from spotline.stages.tracking.tracker import ReuseConfig

CAPTIONS = ("red bus", "a person")


def clip(frames: int = 6) -> list[bytes]:
    """The bus photo panning slowly (2 px a frame), as JPEGs."""
    bus = cv2.imread(str(libs.ultralytics_assets() / "bus.jpg"))
    out = []
    for f in range(frames):
        view = bus[100 + 2 * f:740 + 2 * f, 50 + 2 * f:690 + 2 * f]
        ok, buf = cv2.imencode(".jpg", view, [cv2.IMWRITE_JPEG_QUALITY, 90])
        assert ok
        out.append(buf.tobytes())
    return out


@pytest.fixture(scope="module")
def models(data_dir) -> FrameModels:
    """The tiny models (written once per session into the shared data dir)."""
    from spotline.common.settings import Settings

    return FrameModels(Settings(data_dir=str(data_dir), imgsz=256, warmup=0, max_det=4, tta=False,
                                upscale=False))


def test_track_mode_embeds_fewer_crops(models):
    # A still camera: the tiny random detector finds the same boxes in every frame (on a
    # moving view its random boxes have nothing to do with each other from frame to frame).
    frames = [clip(1)[0]] * 6
    per_frame, tracked = PerFrame(models), Tracked(models, TrackOptions(
        reuse=ReuseConfig(keyframe_every=4, min_iou=0.6)))
    crops_pf = crops_tr = 0
    for seq, image in enumerate(frames):
        a = per_frame.frame(f"p{seq}", image, CAPTIONS)
        b = tracked.frame("cam", seq, f"t{seq}", image, CAPTIONS)
        assert len(a.boxes) == len(b.boxes) == 2
        assert a.boxes_found == b.boxes_found > 0
        assert a.crops_embedded == a.boxes_found
        assert all(t >= 0 for t in b.track_ids)
        crops_pf += a.crops_embedded
        crops_tr += b.crops_embedded
    c = tracked.stats  # the track stage's own counters: Tracked runs the stage's step
    assert c.frames == len(frames) and c.embedded + c.reused == crops_pf
    assert c.untracked == 0 and crops_tr == crops_pf - c.reused
    # Same boxes every frame: crops are embedded on keyframes only (frames 0 and 4).
    assert c.embedded == 2 * (crops_pf // len(frames))
    assert c.reuse_ratio == pytest.approx(4 / 6)
    # Per-frame mode and track mode saw the same scores for the same boxes.
    assert per_frame.frame("p", frames[0], CAPTIONS).boxes_found == crops_pf // len(frames)


def test_state_in_redis_gives_the_same_answers(models, redis_server, settings):
    frames = clip(4)
    memory = Tracked(models)
    t = Transport(settings, url=redis_server.url)
    redis_mode = Tracked(models, store=TrackStore(t), cache=EmbeddingCache(t))
    for seq, image in enumerate(frames):
        a = memory.frame("cam", seq, f"m{seq}", image, CAPTIONS)
        b = redis_mode.frame("cam", seq, f"r{seq}", image, CAPTIONS)
        assert a.track_ids == b.track_ids and a.crops_embedded == b.crops_embedded
        assert np.allclose(np.array(a.boxes, float), np.array(b.boxes, float))
        assert np.allclose(a.scores, b.scores, atol=1e-6)
    assert TrackStore(t).load("cam")[0] == len(frames)  # numbered from 1, as producers do
    assert EmbeddingCache(t).size("cam") > 0
    t.close()


def test_in_process_store_keeps_the_stage_semantics(models):
    """Tracked's in-process stores behave as the Redis ones for the stage: a frame delivered
    again is answered from the answer saved with the state (never tracked twice), and an
    older state never replaces a newer one."""
    from spotline.common.envelope import Envelope
    from spotline.pipeline.trackmode import LocalTrackStore

    frames = clip(3)
    tracked = Tracked(models)
    answers = [tracked.frame("cam", seq, f"f{seq}", image, CAPTIONS)
               for seq, image in enumerate(frames)]
    again = tracked.stage.frame(Envelope(frame_id="f1", source_id="cam", captions=CAPTIONS,
                                         image=frames[1], seq=2))
    assert tracked.stats.replayed == 1 and tracked.stats.frames == 4
    assert tuple(int(t) for t in again.track_ids) == tuple(
        int(t) for t in tracked.stage.store.answer("cam", "f1")["track_ids"])
    assert answers[1].track_ids == tuple(
        int(again.track_ids[p]) if p >= 0 else -1 for p in again.picks)
    store = LocalTrackStore(answers_kept=2)
    assert store.save("s", 2, {"x": 1}, answer=("a", {"k": 1}))
    assert not store.save("s", 2, {"x": 2}) and not store.save("s", 1, {"x": 3})
    assert store.load("s") == (2, {"x": 1})
    store.save("s", 3, {"x": 4}, answer=("b", {"k": 2}))
    store.save("s", 4, {"x": 5}, answer=("c", {"k": 3}))
    assert store.answer("s", "a") is None and store.answer("s", "c") == {"k": 3}
