"""Run history: the last runs' test metrics read from their metrics.json in a local bucket, bad
files left out with a warning, runs on another test split marked, the trend plot written."""

from __future__ import annotations

import dataclasses
import io
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tasks.data.manifest import PairRow
from tasks.io import records
from tasks.io.layout import Layout
from tasks.io.storage import LocalStorage
from tasks.refs import EvaluationRef, FeatureRef
from tasks.runs import trend
from tasks.runs.history import split_hash

LAYOUT = Layout()
CURRENT = "20261205T020000Z"


def metrics_doc(run: str, auc: float, feature_hash: str, fusions: tuple[str, ...]) -> dict:
    """A metrics.json as the evaluation writes it (the fields the history reads)."""
    return {
        "format_version": 1,
        "run": run,
        "feature_hash": feature_hash,
        "fusions": {
            f: {"metrics": {"roc_auc": auc + i / 100, "eer": 1 - auc, "accuracy": 0.5}}
            for i, f in enumerate(fusions)
        },
    }


def write_manifest(store: LocalStorage, run: str, test_ids: list[str]) -> None:
    rows = [
        PairRow(
            pair_id=p,
            split="test",
            label=i % 2,
            family="",
            emotion="",
            image_emotion="",
            audio_key=f"a/{p}",
            audio_size=1,
            audio_etag="e",
            image_key=f"i/{p}",
            image_size=1,
            image_etag="e",
        )  # fmt: skip
        for i, p in enumerate(test_ids)
    ]
    table = pa.Table.from_pylist([dataclasses.asdict(r) for r in rows])
    buf = io.BytesIO()
    pq.write_table(table, buf)
    store.write_bytes(LAYOUT.manifest(run), buf.getvalue())


def current_ref(metrics: dict[str, dict[str, float]]) -> EvaluationRef:
    return EvaluationRef(
        run=CURRENT,
        metrics_key=LAYOUT.metrics(CURRENT),
        report_key=LAYOUT.report(CURRENT),
        plot_keys=[],
        metrics=metrics,
    )


FEATURES = FeatureRef(run=CURRENT, feature_hash="fh-now", prefix="p/", shards={}, counts={})
SPLIT = split_hash(["p1", "p2", "p3"])


@pytest.fixture
def bucket(tmp_path: Path) -> LocalStorage:
    """Five earlier runs: 01 and 02 on other features, 02's split is the current one (its
    manifest says so), 01's another; 03 corrupt; 04 on the current features; a later run."""
    store = LocalStorage(str(tmp_path))
    fusions = ("early", "mid", "late")
    docs = {
        "20261201T020000Z": metrics_doc("20261201T020000Z", 0.80, "fh-old", fusions),
        "20261202T020000Z": metrics_doc("20261202T020000Z", 0.82, "fh-mid", ("early", "mid")),
        "20261204T020000Z": metrics_doc("20261204T020000Z", 0.86, "fh-now", fusions),
        "20261206T020000Z": metrics_doc("20261206T020000Z", 0.99, "fh-now", fusions),  # later
    }
    for run, doc in docs.items():
        records.write_json(store, LAYOUT.metrics(run), doc)
    store.write_bytes(LAYOUT.metrics("20261203T020000Z"), b"{not json")
    write_manifest(store, "20261201T020000Z", ["p1", "p9"])
    write_manifest(store, "20261202T020000Z", ["p3", "p2", "p1"])
    store.write_bytes(LAYOUT.report("20261199T020000Z"), b"<html>")  # a report, no metrics
    return store


CURRENT_METRICS = {
    f: {"roc_auc": v, "eer": 0.1, "accuracy": 0.9} for f, v in (("early", 0.9), ("mid", 0.95))
}


def test_history_reads_the_runs_up_to_this_one_and_leaves_out_a_corrupt_file(
    bucket: LocalStorage, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="tasks.runs.trend"):
        history = trend.read_history(bucket, LAYOUT, current_ref(CURRENT_METRICS), FEATURES, SPLIT)
    runs = [p.run for p in history.runs]
    assert runs == ["20261201T020000Z", "20261202T020000Z", "20261204T020000Z", CURRENT]
    assert history.runs[-1].current and history.current.run == CURRENT
    assert history.runs[-1].metrics == {
        "early": {"roc_auc": 0.9, "eer": 0.1},
        "mid": {"roc_auc": 0.95, "eer": 0.1},
    }
    assert history.runs[0].metrics["late"] == pytest.approx({"roc_auc": 0.82, "eer": 0.2})
    # the corrupt metrics.json: left out, with a warning naming it, never an error
    assert [line.split(":")[0] for line in history.left_out] == ["20261203T020000Z"]
    assert any("20261203T020000Z/metrics.json" in r.getMessage() for r in caplog.records)
    # splits: the other feature set with the same test pairs is the same split
    assert [p.same_split for p in history.runs] == [False, True, True, True]
    assert history.runs[1].split_hash == SPLIT
    assert history.fusions == ["early", "mid", "late"]  # this run's first, then the others


def test_history_window_holds_the_newest_runs_and_this_one(bucket: LocalStorage) -> None:
    history = trend.read_history(bucket, LAYOUT, current_ref(CURRENT_METRICS), FEATURES, limit=2)
    assert [p.run for p in history.runs] == ["20261204T020000Z", CURRENT]
    assert history.left_out == []  # the corrupt one is older than the window
    only = trend.read_history(bucket, LAYOUT, current_ref(CURRENT_METRICS), FEATURES, limit=1)
    assert [p.run for p in only.runs] == [CURRENT]
    with pytest.raises(ValueError, match="at least 1"):
        trend.read_history(bucket, LAYOUT, current_ref(CURRENT_METRICS), limit=0)


def test_split_unknown_without_the_current_split_or_a_manifest(bucket: LocalStorage) -> None:
    history = trend.read_history(bucket, LAYOUT, current_ref(CURRENT_METRICS), FEATURES, None)
    # same features: same split; other features and no current split: unknown
    assert [p.same_split for p in history.runs] == [None, None, True, True]
    bucket.delete(LAYOUT.manifest("20261202T020000Z"))
    history = trend.read_history(bucket, LAYOUT, current_ref(CURRENT_METRICS), FEATURES, SPLIT)
    assert [history.split_label(p) for p in history.runs] == ["other", "unknown", "same",
                                                             "this run"]  # fmt: skip


def test_an_empty_bucket_gives_this_run_alone(tmp_path: Path) -> None:
    store = LocalStorage(str(tmp_path))
    history = trend.read_history(store, LAYOUT, current_ref(CURRENT_METRICS))
    assert [p.run for p in history.runs] == [CURRENT]


def test_table_rows_and_plot(bucket: LocalStorage) -> None:
    history = trend.read_history(bucket, LAYOUT, current_ref(CURRENT_METRICS), FEATURES, SPLIT)
    rows = trend.table_rows(history)
    assert list(rows[0]) == ["run", "test split", "early ROC-AUC", "early EER", "mid ROC-AUC",
                             "mid EER", "late ROC-AUC", "late EER"]  # fmt: skip
    assert rows[0]["run"] == "20261201T020000Z" and rows[0]["test split"] == "other"
    assert rows[1]["late ROC-AUC"] is None  # run 02 trained no late fusion
    assert rows[-1] == {"run": CURRENT, "test split": "this run", "early ROC-AUC": 0.9,
                        "early EER": 0.1, "mid ROC-AUC": 0.95, "mid EER": 0.1,
                        "late ROC-AUC": None, "late EER": None}  # fmt: skip

    written = trend.write_plot(bucket, LAYOUT, history)
    assert written.plot_key == LAYOUT.plot(CURRENT, "run-history")
    with Image.open(io.BytesIO(bucket.read_bytes(written.plot_key))) as img:
        assert img.format == "PNG" and img.width >= 600
    fig = trend.draw(history)
    top = fig.axes[0]
    assert [line.get_label() for line in top.get_lines()] == ["early", "mid", "late"]
