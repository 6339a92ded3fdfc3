"""Fan-out: train each fusion as its own `train-fusion` deployment run, so every worker on the
pool can take one (`training.fan_out: true`).

    trained = train_on_workers(cfg, config_path, overrides, run)   # inside train-all-fusions

One flow run per fusion is created on the `train-fusion/fan-out` deployment (prefect.yaml) with
the parent's config path, overrides and run id, linked to the parent as a subflow; then the parent
waits for all of them. Results are not passed through Prefect (a result store both workers can
read would be one more thing to run): each child writes its model and epoch log to the bucket,
and the parent reads its `TrainedRef` back from there.

A worker running the parent holds one of its slots while it waits: give the pool at least two
workers (or a worker without `--limit 1`), else the children never start.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from typing import Any

from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment

from config.schema import PipelineConfig
from tasks.errors import CheckpointError, DetectorError, ObjectNotFound
from tasks.io.layout import Layout
from tasks.io.storage import Storage, open_storage
from tasks.refs import TrainedRef

log = logging.getLogger(__name__)

TRAIN_FUSION_DEPLOYMENT = "train-fusion/fan-out"  # <flow name>/<deployment name> in prefect.yaml


class FanOutError(DetectorError):
    """A fanned-out training run did not complete (failed, crashed, cancelled or timed out)."""


def train_on_workers(
    cfg: PipelineConfig,
    config_path: str,
    overrides: Sequence[str],
    run: str,
    *,
    deployment: str = TRAIN_FUSION_DEPLOYMENT,
    timeout_s: float | None = None,
    poll_s: float = 5.0,
) -> list[TrainedRef]:
    """Run every `cfg.training.fusions` as a `deployment` flow run, wait for all of them, and
    return their `TrainedRef`s (in the configured order) as read from the bucket."""
    started: dict[str, Any] = {}
    for fusion in cfg.training.fusions:
        flow_run: FlowRun = run_deployment(  # type: ignore[assignment]  # sync call: a FlowRun
            deployment,
            parameters={"config_path": config_path, "overrides": list(overrides),
                        "fusion": fusion, "run": run},
            flow_run_name=f"{run}-{fusion}",
            tags=["fan-out", f"run-{run}"],
            timeout=0,  # create now, wait for all below
        )  # fmt: skip
        log.info("%s: started %s run %r (%s)", fusion, deployment, flow_run.name, flow_run.id)
        started[fusion] = flow_run
    finished = wait_for_runs(started, timeout_s, poll_s)
    problems = [
        f"{fusion}: run {fr.name!r} ({fr.id}) ended {fr.state_name or 'without a state'}"
        + (f": {fr.state.message}" if fr.state and fr.state.message else "")
        for fusion, fr in finished.items()
        if not (fr.state and fr.state.is_completed())
    ]
    if problems:
        raise FanOutError(
            f"{deployment}: {len(problems)} of {len(finished)} fusion runs did not "
            "complete:\n" + "\n".join(problems)
        )
    store = open_storage(cfg.storage)
    layout = Layout.from_config(cfg.storage)
    return [trained_ref_from_bucket(store, layout, fusion, run) for fusion in cfg.training.fusions]


def wait_for_runs(
    flow_runs: dict[str, Any], timeout_s: float | None, poll_s: float = 5.0
) -> dict[str, Any]:
    """Poll the API until every flow run is in a final state; `FanOutError` at the timeout."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    pending = dict(flow_runs)
    done: dict[str, Any] = {}
    with get_client(sync_client=True) as client:
        while pending:
            for fusion, fr in list(pending.items()):
                fr = client.read_flow_run(fr.id)
                if fr.state and fr.state.is_final():
                    log.info("%s: run %r %s", fusion, fr.name, fr.state_name)
                    done[fusion] = fr
                    del pending[fusion]
            if not pending:
                break
            if deadline is not None and time.monotonic() >= deadline:
                waiting = ", ".join(f"{f} ({fr.id}, {fr.state_name})" for f, fr in pending.items())
                raise FanOutError(f"fusion runs not finished after {timeout_s:.0f} s: {waiting}")
            time.sleep(poll_s)
    return {fusion: done[fusion] for fusion in flow_runs}


def trained_ref_from_bucket(store: Storage, layout: Layout, fusion: str, run: str) -> TrainedRef:
    """The `TrainedRef` a `train-fusion` run left behind: its model file must exist; epochs and
    the best epoch come from its epoch log (one JSON line per finished epoch)."""
    model_key, log_key = layout.model(fusion, run), layout.epoch_log(fusion, run)
    try:
        lines = store.read_bytes(log_key).decode("utf-8").splitlines()
    except ObjectNotFound as exc:
        raise CheckpointError(
            f"{store.uri(log_key)}: {fusion} run {run} left no epoch log"
        ) from exc
    if not any(line.strip() for line in lines):
        raise CheckpointError(f"{store.uri(log_key)}: {fusion} run {run} logged no epoch")
    try:
        rows = [json.loads(line) for line in lines if line.strip()]
        epochs = max(int(r["epoch"]) for r in rows)
        best = min(rows, key=lambda r: (float(r["val_loss"]), int(r["epoch"])))
    except (ValueError, KeyError, TypeError) as exc:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{store.uri(log_key)}: unreadable epoch log ({exc})") from exc
    if not store.exists(model_key):
        raise CheckpointError(
            f"{store.uri(model_key)}: {fusion} run {run} completed without a model"
        )
    return TrainedRef(
        fusion=fusion,
        run=run,
        model_key=model_key,
        epochs=epochs,
        best_epoch=int(best["epoch"]),
        best_val_loss=float(best["val_loss"]),
    )
