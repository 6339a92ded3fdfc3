"""The operating point: a temperature and a decision threshold fitted on the validation split.

    fit_temperature(logits, labels) -> T       T > 0 minimising the binary NLL of sigmoid(logit / T)
    calibrated_scores(logits, T) -> scores     sigmoid(logit / T), float64, in [0, 1]
    fit_threshold(labels, scores, rule, target_fpr) -> threshold
    fit_operating_point(logits, labels, rule, target_fpr) -> OperatingPoint
    operating_point_of(metadata, fixed_threshold) -> OperatingPoint   what a model file carries
    ensemble_scores(scores, points) -> scores  the fusions' combined verdict (below)
    ensemble_threshold(points) -> threshold    where that verdict says fake

Training fits the point on its validation predictions and stores `OperatingPoint.as_dict()` under
"operating_point" in the model file's metadata; evaluation reads it back and calls a test score
at or above `threshold` fake. Conventions (label 1 = fake, 0 = real):

    temperature   searched over log T in [log MIN_TEMPERATURE, log MAX_TEMPERATURE] (bounded
                  Brent, deterministic); 1.0 when the data cannot support a fit: one class only,
                  or every logit 0. A perfectly separated validation set drives T to the lower
                  bound (the NLL keeps falling as the scores sharpen).
    thresholds    the candidates are the distinct validation scores, plus the next float above the
                  highest one (nothing called fake). A score equal to the threshold is called fake,
                  so every sample tied at a candidate falls on the same side of it, and the fitted
                  threshold reproduces the validation rates it was chosen for exactly.
    rule "eer"    the candidate where |FPR - FNR| is smallest; of equal gaps, the highest
                  candidate (the one with fewer false positives), as `metrics.equal_error_rate`
    rule "fpr"    the smallest candidate whose FPR <= target_fpr (the most fakes caught within
                  the false-positive budget)
    rule "fixed"  not fitted: a configured threshold at temperature 1 (model files from before
                  operating points, or a validation split without both classes)

The ensemble: a fitted point also keeps `reference`, the validation split's real pairs'
calibrated scores (sorted; at most REFERENCE_SIZE, evenly spaced quantiles beyond). A test score
becomes its rank among them (`rank_among`: the share of validation reals scoring below it, ties
counted half, in [0, 1]: how much more fake than a real pair it looks, on that fusion's own
scale), and the ensemble's score is the mean of the fusions' ranks. Ranks, not probabilities:
each fusion's calibrated scores are spread differently (one may give 1.0 to anything unusual),
and a mean of probabilities follows the most confident fusion. A rank stops at 1 above the
highest validation real, so samples of equal mean rank (most often: above every validation real
in every fusion, the clear fakes and now and then a real) are ordered by the mean calibrated
score, weighted never to overturn a step of the rank (`_combined`). Its threshold is the
fusions' thresholds combined the same way: about 1 - their mean validation false-positive rate. On
fake families no fusion was trained on (`benchmarks/README.md`, "The ensemble") the mean rank
beat each single fusion chosen in advance on average and in the worst case, though not the one
that, afterwards, turned out best.

Pure numpy and scipy; no torch, no sklearn.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import expit

log = logging.getLogger(__name__)

RULES = ("eer", "fpr")  # what can be fitted
FIXED = "fixed"  # the rule of a point that was not fitted
MIN_TEMPERATURE = 0.05
MAX_TEMPERATURE = 20.0
METADATA_KEY = "operating_point"  # where a model file's metadata holds the point
REFERENCE_SIZE = 1001  # validation reals' scores a point keeps (evenly spaced quantiles beyond)
ENSEMBLE = "ensemble"  # the name of the combined verdict in metrics.json and the CSVs


@dataclass(frozen=True)
class OperatingPoint:
    """How to turn a model's logit into a decision: score = sigmoid(logit / temperature), fake
    when score >= threshold. Plain JSON types only (`as_dict`), so it fits in a model file that
    loads with `torch.load(weights_only=True)`."""

    threshold: float  # on the calibrated score
    temperature: float  # > 0; 1.0 = the model's own sigmoid
    rule: str  # "eer", "fpr" or "fixed"
    target_fpr: float | None  # the FPR budget of rule "fpr", else None
    n_val: int  # validation samples it was fitted on (0: not fitted)
    # the validation reals' calibrated scores, ascending (what `rank_among` ranks against); ()
    # for a point not fitted, or from a model file written before the ensemble
    reference: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.rule not in (*RULES, FIXED):
            raise ValueError(f"rule {self.rule!r} is not one of {', '.join((*RULES, FIXED))}")
        if not math.isfinite(self.threshold):
            raise ValueError(f"threshold must be finite, got {self.threshold}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be finite and > 0, got {self.temperature}")
        if self.rule == "fpr" and (self.target_fpr is None or not 0 < self.target_fpr < 1):
            raise ValueError(f"rule 'fpr' needs a target_fpr in (0, 1), got {self.target_fpr}")
        if self.n_val < 0:
            raise ValueError(f"n_val must be >= 0, got {self.n_val}")
        ref = np.asarray(self.reference, dtype=np.float64)
        if ref.size and not (np.all((ref >= 0) & (ref <= 1)) and np.all(np.diff(ref) >= 0)):
            raise ValueError("reference must be ascending calibrated scores in [0, 1]")

    def as_dict(self) -> dict[str, Any]:
        """Plain str/float/int/None values, keys in a fixed order (what metrics.json and the
        report show; `as_metadata` adds the reference)."""
        return {
            "threshold": float(self.threshold),
            "temperature": float(self.temperature),
            "rule": str(self.rule),
            "target_fpr": None if self.target_fpr is None else float(self.target_fpr),
            "n_val": int(self.n_val),
        }

    def as_metadata(self) -> dict[str, Any]:
        """`as_dict` and the reference: what a model file stores."""
        return {**self.as_dict(), "reference": [float(v) for v in self.reference]}

    @classmethod
    def from_dict(cls, data: Any) -> OperatingPoint:
        """The point `as_dict` wrote; a missing or mistyped field is a `ValueError` naming it."""
        if not isinstance(data, dict):
            raise ValueError(f"an operating point is a dict, got {type(data).__name__}")
        missing = sorted({"threshold", "temperature", "rule", "target_fpr", "n_val"} - set(data))
        if missing:
            raise ValueError(f"operating point lacks {', '.join(missing)}")
        try:
            target = data["target_fpr"]
            return cls(
                threshold=float(data["threshold"]),
                temperature=float(data["temperature"]),
                rule=str(data["rule"]),
                target_fpr=None if target is None else float(target),
                n_val=int(data["n_val"]),
                reference=tuple(float(v) for v in data.get("reference") or ()),
            )
        except (TypeError, ValueError) as exc:
            raise ValueError(f"not a readable operating point {data!r} ({exc})") from exc


def fixed_point(threshold: float) -> OperatingPoint:
    """The point of a model that has none: `threshold` on the model's own sigmoid."""
    return OperatingPoint(
        threshold=float(threshold), temperature=1.0, rule=FIXED, target_fpr=None, n_val=0
    )


def _logits_and_labels(logits: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels)
    if z.ndim != 1 or y.ndim != 1 or len(z) != len(y):
        raise ValueError(f"logits {z.shape} and labels {y.shape} must be 1-D of the same length")
    if not np.all(np.isfinite(z)):
        raise ValueError("logits must be finite")
    if not set(np.unique(y).tolist()) <= {0, 1}:
        raise ValueError(f"labels must be 0 (real) or 1 (fake), got {np.unique(y).tolist()}")
    return z, y.astype(np.int64)


def _nll(log_t: float, z: np.ndarray, y: np.ndarray) -> float:
    """Mean binary NLL of sigmoid(z / T): log(1 + e^x) - y x, x = z / T, without overflow."""
    x = z / math.exp(log_t)
    return float(np.mean(np.logaddexp(0.0, x) - y * x))


def fit_temperature(logits: Any, labels: Any) -> float:
    """The temperature T in [MIN_TEMPERATURE, MAX_TEMPERATURE] minimising the validation NLL of
    sigmoid(logit / T); 1.0 with a single class or all-zero logits (nothing to fit)."""
    z, y = _logits_and_labels(logits, labels)
    if np.unique(y).size < 2 or not np.any(z != 0.0):
        return 1.0
    result = minimize_scalar(
        _nll,
        bounds=(math.log(MIN_TEMPERATURE), math.log(MAX_TEMPERATURE)),
        args=(z, y),
        method="bounded",
        options={"xatol": 1e-6},
    )
    return float(math.exp(result.x))


def calibrated_scores(logits: Any, temperature: float) -> np.ndarray:
    """sigmoid(logit / temperature) as float64, clipped to [0, 1] (huge logits give 0 or 1)."""
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    z = np.asarray(logits, dtype=np.float64)
    if not np.all(np.isfinite(z)):
        raise ValueError("logits must be finite")
    with np.errstate(over="ignore"):
        x = z / temperature  # may overflow to +-inf: expit maps those to 1 and 0
    return np.clip(expit(x), 0.0, 1.0).astype(np.float64)


def _rates(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, ...]:
    """(candidates ascending, FPR, FNR at each): fake when score >= candidate."""
    distinct = np.unique(scores)  # ascending
    candidates = np.append(distinct, np.nextafter(distinct[-1], np.inf))
    real = np.sort(scores[labels == 0])
    fake = np.sort(scores[labels == 1])
    # false positives = reals at or above the candidate = n_real - (reals strictly below it);
    # rates as count / n, so a budget such as 5 / 500 compares equal to 0.01
    fpr = (len(real) - np.searchsorted(real, candidates, side="left")) / len(real)
    fnr = np.searchsorted(fake, candidates, side="left") / len(fake)
    return candidates, fpr, fnr


def fit_threshold(labels: Any, scores: Any, rule: str, target_fpr: float | None = None) -> float:
    """The validation threshold of `rule` ("eer" or "fpr", see the module docstring); a score at
    or above it is fake. Needs both classes."""
    if rule not in RULES:
        raise ValueError(f"rule {rule!r} is not one of {', '.join(RULES)}")
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels)
    if s.ndim != 1 or y.ndim != 1 or len(s) != len(y):
        raise ValueError(f"labels {y.shape} and scores {s.shape} must be 1-D of the same length")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite")
    if set(np.unique(y).tolist()) != {0, 1}:
        raise ValueError(f"need real and fake samples, got labels {np.unique(y).tolist()}")
    candidates, fpr, fnr = _rates(y.astype(np.int64), s)
    if rule == "eer":
        gap = np.abs(fpr - fnr)
        i = len(gap) - 1 - int(np.argmin(gap[::-1]))  # the highest of the smallest gaps
        return float(candidates[i])
    if target_fpr is None or not 0 < target_fpr < 1:
        raise ValueError(f"rule 'fpr' needs a target_fpr in (0, 1), got {target_fpr}")
    # FPR falls as the threshold rises; the last candidate has FPR 0, so one always qualifies
    return float(candidates[int(np.argmax(fpr <= target_fpr))])


def fit_operating_point(
    logits: Any,
    labels: Any,
    rule: str,
    target_fpr: float | None = None,
    fallback_threshold: float = 0.5,
) -> OperatingPoint:
    """Temperature first, then the threshold of `rule` on the calibrated validation scores.
    Without both classes nothing can be fitted: `fixed_point(fallback_threshold)`, logged."""
    if rule not in RULES:
        raise ValueError(f"rule {rule!r} is not one of {', '.join(RULES)}")
    z, y = _logits_and_labels(logits, labels)
    if np.unique(y).size < 2:
        log.warning(
            "validation split has labels %s only: no operating point fitted, threshold %s",
            np.unique(y).tolist(),
            fallback_threshold,
        )
        return fixed_point(fallback_threshold)
    temperature = fit_temperature(z, y)
    scores = calibrated_scores(z, temperature)
    return OperatingPoint(
        threshold=fit_threshold(y, scores, rule, target_fpr),
        temperature=temperature,
        rule=rule,
        target_fpr=float(target_fpr) if rule == "fpr" and target_fpr is not None else None,
        n_val=int(len(y)),
        reference=reference_scores(scores[y == 0]),
    )


def reference_scores(real_scores: Any) -> tuple[float, ...]:
    """The validation reals' calibrated scores a point keeps: ascending, at most
    REFERENCE_SIZE (evenly spaced quantiles of them beyond that)."""
    s = np.sort(np.asarray(real_scores, dtype=np.float64))
    if len(s) > REFERENCE_SIZE:
        s = np.quantile(s, np.linspace(0.0, 1.0, REFERENCE_SIZE))
    return tuple(float(v) for v in s)


def rank_among(reference: Any, scores: Any) -> np.ndarray:
    """Each score's rank among the `reference` scores (ascending), in [0, 1]: the share of
    them below it, ties counted half."""
    ref = np.asarray(reference, dtype=np.float64)
    if ref.ndim != 1 or not ref.size:
        raise ValueError("the reference must hold at least one score")
    s = np.asarray(scores, dtype=np.float64)
    below = np.searchsorted(ref, s, side="left") + np.searchsorted(ref, s, side="right")
    return below / (2.0 * len(ref))


def has_ensemble(points: Mapping[str, OperatingPoint]) -> bool:
    """Two fusions or more, each with a reference: the ensemble can be formed."""
    return len(points) >= 2 and all(p.reference for p in points.values())


def _combined(
    ranks: list[np.ndarray], probabilities: list[np.ndarray], sizes: list[int]
) -> np.ndarray:
    """The mean rank, ties broken by the mean calibrated probability: it weighs at most half
    the finest step of a mean rank, 1 / (2 x fusions x the largest reference), so it orders
    samples of one mean rank (above every validation real in every fusion, most often) and
    never overturns a whole step. In [0, 1]."""
    tie = 0.5 / (2 * len(ranks) * max(sizes))
    return (np.mean(ranks, axis=0) + tie * np.mean(probabilities, axis=0)) / (1.0 + tie)


def ensemble_scores(scores: Mapping[str, Any], points: Mapping[str, OperatingPoint]) -> np.ndarray:
    """The mean over the fusions of each calibrated score's rank among that fusion's validation
    reals, ties broken by the mean calibrated score (`_combined`); `scores`: fusion -> scores
    of the same samples, in the same order."""
    if not has_ensemble(points):
        raise ValueError("an ensemble needs two fusions or more, each with a reference")
    return _combined(
        [rank_among(points[f].reference, scores[f]) for f in points],
        [np.asarray(scores[f], dtype=np.float64) for f in points],
        [len(p.reference) for p in points.values()],
    )


def ensemble_threshold(points: Mapping[str, OperatingPoint]) -> float:
    """The fusions' thresholds combined as their scores are (`ensemble_scores` of a sample
    that scores each fusion's threshold): an ensemble score at or above it is fake."""
    if not has_ensemble(points):
        raise ValueError("an ensemble needs two fusions or more, each with a reference")
    return float(ensemble_scores({f: [p.threshold] for f, p in points.items()}, points)[0])


def operating_point_of(metadata: Any, fixed_threshold: float) -> OperatingPoint:
    """The point a model file's metadata holds under "operating_point"; a file from before
    operating points has none: `fixed_point(fixed_threshold)`. A malformed one is a ValueError."""
    if not isinstance(metadata, dict) or metadata.get(METADATA_KEY) is None:
        return fixed_point(fixed_threshold)
    return OperatingPoint.from_dict(metadata[METADATA_KEY])
