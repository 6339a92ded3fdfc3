"""The operating point: temperature scaling and thresholds fitted on hand-made validation data."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from tasks.evaluate import calibration
from tasks.evaluate.calibration import (
    REFERENCE_SIZE,
    OperatingPoint,
    calibrated_scores,
    ensemble_scores,
    ensemble_threshold,
    fit_operating_point,
    fit_temperature,
    fit_threshold,
    has_ensemble,
    operating_point_of,
    rank_among,
)
from tasks.evaluate.metrics import equal_error_rate


def synthetic(temperature: float, n: int = 20_000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits z ~ N(0, 4^2) and labels drawn from sigmoid(z / temperature): the true T."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 4.0, n)
    y = (rng.uniform(size=n) < 1 / (1 + np.exp(-z / temperature))).astype(np.int64)
    return z, y


@pytest.mark.parametrize("true_t", [0.5, 1.0, 3.0])
def test_fit_temperature_recovers_a_known_temperature(true_t: float) -> None:
    z, y = synthetic(true_t)
    assert fit_temperature(z, y) == pytest.approx(true_t, rel=0.08)


def test_fit_temperature_is_deterministic_and_bounded() -> None:
    z, y = synthetic(3.0, n=2000, seed=1)
    assert fit_temperature(z, y) == fit_temperature(z.copy(), y.copy())
    # perfectly separated: the NLL keeps falling as T shrinks, so T stops at the bound
    separated = fit_temperature(np.array([-2.0, -1.0, 1.0, 2.0]), np.array([0, 0, 1, 1]))
    assert separated == pytest.approx(calibration.MIN_TEMPERATURE, rel=1e-3)
    # labels that contradict the logits everywhere flatten the scores towards 0.5
    wrong = fit_temperature(np.array([-2.0, -1.0, 1.0, 2.0, 0.5]), np.array([1, 1, 0, 0, 1]))
    assert calibration.MIN_TEMPERATURE <= wrong <= calibration.MAX_TEMPERATURE
    assert wrong == pytest.approx(calibration.MAX_TEMPERATURE, rel=1e-3)


def test_fit_temperature_is_one_without_a_fit() -> None:
    assert fit_temperature(np.array([-1.0, 2.0, 3.0]), np.array([1, 1, 1])) == 1.0
    assert fit_temperature(np.array([0.0, 0.0]), np.array([0, 1])) == 1.0
    with pytest.raises(ValueError, match="logits must be finite"):
        fit_temperature(np.array([np.nan, 1.0]), np.array([0, 1]))
    with pytest.raises(ValueError, match="labels must be 0"):
        fit_temperature(np.array([0.0, 1.0]), np.array([0, 2]))


def test_calibrated_scores_stay_probabilities_for_huge_logits() -> None:
    z = np.array([-1e308, -1e4, -50.0, 0.0, 50.0, 1e4, 1e308])
    for t in (calibration.MIN_TEMPERATURE, 1.0, 20.0):
        with np.errstate(all="raise"):  # no overflow warning leaks out
            s = calibrated_scores(z, t)
        assert s.dtype == np.float64
        assert np.all((s >= 0.0) & (s <= 1.0)) and np.all(np.diff(s) >= 0)
        assert s[0] == 0.0 and s[-1] == 1.0 and s[3] == 0.5
    assert calibrated_scores(np.array([2.0]), 2.0)[0] == pytest.approx(1 / (1 + math.exp(-1)))
    with pytest.raises(ValueError, match="temperature"):
        calibrated_scores(z, 0.0)


def test_eer_threshold_by_hand() -> None:
    # reals 0.1 0.2 0.3 0.6, fakes 0.4 0.5 0.7 0.8, fake when score >= t:
    #   t=0.4: FPR 1/4 (0.6), FNR 0   t=0.5: FPR 1/4, FNR 1/4 (0.4)   t=0.6: FPR 1/4, FNR 2/4
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.6, 0.4, 0.5, 0.7, 0.8])
    assert fit_threshold(y, s, "eer") == 0.5
    assert fit_threshold(y, s, "eer") == equal_error_rate(y, s)[1]


def test_eer_ties_go_to_the_higher_threshold() -> None:
    # t=0.3: FPR 1/2, FNR 0 (gap 1/2); t=0.6: FPR 0, FNR 1/2 (gap 1/2); equal gaps -> 0.6
    y = np.array([0, 0, 1, 1])
    s = np.array([0.2, 0.3, 0.6, 0.9])
    assert fit_threshold(y, s, "eer") == 0.6
    y = np.array([0, 0, 1, 1])
    s = np.array([0.1, 0.5, 0.5, 0.9])  # t=0.5: FPR 1/2, FNR 0; t=0.9: FPR 0, FNR 1/2
    assert fit_threshold(y, s, "eer") == 0.9
    # a score tied between a real and a fake is called fake for both: at t=0.5 FPR 1/4, FNR 0
    # (gap 1/4); at 0.8 FPR 0, FNR 1/3; at 0.3 FPR 2/4, FNR 0
    y = np.array([0, 0, 0, 0, 1, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.5, 0.5, 0.8, 0.9])
    assert fit_threshold(y, s, "eer") == 0.5 == equal_error_rate(y, s)[1]


def test_fpr_rule_respects_the_budget_on_validation() -> None:
    rng = np.random.default_rng(3)
    y = np.array([0] * 500 + [1] * 500)
    s = np.clip(rng.normal(0.35 + 0.3 * y, 0.15), 0, 1)
    reals = s[y == 0]
    for target in (0.01, 0.05, 0.2):
        t = fit_threshold(y, s, "fpr", target)
        assert np.mean(reals >= t) <= target
        lower = s[s < t].max()  # the next lower candidate breaks the budget
        assert np.mean(reals >= lower) > target
        assert np.sum(reals >= t) == np.floor(target * len(reals) + 1e-9)  # budget used up
    # by hand: reals 0.1 0.2 0.3 0.6: budget 1/4 -> 0.6 allowed (FPR 1/4), 0.5 also FPR 1/4,
    # 0.4 also 1/4, 0.3 gives 2/4: smallest allowed candidate is 0.4
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.6, 0.4, 0.5, 0.7, 0.8])
    assert fit_threshold(y, s, "fpr", 0.25) == 0.4
    assert fit_threshold(y, s, "fpr", 0.1) == 0.7  # FPR 0 needs t above the real 0.6


def test_fpr_rule_above_every_score_when_the_top_score_is_real() -> None:
    y = np.array([1, 1, 0])
    s = np.array([0.2, 0.3, 1.0])
    t = fit_threshold(y, s, "fpr", 0.01)
    assert t > 1.0 and t == np.nextafter(1.0, 2.0)  # nothing called fake: FPR 0


def test_fit_threshold_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="rule 'roc' is not one of eer, fpr"):
        fit_threshold([0, 1], [0.1, 0.9], "roc")
    with pytest.raises(ValueError, match="needs a target_fpr"):
        fit_threshold([0, 1], [0.1, 0.9], "fpr")
    with pytest.raises(ValueError, match="need real and fake"):
        fit_threshold([1, 1], [0.1, 0.9], "eer")


def test_fit_operating_point_fits_temperature_then_threshold() -> None:
    z, y = synthetic(3.0, n=4000, seed=2)
    op = fit_operating_point(z, y, "fpr", 0.05)
    assert op.rule == "fpr" and op.target_fpr == 0.05 and op.n_val == 4000
    assert op.temperature == pytest.approx(3.0, rel=0.1)
    scores = calibrated_scores(z, op.temperature)
    assert op.threshold == fit_threshold(y, scores, "fpr", 0.05)
    assert np.mean(scores[y == 0] >= op.threshold) <= 0.05
    eer = fit_operating_point(z, y, "eer", 0.05)
    assert eer.rule == "eer" and eer.target_fpr is None
    # one class: nothing to fit, the fallback threshold at temperature 1
    fixed = fit_operating_point(z, np.ones_like(y), "eer", fallback_threshold=0.4)
    assert fixed == OperatingPoint(0.4, 1.0, "fixed", None, 0)


def test_operating_point_round_trips_through_plain_json() -> None:
    z, y = synthetic(2.0, n=500, seed=4)
    op = fit_operating_point(z, y, "eer")
    data = op.as_metadata()
    assert list(data) == ["threshold", "temperature", "rule", "target_fpr", "n_val", "reference"]
    assert OperatingPoint.from_dict(json.loads(json.dumps(data))) == op
    # what metrics.json shows: the point without its reference; a file from before the
    # reference reads back with none
    assert list(op.as_dict()) == list(data)[:-1]
    assert OperatingPoint.from_dict(op.as_dict()).reference == ()
    with pytest.raises(ValueError, match="reference must be ascending"):
        OperatingPoint.from_dict({**data, "reference": [0.5, 0.2]})
    with pytest.raises(ValueError, match="lacks n_val"):
        OperatingPoint.from_dict({k: v for k, v in data.items() if k != "n_val"})
    with pytest.raises(ValueError, match="temperature must be finite and > 0"):
        OperatingPoint.from_dict({**data, "temperature": -1.0})
    with pytest.raises(ValueError, match="rule 'x'"):
        OperatingPoint.from_dict({**data, "rule": "x"})


def test_operating_point_of_a_model_file() -> None:
    op = OperatingPoint(0.7, 2.5, "fpr", 0.01, 40)
    assert operating_point_of({"epoch": 3, "operating_point": op.as_dict()}, 0.5) == op
    assert operating_point_of({"epoch": 3}, 0.5) == OperatingPoint(0.5, 1.0, "fixed", None, 0)
    with pytest.raises(ValueError, match="operating point"):
        operating_point_of({"operating_point": "eer"}, 0.5)


def test_a_fitted_point_keeps_its_validation_reals_scores_as_the_reference() -> None:
    z, y = synthetic(2.0, n=500, seed=4)
    op = fit_operating_point(z, y, "eer")
    reals = np.sort(calibrated_scores(z, op.temperature)[y == 0])
    assert np.allclose(op.reference, reals, rtol=0, atol=1e-12)
    # beyond REFERENCE_SIZE reals: evenly spaced quantiles, the lowest and highest kept
    z, y = synthetic(2.0, n=5_000, seed=5)
    big = fit_operating_point(z, y, "eer")
    reals = np.sort(calibrated_scores(z, big.temperature)[y == 0])
    assert len(reals) > REFERENCE_SIZE and len(big.reference) == REFERENCE_SIZE
    assert big.reference[0] == pytest.approx(reals[0], abs=1e-12)
    assert big.reference[-1] == pytest.approx(reals[-1], abs=1e-12)
    assert big.reference[500] == pytest.approx(np.median(reals), abs=1e-9)


def test_rank_among_counts_the_reference_below_with_ties_half() -> None:
    ref = [0.1, 0.2, 0.2, 0.4]
    got = rank_among(ref, [0.0, 0.1, 0.15, 0.2, 0.3, 0.4, 0.9])
    assert got.tolist() == [0.0, 0.125, 0.25, 0.5, 0.75, 0.875, 1.0]
    with pytest.raises(ValueError, match="at least one score"):
        rank_among([], [0.5])


def point(threshold: float, reference: list[float]) -> OperatingPoint:
    return OperatingPoint(threshold, 1.0, "eer", None, 2 * len(reference), tuple(reference))


def by_hand(ranks: list[float], probabilities: list[float], largest: int) -> float:
    """The mean rank, ties broken by the mean probability weighted at half the finest step."""
    tie = 0.5 / (2 * len(ranks) * largest)
    return (float(np.mean(ranks)) + tie * float(np.mean(probabilities))) / (1 + tie)


def test_the_ensemble_follows_the_fusions_ranks_not_the_most_confident_fusions_probability() -> (
    None
):
    # "a" is confident (near 1 for anything unusual), "b" spreads its scores: a mean of
    # probabilities would follow "a"; the ranks weigh the two alike
    points = {
        "a": point(0.999, [0.0, 0.001, 0.002, 0.003]),
        "b": point(0.25, [0.1, 0.2, 0.3, 0.4]),
    }
    # X: above every real for "a", low for "b"; Y: above most reals for "a", every real for "b"
    scores = {"a": np.array([0.9999, 0.0025]), "b": np.array([0.15, 0.45])}
    got = ensemble_scores(scores, points)
    assert got == pytest.approx(
        [by_hand([1.0, 0.25], [0.9999, 0.15], 4), by_hand([0.75, 1.0], [0.0025, 0.45], 4)]
    )
    assert got[1] > got[0]  # Y looks more fake to the two together
    assert np.mean([scores["a"], scores["b"]], axis=0).tolist() == pytest.approx([0.57495, 0.22625])
    # the thresholds combined the same way: ranks 1.0 and 0.5 here
    assert ensemble_threshold(points) == pytest.approx(by_hand([1.0, 0.5], [0.999, 0.25], 4))
    assert (got >= ensemble_threshold(points)).tolist() == [False, True]


def test_equal_mean_ranks_are_ordered_by_probability_and_never_a_whole_rank_step() -> None:
    points = {"a": point(0.5, [0.1, 0.2, 0.3]), "b": point(0.5, [0.2, 0.4, 0.6])}
    # P and Q above every real in both fusions (rank 1 each): the surer one ranks higher;
    # R half a step lower in "b" (tied with its top real) at the highest probabilities
    scores = {"a": np.array([0.7, 0.99, 1.0]), "b": np.array([0.65, 0.98, 0.6])}
    p, q, r = ensemble_scores(scores, points)
    assert q > p > r
    assert r == pytest.approx(by_hand([1.0, 5 / 6], [1.0, 0.6], 3))
    assert 0.0 <= r and q <= 1.0
    # a score below every real in both fusions, at the lowest probability: 0
    assert ensemble_scores({"a": [0.0], "b": [0.0]}, points)[0] == 0.0


def test_an_ensemble_needs_two_fusions_each_with_a_reference() -> None:
    with_ref = point(0.5, [0.1, 0.2])
    assert has_ensemble({"a": with_ref, "b": with_ref})
    assert not has_ensemble({"a": with_ref})
    assert not has_ensemble({"a": with_ref, "b": OperatingPoint(0.5, 1.0, "fixed", None, 0)})
    with pytest.raises(ValueError, match="two fusions or more"):
        ensemble_scores({"a": np.array([0.5])}, {"a": with_ref})
    with pytest.raises(ValueError, match="two fusions or more"):
        ensemble_threshold({"a": with_ref})
