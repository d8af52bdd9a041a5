"""One box per caption (Hungarian), "not in view" and score calibration: pure functions."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from spotline.stages.tracking import calibration
from spotline.stages.tracking.assign import argmax_boxes, assign, ground
from spotline.stages.tracking.calibration import Calibration, fit_isotonic, fit_temperature


def test_joint_assignment_gives_two_captions_two_boxes():
    # Both captions like box 0 best; argmax gives both box 0, the assignment splits them.
    scores = np.array([[0.9, 0.8, 0.1],
                       [0.7, 0.2, 0.1]])
    assert argmax_boxes(scores) == [0, 0]
    assert assign(scores, joint=False) == [0, 0]
    assert assign(scores) == [1, 0]  # total 0.8 + 0.7 beats 0.9 + 0.2


def test_joint_assignment_is_the_best_total_by_brute_force():
    rng = np.random.default_rng(7)
    for c, n in [(2, 2), (3, 5), (4, 4), (3, 6)]:
        scores = rng.random((c, n))
        picks = assign(scores)
        assert len(set(picks)) == c  # one box per caption
        best = max(sum(scores[r, p] for r, p in enumerate(perm))
                   for perm in itertools.permutations(range(n), c))
        assert math.isclose(sum(scores[r, p] for r, p in enumerate(picks)), best)


def test_more_captions_than_boxes_share_only_what_they_must():
    scores = np.array([[0.9, 0.1],
                       [0.8, 0.7],
                       [0.6, 0.2]])
    picks = assign(scores)
    assert sorted(picks[:2]) == [0, 1]  # the optimal pair: 0.9 + 0.7
    assert picks == [0, 1, 0]  # the caption left over takes its own argmax


def test_same_caption_twice_gets_the_same_box():
    scores = np.array([[0.9, 0.2], [0.9, 0.2], [0.8, 0.3]])
    picks = assign(scores, captions=["red car", "red car", "blue car"])
    assert picks[0] == picks[1] == 0
    assert picks[2] == 1


def test_nan_scores_rank_last_and_bad_shapes_are_refused():
    scores = np.array([[np.nan, 0.2], [0.5, np.nan]])
    assert assign(scores) == [1, 0]
    assert assign(np.zeros((0, 3))) == []
    with pytest.raises(ValueError, match="captions × boxes"):
        assign(np.zeros(3))
    with pytest.raises(ValueError, match="2 captions for 1"):
        assign(np.zeros((1, 2)), captions=["a", "b"])


def test_ground_abstains_below_the_calibrated_threshold():
    cal = Calibration("temperature", temperature=1.0, bias=0.0)  # identity on probabilities
    scores = np.array([[0.95, 0.10],
                       [0.20, 0.30]])
    picks = ground(scores, calibration=cal, abstain_below=0.5)
    assert picks[0].box == 0 and math.isclose(picks[0].probability, 0.95, rel_tol=1e-6)
    assert picks[1].box is None  # best is 0.30 < 0.5: not in view
    assert math.isclose(picks[1].probability, 0.30, rel_tol=1e-6)
    assert math.isclose(picks[1].score, 0.30)
    # Without a threshold (the seed's /identify contract) every caption gets a box.
    assert [p.box for p in ground(scores, calibration=cal)] == [0, 1]
    assert [p.box for p in ground(scores)] == [0, 1]
    assert all(math.isnan(p.probability) for p in ground(scores))


def test_ground_without_boxes_is_not_in_view():
    picks = ground(np.zeros((2, 0)), captions=["a", "b"])
    assert [(p.box, p.probability) for p in picks] == [(None, 0.0), (None, 0.0)]


def _labelled(seed: int, n: int = 4000) -> tuple[np.ndarray, np.ndarray]:
    """SigLIP-like scores: right boxes score ~0.02, wrong ones ~0.001, overlapping."""
    rng = np.random.default_rng(seed)
    correct = rng.random(n) < 0.3
    z = np.where(correct, rng.normal(-4.0, 1.0, n), rng.normal(-7.0, 1.0, n))
    return 1 / (1 + np.exp(-z)), correct.astype(np.float64)


@pytest.mark.parametrize("fitter", [fit_temperature, fit_isotonic])
def test_calibration_lowers_the_nll_and_is_monotone(fitter):
    scores, correct = _labelled(1)
    cal = fitter(scores, correct)
    probs = cal.apply(scores)
    assert calibration.nll(probs, correct) < 0.8 * calibration.nll(scores, correct)
    # Calibrated: the mean probability matches the rate of right boxes.
    assert abs(probs.mean() - correct.mean()) < 0.02
    grid = np.linspace(1e-4, 0.2, 200)
    assert np.all(np.diff(cal.apply(grid)) >= -1e-12)
    assert cal.fitted_on == scores.size


def test_temperature_recovers_a_known_scaling():
    rng = np.random.default_rng(3)
    z = rng.normal(0.0, 3.0, 20000)
    truth = 1 / (1 + np.exp(-(z / 2.0 - 1.0)))  # T = 2, b = -1
    correct = (rng.random(z.size) < truth).astype(np.float64)
    cal = fit_temperature(1 / (1 + np.exp(-z)), correct)
    assert abs(cal.temperature - 2.0) < 0.15
    assert abs(cal.bias + 1.0) < 0.1


def test_calibration_round_trips_beside_the_scorer(tmp_path):
    scores, correct = _labelled(2)
    assert calibration.load(tmp_path) is None
    for method in calibration.METHODS:
        cal = calibration.fit(scores, correct, method)
        path = calibration.save(cal, tmp_path)
        assert path == tmp_path / "calibration.json"
        again = calibration.load(tmp_path)
        assert again == cal
        assert np.allclose(again.apply(scores), cal.apply(scores))
    assert path.stat().st_size < 40_000


def test_calibration_refuses_bad_input(tmp_path):
    with pytest.raises(ValueError, match="one right and one wrong"):
        fit_temperature(np.array([0.1, 0.2]), np.array([1, 1]))
    with pytest.raises(ValueError, match="3 scores for 2 labels"):
        fit_isotonic(np.array([0.1, 0.2, 0.3]), np.array([1, 0]))
    with pytest.raises(ValueError, match="choose from"):
        calibration.fit(np.array([0.1, 0.2]), np.array([1, 0]), "platt")
    (tmp_path / "calibration.json").write_text('{"version": 1, "method": "magic"}')
    with pytest.raises(ValueError, match="not a spotline calibration"):
        calibration.load(tmp_path)
