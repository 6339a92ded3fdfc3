"""Run ids survive a crash: an interrupted run is resumed by the next flow run with the same
settings, never by one with other settings, and a finished run is forgotten."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from config.schema import PipelineConfig
from tasks.errors import RunInProgress
from tasks.io.layout import Layout
from tasks.io.storage import LocalStorage
from tasks.runs import history
from tasks.runs.ids import begin_run, end_run, finish_run, start_run


def test_interrupted_run_is_resumed_only_with_the_same_settings(tmp_path: Path) -> None:
    store, layout = LocalStorage(str(tmp_path)), Layout()
    first, resumed = begin_run(store, layout, "cfg-a")
    assert not resumed
    assert json.loads(store.read_bytes(layout.in_progress()))["run"] == first
    # the worker died: the next flow run with the same settings takes the run over
    assert begin_run(store, layout, "cfg-a") == (first, True)
    # other settings: a new run, which becomes the one in progress
    other, resumed = begin_run(store, layout, "cfg-b")
    assert not resumed and json.loads(store.read_bytes(layout.in_progress()))["run"] == other


def test_explicit_name_wins_and_end_forgets_only_its_own_run(tmp_path: Path) -> None:
    store, layout = LocalStorage(str(tmp_path)), Layout()
    assert begin_run(store, layout, "cfg", explicit="nightly-1") == ("nightly-1", False)
    run, _ = begin_run(store, layout, "cfg")
    end_run(store, layout, "some-other-run")
    assert store.exists(layout.in_progress())
    end_run(store, layout, run)
    assert not store.exists(layout.in_progress())
    new, resumed = begin_run(store, layout, "cfg")
    assert not resumed


def test_unreadable_record_starts_a_new_run(tmp_path: Path) -> None:
    store, layout = LocalStorage(str(tmp_path)), Layout()
    store.write_bytes(layout.in_progress(), b"{not json")
    _, resumed = begin_run(store, layout, "cfg")
    assert not resumed


def test_start_computes_the_fingerprint_once_and_finish_records_the_run(tmp_path: Path) -> None:
    store, layout = LocalStorage(str(tmp_path)), Layout()
    cfg = PipelineConfig.model_validate({"storage": {"uri": str(tmp_path)}})
    started = start_run(store, layout, cfg)
    assert started.config_hash == history.config_fingerprint(cfg.model_dump(mode="json"))
    assert not started.resumed and store.exists(layout.in_progress())
    assert start_run(store, layout, cfg).run == started.run  # interrupted: taken over
    assert finish_run(store, layout, started, "data-a") == layout.last_run()
    assert not store.exists(layout.in_progress())
    last = history.read_last_run(store, layout)
    assert last is not None and (last.run, last.data_hash) == (started.run, "data-a")
    assert last.config_hash == started.config_hash


def test_a_live_holder_keeps_its_run_and_a_dead_ones_is_adopted(tmp_path: Path) -> None:
    """The record names its flow run; `live` (Prefect's view, faked here) decides adoption."""
    store, layout = LocalStorage(str(tmp_path)), Layout()
    states = {"night-1": "Running"}

    def live(flow_run_id: str) -> str | None:
        return states.get(flow_run_id)

    run, resumed = begin_run(store, layout, "cfg", holder="night-1", live=live)
    assert not resumed
    assert json.loads(store.read_bytes(layout.in_progress()))["flow_run_id"] == "night-1"
    assert begin_run(store, layout, "cfg", holder="night-1", live=live) == (run, True)  # retry
    for config in ("cfg", "other-cfg"):  # neither adopted nor replaced while night-1 lives
        with pytest.raises(RunInProgress, match=f"run {run} is held by flow run night-1"):
            begin_run(store, layout, config, holder="night-2", live=live)
    assert json.loads(store.read_bytes(layout.in_progress()))["flow_run_id"] == "night-1"
    states.pop("night-1")  # crashed: no longer live
    assert begin_run(store, layout, "cfg", holder="night-2", live=live) == (run, True)
    assert json.loads(store.read_bytes(layout.in_progress()))["flow_run_id"] == "night-2"
    states["night-2"] = "Running"
    with pytest.raises(RunInProgress, match="held by flow run night-2"):
        begin_run(store, layout, "cfg", holder="night-3", live=live)
