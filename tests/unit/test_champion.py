"""Nightly decisions: champion promotion on the same split (tasks/runs/champions.py), skip on
unchanged data and settings (tasks/runs/history.py)."""

from __future__ import annotations

import json
import logging

import pytest

from config.load import validate_config
from config.schema import StorageConfig
from tasks.errors import CheckpointError, DataError
from tasks.io.layout import Layout
from tasks.io.storage import LocalStorage, open_storage
from tasks.refs import FeatureRef, TrainedRef
from tasks.runs import champions as champion
from tasks.runs import history

SPLIT = history.split_hash(["p1", "p2", "p3"])
OTHER_SPLIT = history.split_hash(["p1", "p2", "p4"])


def model(store: LocalStorage, fusion: str, run: str) -> str:
    key = Layout().model(fusion, run)
    store.write_bytes(key, b"weights")
    return key


def promote(store, fusion="mid", run="r1", auc=0.8, split=SPLIT, rescored=None):
    return champion.update_champion(
        store, Layout(), fusion, run=run, auc=auc, model_key=model(store, fusion, run),
        split_hash=split, champion_auc_on_split=rescored,
    )  # fmt: skip


@pytest.fixture
def store(tmp_path) -> LocalStorage:
    return LocalStorage(str(tmp_path))


def test_split_hash_ignores_order_and_duplicates():
    assert history.split_hash(["b", "a", "a"]) == history.split_hash(["a", "b"])
    assert history.split_hash(["a", "b"]) != history.split_hash(["a", "c"])
    with pytest.raises(ValueError, match="no pairs"):
        history.split_hash([])


def test_first_model_becomes_champion(store):
    decision = promote(store, auc=0.8)
    assert decision.promoted and decision.champion_auc is None
    record = json.loads(store.read_bytes(Layout().champion("mid")))
    assert record["run"] == "r1" and record["auc"] == 0.8 and record["split_hash"] == SPLIT
    assert record["model_key"] == "outputs/models/mid/r1/model.pt" and record["previous"] is None


def test_better_or_equal_model_on_same_split_is_promoted(store, caplog):
    promote(store, run="r1", auc=0.80)
    with caplog.at_level(logging.INFO, logger="tasks.runs.champions"):
        equal = promote(store, run="r2", auc=0.80)
    assert equal.promoted and equal.champion_auc == 0.80 and equal.champion_run == "r1"
    assert "r2" in caplog.text and "0.8000 >= champion run r1's 0.8000" in caplog.text
    better = promote(store, run="r3", auc=0.90)
    assert better.promoted
    record = champion.read_champion(store, Layout(), "mid")
    assert record is not None and record.run == "r3"
    assert record.previous == {"run": "r2", "auc": 0.80}


def test_worse_model_on_same_split_is_not_promoted(store):
    promote(store, run="r1", auc=0.90)
    decision = promote(store, run="r2", auc=0.85)
    assert not decision.promoted and decision.comparable
    assert (decision.new_auc, decision.champion_auc) == (0.85, 0.90)
    assert "mid: run r2 not promoted" in decision.summary() and "0.8500 < " in decision.summary()
    assert champion.read_champion(store, Layout(), "mid").run == "r1"


def test_other_split_needs_a_rescored_champion(store):
    promote(store, run="r1", auc=0.70)
    kept = promote(store, run="r2", auc=0.95, split=OTHER_SPLIT)
    assert not kept.promoted and not kept.comparable and kept.champion_auc == 0.70
    assert "another test split" in kept.reason
    assert champion.read_champion(store, Layout(), "mid").run == "r1"
    # The champion re-scored on the new split: 0.96 beats the candidate's 0.95.
    assert not promote(store, run="r3", auc=0.95, split=OTHER_SPLIT, rescored=0.96).promoted
    won = promote(store, run="r4", auc=0.95, split=OTHER_SPLIT, rescored=0.90)
    assert won.promoted and won.champion_auc == 0.90 and "re-scored" in won.reason
    assert champion.read_champion(store, Layout(), "mid").split_hash == OTHER_SPLIT


def test_fusions_have_separate_champions(store):
    promote(store, fusion="early", run="r1", auc=0.9)
    assert promote(store, fusion="late", run="r1", auc=0.6).promoted
    assert champion.read_champion(store, Layout(), "mid") is None


@pytest.mark.parametrize("bad", [float("nan"), -0.1, 1.5])
def test_invalid_auc_is_refused(store, bad):
    with pytest.raises(ValueError, match="mid: new test AUC"):
        promote(store, auc=bad)


def test_missing_model_is_not_promoted(store):
    with pytest.raises(CheckpointError, match="model to promote does not exist"):
        champion.update_champion(
            store,
            Layout(),
            "mid",
            run="r1",
            auc=0.9,
            model_key="outputs/models/mid/r1/model.pt",
            split_hash=SPLIT,
        )
    assert not store.exists(Layout().champion("mid"))


def test_corrupt_champion_record_names_the_file(store):
    store.write_bytes(Layout().champion("mid"), b"{not json")
    with pytest.raises(CheckpointError, match=r"models/mid/champion.json: not a valid champion"):
        promote(store)


def cfg_dump(**training):
    return validate_config({"run": {"name": "n1"}, "training": training}).model_dump(mode="json")


def test_skip_only_when_data_and_settings_are_unchanged(store):
    layout = Layout()
    config_hash = history.config_fingerprint(cfg_dump(epochs=2))
    first = history.skip_unchanged(store, layout, "data-a", config_hash)
    assert not first.skip and first.last_run is None
    history.record_run(store, layout, "r1", "data-a", config_hash)

    same = history.skip_unchanged(store, layout, "data-a", config_hash)
    assert same.skip and same.last_run == "r1" and "unchanged since run r1" in same.reason
    assert not history.skip_unchanged(store, layout, "data-b", config_hash).skip
    other_cfg = history.config_fingerprint(cfg_dump(epochs=3))
    changed = history.skip_unchanged(store, layout, "data-a", other_cfg)
    assert not changed.skip and "settings changed" in changed.reason


def test_config_fingerprint_ignores_the_run_name():
    a = cfg_dump(epochs=2)
    b = json.loads(json.dumps(a))
    b["run"]["name"] = "another-night"
    assert history.config_fingerprint(a) == history.config_fingerprint(b)
    assert a["run"]["name"] == "n1"  # the caller's dump is not modified


def test_unreadable_last_run_means_changed(store):
    store.write_bytes(Layout().last_run(), b"garbage")
    decision = history.skip_unchanged(store, Layout(), "data-a", "cfg")
    assert not decision.skip and decision.reason == "no completed run recorded"


def test_champion_over_s3(s3_server, s3_bucket):
    store = open_storage(
        StorageConfig(uri=f"s3://{s3_bucket}", endpoint_url=s3_server.endpoint_url)
    )
    key = Layout().model("late", "r1")
    store.write_bytes(key, b"weights")
    first = champion.update_champion(
        store, Layout(), "late", run="r1", auc=0.7, model_key=key, split_hash=SPLIT
    )
    second = champion.update_champion(
        store, Layout(), "late", run="r1", auc=0.6, model_key=key, split_hash=SPLIT
    )
    assert first.promoted and not second.promoted
    assert champion.read_champion(store, Layout(), "late").auc == 0.7
    history.record_run(store, Layout(), "r1", "data-a", "cfg")
    assert history.skip_unchanged(store, Layout(), "data-a", "cfg").skip


def trained_ref(store: LocalStorage, fusion: str, run: str) -> TrainedRef:
    return TrainedRef(
        fusion=fusion, run=run, model_key=model(store, fusion, run),
        epochs=1, best_epoch=1, best_val_loss=0.5,
    )  # fmt: skip


def test_promote_all_decides_every_fusion_and_writes_the_run_decisions(store):
    cfg = validate_config({"storage": {"uri": str(store.root)}})
    features = FeatureRef(
        run="r2", feature_hash="h", prefix="outputs/cache/features/h/", shards={}, counts={}
    )
    layout = Layout()
    promote(store, fusion="mid", run="r1", auc=0.9, split=OTHER_SPLIT)
    # mid's champion was scored on another split and its model file is gone: not re-scored
    store.delete(layout.model("mid", "r1"))
    trained = [trained_ref(store, "early", "r2"), trained_ref(store, "mid", "r2")]
    metrics = {"early": {"roc_auc": 0.7}, "mid": {"roc_auc": 0.95}}

    decisions = champion.promote_all(store, layout, cfg, features, trained, metrics, SPLIT)

    assert [(d.fusion, d.promoted) for d in decisions] == [("early", True), ("mid", False)]
    assert not decisions[1].comparable
    assert champion.read_champion(store, layout, "early").run == "r2"
    assert champion.read_champion(store, layout, "mid").run == "r1"
    assert champion.read_decisions(store, layout, "r2") == decisions
    assert champion.read_decisions(store, layout, "r1") is None


def test_unreadable_decisions_name_the_file(store):
    store.write_bytes(Layout().champion_decisions("r1"), b'[{"fusion": 1}]')
    with pytest.raises(DataError, match=r"r1/champions.json: not a readable list"):
        champion.read_decisions(store, Layout(), "r1")
