"""Publishing an evaluation to the bucket (S3 over HTTP and a local folder), from hand-built
test-split predictions and training outputs in the contract formats."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from config.schema import PipelineConfig, StorageConfig
from models import build_model
from tasks.data import shards
from tasks.errors import DataError, ObjectNotFound
from tasks.evaluate import inference, publish
from tasks.evaluate.calibration import OperatingPoint, calibrated_scores
from tasks.evaluate.inference import pick_device
from tasks.evaluate.metrics import THRESHOLD_METRIC_NAMES, calculate_metrics, confusion
from tasks.io import records
from tasks.io.layout import Layout
from tasks.io.storage import LocalStorage, open_storage
from tasks.refs import FeatureRef, TrainedRef
from tasks.train import checkpoint
from tests.unit import eval_inputs

RUN = "20260101T000000Z"


def s3_config(s3_server, bucket: str) -> PipelineConfig:
    return PipelineConfig(
        storage=StorageConfig(uri=f"s3://{bucket}", endpoint_url=s3_server.endpoint_url)
    )


def test_publish_writes_metrics_19_plots_and_report_to_s3(s3_server, s3_bucket) -> None:
    cfg = s3_config(s3_server, s3_bucket)
    store = open_storage(cfg.storage)
    layout = Layout.from_config(cfg.storage)
    eval_inputs.write_training_outputs(store, layout, RUN)
    features, trained, manifest = eval_inputs.refs(RUN)
    preds = {f: eval_inputs.predictions(f) for f in eval_inputs.FUSIONS}

    ref = publish.write_evaluation(cfg, store, layout, RUN, features, trained, preds)
    report_key = publish.write_report(cfg, store, layout, ref, features, trained, manifest, None)

    assert report_key == ref.report_key
    assert ref.reproduced is None  # nothing to compare with yet
    assert ref.metrics_key == f"outputs/reports/{RUN}/metrics.json"
    assert ref.report_key == f"outputs/reports/{RUN}/report.html"
    pngs = sorted(o.key for o in store.list(layout.plots(RUN)))
    assert pngs == sorted(ref.plot_keys) and len(pngs) == 19
    contents = set()
    for key in pngs:
        data = store.read_bytes(key)
        contents.add(data)
        with Image.open(io.BytesIO(data)) as img:
            pixels = np.asarray(img.convert("L"))
        assert pixels.shape[1] >= 300 and pixels.shape[0] >= 250, key
        assert pixels.std() > 5, f"{key} is blank"
    assert len(contents) == 19

    doc = json.loads(store.read_bytes(ref.metrics_key))
    assert sorted(doc["fusions"]) == sorted(eval_inputs.FUSIONS)
    assert doc["fusions"]["late"]["metrics"] == ref.metrics["late"]
    assert (
        doc["fusions"]["early"]["confusion"]["threshold"][0][0]
        + doc["fusions"]["early"]["confusion"]["threshold"][0][1]
        == 20
    )  # 20 reals
    assert set(doc["fusions"]["mid"]["families"]) == {"faceswap", "tts"}
    assert doc["test_shards"] == features.shards["test"]
    html = store.read_bytes(ref.report_key).decode()
    assert html.count("data:image/png;base64,") == 19


def test_rerun_reproduces_metrics_byte_for_byte_and_other_scores_differ(tmp_path: Path) -> None:
    cfg = PipelineConfig(storage=StorageConfig(uri=str(tmp_path)))
    store = LocalStorage(str(tmp_path))
    layout = Layout()
    eval_inputs.write_training_outputs(store, layout, RUN, ("mid",))
    features, trained, manifest = eval_inputs.refs(RUN, ("mid",))
    preds = {"mid": eval_inputs.predictions("mid")}
    first = publish.write_evaluation(cfg, store, layout, RUN, features, trained, preds)
    assert len(first.plot_keys) == 17  # one confusion matrix for the one fusion
    stored = store.read_bytes(first.metrics_key)

    again = publish.write_evaluation(cfg, store, layout, RUN, features, trained, preds)
    assert again.reproduced is True
    assert store.read_bytes(first.metrics_key) == stored

    other = {"mid": eval_inputs.predictions("mid", seed=5)}
    changed = publish.metrics_document(RUN, cfg.evaluation, features, trained, other)
    assert publish.compare_with_stored(store, first.metrics_key, changed) is False


def test_compare_with_stored(tmp_path: Path) -> None:
    store = LocalStorage(str(tmp_path))
    assert publish.compare_with_stored(store, "m.json", {"a": 1}) is None
    store.write_bytes("m.json", b'{"a": 1}')
    assert publish.compare_with_stored(store, "m.json", {"a": 1}) is True
    assert publish.compare_with_stored(store, "m.json", {"a": 2}) is False
    store.write_bytes("m.json", b"{not json")
    assert publish.compare_with_stored(store, "m.json", {"a": 1}) is False


def test_differences_name_the_changed_values() -> None:
    old = {"a": 1, "f": {"mid": {"auc": 0.9, "n": 4}}}
    assert publish.differences(old, old) == []
    new = {"a": 1, "f": {"mid": {"auc": 0.8}}, "b": 2}
    assert publish.differences(old, new) == [
        "b: missing before",
        "f.mid.auc: 0.9 -> 0.8",
        "f.mid.n: missing now",
    ]


def test_a_test_split_without_one_class_is_refused() -> None:
    features, trained, _ = eval_inputs.refs(RUN, ("early",))
    p = eval_inputs.predictions("early")
    only_fakes = type(p)(**{**p.__dict__, "label": np.ones_like(p.label)})
    with pytest.raises(DataError, match="early: the test split has no real pairs"):
        publish.metrics_document(
            RUN, PipelineConfig().evaluation, features, trained, {"early": only_fakes}
        )


def test_refs_round_trip_keeps_the_run_settings_but_todays_storage(tmp_path: Path) -> None:
    store = LocalStorage(str(tmp_path))
    layout = Layout()
    run_cfg = PipelineConfig.model_validate(
        {
            "storage": {"uri": "s3://old-bucket"},
            "training": {"epochs": 2},
            "evaluation": {"threshold": 0.4},
        }
    )
    features, trained, manifest = eval_inputs.refs(RUN)
    publish.save_refs(store, layout, RUN, run_cfg, features, trained, manifest)
    today = PipelineConfig.model_validate({"storage": {"uri": str(tmp_path)}})
    refs = publish.load_refs(store, layout, RUN, today)
    assert refs.run == RUN and refs.features == features and refs.trained == trained
    assert refs.manifest == manifest
    assert refs.config.training.epochs == 2  # how the run was trained
    assert refs.config.storage.uri == str(tmp_path)  # where the bucket is now
    assert refs.config.evaluation.threshold == 0.5  # how to evaluate now


def test_missing_or_foreign_refs_are_clear_errors(tmp_path: Path) -> None:
    store = LocalStorage(str(tmp_path))
    with pytest.raises(ObjectNotFound, match="refs.json: no such object; run 'r1' was never"):
        publish.load_refs(store, Layout(), "r1", PipelineConfig())
    store.write_bytes(Layout().refs("r2"), b'{"format_version": 7}')
    with pytest.raises(DataError, match="r2/refs.json: not a readable refs file"):
        publish.load_refs(store, Layout(), "r2", PipelineConfig())


def test_latest_run_is_the_newest_with_models_and_refs(tmp_path: Path) -> None:
    store = LocalStorage(str(tmp_path))
    layout = Layout()
    with pytest.raises(DataError, match="no trained models in the bucket"):
        publish.latest_run(store, layout)
    for run in ("20260101T000000Z", "20260102T000000Z", "20260103T000000Z"):
        store.write_bytes(layout.model("early", run), b"x")
    store.write_bytes(layout.checkpoint("mid", "20260104T000000Z", 1), b"x")  # no model.pt yet
    with pytest.raises(DataError, match="none was evaluated"):
        publish.latest_run(store, layout)
    for run in ("20260101T000000Z", "20260102T000000Z"):
        store.write_bytes(layout.refs(run), b"{}")
    assert publish.runs_with_models(store, layout) == [
        "20260101T000000Z",
        "20260102T000000Z",
        "20260103T000000Z",
    ]
    assert publish.latest_run(store, layout) == "20260102T000000Z"


def test_a_bad_log_line_is_named(tmp_path: Path) -> None:
    store = LocalStorage(str(tmp_path))
    store.write_bytes("logs/train-early.jsonl", b'{"epoch": 1}\n\n{"epoch": 2\n')
    with pytest.raises(DataError, match=r"train-early.jsonl, line 3: not JSON"):
        records.read_jsonl(store, "logs/train-early.jsonl")
    store.write_bytes("logs/ok.jsonl", b'{"epoch": 1}\n{"epoch": 2}\n')
    assert records.read_jsonl(store, "logs/ok.jsonl") == [{"epoch": 1}, {"epoch": 2}]


def test_emotion_vectors_are_read_without_pickle(tmp_path: Path) -> None:
    store = LocalStorage(str(tmp_path))
    buf = io.BytesIO()
    np.savez(
        buf,
        audio_emb=np.array([object()], dtype=object),
        image_emb=np.zeros(1),
        label=np.zeros(1),
        epoch=np.int64(1),
    )
    store.write_bytes("v.npz", buf.getvalue())
    with pytest.raises(DataError, match="v.npz: not a readable emotion-vector file"):
        publish.read_vectors(store, "v.npz")
    store.write_bytes("w.npz", eval_inputs.vectors_npz("late"))
    proj = publish.projection(publish.read_vectors(store, "w.npz"))
    assert proj.xy.shape == (60, 2) and set(proj.modality) == {"audio", "image"}
    assert proj.source == "validation split, best epoch 3"


def test_resolve_device() -> None:
    assert pick_device("cpu").type == "cpu"
    assert pick_device("auto").type in ("cpu", "cuda")


# --- the operating point fitted on validation ---------------------------------------------------


def test_metrics_json_holds_the_fixed_and_the_fitted_threshold(tmp_path: Path) -> None:
    cfg = PipelineConfig(storage=StorageConfig(uri=str(tmp_path)))
    store = LocalStorage(str(tmp_path))
    layout = Layout()
    eval_inputs.write_training_outputs(store, layout, RUN, ("early", "mid"))
    features, trained, _ = eval_inputs.refs(RUN, ("early", "mid"))
    preds = {f: eval_inputs.predictions(f) for f in ("early", "mid")}
    op = OperatingPoint(threshold=0.8, temperature=2.0, rule="fpr", target_fpr=0.05, n_val=40)
    ref = publish.write_evaluation(cfg, store, layout, RUN, features, trained, preds, {"mid": op})
    stored = store.read_bytes(ref.metrics_key)
    doc = json.loads(stored)
    mid, early = doc["fusions"]["mid"], doc["fusions"]["early"]

    assert mid["operating_point"] == op.as_dict()
    label = preds["mid"].label
    scores = calibrated_scores(preds["mid"].logit, 2.0)  # the test scores are the calibrated ones
    at = mid["metrics_at_operating_point"]
    assert set(at) == {*THRESHOLD_METRIC_NAMES, "confusion"}
    assert at["confusion"] == confusion(label, scores, 0.8)
    (tn, fp), (fn, tp) = at["confusion"]
    assert at["fpr"] == pytest.approx(fp / (fp + tn)) and at["tpr"] == pytest.approx(tp / (tp + fn))
    assert mid["confusion"]["threshold"] == confusion(label, scores, 0.5)  # fixed one kept
    assert at["confusion"] != mid["confusion"]["threshold"]
    uncalibrated = calculate_metrics(label, preds["mid"].score)
    assert mid["metrics"]["roc_auc"] == pytest.approx(uncalibrated["roc_auc"])  # monotonic
    assert mid["metrics"]["log_loss"] != pytest.approx(uncalibrated["log_loss"])
    assert mid["metrics"]["log_loss"] == pytest.approx(calculate_metrics(label, scores)["log_loss"])

    # a fusion without a point: the fixed threshold at temperature 1, so both sets agree
    assert early["operating_point"] == {
        "threshold": 0.5,
        "temperature": 1.0,
        "rule": "fixed",
        "target_fpr": None,
        "n_val": 0,
    }
    for name in ("accuracy", "balanced_accuracy", "precision", "recall", "f1", "mcc"):
        assert early["metrics_at_operating_point"][name] == early["metrics"][name]
    assert early["metrics_at_operating_point"]["confusion"] == early["confusion"]["threshold"]

    again = publish.write_evaluation(cfg, store, layout, RUN, features, trained, preds, {"mid": op})
    assert again.reproduced is True and store.read_bytes(ref.metrics_key) == stored


def test_predictions_csv_holds_each_pairs_calibrated_score_and_decision(tmp_path: Path) -> None:
    import csv

    cfg = PipelineConfig(storage=StorageConfig(uri=str(tmp_path)))
    store = LocalStorage(str(tmp_path))
    layout = Layout()
    eval_inputs.write_training_outputs(store, layout, RUN, ("early", "mid"))
    features, trained, _ = eval_inputs.refs(RUN, ("early", "mid"))
    preds = {f: eval_inputs.predictions(f) for f in ("early", "mid")}
    op = OperatingPoint(threshold=0.8, temperature=2.0, rule="fpr", target_fpr=0.05, n_val=40)
    publish.write_evaluation(cfg, store, layout, RUN, features, trained, preds, {"mid": op})

    text = store.read_bytes(layout.predictions(RUN)).decode()
    rows = list(csv.DictReader(io.StringIO(text)))
    assert list(rows[0]) == [
        "pair_id", "label", "family", "score_early", "decision_early", "score_mid", "decision_mid"
    ]  # fmt: skip
    assert [r["pair_id"] for r in rows] == list(preds["mid"].pair_id)
    mid = calibrated_scores(preds["mid"].logit, 2.0)
    early = calibrated_scores(preds["early"].logit, 1.0)  # no point: the fixed 0.5, T = 1
    for i, r in enumerate(rows):
        assert r["label"] == ("fake" if preds["mid"].label[i] == 1 else "real")
        assert float(r["score_mid"]) == pytest.approx(mid[i], abs=1e-12)
        assert r["decision_mid"] == ("fake" if mid[i] >= 0.8 else "real")
        assert float(r["score_early"]) == pytest.approx(early[i], abs=1e-12)
        assert r["decision_early"] == ("fake" if early[i] >= 0.5 else "real")
    assert {r["decision_mid"] for r in rows} == {"fake", "real"}


def test_an_ensemble_of_fusions_with_references_in_metrics_and_predictions(tmp_path: Path) -> None:
    import csv

    from tasks.evaluate.calibration import ensemble_scores, ensemble_threshold, rank_among

    cfg = PipelineConfig(storage=StorageConfig(uri=str(tmp_path)))
    store = LocalStorage(str(tmp_path))
    layout = Layout()
    fusions = ("early", "mid")
    eval_inputs.write_training_outputs(store, layout, RUN, fusions)
    features, trained, _ = eval_inputs.refs(RUN, fusions)
    preds = {f: eval_inputs.predictions(f) for f in fusions}
    # mid scored the pairs in another order: the ensemble must match them by pair id
    order = np.arange(len(preds["mid"].pair_id))[::-1]
    preds["mid"] = inference.Predictions(
        *(getattr(preds["mid"], name)[order] for name in inference.Predictions.__dataclass_fields__)
    )
    points = {
        "early": OperatingPoint(0.6, 1.0, "eer", None, 40, (0.1, 0.2, 0.3, 0.5)),
        "mid": OperatingPoint(0.7, 2.0, "eer", None, 40, (0.2, 0.4, 0.6, 0.8)),
    }
    publish.write_evaluation(cfg, store, layout, RUN, features, trained, preds, points)
    doc = json.loads(store.read_bytes(layout.metrics(RUN)))
    ens = doc["ensemble"]
    # by hand: each calibrated score's rank among its fusion's reference, in early's order
    ids = [str(p) for p in preds["early"].pair_id]
    mid_at = {str(p): i for i, p in enumerate(preds["mid"].pair_id)}
    early_s = calibrated_scores(preds["early"].logit, 1.0)
    mid_s = calibrated_scores(preds["mid"].logit, 2.0)[[mid_at[p] for p in ids]]
    ranks = (
        rank_among(points["early"].reference, early_s) + rank_among(points["mid"].reference, mid_s)
    ) / 2
    tie = 0.5 / (2 * 2 * 4)  # ties broken by the mean probability, at half the finest step
    want = (ranks + tie * (early_s + mid_s) / 2) / (1 + tie)
    assert ensemble_scores({"early": early_s, "mid": mid_s}, points) == pytest.approx(want)
    label = preds["early"].label
    assert ens["fusions"] == ["early", "mid"]
    # 0.6 is above all four of early's reals (rank 1), 0.7 above three of mid's (0.75)
    assert ens["threshold"] == pytest.approx(ensemble_threshold(points))
    assert ens["threshold"] == pytest.approx(((1.0 + 0.75) / 2 + tie * 0.65) / (1 + tie))
    assert ens["metrics"]["roc_auc"] == pytest.approx(calculate_metrics(label, want)["roc_auc"])
    assert set(ens["metrics"]) == {
        "roc_auc",
        "average_precision",
        "eer",
        "eer_threshold",
        "tpr_at_1pct_fpr",
    }
    (tn, fp), (fn, tp) = ens["metrics_at_operating_point"]["confusion"]
    assert tp + fp == int(np.sum(want >= ens["threshold"])) and tn + fp == int(np.sum(label == 0))
    assert set(ens["families"]) == set(doc["fusions"]["mid"]["families"])

    rows = list(csv.DictReader(io.StringIO(store.read_bytes(layout.predictions(RUN)).decode())))
    assert list(rows[0])[-2:] == ["score_ensemble", "decision_ensemble"]
    for i, r in enumerate(rows):
        assert r["pair_id"] == ids[i]
        assert float(r["score_ensemble"]) == pytest.approx(want[i], abs=1e-12)
        assert r["decision_ensemble"] == ("fake" if want[i] >= ens["threshold"] else "real")
    # one fusion without a reference (a model file from before it): no ensemble at all
    old = {**points, "mid": OperatingPoint(0.7, 2.0, "eer", None, 40)}
    publish.write_evaluation(cfg, store, layout, RUN, features, trained, preds, old)
    assert "ensemble" not in json.loads(store.read_bytes(layout.metrics(RUN)))
    assert "score_ensemble" not in store.read_bytes(layout.predictions(RUN)).decode()


TINY = {
    "data": {"n_mels": 16, "spec_frames": 16, "image_size": 32},
    "model": {"embedding_dim": 16},
}


def write_test_shard(store: LocalStorage, layout: Layout, n: int = 12) -> FeatureRef:
    rng = np.random.default_rng(0)
    label = np.arange(n) % 2
    prefix = layout.features("tinyhash")
    key = f"{prefix}test/shard-0000.npz"
    shards.write_shard(
        store,
        key,
        audio=rng.normal(0, 1, (n, 1, 16, 16)).astype(np.float16),
        image=(rng.uniform(0, 150, (n, 3, 32, 32)) + 100 * label[:, None, None, None]).astype(
            np.uint8
        ),
        label=label,
        pair_id=[f"test-{i}" for i in range(n)],
        family=["tts" if v else "real" for v in label],
    )
    counts = {"real": int(np.sum(label == 0)), "fake": int(np.sum(label == 1))}
    return FeatureRef(
        run=RUN,
        feature_hash="tinyhash",
        prefix=prefix,
        shards={"train": [], "val": [], "test": [key]},
        counts={"test": counts},
    )


def test_model_files_with_and_without_an_operating_point_evaluate(tmp_path: Path) -> None:
    cfg = PipelineConfig.model_validate({**TINY, "storage": {"uri": str(tmp_path)}})
    store = LocalStorage(str(tmp_path))
    layout = Layout()
    features = write_test_shard(store, layout)
    eval_inputs.write_training_outputs(store, layout, RUN, ("early", "late"))
    torch.manual_seed(0)
    op = OperatingPoint(threshold=0.52, temperature=0.5, rule="eer", target_fpr=None, n_val=8)
    trained = []
    for fusion in ("early", "late"):  # early: a model file from before operating points
        key = layout.model(fusion, RUN)
        checkpoint.save_model(store, key, build_model(fusion, cfg), cfg, fusion, 1, 0.7)
        if fusion == "late":  # what training adds: the point, plain JSON, in the metadata
            obj = torch.load(io.BytesIO(store.read_bytes(key)), weights_only=True)
            buf = io.BytesIO()
            torch.save({**obj, "operating_point": op.as_dict()}, buf)
            store.write_bytes(key, buf.getvalue())
        trained.append(
            TrainedRef(
                fusion=fusion, run=RUN, model_key=key, epochs=1, best_epoch=1, best_val_loss=0.7
            )
        )

    ref = publish.evaluate_run(cfg, store, layout, RUN, features, trained, None)
    doc = json.loads(store.read_bytes(ref.metrics_key))
    early, late = doc["fusions"]["early"], doc["fusions"]["late"]
    assert early["n"] == late["n"] == 12
    assert early["operating_point"]["rule"] == "fixed"
    assert early["operating_point"]["threshold"] == cfg.evaluation.threshold
    assert early["metrics_at_operating_point"]["confusion"] == early["confusion"]["threshold"]
    assert late["operating_point"] == op.as_dict()
    preds = publish.score_model(store, cfg.storage, layout.model("late", RUN), features, "cpu")
    scores = calibrated_scores(preds.logit, 0.5)
    assert late["metrics_at_operating_point"]["confusion"] == confusion(preds.label, scores, 0.52)
    assert late["metrics"]["brier"] == pytest.approx(
        calculate_metrics(preds.label, scores)["brier"]
    )

    key = layout.model("late", RUN)
    obj = torch.load(io.BytesIO(store.read_bytes(key)), weights_only=True)
    buf = io.BytesIO()
    torch.save({**obj, "operating_point": {"threshold": 0.5}}, buf)
    store.write_bytes(key, buf.getvalue())
    with pytest.raises(DataError, match=r"late/.*model.pt: unreadable operating point \(.*lacks"):
        publish.evaluate_run(cfg, store, layout, RUN, features, trained, None)
