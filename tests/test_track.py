"""Track mode's per-source steps: planning which crops to embed, late frames, state."""

from __future__ import annotations

import numpy as np

from spotline.common.codec import decode_state, encode_state
from spotline.stages.tracking.grounding import NO_TRACK
from spotline.stages.tracking.source import SourceState, TrackOptions, fresh_embeddings
from spotline.stages.tracking.tracker import ReuseConfig
from tests.test_tracker import scene

OPTIONS = TrackOptions(reuse=ReuseConfig(keyframe_every=5, min_iou=0.5))


def run_clip(state_trip: bool) -> tuple[list[list[int]], int, int]:
    """(track ids per frame, crops embedded, boxes seen) over the scene, with a cache."""
    state, cache = SourceState(OPTIONS), {}
    ids, embedded, seen = [], 0, 0
    for seq, (boxes, scores, _) in enumerate(scene(30, seed=2)):
        if state_trip:
            state = SourceState.from_state(decode_state(encode_state(state.to_state())), OPTIONS)
        plan = state.plan(seq, boxes, scores, cache)
        embeds = np.random.default_rng(seq).standard_normal((len(boxes), 8)).astype(np.float32)
        cache.update(fresh_embeddings(plan, boxes, embeds))
        captions = ("red circle",)
        got = state.ground(plan, captions, scores[None, :].astype(np.float64))
        assert got[0].track_id in plan.track_ids.tolist()
        ids.append(plan.track_ids.tolist())
        embedded += int(plan.embed.sum())
        seen += len(boxes)
    return ids, embedded, seen


def test_reuse_embeds_far_fewer_crops_and_state_trips_change_nothing():
    ids, embedded, seen = run_clip(state_trip=False)
    assert run_clip(state_trip=True) == (ids, embedded, seen)
    # Steady motion of 1–3 px a frame: a crop is embedded again every 3–5 frames.
    assert embedded <= seen / 3
    assert embedded >= seen / 6


def test_late_and_repeated_frames_do_not_touch_the_tracker():
    state = SourceState(OPTIONS)
    frames = scene(6, seed=3)
    for seq in (0, 1, 2, 4):  # frame 3 comes late
        boxes, scores, _ = frames[seq]
        plan = state.plan(seq, boxes, scores)
    assert plan.skipped == 1 and state.seq == 4
    before = encode_state(state.tracker.state())
    boxes, scores, _ = frames[3]
    late = state.plan(3, boxes, scores, cache := {})
    assert not late.tracked and late.embed.all()
    assert late.track_ids.tolist() == [NO_TRACK] * len(boxes)
    assert encode_state(state.tracker.state()) == before
    again = state.plan(4, *frames[4][:2], cache)  # delivered twice
    assert not again.tracked
    # The late frame is still answered (every box scored, no tracks).
    got = state.ground(late, ["red circle"], np.array([scores], np.float64))
    assert got[0].box == int(np.argmax(scores)) and got[0].track_id == NO_TRACK


def contend_state(margin: float | None) -> tuple[SourceState, dict, np.ndarray]:
    """Three tracks seen at frame 0 and scored for one caption: boxes 0 and 1 close at the top
    (0.95 and 0.90: 0.74 log-odds apart), box 2 far behind (0.05); everything cached."""
    from spotline.common.trackstore import CachedEmbedding

    state = SourceState(TrackOptions(reuse=ReuseConfig(keyframe_every=10, min_iou=0.5,
                                                       contend_margin=margin)))
    boxes = np.array([[10, 10, 30, 30], [100, 10, 120, 30], [200, 10, 220, 30]], np.float32)
    plan = state.plan(0, boxes, np.full(3, 0.9, np.float32))
    state.ground(plan, ["red circle"], np.array([[0.95, 0.90, 0.05]]))
    cache = {int(t): CachedEmbedding(0, boxes[i], np.zeros(4, np.float32))
             for i, t in enumerate(plan.track_ids)}
    return state, cache, plan.track_ids


def test_moved_crops_are_embedded_again_only_where_their_track_contends():
    state, cache, ids = contend_state(margin=1.0)
    moved = np.array([[20, 10, 40, 30], [110, 10, 130, 30], [210, 10, 230, 30]], np.float32)
    plan = state.with_cache(state.plan(1, moved, np.full(3, 0.9, np.float32)), moved, cache,
                            ["red circle"])
    assert plan.track_ids.tolist() == ids.tolist()
    # Boxes 0 and 1 contend for the caption; box 2 is 5.2 log-odds behind: a fresh look of it
    # would not change the answer (its keyframe refreshes it).
    assert plan.embed.tolist() == [True, True, False]
    # Without captions (or with the rule off) every moved crop is embedded again.
    assert state.with_cache(plan, moved, cache).embed.all()
    off, cache_off, _ = contend_state(margin=None)
    plan = off.plan(1, moved, np.full(3, 0.9, np.float32))
    assert off.with_cache(plan, moved, cache_off, ["red circle"]).embed.all()
    # A caption no track was scored for yet: everything contends.
    assert state.with_cache(plan, moved, cache, ["blue square"]).embed.all()


def test_keyframes_and_unchanged_crops_ignore_contention():
    state, cache, _ = contend_state(margin=1.0)
    boxes = np.array([[10, 10, 30, 30], [100, 10, 120, 30], [200, 10, 220, 30]], np.float32)
    still = state.with_cache(state.plan(1, boxes, np.full(3, 0.9, np.float32)), boxes, cache,
                             ["red circle"])
    assert not still.embed.any()  # nothing moved: all reused
    for seq in range(2, 10):
        state.plan(seq, boxes, np.full(3, 0.9, np.float32))
    key = state.with_cache(state.plan(10, boxes, np.full(3, 0.9, np.float32)), boxes, cache,
                           ["red circle"])
    assert key.embed.all()  # 10 frames since they were scored: a keyframe for every track
