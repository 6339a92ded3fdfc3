"""Metric functions against values worked out by hand on small fixed inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tasks.evaluate import metrics as ev

# Four reals, four fakes; one real (0.6) outranks one fake (0.4).
#   threshold 0.5 -> called fake: 0.6(real), 0.7, 0.8, 0.9  => tn 3, fp 1, fn 1, tp 3
Y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
S = np.array([0.1, 0.2, 0.3, 0.6, 0.4, 0.7, 0.8, 0.9])


def test_threshold_metrics_by_hand() -> None:
    m = ev.calculate_metrics(Y, S, threshold=0.5, n_bins=10)
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["precision"] == pytest.approx(3 / 4)
    assert m["recall"] == pytest.approx(3 / 4)
    assert m["f1"] == pytest.approx(3 / 4)
    assert m["balanced_accuracy"] == pytest.approx(3 / 4)
    assert m["precision_macro"] == pytest.approx(3 / 4)  # real: 3 of 4 called real are real
    # MCC = (tp*tn - fp*fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn)) = (9 - 1) / 16
    assert m["mcc"] == pytest.approx(0.5)
    # 15 of the 16 (fake, real) pairs are ranked right
    assert m["roc_auc"] == pytest.approx(15 / 16)
    # AP = sum over fakes of precision at its rank: (1 + 1 + 1 + 4/5) / 4
    assert m["average_precision"] == pytest.approx((3 + 4 / 5) / 4)
    brier = np.mean((S - Y) ** 2)
    assert m["brier"] == pytest.approx(brier)
    log_loss = -np.mean(Y * np.log(S) + (1 - Y) * np.log(1 - S))
    assert m["log_loss"] == pytest.approx(log_loss)
    assert list(m) == list(ev.METRIC_NAMES)


def test_eer_at_a_roc_point() -> None:
    # At threshold 0.6: FPR = 1/4 (the 0.6 real), FNR = 1/4 (the 0.4 fake) -> EER 0.25 there.
    eer, threshold = ev.equal_error_rate(Y, S)
    assert eer == pytest.approx(0.25)
    assert threshold == pytest.approx(0.6)
    assert ev.confusion(Y, S, threshold) == [[3, 1], [1, 3]]


def test_eer_interpolated_between_roc_points() -> None:
    # thresholds 0.7 -> (FPR 0, FNR 1/3); 0.6 -> (FPR 1/2, FNR 1/3): the FPR = FNR crossing lies
    # 2/3 of the way along that segment: EER = 0 + 2/3 * 1/2 = 1/3.
    y = np.array([0, 0, 1, 1, 1])
    s = np.array([0.2, 0.6, 0.4, 0.7, 0.9])
    eer, threshold = ev.equal_error_rate(y, s)
    assert eer == pytest.approx(1 / 3)
    assert threshold == pytest.approx(0.6)  # |FNR - FPR| = 1/6 there, the smallest gap


def test_perfect_scores_give_eer_zero_and_perfect_metrics() -> None:
    y = np.array([0, 0, 1, 1])
    s = np.array([0.1, 0.2, 0.8, 0.9])
    m = ev.calculate_metrics(y, s)
    assert m["eer"] == 0.0
    assert m["roc_auc"] == 1.0
    assert m["accuracy"] == 1.0
    assert m["mcc"] == 1.0
    assert m["tpr_at_1pct_fpr"] == 1.0
    assert ev.confusion(y, s, m["eer_threshold"]) == [[2, 0], [0, 2]]


def test_inverted_scores_give_eer_one() -> None:
    eer, _ = ev.equal_error_rate([0, 1], [0.9, 0.1])
    assert eer == 1.0


def test_ece_by_hand() -> None:
    # 2 bins: [0, .5) holds 0.1, 0.3 (mean 0.2, no fakes: gap 0.2);
    #         [.5, 1] holds 0.6, 0.9 (mean 0.75, all fake: gap 0.25)  -> ECE = (2*.2 + 2*.25) / 4
    y = np.array([0, 0, 1, 1])
    s = np.array([0.1, 0.3, 0.6, 0.9])
    assert ev.expected_calibration_error(y, s, n_bins=2) == pytest.approx(0.225)
    bins = ev.calibration_bins(y, s, n_bins=4)
    assert bins["count"].tolist() == [1, 1, 1, 1]
    # 10 bins, 5 empty: only the four used bins count.
    assert ev.expected_calibration_error(y, s, 10) == pytest.approx((0.1 + 0.3 + 0.4 + 0.1) / 4)


def test_ece_of_a_calibrated_model_is_zero() -> None:
    # Each bin's mean score equals its share of fakes.
    y = np.array([0, 0, 0, 1, 0, 1, 1, 1])
    s = np.array([0.25] * 4 + [0.75] * 4)
    assert ev.expected_calibration_error(y, s, 2) == pytest.approx(0.0)


def test_score_one_falls_in_the_last_bin() -> None:
    bins = ev.calibration_bins([0, 1], [0.0, 1.0], 10)
    assert bins["count"][0] == 1 and bins["count"][-1] == 1


def test_tpr_at_one_percent_fpr() -> None:
    # With 4 reals the only FPR <= 1% is 0: the best TPR before the first real (0.6) is 3/4.
    assert ev.tpr_at_fpr(Y, S) == pytest.approx(0.75)
    # Many reals: 200 reals, the top one at 0.95 (FPR 0.5% once passed), fakes at 0.9 and 0.97
    y = np.array([0] * 200 + [1, 1])
    s = np.concatenate([np.linspace(0.0, 0.5, 199), [0.95], [0.9, 0.97]])
    assert ev.tpr_at_fpr(y, s) == pytest.approx(1.0)  # FPR 1/200 <= 1% catches both fakes
    assert ev.tpr_at_fpr(y, s, max_fpr=0.001) == pytest.approx(0.5)


def test_family_metrics() -> None:
    family = ["real"] * 4 + ["tts", "tts", "faceswap", "faceswap"]
    fams = ev.family_metrics(Y, S, family, threshold=0.5)
    assert set(fams) == {"faceswap", "tts"}
    # tts fakes 0.4, 0.7 vs reals 0.1 .2 .3 .6: 0.4 beats 3 of 4, 0.7 beats 4 -> AUC 7/8
    assert fams["tts"]["roc_auc"] == pytest.approx(7 / 8)
    assert fams["tts"]["recall"] == pytest.approx(0.5)
    assert fams["faceswap"]["roc_auc"] == pytest.approx(1.0)
    assert fams["faceswap"]["n_fake"] == 2
    assert ev.family_metrics(Y, S, [""] * 8) == {}


def test_evaluate_scores_holds_both_confusions() -> None:
    out = ev.evaluate_scores(Y, S, ["real"] * 4 + ["a"] * 4, threshold=0.5, n_bins=10)
    assert (out["n"], out["n_real"], out["n_fake"]) == (8, 4, 4)
    assert out["confusion"]["threshold"] == [[3, 1], [1, 3]]
    assert out["confusion"]["eer_threshold"] == [[3, 1], [1, 3]]
    assert set(out["families"]) == {"a"}


def test_higher_threshold_changes_the_confusion() -> None:
    assert ev.confusion(Y, S, 0.75) == [[4, 0], [2, 2]]


def test_bad_inputs_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match="need real and fake"):
        ev.calculate_metrics([1, 1], [0.2, 0.9])
    with pytest.raises(ValueError, match="same length"):
        ev.calculate_metrics([0, 1, 1], [0.2, 0.9])
    with pytest.raises(ValueError, match=r"probabilities in \[0, 1\]"):
        ev.calculate_metrics([0, 1], [0.2, 1.5])
    with pytest.raises(ValueError, match="probabilities"):
        ev.calculate_metrics([0, 1], [0.2, math.nan])
    with pytest.raises(ValueError, match="0 \\(real\\) or 1 \\(fake\\)"):
        ev.calculate_metrics([0, 2], [0.2, 0.9])
    with pytest.raises(ValueError, match="threshold"):
        ev.calculate_metrics([0, 1], [0.2, 0.9], threshold=1.0)


def test_curves_shapes_and_sweep_by_hand() -> None:
    c = ev.curves(Y, S, n_bins=5, sweep_points=99)
    assert c.prevalence == 0.5
    assert c.fpr[0] == 0.0 and c.tpr[-1] == 1.0
    i = int(np.argmin(np.abs(c.sweep_threshold - 0.5)))
    assert c.sweep_threshold[i] == pytest.approx(0.5)
    assert c.sweep_precision[i] == pytest.approx(0.75)
    assert c.sweep_recall[i] == pytest.approx(0.75)
    assert c.sweep_f1[i] == pytest.approx(0.75)
    assert len(c.calibration["count"]) == 5


def test_cosine_similarity_and_projection() -> None:
    a = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    b = np.array([[2.0, 0.0], [-1.0, -1.0], [1.0, 0.0]])
    assert ev.cosine_similarity(a, b).tolist() == pytest.approx([1.0, -1.0, 0.0])
    pts = np.array([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0], [4.0, 0.0, 1.0]])
    xy = ev.project_2d(pts)
    assert xy.shape == (3, 2)
    assert np.allclose(xy.mean(axis=0), 0.0)
    assert np.allclose(ev.project_2d(pts), xy)  # deterministic, signs fixed
    assert np.allclose(ev.project_2d(-pts)[:, 0], -xy[:, 0])  # mirrored data, same axis sign
    assert ev.project_2d(np.ones((1, 4))).shape == (1, 2)


def test_metrics_at_one_threshold_by_hand() -> None:
    # threshold 0.65: called fake 0.7, 0.8, 0.9 => tn 4, fp 0, fn 2, tp 2
    m = ev.threshold_metrics(Y, S, 0.65)
    assert list(m) == [*ev.THRESHOLD_METRIC_NAMES, "confusion"]
    assert m["confusion"] == [[4, 0], [1, 3]] == ev.confusion(Y, S, 0.65)
    assert m["fpr"] == 0.0 and m["tpr"] == pytest.approx(3 / 4)
    assert m["accuracy"] == pytest.approx(7 / 8) and m["precision"] == pytest.approx(1.0)
    assert m["balanced_accuracy"] == pytest.approx((1 + 3 / 4) / 2)
    at_half = ev.threshold_metrics(Y, S, 0.5)
    fixed = ev.calculate_metrics(Y, S, 0.5)
    for name in ("accuracy", "balanced_accuracy", "precision", "recall", "f1", "mcc"):
        assert at_half[name] == fixed[name]
    # a fitted threshold may lie above every score: nothing is called fake
    above = ev.threshold_metrics(Y, S, float(np.nextafter(1.0, 2.0)))
    assert above["confusion"] == [[4, 0], [4, 0]] and above["tpr"] == 0.0
    with pytest.raises(ValueError, match="threshold must be finite"):
        ev.threshold_metrics(Y, S, math.inf)
