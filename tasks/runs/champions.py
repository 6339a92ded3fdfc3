"""Champions: which model of each fusion users should deploy, and every run's decision about it.

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

    promote_all(store, layout, cfg, features, trained, metrics, test_split_hash)
        one decision per trained fusion (the champion re-scored on this split when it was scored
        on another), written to the run's `Layout.champion_decisions(run)` (champions.json)
    read_decisions(store, layout, run)   those decisions, for a re-evaluation's report
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import TypeAdapter, ValidationError

from config.schema import PipelineConfig
from tasks.errors import CheckpointError, DataError, ObjectNotFound
from tasks.evaluate import inference, publish
from tasks.evaluate.metrics import calculate_metrics
from tasks.io import records
from tasks.io.layout import Layout
from tasks.io.storage import Storage
from tasks.refs import FeatureRef, TrainedRef
from tasks.runs.history import Record, first_line, utc_now

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # of champion.json


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


# --- champion ------------------------------------------------------------------------------------


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
        champion = Champion.model_validate(records.read_json(store, key))
    except ObjectNotFound:
        return None
    except (DataError, ValidationError) as exc:
        raise CheckpointError(
            f"{store.uri(key)}: not a valid champion record ({first_line(exc)}); "
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
            promoted_at=utc_now(),
            previous=None if current is None else {"run": current.run, "auc": current.auc},
        )  # fmt: skip
        records.write_json(store, layout.champion(fusion), champion.model_dump(mode="json"))
    log.info("champion %s", decision.summary())
    return decision


def promote_all(
    store: Storage,
    layout: Layout,
    cfg: PipelineConfig,
    features: FeatureRef,
    trained: Sequence[TrainedRef],
    metrics: Mapping[str, Mapping[str, float]],
    test_split_hash: str,
) -> list[ChampionDecision]:
    """Decide each trained fusion's champion from its test AUC (`metrics[fusion]["roc_auc"]`) and
    write the run's decisions. A champion scored on another test split (the data grew) is first
    re-scored on this run's split from its model file, so the two AUCs compare like with like."""
    decisions = []
    for ref in trained:
        current = read_champion(store, layout, ref.fusion)
        rescored = None
        if (
            current is not None
            and current.split_hash != test_split_hash
            and store.exists(current.model_key)
        ):
            rescored = rescore(store, cfg, current, features)
        decision = update_champion(
            store, layout, ref.fusion, run=ref.run, auc=metrics[ref.fusion]["roc_auc"],
            model_key=ref.model_key, split_hash=test_split_hash, champion_auc_on_split=rescored,
        )  # fmt: skip
        decisions.append(decision)
    if decisions:
        write_decisions(store, layout, decisions[0].new_run, decisions)
    return decisions


def rescore(store: Storage, cfg: PipelineConfig, current: Champion, features: FeatureRef) -> float:
    """The champion's test AUC on the split of `features`, from its model file."""
    device = inference.pick_device(cfg.evaluation.device)
    preds = publish.score_model(store, cfg.storage, current.model_key, features, device)
    auc = calculate_metrics(preds.label, preds.score)["roc_auc"]
    log.info(
        "%s: champion %s re-scored on this split: AUC %.4f (recorded %.4f on its own)",
        current.fusion, current.run, auc, current.auc,
    )  # fmt: skip
    return auc


_DECISIONS = TypeAdapter(list[ChampionDecision])


def write_decisions(
    store: Storage, layout: Layout, run: str, decisions: Sequence[ChampionDecision]
) -> str:
    """The run's champion decisions at `Layout.champion_decisions(run)`; returns the key."""
    key = layout.champion_decisions(run)
    records.write_json(store, key, [d.model_dump(mode="json") for d in decisions])
    return key


def read_decisions(store: Storage, layout: Layout, run: str) -> list[ChampionDecision] | None:
    """The run's champion decisions, or None when the run made none (e.g. only re-evaluated)."""
    key = layout.champion_decisions(run)
    try:
        return _DECISIONS.validate_python(records.read_json(store, key))
    except ObjectNotFound:
        return None
    except (DataError, ValidationError) as exc:
        raise DataError(
            f"{store.uri(key)}: not a readable list of champion decisions ({first_line(exc)})"
        ) from exc


# --- helpers -------------------------------------------------------------------------------------


def _check_auc(value: float, what: str) -> None:
    if not isinstance(value, (int, float)) or math.isnan(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{what} must be a number in [0, 1], got {value!r}")
