"""The evaluate path on a tiny trained run in an S3 bucket (moto over HTTP): train-all-fusions'
evaluation step, then `python -m flows.evaluate` reproducing its metrics.json byte for byte, and
a model file carrying an arbitrary pickled object refused before any of it runs."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from prefect import flow

from config import load_config
from config.schema import PipelineConfig
from flows.common import run_cli
from flows.evaluate import evaluate_models, main, parser
from flows.steps import evaluate, publish_report
from models import build_model
from tasks.data import shards
from tasks.errors import CheckpointError
from tasks.evaluate import publish
from tasks.evaluate.calibration import OperatingPoint
from tasks.io.layout import Layout
from tasks.io.storage import open_storage
from tasks.refs import EvaluationRef, FeatureRef, ManifestRef, TrainedRef
from tasks.train import checkpoint
from tasks.train import fit as training

RUN = "20260101T000000Z"
EVIL_RUN = "20260102T000000Z"
SPLITS = {"train": (16, 1), "val": (8, 1), "test": (12, 2)}  # pairs, shards


def write_features(store, layout: Layout) -> FeatureRef:
    """Random tiny feature shards; fakes carry a brighter image so the models learn something."""
    rng = np.random.default_rng(0)
    prefix = layout.features("tinyhash")
    keys: dict[str, list[str]] = {}
    counts: dict[str, dict[str, int]] = {}
    for split, (n, n_shards) in SPLITS.items():
        label = np.arange(n) % 2
        audio = rng.normal(0, 1, (n, 1, 16, 16)).astype(np.float16)
        image = rng.uniform(0, 150, (n, 3, 32, 32)) + 100 * label[:, None, None, None]
        family = np.where(label == 1, np.array(["tts", "faceswap"])[np.arange(n) // 2 % 2], "real")
        keys[split] = []
        for s, part in enumerate(np.array_split(np.arange(n), n_shards)):
            key = f"{prefix}{split}/shard-{s:04d}.npz"
            shards.write_shard(
                store,
                key,
                audio=audio[part],
                image=image[part].astype(np.uint8),
                label=label[part],
                pair_id=[f"{split}-{i}" for i in part],
                family=list(family[part]),
            )
            keys[split].append(key)
        counts[split] = {"real": int(np.sum(label == 0)), "fake": int(np.sum(label == 1))}
    return FeatureRef(run=RUN, feature_hash="tinyhash", prefix=prefix, shards=keys, counts=counts)


@pytest.fixture
def run_bucket(s3_server, s3_bucket, tmp_path: Path):
    """A fresh bucket with the tiny feature shards, and a config file pointing at it."""
    raw = {
        "storage": {"uri": f"s3://{s3_bucket}", "endpoint_url": s3_server.endpoint_url},
        "data": {"n_mels": 16, "spec_frames": 16, "image_size": 32},
        "model": {"embedding_dim": 16},
        "training": {"epochs": 1, "batch_size": 4, "device": "cpu", "log_every": 1},
    }
    config_path = tmp_path / "tiny.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    cfg = load_config(config_path)
    store = open_storage(cfg.storage)
    layout = Layout.from_config(cfg.storage)
    features = write_features(store, layout)
    manifest = ManifestRef(
        run=RUN,
        key=layout.manifest(RUN),
        uri=store.uri(layout.manifest(RUN)),
        n_pairs=36,
        counts=features.counts,
        data_hash="tiny",
    )
    return cfg, config_path, store, layout, features, manifest


@flow(name="evaluation-step-test")
def evaluation_step(
    cfg: PipelineConfig, features: FeatureRef, trained: list[TrainedRef], manifest: ManifestRef
) -> EvaluationRef:
    """What train-all-fusions ends with (without the champions: this run has none)."""
    evaluation = evaluate(cfg, features, trained, RUN, manifest)
    publish_report(cfg, features, trained, evaluation, manifest, None)
    return evaluation


@pytest.mark.slow
def test_evaluate_flow_reproduces_the_run_metrics_exactly(prefect_harness, run_bucket) -> None:
    cfg, config_path, store, layout, features, manifest = run_bucket
    # a finished tiny run: the three fusions, one epoch each
    trained = [
        training.fit(store, layout, cfg, features, f, RUN, read_memory=lambda: 30.0)
        for f in cfg.training.fusions
    ]
    # late's model file carries an operating point fitted on validation; the others have none
    point = OperatingPoint(threshold=0.55, temperature=1.7, rule="eer", target_fpr=None, n_val=8)
    late_key = next(t.model_key for t in trained if t.fusion == "late")
    obj = torch.load(io.BytesIO(store.read_bytes(late_key)), weights_only=True)
    obj.setdefault("operating_point", point.as_dict())
    point = OperatingPoint.from_dict(obj["operating_point"])  # training may have fitted its own
    buf = io.BytesIO()
    torch.save(obj, buf)
    store.write_bytes(late_key, buf.getvalue())

    ref = evaluation_step(cfg, features, trained, manifest)
    assert sorted(ref.metrics) == ["early", "late", "mid"]
    assert len(ref.plot_keys) == 19 and ref.reproduced is None
    first = store.read_bytes(layout.metrics(RUN))
    first_report = store.read_bytes(layout.report(RUN))
    assert b'"n": 12' in first  # every test pair of both shards was scored
    doc = json.loads(first)
    assert doc["fusions"]["late"]["operating_point"] == point.as_dict()
    for fusion in ("early", "mid", "late"):
        assert "metrics_at_operating_point" in doc["fusions"][fusion]
    assert b'<section id="operating-point">' in first_report

    # `python -m flows.evaluate --config tiny.yaml` (default run: the newest with models)
    again = main(parser().parse_args(["--config", str(config_path)]))
    assert again.run == RUN and again.reproduced is True
    assert store.read_bytes(layout.metrics(RUN)) == first
    assert again.metrics == ref.metrics
    assert store.read_bytes(layout.report(RUN)) != first_report  # rewritten (new time stamp)


class _Payload:
    """Unpickling this runs code: it writes its marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


def test_a_model_file_with_a_pickled_object_is_refused(
    prefect_harness, run_bucket, tmp_path: Path
) -> None:
    cfg, config_path, store, layout, features, manifest = run_bucket
    marker = tmp_path / "ran"
    model = build_model("mid", cfg)
    buf = io.BytesIO()
    torch.save(
        {
            "format_version": checkpoint.FORMAT_VERSION,
            "fusion": "mid",
            "state_dict": model.state_dict(),
            "config": cfg.model_dump(mode="json"),
            "epoch": 1,
            "val_loss": 0.7,
            "extra": _Payload(marker),
        },
        buf,
    )
    evil = buf.getvalue()
    torch.load(io.BytesIO(evil), weights_only=False)  # the payload is live: unsafe loading runs it
    assert marker.read_text() == "code ran"
    marker.unlink()

    key = layout.model("mid", EVIL_RUN)
    store.write_bytes(key, evil)
    bad = TrainedRef(
        fusion="mid", run=EVIL_RUN, model_key=key, epochs=1, best_epoch=1, best_val_loss=0.7
    )
    publish.save_refs(store, layout, EVIL_RUN, cfg, features, [bad], manifest)
    with pytest.raises(CheckpointError, match=rf"{EVIL_RUN}/model.pt: not a safe torch file"):
        evaluate_models(config_path=str(config_path), run=EVIL_RUN)
    assert not marker.exists()
    assert not store.exists(layout.metrics(EVIL_RUN))


def test_an_unknown_run_fails_with_a_clear_message(prefect_harness, run_bucket, capsys) -> None:
    _, config_path, *_ = run_bucket
    assert run_cli(main, parser(), ["--config", str(config_path), "--run", "nope"]) == 2
    err = capsys.readouterr().err
    assert "outputs/reports/nope/refs.json: no such object; run 'nope' was never evaluated" in err
