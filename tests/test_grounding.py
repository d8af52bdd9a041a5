"""Track mode's grounding of a frame: evidence + hysteresis + one box per caption + "not in
view", with scripted scores."""

from __future__ import annotations

import math

import numpy as np

from spotline.stages.tracking.calibration import Calibration
from spotline.stages.tracking.evidence import Evidence, EvidenceConfig
from spotline.stages.tracking.grounding import NO_TRACK, ground_frame

CAPS = ("red circle", "blue square")


def test_two_captions_never_share_a_box_and_keep_their_tracks():
    ev = Evidence(EvidenceConfig(switch_frames=3))
    ids = np.array([7, 9])
    # Both captions like track 7 best; the assignment gives blue square track 9.
    frame = np.array([[0.9, 0.2], [0.6, 0.5]])
    for seq in range(5):
        got = ground_frame(ev, seq, CAPS, frame, ids)
        assert [g.track_id for g in got] == [7, 9]
    # Boxes come in another order: the tracks, not the positions, carry the answer.
    got = ground_frame(ev, 5, CAPS, frame[:, ::-1], ids[::-1])
    assert [(g.box, g.track_id) for g in got] == [(1, 7), (0, 9)]
    # Without joint assignment both captions take track 7.
    ev2 = Evidence()
    assert [g.track_id for g in ground_frame(ev2, 0, CAPS, frame, ids, joint=False)] == [7, 7]


def test_outlier_frame_does_not_flip_but_a_steady_change_does():
    ev = Evidence(EvidenceConfig(decay=0.8, margin=0.5, switch_frames=3))
    ids = np.array([1, 2])
    good, bad = np.array([[0.9, 0.1]]), np.array([[0.1, 0.9]])
    tracks = [ground_frame(ev, s, CAPS[:1], good, ids)[0].track_id for s in range(8)]
    tracks.append(ground_frame(ev, 8, CAPS[:1], bad, ids)[0].track_id)
    assert tracks == [1] * 9
    later = [ground_frame(ev, 9 + s, CAPS[:1], bad, ids)[0] for s in range(10)]
    assert later[-1].track_id == 2
    assert sum(g.switched for g in later) == 1
    assert ev.flips("red circle") == 1


def test_not_in_view_abstains_with_the_probability():
    cal = Calibration("temperature", temperature=1.0, bias=0.0)  # identity
    ev = Evidence()
    scores = np.array([[0.95, 0.05], [0.02, 0.03]])
    got = ground_frame(ev, 0, CAPS, scores, np.array([1, 2]), calibration=cal,
                       abstain_below=0.5)
    assert got[0].box == 0 and got[0].track_id == 1
    assert math.isclose(got[0].probability, 0.95, rel_tol=1e-6)
    assert got[1].box is None and got[1].track_id == NO_TRACK
    assert math.isclose(got[1].probability, 0.03, rel_tol=1e-6)


def test_untracked_boxes_and_empty_frames():
    ev = Evidence()
    got = ground_frame(ev, 0, CAPS[:1], np.array([[0.3, 0.8]]), np.array([4, NO_TRACK]))
    assert (got[0].box, got[0].track_id) == (1, NO_TRACK)  # this frame's score wins
    empty = ground_frame(ev, 1, CAPS, np.zeros((2, 0)), np.zeros(0, np.int64))
    assert [(g.box, g.probability) for g in empty] == [(None, 0.0), (None, 0.0)]


def test_a_caption_naming_nothing_does_not_take_a_box_from_one_in_view():
    # "red circle" is in view: track 1 (0.9) ahead of track 2 (0.6). "blue square" names
    # nothing: tiny scores, but in log-odds its 1e-3 on track 1 is far "better" than its 1e-6
    # on track 2. Summed log-odds would hand it track 1 and push red circle to track 2; below
    # JOINT_FLOOR its differences count for nothing.
    ev = Evidence()
    scores = np.array([[0.9, 0.6], [1e-3, 1e-6]])
    got = ground_frame(ev, 0, CAPS, scores, np.array([1, 2]))
    assert [g.track_id for g in got] == [1, 2]
    # Where both captions are in view, posteriors still decide between them.
    ev = Evidence()
    both = np.array([[0.9, 0.6], [0.97, 0.2]])
    assert [g.track_id for g in ground_frame(ev, 0, CAPS, both, np.array([1, 2]))] == [2, 1]


def test_a_held_caption_is_not_in_view_only_when_abstaining():
    """A caption waiting for its lost track answers no box when "not in view" is on, and
    keeps the look-alike's box when it is off (false always gives a box)."""
    cal = Calibration("temperature", temperature=1.0, bias=0.0)  # identity
    config = EvidenceConfig(hold=4, hold_margin=1.0)
    seen, hidden = np.array([[0.95, 0.3]]), np.array([[0.3]])
    for abstain, expect in ((0.05, None), (None, 0)):
        ev = Evidence(config)
        for seq in range(5):
            ground_frame(ev, seq, CAPS[:1], seen, np.array([1, 2]), calibration=cal,
                         abstain_below=abstain)
        got = ground_frame(ev, 5, CAPS[:1], hidden, np.array([2]), calibration=cal,
                           abstain_below=abstain)[0]
        assert got.box == expect
        back = ground_frame(ev, 6, CAPS[:1], seen, np.array([1, 2]), calibration=cal,
                            abstain_below=abstain)[0]
        assert back.track_id == 1
