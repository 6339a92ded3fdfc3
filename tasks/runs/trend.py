"""Run history: each fusion's test ROC-AUC and EER over the last runs, read from the bucket.

Every evaluated run leaves `Layout.metrics(run)` (outputs/reports/<run>/metrics.json); the
history is the newest `HISTORY_RUNS` of them up to and including the current run, oldest first,
in run-id order (run ids are UTC timestamps, so that is time order). The current run's metrics
come from its `EvaluationRef`, so it is always in, even before anything else is readable.

A run whose metrics.json is missing or unreadable is left out with a warning, never an error: the
history is a view, and one bad file must not stop a night's report.

Each run is marked with whether it was evaluated on the current run's test split
(`history.split_hash`): the same feature hash means the same split (the hash covers every pair's
split); otherwise the run's manifest is read and its test split hashed. Unknown (no manifest, or
the current run's split unknown) is None.

    read_history(store, layout, evaluation, features, current_split) -> RunHistory
    write_plot(store, layout, history) -> RunHistory   the trend PNG at
        `Layout.plot(run, HISTORY_PLOT)`, its key recorded in the returned history
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

from tasks.errors import DataError, StorageError
from tasks.evaluate import plots
from tasks.io import records
from tasks.io.layout import Layout
from tasks.io.storage import Storage
from tasks.refs import EvaluationRef, FeatureRef
from tasks.runs.history import Record, first_line, split_hash

log = logging.getLogger(__name__)

HISTORY_RUNS = 30  # runs shown in the history: about a month of nights
TREND_METRICS = ("roc_auc", "eer")  # what the history follows per fusion
HISTORY_PLOT = "run-history"  # file stem of the trend plot (outputs/plots/<run>/run-history.png)


class RunPoint(Record):
    """One run of the history: its fusions' trend metrics and its test split."""

    run: str
    metrics: dict[str, dict[str, float]]  # fusion -> {"roc_auc": ..., "eer": ...}
    feature_hash: str | None = None
    split_hash: str | None = None  # None: unknown
    same_split: bool | None = None  # as the current run's test split; None: unknown
    current: bool = False


class RunHistory(Record):
    """The runs of the history, oldest first, and the runs left out with the reason."""

    limit: int
    runs: list[RunPoint]
    left_out: list[str] = []  # "<run>: <reason>" of runs whose metrics were unreadable
    plot_key: str | None = None  # the trend PNG, once written

    @property
    def current(self) -> RunPoint:
        return next(r for r in self.runs if r.current)

    @property
    def fusions(self) -> list[str]:
        """Every fusion that appears, the current run's first and in its order."""
        names = list(self.current.metrics)
        for point in self.runs:
            names += [f for f in point.metrics if f not in names]
        return names

    def split_label(self, point: RunPoint) -> str:
        """ "this run", "same", "other" or "unknown": how a run's test split compares."""
        if point.current:
            return "this run"
        return {True: "same", False: "other", None: "unknown"}[point.same_split]


# --- reading -------------------------------------------------------------------------------------


def evaluated_runs(store: Storage, layout: Layout) -> list[str]:
    """Ids of the runs with a metrics.json, sorted (oldest first)."""
    prefix = layout.reports("").rstrip("/") + "/"  # outputs/reports/
    runs = set()
    for info in store.list(prefix):
        run = info.key[len(prefix) :].split("/", 1)[0]
        if run and info.key == layout.metrics(run):
            runs.add(run)
    return sorted(runs)


def trend_metrics(doc: Any) -> tuple[dict[str, dict[str, float]], str | None]:
    """The trend metrics per fusion and the feature hash of a metrics.json document; ValueError
    when it has none in the expected shape."""
    if not isinstance(doc, dict) or not isinstance(doc.get("fusions"), dict):
        raise ValueError("no 'fusions' object")
    out: dict[str, dict[str, float]] = {}
    for fusion, entry in doc["fusions"].items():
        try:
            values = {m: float(entry["metrics"][m]) for m in TREND_METRICS}
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(
                f"{fusion}: no readable {' and '.join(TREND_METRICS)} ({exc})"
            ) from exc
        if any(math.isnan(v) for v in values.values()):
            raise ValueError(f"{fusion}: NaN metric")
        out[str(fusion)] = values
    if not out:
        raise ValueError("no fusion")
    feature_hash = doc.get("feature_hash")
    return out, feature_hash if isinstance(feature_hash, str) else None


def _split_of(store: Storage, layout: Layout, run: str) -> str | None:
    """`split_hash` of the test pairs of `run`'s manifest; None when it cannot be read."""
    from tasks.data import manifest as manifests  # pyarrow: only when a manifest is read

    key = layout.manifest(run)
    try:
        rows = manifests.read_manifest(store, key)
        return split_hash(r.pair_id for r in rows if r.split == "test")
    except (StorageError, DataError, ValueError) as exc:
        log.info("%s: test split unknown (%s)", store.uri(key), first_line(exc))
        return None


def read_history(
    store: Storage,
    layout: Layout,
    evaluation: EvaluationRef,
    features: FeatureRef | None = None,
    current_split: str | None = None,
    limit: int = HISTORY_RUNS,
) -> RunHistory:
    """The newest `limit` evaluated runs up to and including `evaluation.run` (oldest first);
    `features` and `current_split` (`history.split_hash` of its test pairs) name the current
    run's test split, for marking runs evaluated on another one."""
    if limit < 1:
        raise ValueError(f"history limit must be at least 1, got {limit}")
    run = evaluation.run
    current = RunPoint(
        run=run,
        metrics={f: {m: float(v[m]) for m in TREND_METRICS} for f, v in evaluation.metrics.items()},
        feature_hash=features.feature_hash if features is not None else None,
        split_hash=current_split,
        same_split=True,
        current=True,
    )
    try:
        others = [r for r in evaluated_runs(store, layout) if r < run]
    except StorageError as exc:
        log.warning("%s: runs not listed (%s); history of this run only", store.uri(""), exc)
        others = []
    points: list[RunPoint] = []
    left_out: list[str] = []
    for other in reversed(others):  # newest first, until the window is full
        if len(points) == limit - 1:
            break
        key = layout.metrics(other)
        try:
            metrics, fhash = trend_metrics(records.read_json(store, key))
        except (StorageError, DataError, ValueError) as exc:
            reason = first_line(exc).removeprefix(f"{store.uri(key)}: ")
            log.warning("%s: left out of the run history (%s)", store.uri(key), reason)
            left_out.append(f"{other}: {reason}")
            continue
        points.append(_with_split(store, layout, other, metrics, fhash, current))
    return RunHistory(limit=limit, runs=[*reversed(points), current], left_out=left_out)


def _with_split(
    store: Storage,
    layout: Layout,
    run: str,
    metrics: dict[str, dict[str, float]],
    feature_hash: str | None,
    current: RunPoint,
) -> RunPoint:
    if feature_hash is not None and feature_hash == current.feature_hash:
        same: bool | None = True
        split = current.split_hash
    else:
        split = _split_of(store, layout, run) if current.split_hash is not None else None
        same = None if split is None or current.split_hash is None else split == current.split_hash
    return RunPoint(
        run=run, metrics=metrics, feature_hash=feature_hash, split_hash=split, same_split=same
    )


# --- the table and the plot ----------------------------------------------------------------------


def table_rows(history: RunHistory) -> list[dict[str, Any]]:
    """One row per run (oldest first): run, test split, then each fusion's ROC-AUC and EER
    (rounded to 4 decimals; None where the run did not train that fusion)."""
    rows = []
    for point in history.runs:
        row: dict[str, Any] = {"run": point.run, "test split": history.split_label(point)}
        for f in history.fusions:
            values: Mapping[str, float] = point.metrics.get(f, {})
            for m, label in (("roc_auc", "ROC-AUC"), ("eer", "EER")):
                row[f"{f} {label}"] = round(values[m], 4) if m in values else None
        rows.append(row)
    return rows


def draw(history: RunHistory) -> plots.Figure:
    """The trend plot of the history (tasks/evaluate/plots.py `plot_run_history`)."""
    fusions = history.fusions
    series = {
        m: {f: [p.metrics.get(f, {}).get(m) for p in history.runs] for f in fusions}
        for m in TREND_METRICS
    }
    return plots.plot_run_history(
        [p.run for p in history.runs],
        series["roc_auc"],
        series["eer"],
        other_split=[p.same_split is False for p in history.runs],
    )


def write_plot(store: Storage, layout: Layout, history: RunHistory) -> RunHistory:
    """Draw the trend, write it at `Layout.plot(run, HISTORY_PLOT)`; the history with its key."""
    key = layout.plot(history.current.run, HISTORY_PLOT)
    store.write_bytes(key, plots.render_png(draw(history)), "image/png")
    return history.model_copy(update={"plot_key": key})
