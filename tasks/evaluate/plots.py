"""The 19 plots of a run (the evaluation step draws them all), as `matplotlib.figure.Figure`s,
and the run-history trend (`plot_run_history`, drawn when the report is published).

No pyplot state: every figure is built on its own Agg canvas, so drawing is thread-safe and
leaves nothing behind. Each has a title, labelled axes and a legend where it draws more than one
series; a fusion keeps its colour in every plot (FUSION_COLOURS), real and fake keep theirs
(CLASS_COLOURS). The caller renders with `render_png` and saves through storage.

Inputs are plain: epoch and step records as the training logs write them (dicts), and per fusion
the evaluation's `Curves`, metrics, confusion matrices, scores and embeddings.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")  # no display on a worker; harmless when already Agg

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from scipy.special import ndtri

if TYPE_CHECKING:
    from tasks.evaluate.metrics import Curves

FUSION_COLOURS = {"early": "#1f77b4", "mid": "#ff7f0e", "late": "#2ca02c"}
_SPARE_COLOURS = ("#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22")
CLASS_COLOURS = {"real": "#4d4d4d", "fake": "#d62728"}
DPI = 100  # pixels per inch of the PNGs
MAX_POINTS = 2000  # points drawn per fusion in the embedding scatter (a seeded sample)

Records = Sequence[Mapping[str, Any]]


def colour(fusion: str) -> str:
    """The fusion's colour in every plot."""
    if fusion in FUSION_COLOURS:
        return FUSION_COLOURS[fusion]
    return _SPARE_COLOURS[sum(map(ord, fusion)) % len(_SPARE_COLOURS)]


def new_figure(width: float = 7.0, height: float = 4.5) -> Figure:
    """An empty figure on its own Agg canvas (no pyplot)."""
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def render_png(fig: Figure) -> bytes:
    """The figure as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def _note(ax: Axes, text: str) -> None:
    """Say on the axes why nothing is drawn (an empty log, no families)."""
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="#555555")


def _legend(ax: Axes, **kwargs: Any) -> None:
    if len(ax.get_legend_handles_labels()[0]) > 1:
        ax.legend(**kwargs)


def _values(records: Records, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(epochs, values) of one field of epoch records, skipping records without it."""
    pairs = [(r["epoch"], r[key]) for r in records if r.get(key) is not None]
    if not pairs:
        return np.array([]), np.array([])
    x, y = zip(*pairs, strict=True)
    return np.asarray(x, dtype=float), np.asarray(y, dtype=float)


def _epoch_lines(
    ax: Axes, history: Mapping[str, Records], key: str, style: str = "-", suffix: str = ""
) -> int:
    drawn = 0
    for fusion, records in history.items():
        x, y = _values(records, key)
        if len(x):
            ax.plot(x, y, style, marker="o", color=colour(fusion), label=f"{fusion}{suffix}")
            drawn += 1
    return drawn


def _epoch_axes(ax: Axes, title: str, ylabel: str) -> None:
    ax.set_title(title)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


# --- training history (epoch logs) ------------------------------------------------------------


def plot_train_loss(history: Mapping[str, Records]) -> Figure:
    """Training loss (BCE + lambda x consistency) per epoch, one line per fusion."""
    fig = new_figure()
    ax = fig.subplots()
    if not _epoch_lines(ax, history, "train_loss"):
        _note(ax, "no epoch records")
    _epoch_axes(ax, "Training loss per epoch", "loss (BCE + λ·consistency)")
    _legend(ax, title="fusion")
    return fig


def plot_val_loss(history: Mapping[str, Records]) -> Figure:
    """Validation loss per epoch, one line per fusion, best epoch marked."""
    fig = new_figure()
    ax = fig.subplots()
    if not _epoch_lines(ax, history, "val_loss"):
        _note(ax, "no epoch records")
    for fusion, records in history.items():
        x, y = _values(records, "val_loss")
        if len(x):
            best = int(np.argmin(y))
            ax.scatter(
                [x[best]],
                [y[best]],
                s=120,
                facecolors="none",
                edgecolors=colour(fusion),
                linewidths=2,
                zorder=3,
            )
    _epoch_axes(ax, "Validation loss per epoch (circle: best epoch)", "loss (BCE + λ·consistency)")
    _legend(ax, title="fusion")
    return fig


def plot_accuracy(history: Mapping[str, Records]) -> Figure:
    """Train (solid) and validation (dashed) accuracy per epoch."""
    fig = new_figure()
    ax = fig.subplots()
    drawn = _epoch_lines(ax, history, "train_acc", "-", " train")
    drawn += _epoch_lines(ax, history, "val_acc", "--", " val")
    if not drawn:
        _note(ax, "no epoch records")
    _epoch_axes(ax, "Train / validation accuracy per epoch", "accuracy")
    ax.set_ylim(-0.02, 1.02)
    _legend(ax, ncols=2)
    return fig


def plot_bce_vs_consistency(history: Mapping[str, Records]) -> Figure:
    """The two parts of the loss per epoch: BCE (left) and consistency (right), train and val."""
    fig = new_figure(10, 4.5)
    left, right = fig.subplots(1, 2)
    for ax, part, name in ((left, "bce", "BCE loss"), (right, "consistency", "consistency loss")):
        drawn = _epoch_lines(ax, history, f"train_{part}", "-", " train")
        drawn += _epoch_lines(ax, history, f"val_{part}", "--", " val")
        if not drawn:
            _note(ax, "no epoch records")
        _epoch_axes(ax, name, name)
        _legend(ax, fontsize="small")
    fig.suptitle("BCE vs emotional-consistency loss per epoch")
    return fig


# --- detection curves ------------------------------------------------------------------------


def plot_roc(curves: Mapping[str, Curves], metrics: Mapping[str, Mapping[str, float]]) -> Figure:
    """ROC curves of every fusion on the test split, AUC in the legend."""
    fig = new_figure(6, 5.5)
    ax = fig.subplots()
    for fusion, c in curves.items():
        ax.plot(
            c.fpr,
            c.tpr,
            color=colour(fusion),
            lw=2,
            label=f"{fusion} (AUC {metrics[fusion]['roc_auc']:.3f})",
        )
    ax.plot([0, 1], [0, 1], ":", color="grey", label="chance")
    ax.set(
        title="ROC curves (test split)",
        xlabel="false-positive rate (real called fake)",
        ylabel="true-positive rate (fake caught)",
        xlim=(-0.01, 1.01),
        ylim=(-0.01, 1.01),
    )
    ax.grid(alpha=0.3)
    _legend(ax, loc="lower right")
    return fig


def plot_pr(curves: Mapping[str, Curves], metrics: Mapping[str, Mapping[str, float]]) -> Figure:
    """Precision-recall curves (fake = positive), average precision in the legend."""
    fig = new_figure(6, 5.5)
    ax = fig.subplots()
    for fusion, c in curves.items():
        ax.step(
            c.recall,
            c.precision,
            where="post",
            color=colour(fusion),
            lw=2,
            label=f"{fusion} (AP {metrics[fusion]['average_precision']:.3f})",
        )
    prevalence = next(iter(curves.values())).prevalence if curves else 0.5
    ax.axhline(prevalence, ls=":", color="grey", label=f"chance ({prevalence:.2f} fake)")
    ax.set(
        title="Precision-recall curves (test split)",
        xlabel="recall (fake caught)",
        ylabel="precision (called fake that are fake)",
        xlim=(-0.01, 1.01),
        ylim=(-0.01, 1.05),
    )
    ax.grid(alpha=0.3)
    _legend(ax, loc="lower left")
    return fig


_DET_TICKS = (0.001, 0.01, 0.05, 0.2, 0.5, 0.8, 0.95, 0.99, 0.999)
_DET_LIMIT = 0.0005  # rates are clipped to [limit, 1 - limit] on the normal-deviate scale


def _probit(rate: Any) -> np.ndarray:
    return np.asarray(ndtri(np.clip(np.asarray(rate, dtype=float), _DET_LIMIT, 1 - _DET_LIMIT)))


def plot_det(curves: Mapping[str, Curves], metrics: Mapping[str, Mapping[str, float]]) -> Figure:
    """DET curves (normal-deviate axes) with each fusion's equal-error-rate point."""
    fig = new_figure(6, 5.5)
    ax = fig.subplots()
    for fusion, c in curves.items():
        ax.plot(_probit(c.det_fpr), _probit(c.det_fnr), color=colour(fusion), lw=2, label=fusion)
        eer = metrics[fusion]["eer"]
        ax.plot(
            _probit(eer),
            _probit(eer),
            "o",
            ms=9,
            color=colour(fusion),
            mec="black",
            label=f"{fusion} EER {100 * eer:.1f}%",
        )
    lim = float(ndtri(_DET_LIMIT))
    ax.plot([lim, -lim], [lim, -lim], ":", color="grey", label="FPR = FNR")
    ticks = _probit(_DET_TICKS)
    labels = [f"{100 * t:g}%" for t in _DET_TICKS]
    ax.set_xticks(ticks, labels)
    ax.set_yticks(ticks, labels)
    ax.set(
        title="DET curves with equal error rate (test split)",
        xlabel="false-positive rate (real called fake)",
        ylabel="false-negative rate (fake missed)",
        xlim=(lim, -lim),
        ylim=(lim, -lim),
    )
    ax.grid(alpha=0.3)
    _legend(ax, loc="upper right", fontsize="small")
    return fig


def plot_confusion(
    fusion: str,
    confusion: Mapping[str, Sequence[Sequence[int]]],
    threshold: float,
    eer_threshold: float,
) -> Figure:
    """One fusion's confusion matrices at the configured threshold and at the EER threshold."""
    fig = new_figure(9, 4.2)
    axes = fig.subplots(1, 2)
    panels = (
        ("threshold", f"threshold {threshold:.2f}"),
        ("eer_threshold", f"EER threshold {eer_threshold:.3f}"),
    )
    for ax, (key, name) in zip(axes, panels, strict=True):
        cm = np.asarray(confusion[key], dtype=float)
        row = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
        ax.imshow(row, cmap="Blues", vmin=0, vmax=1)
        for i in range(2):
            for j in range(2):
                ax.text(
                    j,
                    i,
                    f"{int(cm[i, j])}\n({100 * row[i, j]:.0f}%)",
                    ha="center",
                    va="center",
                    color="white" if row[i, j] > 0.5 else "black",
                )
        ax.set_xticks([0, 1], ["real", "fake"])
        ax.set_yticks([0, 1], ["real", "fake"])
        ax.set(title=name, xlabel="predicted", ylabel="true")
    fig.suptitle(f"Confusion matrix, {fusion} fusion (test split)", color=colour(fusion))
    return fig


def _per_fusion_axes(fig: Figure, n: int) -> list[Axes]:
    axes = fig.subplots(1, max(n, 1), squeeze=False)[0]
    return list(axes)


def plot_score_histograms(
    scores: Mapping[str, tuple[np.ndarray, np.ndarray]], threshold: float
) -> Figure:
    """Per fusion, the distribution of fake-probability scores for real and for fake pairs."""
    fig = new_figure(4 * max(len(scores), 1) + 1, 4.2)
    axes = _per_fusion_axes(fig, len(scores))
    bins = np.linspace(0, 1, 21).tolist()
    for ax, (fusion, (label, score)) in zip(axes, scores.items(), strict=False):
        for value, name in ((0, "real"), (1, "fake")):
            ax.hist(
                score[label == value],
                bins=bins,
                alpha=0.55,
                color=CLASS_COLOURS[name],
                label=f"{name} (n={int(np.sum(label == value))})",
            )
        ax.axvline(threshold, ls="--", color="black", label=f"threshold {threshold:.2f}")
        ax.set_title(fusion, color=colour(fusion))
        ax.set(xlabel="score (probability of fake)", ylabel="pairs", xlim=(0, 1))
        _legend(ax, fontsize="small")
    fig.suptitle("Score histograms, real vs fake (test split)")
    return fig


def plot_reliability(
    curves: Mapping[str, Curves], metrics: Mapping[str, Mapping[str, float]]
) -> Figure:
    """Reliability diagram: fraction of fakes against mean score per bin, ECE in the legend."""
    fig = new_figure(6, 5.5)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], ":", color="grey", label="perfect calibration")
    for fusion, c in curves.items():
        used = c.calibration["count"] > 0
        ax.plot(
            c.calibration["mean_score"][used],
            c.calibration["fraction_fake"][used],
            "-o",
            color=colour(fusion),
            label=f"{fusion} (ECE {metrics[fusion]['ece']:.3f})",
        )
    ax.set(
        title="Reliability diagram (test split)",
        xlabel="mean predicted probability of fake",
        ylabel="observed fraction of fakes",
        xlim=(-0.02, 1.02),
        ylim=(-0.02, 1.02),
    )
    ax.grid(alpha=0.3)
    _legend(ax, loc="upper left")
    return fig


def plot_cosine_similarity(similarity: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> Figure:
    """Per fusion, the cosine similarity of the audio and image emotion embeddings."""
    fig = new_figure(4 * max(len(similarity), 1) + 1, 4.2)
    axes = _per_fusion_axes(fig, len(similarity))
    bins = np.linspace(-1, 1, 41).tolist()
    for ax, (fusion, (label, sim)) in zip(axes, similarity.items(), strict=False):
        for value, name in ((0, "real"), (1, "fake")):
            part = sim[label == value]
            mean = f", mean {part.mean():.2f}" if len(part) else ""
            ax.hist(part, bins=bins, alpha=0.55, color=CLASS_COLOURS[name], label=f"{name}{mean}")
        ax.set_title(fusion, color=colour(fusion))
        ax.set(xlabel="cosine similarity (audio, image)", ylabel="pairs", xlim=(-1, 1))
        _legend(ax, fontsize="small")
    fig.suptitle("Emotional consistency: audio-image cosine similarity (test split)")
    return fig


@dataclass(frozen=True)
class Projection:
    """A fusion's emotion embeddings projected to 2-D: audio and image points of each pair."""

    xy: np.ndarray  # (2N, 2): the N audio points, then the N image points
    label: np.ndarray  # (2N,) 0 real / 1 fake
    modality: np.ndarray  # (2N,) "audio" | "image"
    source: str = ""  # where the vectors came from, shown in the title


def plot_embeddings_2d(projections: Mapping[str, Projection]) -> Figure:
    """Per fusion, the 2-D PCA of the emotion embeddings: colour = class, marker = modality."""
    fig = new_figure(4.5 * max(len(projections), 1) + 1, 4.6)
    axes = _per_fusion_axes(fig, len(projections))
    markers = {"audio": "o", "image": "^"}
    rng = np.random.default_rng(0)
    for ax, (fusion, p) in zip(axes, projections.items(), strict=False):
        keep = np.arange(len(p.xy))
        if len(keep) > MAX_POINTS:
            keep = np.sort(rng.choice(len(keep), MAX_POINTS, replace=False))
        for value, name in ((0, "real"), (1, "fake")):
            for modality, marker in markers.items():
                sel = keep[(p.label[keep] == value) & (p.modality[keep] == modality)]
                ax.scatter(
                    p.xy[sel, 0],
                    p.xy[sel, 1],
                    s=14,
                    marker=marker,
                    alpha=0.6,
                    color=CLASS_COLOURS[name],
                    label=f"{name} {modality}",
                )
        ax.set_title(
            f"{fusion}{' (' + p.source + ')' if p.source else ''}",
            color=colour(fusion),
            fontsize="medium",
        )
        ax.set(xlabel="principal component 1", ylabel="principal component 2")
        ax.grid(alpha=0.3)
        _legend(ax, fontsize="small")
    fig.suptitle("Emotion embeddings, 2-D PCA projection")
    return fig


# --- summaries -------------------------------------------------------------------------------

COMPARED = (
    ("accuracy", "accuracy"),
    ("balanced_accuracy", "balanced acc."),
    ("f1", "F1 (fake)"),
    ("roc_auc", "ROC-AUC"),
    ("average_precision", "AP"),
    ("mcc", "MCC"),
    ("eer", "EER ↓"),
    ("ece", "ECE ↓"),
)


def _grouped_bars(ax: Axes, groups: Sequence[str], series: Mapping[str, Sequence[float]]) -> None:
    """Bars of each series (a fusion) side by side in each group, value on top."""
    width = 0.8 / max(len(series), 1)
    x = np.arange(len(groups))
    for k, (fusion, values) in enumerate(series.items()):
        bars = ax.bar(
            x + (k - (len(series) - 1) / 2) * width,
            values,
            width,
            color=colour(fusion),
            label=fusion,
        )
        ax.bar_label(bars, fmt="%.2f", fontsize="x-small", padding=1)
    long = len(groups) > 4 and max(len(g) for g in groups) > 10
    ax.set_xticks(x, groups, rotation=25 if long else 0, ha="right" if long else "center")


def plot_metric_comparison(metrics: Mapping[str, Mapping[str, float]]) -> Figure:
    """The headline metrics of every fusion side by side (↓: lower is better)."""
    fig = new_figure(10, 4.8)
    ax = fig.subplots()
    series = {f: [m[key] for key, _ in COMPARED] for f, m in metrics.items()}
    _grouped_bars(ax, [name for _, name in COMPARED], series)
    low = min([0.0, *(v for vs in series.values() for v in vs)])
    ax.set(
        title="Metric comparison (test split)",
        xlabel="metric",
        ylabel="value",
        ylim=(low - 0.05, 1.25),
    )
    ax.axhline(0, color="black", lw=0.8)
    ax.grid(axis="y", alpha=0.3)
    _legend(ax, title="fusion", ncols=3, loc="upper center")
    return fig


def plot_threshold_sweep(curves: Mapping[str, Curves], threshold: float) -> Figure:
    """Per fusion, precision (dashed), recall (dotted) and F1 (solid) against the threshold."""
    fig = new_figure(4 * max(len(curves), 1) + 1, 4.2)
    axes = _per_fusion_axes(fig, len(curves))
    for ax, (fusion, c) in zip(axes, curves.items(), strict=False):
        col = colour(fusion)
        ax.plot(c.sweep_threshold, c.sweep_precision, "--", color=col, label="precision")
        ax.plot(c.sweep_threshold, c.sweep_recall, ":", color=col, lw=2, label="recall")
        ax.plot(c.sweep_threshold, c.sweep_f1, "-", color=col, lw=2, label="F1")
        ax.axvline(threshold, color="black", lw=0.8, label=f"threshold {threshold:.2f}")
        ax.set_title(fusion, color=col)
        ax.set(
            xlabel="threshold (score ≥ it = fake)", ylabel="value", xlim=(0, 1), ylim=(-0.02, 1.05)
        )
        ax.grid(alpha=0.3)
        _legend(ax, fontsize="small")
    fig.suptitle("Threshold sweep: precision / recall / F1 (test split)")
    return fig


def plot_family_auc(
    families: Mapping[str, Mapping[str, Mapping[str, float]]],
    metrics: Mapping[str, Mapping[str, float]],
) -> Figure:
    """ROC-AUC of each fake family against all reals, per fusion. Without family labels in
    the data, one group "all fakes" with the overall AUC, and the title says so."""
    fig = new_figure(max(7.0, 1.6 * len(families) + 4), 4.8)
    ax = fig.subplots()
    names = sorted({name for fams in families.values() for name in fams})
    if names:
        series = {
            f: [families[f].get(n, {}).get("roc_auc", math.nan) for n in names] for f in families
        }
        title = "ROC-AUC per fake family (test split)"
    else:
        names = ["all fakes"]
        series = {f: [metrics[f]["roc_auc"]] for f in metrics}
        title = "ROC-AUC per fake family (no family labels in the data: all fakes)"
    _grouped_bars(ax, names, series)
    ax.axhline(0.5, ls=":", color="grey", label="chance")
    ax.set(
        title=title,
        xlabel="fake family",
        ylabel="ROC-AUC (family fakes vs all reals)",
        ylim=(0, 1.25),
    )
    ax.grid(axis="y", alpha=0.3)
    _legend(ax, ncols=4, loc="upper center")
    return fig


# --- resources over time (step logs) -----------------------------------------------------------


def _time_axis(steps: Mapping[str, Records]) -> tuple[float, float, str]:
    """(origin, divisor, unit): a shared clock for every fusion (they may train at once)."""
    times = [float(r["time"]) for records in steps.values() for r in records if "time" in r]
    if not times:
        return 0.0, 1.0, "s"
    span = max(times) - min(times)
    return (min(times), 60.0, "min") if span > 600 else (min(times), 1.0, "s")


def _series(records: Records, key: str, origin: float, div: float) -> tuple[np.ndarray, np.ndarray]:
    pairs = [
        ((float(r["time"]) - origin) / div, float(r[key]))
        for r in records
        if r.get(key) is not None and r.get("time") is not None
    ]
    if not pairs:
        return np.array([]), np.array([])
    x, y = zip(*pairs, strict=True)
    return np.asarray(x), np.asarray(y)


def _marker(x: np.ndarray) -> str | None:
    """Dots on sparse series (a short run logs few steps), so even one reading shows."""
    return "o" if len(x) < 30 else None


def plot_memory(steps: Mapping[str, Records], cap: float, shrink_threshold: float) -> Figure:
    """System memory use while training, with the cap and the shrink threshold; batch-size
    shrinks (▼) and out-of-memory events (✕) marked."""
    fig = new_figure(9, 4.5)
    ax = fig.subplots()
    origin, div, unit = _time_axis(steps)
    drawn = 0
    for fusion, records in steps.items():
        x, y = _series(records, "memory_percent", origin, div)
        if len(x):
            ax.plot(x, y, color=colour(fusion), label=fusion, marker=_marker(x))
            drawn += 1
        for event, marker in (("shrink", "v"), ("oom", "X")):
            hits = [r for r in records if r.get("event") == event]
            ex, ey = _series(hits, "memory_percent", origin, div)
            if len(ex):
                ax.scatter(
                    ex,
                    ey,
                    marker=marker,
                    s=70,
                    color=colour(fusion),
                    edgecolors="black",
                    zorder=3,
                    label=f"{fusion} {event}",
                )
    if not drawn:
        _note(ax, "no step records")
    ax.axhline(100 * cap, color="#d62728", lw=2, label=f"cap {100 * cap:.0f}%")
    ax.axhline(
        100 * shrink_threshold,
        color="#d62728",
        ls="--",
        label=f"shrink above {100 * shrink_threshold:.0f}%",
    )
    ax.set(
        title="Memory use during training",
        xlabel=f"time since first step ({unit})",
        ylabel="system memory used (%)",
        ylim=(0, 100),
    )
    ax.grid(alpha=0.3)
    _legend(ax, fontsize="small", loc="best")
    return fig


def plot_batch_throughput(steps: Mapping[str, Records]) -> Figure:
    """Batch size (top) and training throughput (bottom) over time, per fusion."""
    fig = new_figure(9, 6)
    top, bottom = fig.subplots(2, 1, sharex=True)
    origin, div, unit = _time_axis(steps)
    drawn = 0
    for fusion, records in steps.items():
        x, y = _series(records, "batch_size", origin, div)
        if len(x):
            top.step(x, y, where="post", color=colour(fusion), label=fusion, marker=_marker(x))
            drawn += 1
        x, y = _series(records, "samples_per_s", origin, div)
        if len(x):
            bottom.plot(x, y, color=colour(fusion), label=fusion, marker=_marker(x))
    for ax in (top, bottom):
        if not drawn:
            _note(ax, "no step records")
        ax.grid(alpha=0.3)
        _legend(ax, title="fusion", fontsize="small")
    top.set(
        title="Batch size over time", xlabel=f"time since first step ({unit})", ylabel="batch size"
    )
    top.set_ylim(bottom=0)
    bottom.set(
        title="Throughput over time", xlabel=f"time since first step ({unit})", ylabel="samples / s"
    )
    bottom.set_ylim(bottom=0)
    fig.suptitle("Batch size and throughput during training")
    return fig


# --- run history (the runs' metrics.json, tasks/runs/trend.py) ------------------------------


MAX_RUN_TICKS = 12  # run ids labelled on the trend's x axis (the newest always); others unlabelled


def plot_run_history(
    runs: Sequence[str],
    auc: Mapping[str, Sequence[float | None]],
    eer: Mapping[str, Sequence[float | None]],
    other_split: Sequence[bool] | None = None,
) -> Figure:
    """Test ROC-AUC (top) and EER (bottom) of each fusion over the runs (oldest first), one
    line per fusion in each; None where a run did not train the fusion (a gap). Runs evaluated
    on another test split than the last one are shaded: their scores are not comparable."""
    n = len(runs)
    for name, series in (("auc", auc), ("eer", eer)):
        for fusion, values in series.items():
            if len(values) != n:
                raise ValueError(f"{name} of {fusion}: {len(values)} values for {n} runs")
    shaded = list(other_split or [False] * n)
    if len(shaded) != n:
        raise ValueError(f"other_split: {len(shaded)} values for {n} runs")
    fig = new_figure(10, 6.5)
    top, bottom = fig.subplots(2, 1, sharex=True)
    x = np.arange(n)
    spans = np.flatnonzero(shaded)
    for ax, series, ylabel in (
        (top, auc, "test ROC-AUC (higher is better)"),
        (bottom, eer, "test EER (lower is better)"),
    ):
        for fusion, values in series.items():
            y = np.array([np.nan if v is None else v for v in values], dtype=float)
            ax.plot(x, y, marker="o", color=colour(fusion), label=fusion)
        for i in spans:
            ax.axvspan(
                i - 0.5,
                i + 0.5,
                color="#bbbbbb",
                alpha=0.4,
                lw=0,
                label="other test split" if i == spans[0] else None,
            )
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        _legend(ax, title="fusion", fontsize="small", loc="best")
    top.set_title(f"Test ROC-AUC per run (last {n} run{'s' if n != 1 else ''})")
    bottom.set_title("Test EER per run")
    step = max(1, math.ceil(n / MAX_RUN_TICKS))
    bottom.set_xticks(x, [r if (n - 1 - i) % step == 0 else "" for i, r in enumerate(runs)])
    bottom.tick_params(axis="x", labelrotation=30, labelsize="small")
    bottom.set_xlabel("run (oldest to newest)")
    bottom.set_xlim(-0.5, n - 0.5)
    fig.suptitle("Run history: test metrics of each fusion")
    return fig


# --- all of them -----------------------------------------------------------------------------


@dataclass(frozen=True)
class PlotInputs:
    """Everything the 19 plots draw, per fusion (dict keys are fusion names, in run order)."""

    history: Mapping[str, Records]  # epoch-log records
    steps: Mapping[str, Records]  # step-log records
    curves: Mapping[str, Curves]
    metrics: Mapping[str, Mapping[str, float]]
    confusion: Mapping[str, Mapping[str, Sequence[Sequence[int]]]]
    families: Mapping[str, Mapping[str, Mapping[str, float]]]
    scores: Mapping[str, tuple[np.ndarray, np.ndarray]]  # (label, score)
    similarity: Mapping[str, tuple[np.ndarray, np.ndarray]]  # (label, cosine similarity)
    projections: Mapping[str, Projection]
    threshold: float = 0.5
    memory_cap: float = 0.8
    shrink_threshold: float = 0.7


def plot_names(fusions: Sequence[str]) -> list[str]:
    """File stems of the plots, in report order; 19 when the three fusions ran."""
    return [
        "train-loss",
        "val-loss",
        "accuracy",
        "bce-vs-consistency",
        "roc-curves",
        "pr-curves",
        "det-curves",
        *(f"confusion-{f}" for f in fusions),
        "score-histograms",
        "reliability",
        "cosine-similarity",
        "embeddings-2d",
        "metric-comparison",
        "threshold-sweep",
        "family-auc",
        "memory",
        "batch-throughput",
    ]


def draw_all(p: PlotInputs) -> dict[str, Figure]:
    """Every plot, keyed by its file stem, in the order of `plot_names`."""
    figures = {
        "train-loss": plot_train_loss(p.history),
        "val-loss": plot_val_loss(p.history),
        "accuracy": plot_accuracy(p.history),
        "bce-vs-consistency": plot_bce_vs_consistency(p.history),
        "roc-curves": plot_roc(p.curves, p.metrics),
        "pr-curves": plot_pr(p.curves, p.metrics),
        "det-curves": plot_det(p.curves, p.metrics),
        "score-histograms": plot_score_histograms(p.scores, p.threshold),
        "reliability": plot_reliability(p.curves, p.metrics),
        "cosine-similarity": plot_cosine_similarity(p.similarity),
        "embeddings-2d": plot_embeddings_2d(p.projections),
        "metric-comparison": plot_metric_comparison(p.metrics),
        "threshold-sweep": plot_threshold_sweep(p.curves, p.threshold),
        "family-auc": plot_family_auc(p.families, p.metrics),
        "memory": plot_memory(p.steps, p.memory_cap, p.shrink_threshold),
        "batch-throughput": plot_batch_throughput(p.steps),
    }
    for f in p.metrics:
        figures[f"confusion-{f}"] = plot_confusion(
            f, p.confusion[f], p.threshold, p.metrics[f]["eer_threshold"]
        )
    return {name: figures[name] for name in plot_names(list(p.metrics))}
