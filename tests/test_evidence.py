"""Evidence over time with scripted score sequences: hysteresis, late frames, state."""

from __future__ import annotations

import math

import pytest

from spotline.stages.tracking.evidence import Evidence, EvidenceConfig

CONFIG = EvidenceConfig(decay=0.8, margin=0.5, switch_frames=3)


def run(script: list[dict[int, float]], start: int = 0, ev: Evidence | None = None,
        caption: str = "grey plane") -> tuple[Evidence, list[int | None]]:
    ev = ev or Evidence(CONFIG)
    chosen = [ev.update(start + seq, caption, scores).track for seq, scores in enumerate(script)]
    return ev, chosen


def test_one_outlier_frame_does_not_flip():
    steady = [{1: 0.9, 2: 0.1}] * 10
    outlier = [{1: 0.02, 2: 0.98}]
    ev, chosen = run(steady + outlier + steady)
    assert set(chosen) == {1}
    assert ev.flips("grey plane") == 0


def test_a_switch_after_n_consistent_frames():
    ev, chosen = run([{1: 0.9, 2: 0.1}] * 10 + [{1: 0.1, 2: 0.9}] * 12)
    assert chosen[:10] == [1] * 10
    first_2 = chosen.index(2)
    # Track 2 must first lead by the margin, then hold the lead for switch_frames frames.
    assert chosen[first_2:] == [2] * (len(chosen) - first_2)
    lead_from = next(i for i in range(10, 22) if _lead(i) >= CONFIG.margin)
    assert first_2 == lead_from + CONFIG.switch_frames - 1
    assert ev.flips("grey plane") == 1


def _lead(frame: int) -> float:
    """Posterior of 2 minus 1 after ``frame`` in the script of the test above."""
    ev, _ = run([{1: 0.9, 2: 0.1}] * 10 + [{1: 0.1, 2: 0.9}] * 12)
    ev2, _ = run(([{1: 0.9, 2: 0.1}] * 10 + [{1: 0.1, 2: 0.9}] * 12)[:frame + 1])
    return ev2.posterior("grey plane", 2) - ev2.posterior("grey plane", 1)


def test_alternating_noise_never_switches():
    script = [{1: 0.7, 2: 0.3} if i % 2 else {1: 0.3, 2: 0.8} for i in range(40)]
    _, chosen = run([{1: 0.8, 2: 0.2}] * 5 + script)
    assert set(chosen) == {1}


def test_an_interrupted_lead_restarts_the_count():
    # Track 2 leads for 2 frames, then 1 is back ahead, then 2 leads 2 more: no switch.
    ev = Evidence(EvidenceConfig(decay=0.0 + 1e-9, margin=0.5, switch_frames=3))
    script = [{1: 0.9, 2: 0.1}, {1: 0.1, 2: 0.9}, {1: 0.1, 2: 0.9}, {1: 0.9, 2: 0.1},
              {1: 0.1, 2: 0.9}, {1: 0.1, 2: 0.9}, {1: 0.1, 2: 0.9}]
    _, chosen = run(script, ev=ev)
    assert chosen == [1, 1, 1, 1, 1, 1, 2]


def test_missing_incumbent_hands_over_at_once():
    ev, chosen = run([{1: 0.9, 2: 0.1}] * 5 + [{2: 0.4, 3: 0.3}])
    # Track 1 is gone; 3 (seen once at 0.3) beats 2, whose history is 0.1s and one 0.4.
    assert chosen[-1] == 3
    assert ev.flips("grey plane") == 1
    assert ev.update(6, "grey plane", {}).track is None


def test_dropped_frames_age_evidence_by_the_gap():
    a = Evidence(CONFIG)
    a.update(0, "c", {1: 0.9})
    a.update(5, "c", {1: 0.1})
    b = Evidence(CONFIG)
    b.update(0, "c", {1: 0.9})
    b.update(1, "c", {1: 0.1})
    # The older 0.9 counts less after a gap of 5 than after a gap of 1.
    assert a.posterior("c", 1) < b.posterior("c", 1)
    expected = (0.8 ** 5 * math.log(9) + math.log(1 / 9)) / (0.8 ** 5 + 1)
    assert math.isclose(a.posterior("c", 1), expected, rel_tol=1e-9)


def test_late_frames_give_the_same_sums_as_in_order():
    frames = [(seq, {1: 0.1 + 0.08 * seq, 2: 0.9 - 0.07 * seq}) for seq in range(10)]
    ordered, shuffled = Evidence(CONFIG), Evidence(CONFIG)
    for seq, scores in frames:
        ordered.update(seq, "c", scores)
    for seq, scores in [frames[i] for i in (0, 2, 1, 3, 5, 4, 6, 9, 7, 8)]:
        shuffled.update(seq, "c", scores)
    for track in (1, 2):
        assert math.isclose(ordered.posterior("c", track), shuffled.posterior("c", track),
                            rel_tol=1e-9)


def test_state_round_trip_continues_identically():
    script = [{1: 0.9, 2: 0.1, 3: 0.5}] * 6 + [{1: 0.1, 2: 0.9}] * 6 + [{2: 0.2, 3: 0.95}] * 6
    whole, chosen_whole = run(script)
    ev = Evidence(CONFIG)
    chosen = []
    for seq, scores in enumerate(script):
        ev = Evidence.from_state(ev.to_state(), CONFIG)  # as if another worker continued
        chosen.append(ev.update(seq, "grey plane", scores).track)
    assert chosen == chosen_whole
    assert ev.to_state() == whole.to_state()


def test_old_pairs_and_captions_are_forgotten():
    ev = Evidence(EvidenceConfig(max_age=3, max_captions=2))
    ev.update(0, "a", {1: 0.9})
    ev.update(10, "a", {2: 0.9})
    assert ev.posterior("a", 1) == -math.inf
    ev.update(11, "b", {1: 0.5})
    ev.update(12, "c", {1: 0.5})
    assert list(ev.captions) == ["b", "c"]


def test_bad_config_and_state_are_refused():
    with pytest.raises(ValueError, match="decay"):
        EvidenceConfig(decay=0.0)
    with pytest.raises(ValueError, match="switch_frames"):
        EvidenceConfig(switch_frames=0)
    with pytest.raises(ValueError, match="version"):
        Evidence.from_state({"v": 7, "captions": []})
    with pytest.raises(ValueError, match="track ids"):
        Evidence().update(0, "a", {-1: 0.5})


HOLD = EvidenceConfig(decay=0.8, margin=0.5, switch_frames=3, hold=4, hold_margin=1.0)


def test_a_lost_track_is_waited_for_rather_than_a_look_alike_taken():
    """The target (track 1) hides for 3 frames: the look-alike (track 2) trails it by far more
    than hold_margin, so the caption answers no track (held) and comes back to track 1."""
    ev = Evidence(HOLD)
    seen = [{1: 0.9, 2: 0.3}] * 6
    hidden = [{2: 0.3}] * 3
    decisions = [ev.update(seq, "red star", s) for seq, s in enumerate(seen + hidden + seen)]
    assert [d.track for d in decisions] == [1] * 6 + [None] * 3 + [1] * 6
    assert [d.held for d in decisions] == [False] * 6 + [True] * 3 + [False] * 6
    assert ev.flips("red star") == 0


def test_the_hold_ends_and_a_close_track_takes_over_at_once():
    ev = Evidence(HOLD)
    for seq in range(6):
        ev.update(seq, "red star", {1: 0.9, 2: 0.3})
    # lost for longer than hold frames: the best present track takes over after the 4th
    late = [ev.update(6 + k, "red star", {2: 0.3}).track for k in range(6)]
    assert late == [None] * 4 + [2, 2]
    # the object back under a new id, as likely as before: within hold_margin, it takes over
    ev2 = Evidence(HOLD)
    for seq in range(6):
        ev2.update(seq, "red star", {1: 0.9, 2: 0.3})
    back = ev2.update(6, "red star", {3: 0.85, 2: 0.3})
    assert back.track == 3 and not back.held


def test_without_hold_the_best_present_track_takes_over_at_once():
    ev = Evidence(CONFIG)
    for seq in range(6):
        ev.update(seq, "red star", {1: 0.9, 2: 0.3})
    assert ev.update(6, "red star", {2: 0.3}).track == 2
