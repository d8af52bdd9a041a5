"""'Not in view' with a presence model: its features, its fit and threshold on scripted scores,
grounding with it (an absent caption abstains and takes no box from a caption in view), the
file format, and where the threshold comes from."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
from scipy.special import expit, logit

from spotline.common.errors import ConfigError
from spotline.common.settings import load_settings
from spotline.eval.grounding import Scored, fit_scored, grounding_report, report_lines
from spotline.stages.tracking import calibration
from spotline.stages.tracking.assign import ground, in_view
from spotline.stages.tracking.calibration import (
    Calibration,
    abstain_threshold,
    choose_threshold,
    fit_presence,
    presence_features,
)
from spotline.stages.tracking.evidence import Evidence
from spotline.stages.tracking.grounding import ground_frame

# P(in view) = sigmoid(best logit + margin) with several captions, sigmoid(best logit) alone.
HAND = Calibration("temperature", presence_single=(1.0, 0.0), presence_multi=(1.0, 1.0, 0.0),
                   threshold=0.5)


def test_features_are_the_best_logit_and_the_margin_over_other_captions():
    z = np.array([[2.0, -1.0, 0.0],
                  [1.0, 3.0, -2.0],
                  [-4.0, 0.5, -3.0]])
    feats, multi = presence_features(z, ["a", "b", "c"])
    assert feats[:, 0].tolist() == [2.0, 3.0, 0.5]
    # a's best box 0: rivals b 1.0, c -4.0; b's box 1: a -1.0, c 0.5; c's box 1: a -1, b 3.
    assert feats[:, 1].tolist() == [1.0, 2.5, -2.5]
    assert multi.all()
    # The same text twice is one caption: no rival, no margin.
    feats, multi = presence_features(z[:2], ["a", "a"])
    assert not multi.any() and feats[:, 1].tolist() == [0.0, 0.0]
    # Non-finite scores: nan never wins (no rival: the margin is capped), +inf is a certain
    # box; no boxes: -inf.
    feats, multi = presence_features(np.array([[np.nan, -1.0], [np.inf, np.nan]]))
    assert feats.tolist() == [[-1.0, calibration.MARGIN_CAP],
                              [calibration.BIG, calibration.MARGIN_CAP]] and multi.all()
    feats, multi = presence_features(np.zeros((2, 0)))
    assert np.isneginf(feats[:, 0]).all() and not multi.any()
    with pytest.raises(ValueError, match="1 captions for 2"):
        presence_features(z[:2], ["a"])


def test_presence_of_a_hand_made_model():
    scores = expit(np.array([[2.0, -1.0], [1.0, 3.0]]))
    got = HAND.presence(scores, ["a", "b"])
    # a: best 2, margin 2 - 1 = 1 -> sigmoid(3); b: best 3, margin 3 - (-1) = 4 -> sigmoid(7)
    assert np.allclose(got, expit([3.0, 7.0]), atol=1e-6)
    assert np.allclose(HAND.presence(scores[:1], ["a"]), expit([2.0]), atol=1e-6)
    assert HAND.presence(np.zeros((2, 0))).tolist() == [0.0, 0.0]
    # Without a presence model: the best box's calibrated probability (identity here).
    plain = Calibration("temperature")
    assert np.allclose(plain.presence(scores), scores.max(axis=1))
    assert np.allclose(in_view(plain, scores), scores.max(axis=1))


def test_choose_threshold_takes_the_most_recall_at_the_target_precision():
    probs = np.array([0.05, 0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.8, 0.9, 0.95])
    present = np.array([0, 0, 1, 0, 0, 1, 1, 0, 1, 1], dtype=bool)
    # Abstaining on the lowest 2: precision 1.0; lowest 5: 4/5 = 0.8; lowest 8: 5/8.
    t, how = choose_threshold(probs, present, 0.8)
    assert math.isclose(t, 0.5) and how["precision"] == 0.8 and how["recall"] == 0.8
    t, how = choose_threshold(probs, present, 1.0)
    assert math.isclose(t, 0.15) and how["recall"] == 0.4
    # Ties are never split: abstaining is decided per probability value.
    t, how = choose_threshold(np.array([0.1, 0.1, 0.5]), np.array([0, 1, 1], bool), 0.9)
    assert t == 0.0 and how["recall"] == 0.0  # never abstain: nothing reaches 0.9


def scripted_frames(seed: int, n: int = 300) -> list[Scored]:
    """Frames of three captions on four boxes: two in view (a high logit on their own box),
    one naming nothing; a third of the absent captions look like a visible object's caption
    (a high logit on a box another caption claims more strongly)."""
    rng = np.random.default_rng(seed)
    boxes = np.array([[0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10], [60, 0, 70, 10]],
                     np.float32)
    frames = []
    for _ in range(n):
        z = rng.normal(-6.0, 1.0, (3, 4))
        z[0, 0], z[1, 1] = rng.normal(0.0, 1.5, 2)
        z[2, 0] = z[0, 0] - abs(rng.normal(1.0, 0.5)) if rng.random() < 1 / 3 else \
            rng.normal(-3.0, 1.5)
        frames.append(Scored(("a", "b", "zzz"), ((0, 0, 10, 10), (20, 0, 10, 10), None),
                             boxes, expit(z)))
    return frames


def test_fit_presence_on_scripted_frames_reaches_the_precision_it_promises():
    fit, held_out = scripted_frames(1), scripted_frames(2)
    cal = fit_scored(fit, target_precision=0.9)
    assert cal.has_presence and cal.threshold is not None and 0 < cal.threshold < 1
    assert cal.threshold_fit["precision"] >= 0.9 and cal.threshold_fit["absent"] == 300
    assert cal.presence_multi[1] > 0  # a rival's stronger claim speaks for "absent"
    report = grounding_report(held_out, cal)
    assert report["threshold"] == cal.threshold and report["presence_model"]
    assert report["abstain_precision"] >= 0.85 and report["abstain_recall"] >= 0.8
    # The best box's probability alone, thresholded for the same precision on the same frames,
    # cannot tell the look-alikes from visible captions: it finds far fewer absent ones.
    plain = Calibration("temperature")
    probs = np.concatenate([plain.presence(f.scores) for f in fit])
    threshold, _ = choose_threshold(probs, [t is not None for f in fit for t in f.truth], 0.9)
    best_only = grounding_report(held_out, plain, threshold)
    assert report["abstain_recall"] > best_only["abstain_recall"] + 0.3
    # Abstaining costs the visible captions little.
    assert report["joint_not_in_view"] >= report["joint"] - 0.05
    lines = report_lines(report)
    assert len(lines) == 2 and lines[0].startswith("joint assignment: accuracy")
    assert lines[1].startswith("not in view (P(in view) <")
    # No absent captions to learn from: a calibration without presence model or threshold.
    plain = fit_scored([Scored(f.captions[:2], f.truth[:2], f.boxes, f.scores[:2])
                        for f in fit])
    assert not plain.has_presence and plain.threshold is None
    assert "not measured" in report_lines(grounding_report(fit, plain))[1]


def test_fit_presence_refuses_what_it_cannot_learn_from():
    base = Calibration("temperature")
    visible = [(np.array([[0.9, 0.1]]), ["a"], [True])]
    with pytest.raises(ValueError, match="name nothing"):
        fit_presence(base, visible)
    alone = [(np.array([[0.9, 0.1]]), ["a"], [True]), (np.array([[0.2, 0.1]]), ["b"], [False])]
    with pytest.raises(ValueError, match="several captions"):
        fit_presence(base, alone)
    with pytest.raises(ValueError, match="2 labels for 1"):
        fit_presence(base, [(np.array([[0.9, 0.1]]), ["a"], [True, False])])
    with pytest.raises(ValueError, match="target precision"):
        fit_presence(base, visible, target_precision=0.0)


def test_an_absent_caption_abstains_and_leaves_the_visible_one_its_box():
    # a is box 0's; zzz names nothing but scores 0.4 on box 0. Jointly, zzz takes box 0 and
    # pushes a onto box 1 (0.6 + 0.4 > 0.9 + 0.01).
    scores = np.array([[0.9, 0.6],
                       [0.4, 0.01]])
    captions = ["a", "zzz"]
    assert [p.box for p in ground(scores, captions)] == [1, 0]
    picks = ground(scores, captions, calibration=HAND, abstain_below=0.5)
    assert picks[0].box == 0 and picks[1].box is None
    # zzz: best logit(0.4), margin logit(0.4) - logit(0.9)
    expect = expit(2 * logit(0.4) - logit(0.9))
    assert math.isclose(picks[1].probability, expect, rel_tol=1e-6)
    # The seed's /identify contract (no threshold): every caption keeps a box.
    assert all(p.box is not None for p in ground(scores, captions, calibration=HAND))
    # Track mode does the same on the posteriors.
    got = ground_frame(Evidence(), 0, captions, scores, np.array([7, 8]), calibration=HAND,
                       abstain_below=0.5)
    assert (got[0].box, got[0].track_id) == (0, 7) and got[1].box is None


def test_presence_model_round_trips_and_old_files_still_load(tmp_path):
    cal = fit_scored(scripted_frames(3, 60))
    calibration.save(cal, tmp_path)
    data = json.loads((tmp_path / "calibration.json").read_text())
    assert data["version"] == 2 and len(data["presence_multi"]) == 3
    again = calibration.load(tmp_path)
    assert again == cal
    old = {"version": 1, "method": "temperature", "space": "probability", "temperature": 2.0,
           "bias": 1.0, "knots_x": [], "knots_y": [], "fitted_on": 10, "nll": 0.1, "extra": {}}
    (tmp_path / "calibration.json").write_text(json.dumps(old))
    loaded = calibration.load(tmp_path)
    assert loaded is not None and not loaded.has_presence and loaded.threshold is None
    with pytest.raises(ValueError, match="2 single-caption and 3 multi-caption"):
        Calibration("temperature", presence_single=(1.0, 0.0))
    with pytest.raises(ValueError, match="threshold must be in"):
        Calibration("temperature", threshold=1.5)


def test_the_threshold_comes_from_the_settings_or_the_calibration(monkeypatch):
    off = SimpleNamespace(not_in_view=False, not_in_view_threshold=0.3)
    assert abstain_threshold(off, HAND) is None
    explicit = SimpleNamespace(not_in_view=True, not_in_view_threshold=0.3)
    assert abstain_threshold(explicit, HAND) == 0.3
    fitted = SimpleNamespace(not_in_view=True, not_in_view_threshold=0.0)
    assert abstain_threshold(fitted, HAND) == 0.5
    with pytest.raises(ConfigError, match="needs a threshold"):
        abstain_threshold(fitted, Calibration("temperature"))
    monkeypatch.setenv("SPOTLINE_NOT_IN_VIEW", "true")
    monkeypatch.setenv("SPOTLINE_NOT_IN_VIEW_THRESHOLD", "0.25")
    s = load_settings()
    assert s.not_in_view == "true" and s.not_in_view_threshold == 0.25
    monkeypatch.setenv("SPOTLINE_NOT_IN_VIEW_THRESHOLD", "1.5")
    with pytest.raises(ConfigError, match="not_in_view_threshold"):
        load_settings()


def test_track_mode_takes_its_own_threshold_where_the_calibration_has_one():
    both = Calibration("temperature", presence_single=(1.0, 0.0),
                       presence_multi=(1.0, 1.0, 0.0), threshold=0.5, track_threshold=0.3)
    fitted = SimpleNamespace(not_in_view="auto", not_in_view_threshold=0.0)
    assert abstain_threshold(fitted, both) == 0.5  # stills (eval --grounding, ask)
    assert abstain_threshold(fitted, both, tracked=True) == 0.3
    assert abstain_threshold(fitted, HAND, tracked=True) == 0.5  # none fitted on clips
    explicit = SimpleNamespace(not_in_view="auto", not_in_view_threshold=0.2)
    assert abstain_threshold(explicit, both, tracked=True) == 0.2  # the setting wins
    with pytest.raises(ValueError, match="track_threshold must be in"):
        Calibration("temperature", track_threshold=-0.1)


def test_track_threshold_counts_held_captions_as_abstaining_at_any_threshold():
    # eight caption-frames: presence, held back (waiting for a lost track), object in view
    presence = np.array([0.05, 0.10, 0.20, 0.30, 0.60, 0.70, 0.80, 0.95])
    held = np.array([False, False, False, False, True, False, False, False])
    present = np.array([False, False, True, False, False, True, True, True])
    threshold, how = calibration.choose_track_threshold(presence, held, present, 0.75)
    # abstaining on the held one and presence < 0.25 catches 3 of 4 absent with 1 wrong;
    # going on to 0.30 catches all 4 at 4/5 = 0.8 precision; the next (0.70) drops to 4/6
    assert 0.30 < threshold < 0.60
    assert how["held"] == 1
    assert how["precision"] == pytest.approx(4 / 5) and how["recall"] == 1.0
    strict, how = calibration.choose_track_threshold(presence, held, present, 0.99)
    # only the held one and the two lowest are sure: precision 1.0 on them
    assert 0.10 < strict <= 0.20 and how["precision"] == 1.0 and how["recall"] == 0.75
    with pytest.raises(ValueError, match="one shape"):
        calibration.choose_track_threshold(presence, held[:3], present)
