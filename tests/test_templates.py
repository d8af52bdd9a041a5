"""Finding a track by its look between detections (stages/tracking/templates.py), and what it
does to a source's state (stages/tracking/source.py: ``match``)."""

from __future__ import annotations

import numpy as np
import pytest

from spotline.common.codec import decode_state, encode_state
from spotline.stages.tracking.source import SourceState, TrackOptions
from spotline.stages.tracking.templates import (
    TEMPLATE_SIDE,
    Template,
    exposure,
    make_template,
    match,
)
from spotline.stages.tracking.tracker import iou

SIZE = (320, 240)  # width, height


def ground(seed: int = 0) -> np.ndarray:
    """A textured still background (BGR uint8)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(60, 200, (SIZE[1] // 8, SIZE[0] // 8, 3), dtype=np.uint8)
    return np.repeat(np.repeat(small, 8, axis=0), 8, axis=1)


def frame(boxes: list[tuple[float, float, float, float]], seed: int = 0,
          colours: tuple[tuple[int, int, int], ...] = ((0, 220, 255), (255, 40, 200)),
          noise: int = 1) -> np.ndarray:
    """The background with a solid square per xyxy box (integer corners), fresh noise."""
    image = ground().astype(np.int16)
    for (x1, y1, x2, y2), colour in zip(boxes, colours, strict=False):
        image[int(y1):int(y2), int(x1):int(x2)] = colour
    rng = np.random.default_rng(1000 + seed)
    image += rng.integers(-6, 7, image.shape, dtype=np.int16) * noise
    return image.clip(0, 255).astype(np.uint8)


def test_a_moved_object_is_found_where_it_went():
    box = np.array([100, 80, 112, 92], np.float32)  # 12 px, the clips' small objects
    template = make_template(frame([tuple(box)]), box)
    assert template is not None and template.patch.shape == (12, 12, 3)
    moved = box + np.array([7, -4, 7, -4], np.float32)
    predicted = box + np.array([4, -2, 4, -2], np.float32)  # the Kalman guess, 3 px short
    found, corr = match(frame([tuple(moved)], seed=1), template, predicted)
    assert corr > 0.9 and np.abs(found - moved).max() <= 0.5, (found, corr)


def test_a_large_object_is_matched_downscaled():
    box = np.array([60, 50, 140, 130], np.float32)  # 80 px: its template is downscaled
    template = make_template(frame([tuple(box)]), box)
    assert template is not None and max(template.patch.shape[:2]) <= TEMPLATE_SIDE
    assert template.scale < 1
    moved = box + np.array([-15, 9, -15, 9], np.float32)
    found, corr = match(frame([tuple(moved)], seed=2), template, moved)
    assert corr > 0.8 and np.abs(found - moved).max() <= 1 / template.scale + 0.5


def test_a_vanished_object_is_not_similar():
    box = np.array([100, 80, 112, 92], np.float32)
    template = make_template(frame([tuple(box)]), box)
    assert template is not None
    _, similarity = match(frame([], seed=3), template, box)
    assert similarity < 0.75


def sky(boxes: list[np.ndarray], gain: float = 1.0, offset: float = 0.0,
        seed: int = 0) -> np.ndarray:
    """A smooth blue-to-pale gradient with a flat grey square per xyxy box, exposed with a
    global ``gain`` and ``offset`` (a camera's gain; the clips' brightness and contrast)."""
    height, width = SIZE[1], SIZE[0]
    y = np.linspace(0, 1, height)[:, None, None]
    image = (np.array([150, 110, 70]) * (1 - y) + np.array([190, 150, 140]) * y
             ) * np.ones((height, width, 3))
    for x1, y1, x2, y2 in boxes:
        image[int(y1):int(y2), int(x1):int(x2)] = (105, 115, 110)
    image = (image - image.mean()) * gain + image.mean() + offset
    image += np.random.default_rng(seed).normal(0, 3, image.shape)
    return image.clip(0, 255).astype(np.uint8)


@pytest.mark.parametrize(("gain", "offset"), [(1.0, 0), (0.85, -20), (1.2, 25), (1.2, -30)])
def test_a_change_of_exposure_does_not_move_the_match(gain: float, offset: float):
    """A grey square on a plain sky, the next frame exposed otherwise: the window brought to
    the template's exposure finds the square where it went, as similar as before. Without the
    correction, at gain 1.2 and offset -30 the least squared difference lies 30 px away, where
    sky and square blend into the old colours (as on the seed-13 clips)."""
    box = np.array([100, 80, 165, 145], np.float32)
    template = make_template(sky([box]), box)
    assert template is not None and template.seen is not None
    moved = box + np.array([-4, 1, -4, 1], np.float32)
    image = sky([moved], gain, offset, seed=5)
    found, similarity = match(image, template, box, exposure(image))
    assert np.abs(found - moved).max() <= 1 / template.scale, (found, moved)
    assert similarity > 0.97
    if (gain, offset) == (1.2, -30):
        uncorrected, _ = match(image, template, box)
        assert np.abs(uncorrected - moved).max() > 10


def test_a_flat_frame_is_not_similar_and_raises_nothing():
    """A blank frame (a camera's dropout) has no contrast to scale to: the gain is held within
    GAIN_RANGE (the window becomes the old frame's mean colour, not noise × 100), the match is
    finite, and a coloured object is not found in it, so the frame would be detected."""
    box = np.array([100, 80, 112, 92], np.float32)
    template = make_template(frame([tuple(box)]), box)
    assert template is not None
    blank = np.full((SIZE[1], SIZE[0], 3), 128, np.uint8)
    blank[::2, ::2] = 129  # std 0.43: gain 50 unclamped
    found, similarity = match(blank, template, box, exposure(blank))
    assert np.isfinite(found).all() and similarity < 0.75


def test_a_template_saved_without_its_exposure_still_loads():
    box = np.array([100, 80, 112, 92], np.float32)
    template = make_template(frame([tuple(box)]), box)
    assert template is not None
    old = Template.from_state(template.to_state()[:3])  # as states were saved before
    assert old.seen is None and np.array_equal(old.patch, template.patch)
    image = frame([tuple(box)], seed=1)
    found, _ = match(image, old, box, exposure(image))  # no correction, no error
    assert np.abs(found - box).max() <= 0.5


def test_no_template_beyond_the_border_or_of_no_size():
    assert make_template(frame([(0, 0, 12, 12)]), np.array([-1, 0, 11, 12])) is None
    assert make_template(frame([(0, 0, 12, 12)]), np.array([0, 0, 12, 12])) is not None
    assert make_template(frame([]), np.array([100, 80, 100, 92])) is None  # no width
    assert match(frame([]), make_template(frame([]), np.array([0, 0, 40, 40])),
                 np.array([-100, -100, -60, -60])) is None  # the window left the image


def _clip(frames: int, vanish_at: int | None = None, appear_at: int = 0):
    """Two squares moving steadily, per frame: (image, xyxy boxes); the second one is there
    from ``appear_at`` and vanishes from ``vanish_at`` on."""
    starts = np.array([[40, 40, 52, 52], [200, 150, 215, 165]], np.float32)
    steps = np.array([[4, 3, 4, 3], [-3, -2, -3, -2]], np.float32)
    out = []
    for f in range(frames):
        boxes = [starts[k] + f * steps[k] for k in range(2)
                 if not (k == 1 and (f < appear_at or vanish_at is not None and f >= vanish_at))]
        out.append((frame([tuple(np.round(b)) for b in boxes], seed=f),
                    np.round(np.stack(boxes)).astype(np.float32)))
    return out


def _drive(state: SourceState, clip, seqs):
    """Detect where the state asks (the true boxes), propagate the others: the detected seqs,
    and each propagated frame's boxes with the true ones."""
    detected, propagated = [], []
    for seq in seqs:
        image, truth = clip[seq]
        if not state.needs_detection(seq):
            got = state.propagate(seq, SIZE, image)
            if got is not None:
                propagated.append((got[1], truth))
                continue
        detected.append(seq)
        state.plan(seq, truth, np.full(len(truth), 0.9, np.float32), image=image)
    return detected, propagated


def test_tracks_are_followed_by_their_look_between_keyframes():
    """Small, fast squares (12-15 px, 3-5 px a frame) that the Kalman prediction alone would
    lose (``motion`` detects nearly every frame): found by their look, the detector runs on
    keyframes and the first frames only, and every box found overlaps the truth."""
    clip = _clip(16)
    state = SourceState(TrackOptions(detect_every=5, settle=2, motion=0.25, match=0.75))
    detected, propagated = _drive(state, clip, range(1, 16))
    assert detected == [1, 2, 3, 5, 10, 15], detected
    for boxes, truth in propagated:
        assert len(boxes) == 2
        assert all(max(iou(b, t) for b in boxes) > 0.8 for t in truth)
    kalman_only = SourceState(TrackOptions(detect_every=5, settle=2, motion=0.25))
    assert len(_drive(kalman_only, clip, range(1, 16))[0]) >= 12


def test_a_track_not_found_makes_the_frame_detected_and_changes_nothing():
    clip = _clip(12, vanish_at=7)
    state = SourceState(TrackOptions(detect_every=5, settle=2, match=0.75))
    detected, _ = _drive(state, clip, range(1, 7))
    assert detected == [1, 2, 3, 5]
    before = encode_state(state.to_state())
    assert state.propagate(7, SIZE, clip[7][0]) is None  # the second square is gone
    assert encode_state(state.to_state()) == before
    assert _drive(state, clip, [7])[0] == [7]  # so the frame is detected


def test_templates_travel_with_the_state():
    clip = _clip(4)
    state = SourceState(TrackOptions(detect_every=5, match=0.75))
    _drive(state, clip, range(1, 3))
    assert len(state.templates) == 2
    restored = SourceState.from_state(decode_state(encode_state(state.to_state())),
                                      state.options)
    for tid, template in state.templates.items():
        assert np.array_equal(restored.templates[tid].patch, template.patch)
        assert restored.templates[tid].scale == template.scale
        assert restored.templates[tid].seen == template.seen
    a = state.propagate(3, SIZE, clip[3][0])
    b = restored.propagate(3, SIZE, clip[3][0])
    assert a is not None and b is not None and np.array_equal(a[1], b[1])
    with pytest.raises(ValueError):
        TrackOptions(match=1.5)


def test_a_new_object_is_followed_until_the_next_keyframe_confirms_it():
    """Seen once, at a keyframe, its track is unconfirmed (maybe the detector's flicker): it
    is looked for all the same, so its box moves with it and the next keyframe's detection
    meets it there and confirms the same track, where a box left where it was seen (5 frames
    at 3-4 px a frame) would have started a new track."""
    clip = _clip(12, appear_at=5)
    state = SourceState(TrackOptions(detect_every=5, settle=2, match=0.75))
    ids = {}
    for seq in range(1, 11):
        image, truth = clip[seq]
        got = None if state.needs_detection(seq) else state.propagate(seq, SIZE, image)
        if got is None:
            plan = state.plan(seq, truth, np.full(len(truth), 0.9, np.float32), image=image)
            boxes = truth
        else:
            plan, boxes, _ = got
        if seq >= 5:
            k = max(range(len(boxes)), key=lambda i: iou(boxes[i], truth[-1]))
            assert iou(boxes[k], truth[-1]) > 0.8, (seq, boxes, truth)
            ids[seq] = int(plan.track_ids[k])
    assert len(set(ids.values())) == 1, ids  # one track from its first sighting on
