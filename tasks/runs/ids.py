"""Run ids that survive a crash: the in-progress record at `Layout.in_progress()`.

A flow run writes `outputs/runs/in-progress.json` when it starts a new run id and deletes it when
the run completes. If the worker dies mid-run, the next flow run with the same settings finds the
record and takes over that run id, so training resumes from the checkpoints already in the bucket
instead of starting again: a failure loses no finished epoch.

    start_run(store, layout, cfg) -> RunRef     the run id and the config fingerprint, computed
                                                once per flow run and passed to later steps
    finish_run(store, layout, started, data_hash)   record the completed run, forget it as
                                                in progress
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from config.schema import PipelineConfig
from tasks.errors import DataError, ObjectNotFound
from tasks.io import records
from tasks.io.layout import Layout, new_run_id
from tasks.io.storage import Storage
from tasks.runs import history

log = logging.getLogger(__name__)


class RunRef(history.Record):
    """The run a flow run works on, and the fingerprint of its settings (computed once)."""

    run: str
    config_hash: str  # history.config_fingerprint of the run's config
    resumed: bool = False  # True: an interrupted run with the same settings is taken over


def start_run(store: Storage, layout: Layout, cfg: PipelineConfig) -> RunRef:
    """The run to work on: run.name, else an interrupted run with the same settings, else new."""
    fingerprint = history.config_fingerprint(cfg.model_dump(mode="json"))
    run, resumed = begin_run(store, layout, fingerprint, cfg.run.name)
    return RunRef(run=run, config_hash=fingerprint, resumed=resumed)


def finish_run(store: Storage, layout: Layout, started: RunRef, data_hash: str) -> str:
    """Record the completed run (data hash, settings) and clear its in-progress record; returns
    the last-run record's key."""
    key = history.record_run(store, layout, started.run, data_hash, started.config_hash)
    end_run(store, layout, started.run)
    return key


def begin_run(
    store: Storage, layout: Layout, config_hash: str, explicit: str | None = None
) -> tuple[str, bool]:
    """The run id to use and whether it resumes an interrupted run.

    `explicit` (run.name, or --run) always wins. Otherwise an interrupted run with the same config
    fingerprint is resumed; else a new timestamped id is recorded as in progress.
    """
    if explicit:
        return explicit, False
    key = layout.in_progress()
    try:
        record = records.read_json(store, key)
    except ObjectNotFound:
        record = None
    except DataError:
        log.warning("%s: unreadable run record, starting a new run", store.uri(key))
        record = None
    if isinstance(record, dict) and record.get("config_hash") == config_hash and record.get("run"):
        log.info("resuming interrupted run %s (started %s)", record["run"], record.get("started"))
        return str(record["run"]), True
    run = new_run_id()
    doc = {"run": run, "config_hash": config_hash, "started": datetime.now(UTC).isoformat()}
    records.write_json(store, key, doc)
    return run, False


def end_run(store: Storage, layout: Layout, run: str) -> None:
    """Forget the in-progress record of `run` (a newer run's record is left alone)."""
    key = layout.in_progress()
    try:
        record = records.read_json(store, key)
    except (ObjectNotFound, DataError):
        return
    if isinstance(record, dict) and record.get("run") == run:
        store.delete(key)
