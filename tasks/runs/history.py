"""What the newest completed run saw, and whether a scheduled run can skip because nothing changed.

Last-run record at `Layout.last_run()` (outputs/manifests/last-run.json): the data hash of the
newest completed run's manifest and the fingerprint of its config. `skip_unchanged` tells a
scheduled run whether anything changed since.

`split_hash` names a test split (the set of its pairs), so that AUCs measured on different splits
are never compared as if they were alike (tasks/runs/champions.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from tasks.data import manifest as manifests
from tasks.errors import DataError, ObjectNotFound
from tasks.io import records
from tasks.io.layout import Layout
from tasks.io.storage import Storage
from tasks.refs import ManifestRef

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # of last-run.json


class Record(BaseModel):
    """A small frozen record of the run bookkeeping (no unknown fields)."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class RunRecord(Record):
    """What the newest completed run saw: its data and its settings."""

    format_version: int = FORMAT_VERSION
    run: str
    data_hash: str  # ManifestRef.data_hash: every listed key + ETag
    config_hash: str  # `config_fingerprint()` of the run's config
    finished_at: str  # ISO 8601 UTC


class SkipDecision(Record):
    """Whether a scheduled run can skip training: same data and same settings as the last run."""

    skip: bool
    reason: str
    data_hash: str
    last_run: str | None = None


# --- splits and settings -------------------------------------------------------------------------


def split_hash(pair_ids: Iterable[str]) -> str:
    """A stable name for a test split: SHA-256 of its sorted, distinct pair identifiers (e.g. the
    manifest's pair_id, or "audio_key|image_key"); the order they come in does not matter."""
    ids = sorted(set(pair_ids))
    if not ids:
        raise ValueError("split_hash: the test split holds no pairs")
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()


def split_hash_of_test(store: Storage, manifest: ManifestRef) -> str:
    """`split_hash` of the test pairs of the run's manifest."""
    rows = manifests.read_manifest(store, manifest.key)
    return split_hash(r.pair_id for r in rows if r.split == "test")


def config_fingerprint(config: Mapping[str, Any]) -> str:
    """SHA-256 of a config dump (`cfg.model_dump(mode="json")`) without `run.name`, which changes
    every night without changing what a run computes."""
    dump = json.loads(json.dumps(config))  # a deep copy with JSON types only
    dump.get("run", {}).pop("name", None)
    return hashlib.sha256(json.dumps(dump, sort_keys=True).encode()).hexdigest()


# --- last run and skip unchanged -----------------------------------------------------------------


def read_last_run(store: Storage, layout: Layout) -> RunRecord | None:
    """The newest completed run's record, or None before the first one."""
    key = layout.last_run()
    try:
        return RunRecord.model_validate(records.read_json(store, key))
    except ObjectNotFound:
        return None
    except (DataError, ValidationError) as exc:
        log.warning(
            "%s: unreadable last-run record (%s); treating the data as changed",
            store.uri(key),
            first_line(exc),
        )
        return None


def skip_unchanged(
    store: Storage, layout: Layout, data_hash: str, config_hash: str
) -> SkipDecision:
    """Skip when the last completed run saw the same data (manifest data_hash) and settings."""
    last = read_last_run(store, layout)
    if last is None:
        return SkipDecision(skip=False, reason="no completed run recorded", data_hash=data_hash)
    same_data, same_config = last.data_hash == data_hash, last.config_hash == config_hash
    if same_data and same_config:
        reason = f"data and settings unchanged since run {last.run}"
    elif same_data:
        reason = f"settings changed since run {last.run} (data unchanged)"
    else:
        reason = f"data changed since run {last.run}"
    decision = SkipDecision(
        skip=same_data and same_config, reason=reason, data_hash=data_hash, last_run=last.run
    )
    log.info("%s: %s", "skip" if decision.skip else "run", reason)
    return decision


def record_run(store: Storage, layout: Layout, run: str, data_hash: str, config_hash: str) -> str:
    """Remember a completed run's data hash and config fingerprint; returns the record's key."""
    record = RunRecord(run=run, data_hash=data_hash, config_hash=config_hash, finished_at=utc_now())
    key = layout.last_run()
    records.write_json(store, key, record.model_dump(mode="json"))
    return key


# --- helpers of tasks/runs -----------------------------------------------------------------------


def utc_now() -> str:
    """Now, ISO 8601 UTC to the second: the time stamps of the run records."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def first_line(exc: Exception) -> str:
    """The first line of an error's message (pydantic's run over many lines), or its type."""
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
