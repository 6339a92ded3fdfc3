"""Metrics of a real/fake detector on held-out data: pure functions on numpy arrays.

Every function takes `y_true` (1 = fake, 0 = real) and `y_score` (the model's probability of
fake, in [0, 1]) and checks them first. The one module that imports sklearn. Conventions:

    threshold     a score at or above it is called fake
    confusion     [[tn, fp], [fn, tp]] (rows: true real, true fake; columns: called real, fake)
    EER           the error rate where the false-positive rate equals the false-negative rate,
                  linearly interpolated between the two ROC points that bracket the crossing
    ECE           sum over equal-width bins [k/B, (k+1)/B) of |fraction fake - mean score|,
                  weighted by the bin's share of samples (the reliability diagram's gap)
    TPR@1%FPR     the best true-positive rate among ROC points whose FPR is at most 1%
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.metrics import (
    average_precision_score,
    balanced_accuracy_score,
    brier_score_loss,
    confusion_matrix,
    det_curve,
    log_loss,
    matthews_corrcoef,
    precision_recall_curve,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)

from tasks.io.layout import FAKE, REAL

MAX_FPR = 0.01  # the operating point of "TPR at 1% FPR"
UNKNOWN_FAMILIES = ("", "real")  # family names that do not name a kind of fake

# The scalar metrics, in the order tables show them.
METRIC_NAMES = (
    "accuracy",
    "balanced_accuracy",
    "precision",
    "recall",
    "f1",
    "precision_macro",
    "recall_macro",
    "f1_macro",
    "roc_auc",
    "average_precision",
    "eer",
    "eer_threshold",
    "tpr_at_1pct_fpr",
    "mcc",
    "log_loss",
    "brier",
    "ece",
)
# The metrics of one decision threshold (`threshold_metrics`), in the order tables show them.
THRESHOLD_METRIC_NAMES = (
    "accuracy",
    "balanced_accuracy",
    "precision",
    "recall",
    "f1",
    "mcc",
    "fpr",
    "tpr",
)
# What the summary tables and artifacts show (the rest is in metrics.json and the report).
HEADLINE = ("roc_auc", "eer", "accuracy", "balanced_accuracy", "f1", "average_precision", "ece")


def check_inputs(y_true: Any, y_score: Any) -> tuple[np.ndarray, np.ndarray]:
    """Labels as int 0/1 and scores as float64 in [0, 1]; refuses anything else by name."""
    y = np.asarray(y_true)
    s = np.asarray(y_score, dtype=np.float64)
    if y.ndim != 1 or s.ndim != 1 or len(y) != len(s):
        raise ValueError(f"labels {y.shape} and scores {s.shape} must be 1-D of the same length")
    if not np.all(np.isfinite(s)) or s.min() < 0.0 or s.max() > 1.0:
        raise ValueError(
            f"scores must be finite probabilities in [0, 1], got [{s.min()}, {s.max()}]"
        )
    labels = np.unique(y)
    if not set(labels.tolist()) <= {REAL, FAKE}:
        raise ValueError(f"labels must be 0 (real) or 1 (fake), got {labels.tolist()}")
    if labels.size < 2:
        raise ValueError(f"need real and fake samples, got labels {labels.tolist()}")
    return y.astype(np.int64), s


def confusion(y_true: Any, y_score: Any, threshold: float) -> list[list[int]]:
    """[[tn, fp], [fn, tp]] when a score at or above `threshold` is called fake."""
    y, s = check_inputs(y_true, y_score)
    cm = confusion_matrix(y, (s >= threshold).astype(np.int64), labels=[REAL, FAKE])
    return [[int(v) for v in row] for row in cm]


def equal_error_rate(y_true: Any, y_score: Any) -> tuple[float, float]:
    """(EER, threshold): the rate where FPR = FNR, and the ROC threshold closest to it."""
    y, s = check_inputs(y_true, y_score)
    fpr, tpr, thresholds = roc_curve(y, s, drop_intermediate=False)
    fnr = 1.0 - tpr
    gap = fnr - fpr  # starts at 1 (nothing called fake) and falls to -1 (everything fake)
    i = int(np.argmax(gap <= 0.0))  # first point at or past the crossing
    if gap[i] == 0.0 or i == 0:
        eer = float(fpr[i])
    else:
        t = gap[i - 1] / (gap[i - 1] - gap[i])  # where the segment crosses gap = 0
        eer = float(fpr[i - 1] + t * (fpr[i] - fpr[i - 1]))
    j = int(np.argmin(np.abs(gap)))  # the real operating point nearest the EER
    threshold = float(min(thresholds[j], 1.0))  # roc_curve's first threshold is +inf
    return eer, threshold


def tpr_at_fpr(y_true: Any, y_score: Any, max_fpr: float = MAX_FPR) -> float:
    """The best true-positive rate among ROC points whose false-positive rate <= `max_fpr`."""
    y, s = check_inputs(y_true, y_score)
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    return float(tpr[fpr <= max_fpr].max())  # (0, 0) is always a ROC point, so never empty


def calibration_bins(y_true: Any, y_score: Any, n_bins: int) -> dict[str, np.ndarray]:
    """Equal-width bins [k/B, (k+1)/B) (the last includes 1.0): per bin the sample count, the
    mean score and the fraction of fakes (NaN where a bin is empty)."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be at least 1, got {n_bins}")
    y, s = check_inputs(y_true, y_score)
    index = np.minimum((s * n_bins).astype(np.int64), n_bins - 1)
    count = np.bincount(index, minlength=n_bins)
    score_sum = np.bincount(index, weights=s, minlength=n_bins)
    fake_sum = np.bincount(index, weights=y.astype(np.float64), minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_score = np.where(count > 0, score_sum / count, np.nan)
        fraction_fake = np.where(count > 0, fake_sum / count, np.nan)
    return {
        "edges": np.linspace(0.0, 1.0, n_bins + 1),
        "count": count,
        "mean_score": mean_score,
        "fraction_fake": fraction_fake,
    }


def expected_calibration_error(y_true: Any, y_score: Any, n_bins: int) -> float:
    """Sample-weighted mean |fraction fake - mean score| over the non-empty bins."""
    bins = calibration_bins(y_true, y_score, n_bins)
    used = bins["count"] > 0
    gaps = np.abs(bins["fraction_fake"][used] - bins["mean_score"][used])
    return float(np.sum(bins["count"][used] * gaps) / np.sum(bins["count"]))


def calculate_metrics(
    y_true: Any, y_score: Any, threshold: float = 0.5, n_bins: int = 10
) -> dict[str, float]:
    """Every scalar metric of METRIC_NAMES; a score >= `threshold` is called fake."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    y, s = check_inputs(y_true, y_score)
    pred = (s >= threshold).astype(np.int64)
    p, r, f, _ = precision_recall_fscore_support(y, pred, labels=[REAL, FAKE], zero_division=0.0)
    eer, eer_threshold = equal_error_rate(y, s)
    out = {
        "accuracy": float(np.mean(pred == y)),
        "balanced_accuracy": float(balanced_accuracy_score(y, pred)),
        "precision": float(p[FAKE]),
        "recall": float(r[FAKE]),
        "f1": float(f[FAKE]),
        "precision_macro": float(np.mean(p)),
        "recall_macro": float(np.mean(r)),
        "f1_macro": float(np.mean(f)),
        "roc_auc": float(roc_auc_score(y, s)),
        "average_precision": float(average_precision_score(y, s)),
        "eer": eer,
        "eer_threshold": eer_threshold,
        "tpr_at_1pct_fpr": tpr_at_fpr(y, s),
        "mcc": float(matthews_corrcoef(y, pred)),
        "log_loss": float(log_loss(y, s, labels=[REAL, FAKE])),
        "brier": float(brier_score_loss(y, s)),
        "ece": expected_calibration_error(y, s, n_bins),
    }
    return {name: out[name] for name in METRIC_NAMES}


def ranking_metrics(y_true: Any, y_score: Any) -> dict[str, float]:
    """The metrics of a score's order alone (ROC-AUC, AP, EER and its threshold, TPR at 1%
    FPR): what a score that is not a probability (the ensemble's rank) can be judged by."""
    y, s = check_inputs(y_true, y_score)
    eer, eer_threshold = equal_error_rate(y, s)
    return {
        "roc_auc": float(roc_auc_score(y, s)),
        "average_precision": float(average_precision_score(y, s)),
        "eer": eer,
        "eer_threshold": eer_threshold,
        "tpr_at_1pct_fpr": tpr_at_fpr(y, s),
    }


def threshold_metrics(y_true: Any, y_score: Any, threshold: float) -> dict[str, Any]:
    """THRESHOLD_METRIC_NAMES and the confusion matrix when a score >= `threshold` is called
    fake; any finite threshold (a fitted one may lie just above every score)."""
    if not np.isfinite(threshold):
        raise ValueError(f"threshold must be finite, got {threshold}")
    y, s = check_inputs(y_true, y_score)
    pred = (s >= threshold).astype(np.int64)
    p, r, f, _ = precision_recall_fscore_support(y, pred, labels=[REAL, FAKE], zero_division=0.0)
    (tn, fp), (fn, tp) = confusion(y, s, threshold)
    out = {
        "accuracy": float(np.mean(pred == y)),
        "balanced_accuracy": float(balanced_accuracy_score(y, pred)),
        "precision": float(p[FAKE]),
        "recall": float(r[FAKE]),
        "f1": float(f[FAKE]),
        "mcc": float(matthews_corrcoef(y, pred)),
        "fpr": fp / (fp + tn),
        "tpr": tp / (tp + fn),
    }
    return {
        **{name: out[name] for name in THRESHOLD_METRIC_NAMES},
        "confusion": [[tn, fp], [fn, tp]],
    }


def family_metrics(
    y_true: Any, y_score: Any, family: Sequence[str], threshold: float = 0.5
) -> dict[str, dict[str, float]]:
    """Per named fake family: AUC of its fakes against all reals, recall at `threshold`, count.

    Families "" (unknown) and "real" name no kind of fake; without any named family the result
    is empty (the data did not say)."""
    y, s = check_inputs(y_true, y_score)
    fam = np.asarray(family, dtype=str)
    if fam.shape != y.shape:
        raise ValueError(f"family {fam.shape} must have one entry per sample {y.shape}")
    names = sorted({str(f) for f in fam[y == FAKE]} - set(UNKNOWN_FAMILIES))
    real = y == REAL
    out: dict[str, dict[str, float]] = {}
    for name in names:
        fakes = (y == FAKE) & (fam == name)
        subset = real | fakes
        out[name] = {
            "roc_auc": float(roc_auc_score(y[subset], s[subset])),
            "recall": float(np.mean(s[fakes] >= threshold)),
            "n_fake": float(np.sum(fakes)),
        }
    return out


@dataclass(frozen=True)
class Curves:
    """What the curve plots draw for one fusion; all arrays are 1-D numpy arrays."""

    fpr: np.ndarray  # ROC
    tpr: np.ndarray
    precision: np.ndarray  # precision-recall
    recall: np.ndarray
    det_fpr: np.ndarray  # DET
    det_fnr: np.ndarray
    sweep_threshold: np.ndarray  # precision / recall / F1 against the threshold
    sweep_precision: np.ndarray
    sweep_recall: np.ndarray
    sweep_f1: np.ndarray
    calibration: dict[str, np.ndarray]  # see calibration_bins
    prevalence: float  # share of fakes: the PR curve of a coin toss


def curves(y_true: Any, y_score: Any, n_bins: int = 10, sweep_points: int = 99) -> Curves:
    """ROC, PR, DET, threshold sweep and reliability bins of one detector."""
    y, s = check_inputs(y_true, y_score)
    fpr, tpr, _ = roc_curve(y, s)
    precision, recall, _ = precision_recall_curve(y, s)
    det_fpr, det_fnr, _ = det_curve(y, s)
    grid = np.linspace(0.0, 1.0, sweep_points + 2)[1:-1]  # (P,) thresholds strictly inside (0, 1)
    called = s[None, :] >= grid[:, None]  # (P, N)
    tp = np.sum(called & (y == FAKE), axis=1)
    fp = np.sum(called & (y == REAL), axis=1)
    n_fake = np.sum(y == FAKE)
    with np.errstate(invalid="ignore", divide="ignore"):
        sweep_p = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), 0.0)
        sweep_r = tp / n_fake
        sweep_f1 = np.where(sweep_p + sweep_r > 0, 2 * sweep_p * sweep_r / (sweep_p + sweep_r), 0.0)
    return Curves(
        fpr=fpr,
        tpr=tpr,
        precision=precision,
        recall=recall,
        det_fpr=det_fpr,
        det_fnr=det_fnr,
        sweep_threshold=grid,
        sweep_precision=sweep_p,
        sweep_recall=sweep_r,
        sweep_f1=sweep_f1,
        calibration=calibration_bins(y, s, n_bins),
        prevalence=float(np.mean(y == FAKE)),
    )


def cosine_similarity(a: Any, b: Any) -> np.ndarray:
    """Row-wise cosine similarity of two (N, D) arrays -> (N,); a zero row gives 0."""
    x = np.asarray(a, dtype=np.float64)
    z = np.asarray(b, dtype=np.float64)
    if x.ndim != 2 or x.shape != z.shape:
        raise ValueError(
            f"embeddings must be two (N, D) arrays of one shape, got {x.shape}, {z.shape}"
        )
    norms = np.linalg.norm(x, axis=1) * np.linalg.norm(z, axis=1)
    dots = np.sum(x * z, axis=1)
    return np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), 0.0)


def project_2d(x: Any) -> np.ndarray:
    """Principal-component projection of (N, D) points onto their first two axes -> (N, 2).

    Deterministic: each axis is signed so its largest-magnitude loading is positive. With
    fewer than two usable dimensions the missing coordinate is 0."""
    data = np.asarray(x, dtype=np.float64)
    if data.ndim != 2 or len(data) == 0:
        raise ValueError(f"need a non-empty (N, D) array, got shape {data.shape}")
    centred = data - data.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    axes = vt[:2]
    signs = np.sign(axes[np.arange(len(axes)), np.argmax(np.abs(axes), axis=1)])
    axes = axes * np.where(signs == 0, 1.0, signs)[:, None]
    out = np.zeros((len(data), 2))
    out[:, : len(axes)] = centred @ axes.T
    return out


def evaluate_scores(
    y_true: Any, y_score: Any, family: Sequence[str] | None, threshold: float, n_bins: int
) -> dict[str, Any]:
    """Everything metrics.json holds for one fusion: metrics, both confusion matrices, families."""
    y, s = check_inputs(y_true, y_score)
    metrics = calculate_metrics(y, s, threshold, n_bins)
    return {
        "n": int(len(y)),
        "n_real": int(np.sum(y == REAL)),
        "n_fake": int(np.sum(y == FAKE)),
        "metrics": metrics,
        "confusion": {
            "threshold": confusion(y, s, threshold),
            "eer_threshold": confusion(y, s, metrics["eer_threshold"]),
        },
        "families": family_metrics(y, s, family, threshold) if family is not None else {},
    }
