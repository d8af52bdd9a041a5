"""Track mode's per-source steps: planning which crops to embed, late frames, state."""

from __future__ import annotations

import numpy as np

from spotline.common.codec import decode_state, encode_state
from spotline.stages.grounding import NO_TRACK
from spotline.stages.track import SourceState, TrackOptions, fresh_embeddings
from spotline.stages.tracker import ReuseConfig
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
