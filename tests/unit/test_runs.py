"""Run ids survive a crash: an interrupted run is resumed by the next flow run with the same
settings, never by one with other settings, and a finished run is forgotten."""

from __future__ import annotations

import json
from pathlib import Path

from tasks.io.layout import Layout
from tasks.io.storage import LocalStorage
from tasks.runs.ids import add_report_section, begin_run, end_run, in_progress_key


def test_interrupted_run_is_resumed_only_with_the_same_settings(tmp_path: Path) -> None:
    store, layout = LocalStorage(str(tmp_path)), Layout()
    first, resumed = begin_run(store, layout, "cfg-a")
    assert not resumed
    assert json.loads(store.read_bytes(in_progress_key(layout)))["run"] == first
    # the worker died: the next flow run with the same settings takes the run over
    assert begin_run(store, layout, "cfg-a") == (first, True)
    # other settings: a new run, which becomes the one in progress
    other, resumed = begin_run(store, layout, "cfg-b")
    assert not resumed and json.loads(store.read_bytes(in_progress_key(layout)))["run"] == other


def test_explicit_name_wins_and_end_forgets_only_its_own_run(tmp_path: Path) -> None:
    store, layout = LocalStorage(str(tmp_path)), Layout()
    assert begin_run(store, layout, "cfg", explicit="nightly-1") == ("nightly-1", False)
    run, _ = begin_run(store, layout, "cfg")
    end_run(store, layout, "some-other-run")
    assert store.exists(in_progress_key(layout))
    end_run(store, layout, run)
    assert not store.exists(in_progress_key(layout))
    new, resumed = begin_run(store, layout, "cfg")
    assert not resumed


def test_unreadable_record_starts_a_new_run(tmp_path: Path) -> None:
    store, layout = LocalStorage(str(tmp_path)), Layout()
    store.write_bytes(in_progress_key(layout), b"{not json")
    _, resumed = begin_run(store, layout, "cfg")
    assert not resumed


def test_report_section_is_appended_inside_the_body(tmp_path: Path) -> None:
    store, layout = LocalStorage(str(tmp_path)), Layout()
    store.write_bytes(layout.report("r"), b"<html><body><h1>R</h1></body></html>")
    add_report_section(store, layout, "r", "Champions", ["mid: run r promoted: <first>"])
    page = store.read_bytes(layout.report("r")).decode()
    assert page.index("Champions") < page.index("</body>")
    assert "&lt;first&gt;" in page
