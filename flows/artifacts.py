"""Prefect artifacts of an evaluation: what the UI's Artifacts page shows for each run.

    evaluation-summary     markdown: the story first (which fusion won and by how much, the
                           champion decisions with both scores, the skipped files), then the
                           headline metrics table, each fusion's fitted operating point
                           (threshold, rule, temperature) and its test metrics beside those at
                           the fixed threshold, links to the report, metrics.json, every plot
                           and the models in the bucket
    evaluation-metrics     table: every metric, one row per fusion
    plot-<name>            image: the key plots (KEY_PLOTS)
    run-history            table: each fusion's test ROC-AUC and EER over the last runs
                           (tasks/runs/trend.py), with the test split they were measured on
    plot-run-history       image: the trend of those runs

and of each fusion's training (`TrainingProgress`, fit's `on_epoch`):

    training-progress-<fusion>   progress: the share of the epochs done, updated after each

Keys are fixed (lowercase with dashes), so each key's history on the Artifacts page is the run
after run series. Links come from `Storage.link` and carry no credentials (on AWS the S3
console's page of the object, on another store its plain URL, on the local backend its path);
the key plots are inlined as `data:` URLs, so the UI shows them without any link that would need
signing (a presigned URL holds the signer's access key id and session token).
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping, Sequence
from typing import Any, cast
from uuid import UUID

from prefect.artifacts import (
    create_image_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.context import TaskRunContext

from tasks.evaluate.metrics import HEADLINE, METRIC_NAMES
from tasks.io import records
from tasks.io.storage import Storage
from tasks.refs import EvaluationRef, FeatureRef, ManifestRef, TrainedRef
from tasks.runs import trend
from tasks.runs.champions import ChampionDecision

SUMMARY_KEY = "evaluation-summary"
TABLE_KEY = "evaluation-metrics"
HISTORY_KEY = "run-history"
MAX_SKIPPED_LINES = 50  # skipped files listed in the summary; the rest are counted
KEY_PLOTS = ("roc-curves", "det-curves", "metric-comparison", "reliability", "score-histograms")
_KEY = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
_LABELS = {
    "roc_auc": "ROC-AUC",
    "eer": "EER",
    "accuracy": "accuracy",
    "balanced_accuracy": "balanced acc.",
    "f1": "F1 (fake)",
    "average_precision": "AP",
    "ece": "ECE",
}


def artifact_key(name: str) -> str:
    """`name` as an artifact key: lowercase letters, digits and single dashes."""
    key = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    if not _KEY.match(key):
        raise ValueError(f"{name!r} gives no usable artifact key")
    return key


def _plot_name(key: str) -> str:
    return key.rsplit("/", 1)[-1].removesuffix(".png")


def _md_link(text: str, href: str) -> str:
    return f"[{text.replace(']', ')')}]({href.replace(' ', '%20').replace(')', '%29')})"


def operating_point_lines(doc: Mapping[str, Any]) -> list[str]:
    """The fitted thresholds of metrics.json as a markdown table (empty: it has none)."""
    fusions = {f: v for f, v in doc.get("fusions", {}).items() if "operating_point" in v}
    if not fusions:
        return []
    lines = [
        f"Operating points fitted on validation (fixed threshold {doc['threshold']}: "
        "balanced acc. and F1 in brackets).",
        "",
        "| fusion | threshold | rule | temperature | balanced acc. | F1 (fake) | FPR | TPR |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for f, v in fusions.items():
        op, at, fixed = v["operating_point"], v["metrics_at_operating_point"], v["metrics"]
        rule = op["rule"] if op["target_fpr"] is None else f"{op['rule']} <= {op['target_fpr']}"
        lines.append(
            f"| {f} | {op['threshold']:.4f} | {rule} | {op['temperature']:.4f} | "
            f"{at['balanced_accuracy']:.4f} ({fixed['balanced_accuracy']:.4f}) | "
            f"{at['f1']:.4f} ({fixed['f1']:.4f}) | {at['fpr']:.4f} | {at['tpr']:.4f} |"
        )
    ens = doc.get("ensemble")
    if ens:  # a mean rank, not a probability: no temperature, no fixed threshold
        at = ens["metrics_at_operating_point"]
        lines.append(
            f"| ensemble (ROC-AUC {ens['metrics']['roc_auc']:.4f}) | {ens['threshold']:.4f} | "
            f"mean rank | - | {at['balanced_accuracy']:.4f} | {at['f1']:.4f} | "
            f"{at['fpr']:.4f} | {at['tpr']:.4f} |"
        )
    return ["", *lines]


def _auc(value: float) -> str:
    return f"{value:.4f}"


def winner_lines(metrics: Mapping[str, Mapping[str, float]]) -> list[str]:
    """Which fusion won (highest test ROC-AUC, as shown: 4 decimals) and by how much over the
    runner-up; a tie names every fusion sharing the top score."""
    if not metrics:
        return []
    ranked = sorted(metrics, key=lambda f: -metrics[f]["roc_auc"])  # stable: run order in ties
    best = _auc(metrics[ranked[0]]["roc_auc"])
    if len(ranked) == 1:
        return [f"**{ranked[0]}** is the only fusion: test ROC-AUC {best}."]
    top = [f for f in ranked if _auc(metrics[f]["roc_auc"]) == best]
    if len(top) == len(ranked):
        names = ", ".join(f"**{f}**" for f in top[:-1]) + f" and **{top[-1]}**"
        return [f"{names} tie: test ROC-AUC {best} each."]
    runner = _auc(metrics[ranked[len(top)]]["roc_auc"])
    ahead = f"{float(best) - float(runner):.4f} ahead of {ranked[len(top)]} ({runner})"
    if len(top) == 1:
        return [f"**{top[0]}** wins: test ROC-AUC {best}, {ahead}."]
    names = ", ".join(f"**{f}**" for f in top[:-1]) + f" and **{top[-1]}**"
    return [f"{names} tie: test ROC-AUC {best}, {ahead}."]


def decision_line(d: ChampionDecision) -> str:
    """One champion decision with both scores: the new model's test AUC and the champion's."""
    new = f"test ROC-AUC {_auc(d.new_auc)} (this run)"
    if d.champion_run is None or d.champion_auc is None:
        return f"- **{d.fusion}**: promoted, first champion: {new}"
    old = f"{_auc(d.champion_auc)} (champion run {d.champion_run}"
    if not d.comparable:
        return (
            f"- **{d.fusion}**: champion kept: {new} vs {old}, measured on another test split: "
            "not comparable)"
        )
    verdict = "promoted" if d.promoted else "champion kept"
    return f"- **{d.fusion}**: {verdict}: {new} vs {old}, same test split)"


def skipped_files(
    manifest: ManifestRef | None, features: FeatureRef | None
) -> list[Mapping[str, str]]:
    """The run's skipped files: the manifest's (listing) and the feature build's, each once
    (the feature build's list already holds the manifest's)."""
    out: list[Mapping[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for item in [*(manifest.skipped if manifest else []), *(features.skipped if features else [])]:
        ident = (item.get("key", ""), item.get("reason", ""))
        if ident not in seen:
            seen.add(ident)
            out.append(item)
    return out


def _code(text: str) -> str:
    return "`" + text.replace("`", "'").replace("\n", " ") + "`"


def skipped_lines(
    skipped: Sequence[Mapping[str, str]],
    full_list: str | None = None,
    limit: int = MAX_SKIPPED_LINES,
) -> list[str]:
    """The skipped files, at most `limit` listed (key and reason), the rest counted, with
    `full_list` (a markdown link to the run's skipped.json) where the whole list is."""
    if not skipped:
        return ["**Skipped files:** none."]
    lines = [f"**Skipped files: {len(skipped)}**", ""]
    for item in skipped[:limit]:
        stage = f" ({item['stage']})" if item.get("stage") else ""
        reason = item.get("reason", "").replace("\n", " ")
        lines.append(f"- {_code(item.get('key', ''))}: {reason}{stage}")
    more = len(skipped) - limit
    where = f"; full list: {full_list}" if full_list else ""
    if more > 0:
        lines += ["", f"… and {more} more{where}."]
    elif full_list:
        lines += ["", f"Full list: {full_list}."]
    return lines


def story_lines(
    store: Storage,
    ref: EvaluationRef,
    decisions: Sequence[ChampionDecision] | None,
    manifest: ManifestRef | None,
    features: FeatureRef | None,
) -> list[str]:
    """The opening of the summary: the winner, the champion decisions, the skipped files."""
    lines = winner_lines(ref.metrics)
    lines += ["", "**Champions:**", ""]
    if decisions is None:
        lines.append("- no decisions in this run (re-evaluation: champions unchanged)")
    elif not decisions:
        lines.append("- no fusion was trained, so none was decided")
    else:
        lines += [decision_line(d) for d in decisions]
    key = features.skipped_key if features is not None else None
    full = _md_link(store.uri(key), store.link(key)) if key else None
    return [*lines, "", *skipped_lines(skipped_files(manifest, features), full)]


def history_lines(store: Storage, history: trend.RunHistory | None) -> list[str]:
    """One paragraph on the run history: how many runs, where the trend plot is."""
    if history is None:
        return []
    n = len(history.runs)
    other = sum(1 for p in history.runs if p.same_split is False)
    text = f"**Run history:** {n} run{'s' if n != 1 else ''} (table artifact `{HISTORY_KEY}`"
    if history.plot_key:
        text += f", trend {_md_link(_plot_name(history.plot_key), store.link(history.plot_key))}"
    text += ")"
    if other:
        text += f"; {other} evaluated on another test split"
    if history.left_out:
        text += f"; {len(history.left_out)} left out (unreadable metrics)"
    return ["", text + "."]


def summary_markdown(
    store: Storage,
    ref: EvaluationRef,
    trained: Sequence[TrainedRef],
    doc: Mapping[str, Any] | None = None,
    decisions: Sequence[ChampionDecision] | None = None,
    manifest: ManifestRef | None = None,
    features: FeatureRef | None = None,
    history: trend.RunHistory | None = None,
) -> str:
    """The markdown artifact: the story (`story_lines`), the headline table, the fitted
    operating points (from `doc`, the run's metrics.json), the run history, then links into
    the bucket."""
    fusions = list(ref.metrics)
    head = "| fusion | " + " | ".join(_LABELS[m] for m in HEADLINE) + " |"
    rule = "|---|" + "---:|" * len(HEADLINE)
    rows = [
        f"| {f} | " + " | ".join(f"{ref.metrics[f][m]:.4f}" for m in HEADLINE) + " |"
        for f in fusions
    ]
    plots = " · ".join(_md_link(_plot_name(k), store.link(k)) for k in ref.plot_keys)
    models = "\n".join(
        f"- {t.fusion}: {_md_link(store.uri(t.model_key), store.link(t.model_key))} "
        f"(epochs {t.epochs}, best {t.best_epoch}, val loss {t.best_val_loss:.4f})"
        for t in trained
    )
    lines = [
        f"# Evaluation of run {ref.run}",
        "",
        *story_lines(store, ref, decisions, manifest, features),
        "",
        "Test split; EER and ECE: lower is better.",
        "",
        head,
        rule,
        *rows,
        *operating_point_lines(doc or {}),
        *history_lines(store, history),
        "",
        f"**Report:** {_md_link('report.html', store.link(ref.report_key))} · "
        f"**Metrics:** {_md_link('metrics.json', store.link(ref.metrics_key))}",
        "",
        f"**Plots ({len(ref.plot_keys)}):** {plots}",
        "",
        "**Models:**",
        "",
        models,
    ]
    if ref.reproduced is not None:
        lines += [
            "",
            "Re-evaluation: the metrics "
            + (
                "reproduce the stored metrics.json exactly."
                if ref.reproduced
                else "differ from the stored metrics.json (see the flow's log)."
            ),
        ]
    return "\n".join(lines) + "\n"


def metrics_table(ref: EvaluationRef) -> list[dict[str, float | str]]:
    """One row per fusion with every metric (rounded to 4 decimals for the UI)."""
    return [
        {"fusion": f, **{m: round(ref.metrics[f][m], 4) for m in METRIC_NAMES}} for f in ref.metrics
    ]


def inline_png(data: bytes) -> str:
    """A PNG as a `data:` URL, which the UI's image artifact shows as it is."""
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def publish_artifacts(
    store: Storage,
    ref: EvaluationRef,
    trained: Sequence[TrainedRef],
    decisions: Sequence[ChampionDecision] | None = None,
    manifest: ManifestRef | None = None,
    features: FeatureRef | None = None,
    history: trend.RunHistory | None = None,
) -> list[str]:
    """Create the summary, table and key-plot artifacts in the current flow run, and with
    `history` the run-history table and trend image; returns the keys."""
    description = f"run {ref.run}"
    doc = records.read_json(store, ref.metrics_key)
    markdown = summary_markdown(
        store,
        ref,
        trained,
        doc if isinstance(doc, dict) else None,
        decisions=decisions,
        manifest=manifest,
        features=features,
        history=history,
    )
    create_markdown_artifact(markdown=markdown, key=SUMMARY_KEY, description=description)
    create_table_artifact(table=metrics_table(ref), key=TABLE_KEY, description=description)
    keys = [SUMMARY_KEY, TABLE_KEY]
    by_name = {_plot_name(k): k for k in ref.plot_keys}
    for name in KEY_PLOTS:
        if name in by_name:
            key = artifact_key(f"plot-{name}")
            create_image_artifact(
                image_url=inline_png(store.read_bytes(by_name[name])),
                key=key,
                description=f"{description}: {name} ({store.uri(by_name[name])})",
            )
            keys.append(key)
    if history is not None:
        create_table_artifact(
            table=trend.table_rows(history),
            key=HISTORY_KEY,
            description=f"{description}: test ROC-AUC and EER of the last {len(history.runs)} "
            f"runs (at most {history.limit}), oldest first",
        )
        keys.append(HISTORY_KEY)
        if history.plot_key is not None:
            key = artifact_key(f"plot-{trend.HISTORY_PLOT}")
            create_image_artifact(
                image_url=inline_png(store.read_bytes(history.plot_key)),
                key=key,
                description=f"{description}: run history ({store.uri(history.plot_key)})",
            )
            keys.append(key)
    return keys


class TrainingProgress:
    """The progress artifact of one fusion's training, as `fit`'s `on_epoch`: created at the
    first report (the epochs a resume starts after), updated after each epoch, 100 when training
    ends. Does nothing outside a Prefect task run (`fit` called as a plain function)."""

    def __init__(self, fusion: str, run: str) -> None:
        self.key = artifact_key(f"training-progress-{fusion}")
        self.fusion, self.run = fusion, run
        self.artifact_id: UUID | None = None

    def __call__(self, done: int, epochs: int) -> None:
        if TaskRunContext.get() is None:
            return
        percent = 100.0 * min(done, epochs) / epochs
        description = f"{self.fusion}, run {self.run}: {done}/{epochs} epochs done"
        if self.artifact_id is None:
            made = create_progress_artifact(percent, key=self.key, description=description)
            self.artifact_id = cast(UUID, made)  # typed UUID | Coroutine: called sync, a UUID
        else:
            update_progress_artifact(self.artifact_id, percent, description=description)
