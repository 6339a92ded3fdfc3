"""Prefect artifacts of an evaluation, created in a real (test-harness) flow run and read back."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest
from PIL import Image
from prefect import flow
from prefect.artifacts import Artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.runtime import flow_run

from config.schema import PipelineConfig, StorageConfig
from flows import artifacts, steps
from tasks.evaluate import publish
from tasks.evaluate.calibration import OperatingPoint
from tasks.evaluate.metrics import METRIC_NAMES, calculate_metrics
from tasks.evaluate.plots import plot_names
from tasks.io import records
from tasks.io.layout import Layout
from tasks.io.storage import open_storage
from tasks.refs import EvaluationRef
from tasks.runs.champions import ChampionDecision
from tests.unit import eval_inputs

RUN = "20260101T000000Z"


def evaluation_ref() -> EvaluationRef:
    layout = Layout()
    metrics = {}
    for fusion in eval_inputs.FUSIONS:
        p = eval_inputs.predictions(fusion)
        metrics[fusion] = calculate_metrics(p.label, p.score)
    return EvaluationRef(
        run=RUN,
        metrics_key=layout.metrics(RUN),
        report_key=layout.report(RUN),
        plot_keys=[layout.plot(RUN, n) for n in plot_names(eval_inputs.FUSIONS)],
        metrics=metrics,
    )


POINT = OperatingPoint(threshold=0.8125, temperature=2.5, rule="fpr", target_fpr=0.05, n_val=40)


def write_metrics(storage: StorageConfig) -> dict:
    """The run's metrics.json: late has a fitted operating point, the others the fixed one."""
    features, trained, _ = eval_inputs.refs(RUN)
    preds = {f: eval_inputs.predictions(f) for f in eval_inputs.FUSIONS}
    doc = publish.metrics_document(
        RUN, PipelineConfig().evaluation, features, trained, preds, {"late": POINT}
    )
    store = open_storage(storage)
    records.write_json(store, Layout().metrics(RUN), doc)
    for i, name in enumerate(plot_names(eval_inputs.FUSIONS)):  # stand-ins for the plots
        buf = io.BytesIO()
        Image.new("RGB", (4, 3), (i, 0, 0)).save(buf, format="PNG")
        store.write_bytes(Layout().plot(RUN, name), buf.getvalue())
    return doc


EARLIER, CORRUPT = "20251231T000000Z", "20251230T000000Z"


def write_earlier_runs(storage: StorageConfig) -> None:
    """An earlier run's metrics.json (early and mid only) and a corrupt one before it."""
    store = open_storage(storage)
    doc = {
        "feature_hash": "abc123",  # the current run's features: the same test split
        "fusions": {f: {"metrics": {"roc_auc": 0.75, "eer": 0.25}} for f in ("early", "mid")},
    }
    records.write_json(store, Layout().metrics(EARLIER), doc)
    store.write_bytes(Layout().metrics(CORRUPT), b'{"fusions": ')


DECISIONS = [
    ChampionDecision(fusion="early", promoted=True, reason="r", new_run=RUN, new_auc=0.9),
    ChampionDecision(fusion="mid", promoted=False, reason="r", new_run=RUN, new_auc=0.8,
                     champion_run=EARLIER, champion_auc=0.85),
]  # fmt: skip


@flow(name="artifact-test")
def publish_flow(
    storage: StorageConfig, ref: EvaluationRef, story: bool = False
) -> tuple[list[str], str]:
    """The artifacts as publish-report makes them; `story`: with the run's decisions, skipped
    files and run history (read from the bucket by the step's own helper)."""
    features, trained, manifest = eval_inputs.refs(RUN)
    store = open_storage(storage)
    if not story:
        keys = artifacts.publish_artifacts(store, ref, trained)
    else:
        runs = steps.run_history(store, Layout(), ref, features, manifest)
        keys = artifacts.publish_artifacts(
            store, ref, trained, DECISIONS, manifest=manifest, features=features, history=runs
        )
    return keys, str(flow_run.id)


def read_back(flow_run_id: str) -> dict[str, object]:
    """The artifacts of one flow run, by key."""
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    return {a.key: a for a in found}


def test_artifacts_have_ui_keys_and_credential_free_links_on_s3(
    prefect_harness, s3_server, s3_bucket
) -> None:
    storage = StorageConfig(uri=f"s3://{s3_bucket}", endpoint_url=s3_server.endpoint_url)
    ref = evaluation_ref()
    doc = write_metrics(storage)
    write_earlier_runs(storage)
    keys, run_id = publish_flow(storage, ref, story=True)
    expected = [
        "evaluation-summary",
        "evaluation-metrics",
        "plot-roc-curves",
        "plot-det-curves",
        "plot-metric-comparison",
        "plot-reliability",
        "plot-score-histograms",
        "run-history",
        "plot-run-history",
    ]
    assert keys == expected
    found = read_back(run_id)
    assert set(found) == set(expected)
    for key in expected:
        assert artifacts._KEY.match(key)

    summary = found["evaluation-summary"]
    assert summary.type == "markdown"
    text = str(summary.data)
    assert text.startswith(f"# Evaluation of run {RUN}\n")
    # the story first: winner and margin, champion decisions with both scores, skipped files
    ranked = sorted(ref.metrics, key=lambda f: -ref.metrics[f]["roc_auc"])
    best, runner = ref.metrics[ranked[0]]["roc_auc"], ref.metrics[ranked[1]]["roc_auc"]
    story = text[: text.index("| fusion |")]
    assert f"**{ranked[0]}** wins: test ROC-AUC {best:.4f}, " in story
    assert f"ahead of {ranked[1]} ({runner:.4f})." in story
    assert "- **early**: promoted, first champion: test ROC-AUC 0.9000 (this run)" in story
    assert (
        f"- **mid**: champion kept: test ROC-AUC 0.8000 (this run) vs 0.8500 (champion run "
        f"{EARLIER}, same test split)" in story
    )
    assert "**Skipped files: 2**" in story
    assert "- `dataset/images/real/x.gif`: not an image" in story
    assert "**Run history:** 2 runs (table artifact `run-history`" in text
    assert "1 left out (unreadable metrics)" in text
    for fusion in eval_inputs.FUSIONS:
        assert f"| {fusion} | {ref.metrics[fusion]['roc_auc']:.4f} |" in text
    # links to the report, metrics, all 19 plots and the models, none presigned (no credentials)
    base = f"{s3_server.endpoint_url}/{s3_bucket}/outputs"
    assert f"[report.html]({base}/reports/{RUN}/report.html)" in text
    assert text.count(f"]({base}/") == 1 + 1 + 19 + 3 + 1  # and the run-history plot
    assert "X-Amz-" not in text and "Signature=" not in text
    assert f"s3://{s3_bucket}/outputs/models/late/{RUN}/model.pt" in text
    # the fitted operating points, with the test metrics there and (in brackets) at the fixed one
    assert "fixed threshold 0.5" in text
    late = doc["fusions"]["late"]
    at, fixed = late["metrics_at_operating_point"], late["metrics"]
    assert (
        f"| late | 0.8125 | fpr <= 0.05 | 2.5000 | {at['balanced_accuracy']:.4f} "
        f"({fixed['balanced_accuracy']:.4f}) | {at['f1']:.4f} ({fixed['f1']:.4f}) | "
        f"{at['fpr']:.4f} | {at['tpr']:.4f} |" in text
    )
    assert "| early | 0.5000 | fixed | 1.0000 |" in text

    table = found["evaluation-metrics"]
    assert table.type == "table"
    rows = json.loads(str(table.data))
    assert [r["fusion"] for r in rows] == list(eval_inputs.FUSIONS)
    assert set(rows[0]) == {"fusion", *METRIC_NAMES}
    assert rows[1]["eer"] == round(ref.metrics["mid"]["eer"], 4)

    image = found["plot-roc-curves"]
    assert image.type == "image"
    # the plot itself, inlined: the UI shows it without a signed link
    png = open_storage(storage).read_bytes(f"outputs/plots/{RUN}/roc-curves.png")
    assert str(image.data) == "data:image/png;base64," + base64.b64encode(png).decode()
    assert f"s3://{s3_bucket}/outputs/plots/{RUN}/roc-curves.png" in str(image.description)
    assert Artifact.get("plot-det-curves") is not None

    # the run history: this run and the readable earlier one, oldest first; the corrupt left out
    history = found["run-history"]
    assert history.type == "table"
    rows = json.loads(str(history.data))
    assert [r["run"] for r in rows] == [EARLIER, RUN]
    assert rows[0]["test split"] == "same" and rows[1]["test split"] == "this run"
    assert rows[0]["mid ROC-AUC"] == 0.75 and rows[0]["late ROC-AUC"] is None
    assert rows[1]["late EER"] == round(ref.metrics["late"]["eer"], 4)
    trend_png = open_storage(storage).read_bytes(f"outputs/plots/{RUN}/run-history.png")
    assert Image.open(io.BytesIO(trend_png)).format == "PNG"
    assert str(found["plot-run-history"].data) == (
        "data:image/png;base64," + base64.b64encode(trend_png).decode()
    )


def test_local_backend_links_are_paths(prefect_harness, tmp_path: Path) -> None:
    storage = StorageConfig(uri=str(tmp_path))
    write_metrics(storage)
    keys, run_id = publish_flow(storage, evaluation_ref())
    found = read_back(run_id)
    text = str(found["evaluation-summary"].data)
    report = tmp_path.resolve() / "outputs" / "reports" / RUN / "report.html"
    assert f"[report.html]({report})" in text
    png = (tmp_path / "outputs" / "plots" / RUN / "roc-curves.png").read_bytes()
    assert str(found["plot-roc-curves"].data).endswith(base64.b64encode(png).decode())
    assert len(keys) == 7


def test_artifact_key_is_lowercase_with_dashes() -> None:
    assert artifacts.artifact_key("Plot ROC_curves.png") == "plot-roc-curves-png"
    with pytest.raises(ValueError, match="no usable artifact key"):
        artifacts.artifact_key("__")


def test_the_summarys_operating_points_end_with_the_ensembles_row() -> None:
    features, trained, _ = eval_inputs.refs(RUN)
    preds = {f: eval_inputs.predictions(f) for f in eval_inputs.FUSIONS}
    ref = (0.2, 0.4, 0.6, 0.8)
    points = {f: OperatingPoint(0.5, 1.0, "eer", None, 8, ref) for f in eval_inputs.FUSIONS}
    doc = publish.metrics_document(
        RUN, PipelineConfig().evaluation, features, trained, preds, points
    )
    lines = artifacts.operating_point_lines(doc)
    ens = doc["ensemble"]
    at = ens["metrics_at_operating_point"]
    assert lines[-1] == (
        f"| ensemble (ROC-AUC {ens['metrics']['roc_auc']:.4f}) | 0.5000 | mean rank | - | "
        f"{at['balanced_accuracy']:.4f} | {at['f1']:.4f} | {at['fpr']:.4f} | {at['tpr']:.4f} |"
    )
    assert [line.split(" |")[0] for line in lines[-4:-1]] == ["| early", "| mid", "| late"]
    del doc["ensemble"]  # a run without one: the fusions' rows only
    assert lines[:-1] == artifacts.operating_point_lines(doc)
