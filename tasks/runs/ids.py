"""Run ids that survive a crash: the in-progress record at `Layout.in_progress()`.

A flow run writes `outputs/runs/in-progress.json` when it starts a new run id and deletes it when
the run completes. If the worker dies mid-run, the next flow run with the same settings finds the
record and takes over that run id, so training resumes from the checkpoints already in the bucket
instead of starting again: a failure loses no finished epoch.

The record also names the flow run that holds it (`flow_run_id`). While that flow run is live
(Running, Pending, Paused or Cancelling: a night still going, or a manual run), a second flow run
neither adopts its run id nor overwrites its record: it fails at once with `RunInProgress`. A flow
run that died is Crashed (Prefect's zombie detection) and its record is then adopted; a retry of
the holder itself (same flow run id) adopts it too. Whether a flow run is live is asked through
`live`, a callable the Prefect edge passes in (flows/steps.py), so this module knows no Prefect.

    start_run(store, layout, cfg, holder, live) -> RunRef   the run id and the config
                                                fingerprint, computed once per flow run and
                                                passed to later steps
    finish_run(store, layout, started, data_hash)   record the completed run, forget it as
                                                in progress
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime

from config.schema import PipelineConfig
from tasks.errors import DataError, ObjectNotFound, RunInProgress
from tasks.io import records
from tasks.io.layout import Layout, new_run_id
from tasks.io.storage import Storage
from tasks.runs import history

log = logging.getLogger(__name__)

# A flow run id -> the name of its state when that flow run is live (it may still be working on
# its run), else None (finished, failed, crashed, cancelled, or unknown to the API).
Liveness = Callable[[str], str | None]


class RunRef(history.Record):
    """The run a flow run works on, and the fingerprint of its settings (computed once)."""

    run: str
    config_hash: str  # history.config_fingerprint of the run's config
    resumed: bool = False  # True: an interrupted run with the same settings is taken over


def start_run(
    store: Storage,
    layout: Layout,
    cfg: PipelineConfig,
    holder: str | None = None,
    live: Liveness | None = None,
) -> RunRef:
    """The run to work on: run.name, else an interrupted run with the same settings, else new.
    `holder`: this flow run's id, written into the record; `live`: see `begin_run`."""
    fingerprint = history.config_fingerprint(cfg.model_dump(mode="json"))
    run, resumed = begin_run(store, layout, fingerprint, cfg.run.name, holder, live)
    return RunRef(run=run, config_hash=fingerprint, resumed=resumed)


def finish_run(store: Storage, layout: Layout, started: RunRef, data_hash: str) -> str:
    """Record the completed run (data hash, settings) and clear its in-progress record; returns
    the last-run record's key."""
    key = history.record_run(store, layout, started.run, data_hash, started.config_hash)
    end_run(store, layout, started.run)
    return key


def begin_run(
    store: Storage,
    layout: Layout,
    config_hash: str,
    explicit: str | None = None,
    holder: str | None = None,
    live: Liveness | None = None,
) -> tuple[str, bool]:
    """The run id to use and whether it resumes an interrupted run.

    `explicit` (run.name, or --run) always wins. Otherwise, when the record names another flow
    run than `holder` and `live` says it is live, `RunInProgress`; else an interrupted run with
    the same config fingerprint is resumed (the record then names `holder`); else a new
    timestamped id is recorded as in progress.
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
    if isinstance(record, dict):
        _refuse_if_held(store.uri(key), record, holder, live)
    now = datetime.now(UTC).isoformat()
    if isinstance(record, dict) and record.get("config_hash") == config_hash and record.get("run"):
        run = str(record["run"])
        log.info("resuming interrupted run %s (started %s)", run, record.get("started"))
        if holder is not None and record.get("flow_run_id") != holder:
            records.write_json(store, key, {**record, "flow_run_id": holder, "adopted": now})
        return run, True
    run = new_run_id()
    doc = {"run": run, "config_hash": config_hash, "started": now, "flow_run_id": holder}
    records.write_json(store, key, doc)
    return run, False


def _refuse_if_held(
    where: str, record: dict[str, object], holder: str | None, live: Liveness | None
) -> None:
    """`RunInProgress` when the record's flow run is another one and still live."""
    other = record.get("flow_run_id")
    if live is None or not isinstance(other, str) or not other or other == holder:
        return
    state = live(other)
    if state is not None:
        raise RunInProgress(
            f"{where}: run {record.get('run')} is held by flow run {other}, which is {state}; "
            "not adopting it or starting another run beside it (one night at a time: let it "
            "finish, or cancel it, then run again; if its worker died, Prefect's zombie "
            "detection marks it Crashed, or mark it so by hand)"
        )


def end_run(store: Storage, layout: Layout, run: str) -> None:
    """Forget the in-progress record of `run` (a newer run's record is left alone)."""
    key = layout.in_progress()
    try:
        record = records.read_json(store, key)
    except (ObjectNotFound, DataError):
        return
    if isinstance(record, dict) and record.get("run") == run:
        store.delete(key)
