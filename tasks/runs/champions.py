"""Nightly decisions: promote a new model to its fusion's champion, skip a run on unchanged data.

Champion record, one per fusion, at `Layout.champion(fusion)`, i.e.
outputs/models/<fusion>/champion.json:

    {"format_version": 1, "fusion": "mid", "run": "20261125T020000Z", "auc": 0.93,
     "model_key": "outputs/models/mid/20261125T020000Z/model.pt", "split_hash": "3f2a...",
     "promoted_at": "2026-11-25T02:41:07+00:00", "previous": {"run": "...", "auc": 0.91}}

A candidate becomes the champion when there is none yet, or when its test AUC is not worse than
the champion's on the same test split (`split_hash`: the set of test pairs). AUCs measured on
different splits are not comparable, so then the champion stays, unless the caller has re-scored
the champion's model on the candidate's split and passes that score (`champion_auc_on_split`).
Every decision carries both scores and a one-line reason for the log and the report.

Last-run record at `Layout.last_run()` (outputs/manifests/last-run.json): the data hash of the
newest completed run's manifest and the fingerprint of its config. `skip_unchanged` tells a
scheduled run whether anything changed since.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from tasks.errors import CheckpointError, ObjectNotFound
from tasks.io.layout import Layout
from tasks.io.storage import Storage

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # of champion.json and last-run.json


class Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Champion(Record):
    """The model a fusion's users should deploy, and the score that put it there."""

    format_version: int = FORMAT_VERSION
    fusion: str
    run: str
    auc: float  # test ROC-AUC on the split below
    model_key: str  # outputs/models/<fusion>/<run>/model.pt
    split_hash: str  # `split_hash()` of the test pairs the AUC was measured on
    promoted_at: str  # ISO 8601 UTC
    previous: dict[str, Any] | None = None  # {"run", "auc"} of the champion it replaced


class ChampionDecision(Record):
    """Whether a run's model became its fusion's champion, with both scores and why."""

    fusion: str
    promoted: bool
    reason: str
    new_run: str
    new_auc: float
    champion_run: str | None = None  # the champion before the decision
    champion_auc: float | None = None  # its score: as recorded, or re-scored on the new split
    comparable: bool = True  # False: the scores come from different test splits

    def summary(self) -> str:
        """One line for the run log and the report."""
        verdict = "promoted" if self.promoted else "not promoted"
        return f"{self.fusion}: run {self.new_run} {verdict}: {self.reason}"


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


# --- champion ------------------------------------------------------------------------------------


def split_hash(pair_ids: Iterable[str]) -> str:
    """A stable name for a test split: SHA-256 of its sorted, distinct pair identifiers (e.g. the
    manifest's pair_id, or "audio_key|image_key"); the order they come in does not matter."""
    ids = sorted(set(pair_ids))
    if not ids:
        raise ValueError("split_hash: the test split holds no pairs")
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()


def decide(
    fusion: str,
    new_auc: float,
    new_run: str,
    new_split_hash: str,
    current: Champion | None,
    champion_auc_on_split: float | None = None,
) -> ChampionDecision:
    """Promote when there is no champion, or when `new_auc` is not worse than the champion's AUC
    on the same split: its recorded AUC when the split hashes match, else `champion_auc_on_split`
    (the champion re-scored on the new split) when given. Otherwise keep the champion."""
    _check_auc(new_auc, f"{fusion}: new test AUC")
    if current is None:
        return ChampionDecision(
            fusion=fusion, new_run=new_run, new_auc=new_auc, promoted=True,
            reason=f"first champion (AUC {new_auc:.4f})",
        )  # fmt: skip
    if current.fusion != fusion:
        raise ValueError(f"champion record of {current.fusion!r} used for fusion {fusion!r}")
    comparable = True
    if current.split_hash == new_split_hash:
        champion_auc, where = current.auc, "the same test split"
    elif champion_auc_on_split is not None:
        _check_auc(champion_auc_on_split, f"{fusion}: champion AUC re-scored on the new split")
        champion_auc, where = champion_auc_on_split, "the new test split (champion re-scored)"
    else:
        champion_auc, comparable = current.auc, False
    if comparable:
        promoted = new_auc >= champion_auc
        sign = ">=" if promoted else "<"
        reason = (
            f"AUC {new_auc:.4f} {sign} champion run {current.run}'s {champion_auc:.4f} on {where}"
        )
    else:
        promoted = False
        reason = (f"AUC {new_auc:.4f} not comparable with champion run {current.run}'s "
                  f"{champion_auc:.4f}: measured on another test split; re-score the champion "
                  "on this split to compare")  # fmt: skip
    return ChampionDecision(
        fusion=fusion, new_run=new_run, new_auc=new_auc, promoted=promoted, reason=reason,
        champion_run=current.run, champion_auc=champion_auc, comparable=comparable,
    )  # fmt: skip


def read_champion(store: Storage, layout: Layout, fusion: str) -> Champion | None:
    """The fusion's champion record, or None when it has none yet."""
    key = layout.champion(fusion)
    try:
        data = store.read_bytes(key)
    except ObjectNotFound:
        return None
    try:
        champion = Champion.model_validate(json.loads(data))
    except (json.JSONDecodeError, UnicodeDecodeError, ValidationError) as exc:
        raise CheckpointError(
            f"{store.uri(key)}: not a valid champion record ({_first_line(exc)}); "
            "fix or delete it to let the next run become champion"
        ) from exc
    if champion.format_version != FORMAT_VERSION:
        raise CheckpointError(
            f"{store.uri(key)}: champion format_version "
            f"{champion.format_version}, expected {FORMAT_VERSION}"
        )
    return champion


def update_champion(
    store: Storage,
    layout: Layout,
    fusion: str,
    *,
    run: str,
    auc: float,
    model_key: str,
    split_hash: str,
    champion_auc_on_split: float | None = None,
) -> ChampionDecision:
    """Read the champion, decide, write champion.json when the new model wins, log the decision."""
    current = read_champion(store, layout, fusion)
    decision = decide(fusion, auc, run, split_hash, current, champion_auc_on_split)
    if decision.promoted:
        if not store.exists(model_key):
            raise CheckpointError(f"{store.uri(model_key)}: model to promote does not exist")
        champion = Champion(
            fusion=fusion, run=run, auc=auc, model_key=model_key, split_hash=split_hash,
            promoted_at=_now(),
            previous=None if current is None else {"run": current.run, "auc": current.auc},
        )  # fmt: skip
        store.write_bytes(layout.champion(fusion), _json(champion), "application/json")
    log.info("champion %s", decision.summary())
    return decision


# --- skip unchanged ------------------------------------------------------------------------------


def config_fingerprint(config: Mapping[str, Any]) -> str:
    """SHA-256 of a config dump (`cfg.model_dump(mode="json")`) without `run.name`, which changes
    every night without changing what a run computes."""
    dump = json.loads(json.dumps(config))  # a deep copy with JSON types only
    dump.get("run", {}).pop("name", None)
    return hashlib.sha256(json.dumps(dump, sort_keys=True).encode()).hexdigest()


def read_last_run(store: Storage, layout: Layout) -> RunRecord | None:
    """The newest completed run's record, or None before the first one."""
    key = layout.last_run()
    try:
        data = store.read_bytes(key)
    except ObjectNotFound:
        return None
    try:
        return RunRecord.model_validate(json.loads(data))
    except (json.JSONDecodeError, UnicodeDecodeError, ValidationError) as exc:
        log.warning(
            "%s: unreadable last-run record (%s); treating the data as changed",
            store.uri(key),
            _first_line(exc),
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
    record = RunRecord(run=run, data_hash=data_hash, config_hash=config_hash, finished_at=_now())
    key = layout.last_run()
    store.write_bytes(key, _json(record), "application/json")
    return key


# --- helpers -------------------------------------------------------------------------------------


def _check_auc(value: float, what: str) -> None:
    if not isinstance(value, (int, float)) or math.isnan(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{what} must be a number in [0, 1], got {value!r}")


def _json(record: BaseModel) -> bytes:
    return (json.dumps(record.model_dump(mode="json"), indent=2) + "\n").encode()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
