"""Fan-out: train each fusion as its own `train-fusion` deployment run, so every worker on the
pool can take one (`training.fan_out: true`).

    trained = train_on_workers(cfg, config_path, overrides, run)   # inside train-all-fusions

One flow run per fusion is created on the `train-fusion/fan-out` deployment (prefect.yaml) with
the parent's config path, overrides and run id, linked to the parent as a subflow; then the parent
waits for all of them and takes each child's result: the `TrainedRef` its `fit` returned, which
`fit` also wrote to `outputs/models/<fusion>/<run>/trained.json` (`Layout.trained`).

Why the result travels through the bucket and not as a Prefect result: a child's return value
would have to be persisted in a result store that the worker running the parent can read, and the
children run on other machines, so that is one more shared service to run and secure. The bucket
is already shared by every worker, and the record sits next to the model it points to.

A worker running the parent holds one of its slots while it waits: give the pool at least two
workers (or a worker without `--limit 1`), else the children never start.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment
from pydantic import ValidationError

from config.schema import PipelineConfig
from tasks.errors import CheckpointError, DataError, DetectorError, ObjectNotFound
from tasks.io import records
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
    return their `TrainedRef`s (in the configured order) as each child recorded it in the bucket."""
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
    """The `TrainedRef` a `train-fusion` run of `fusion` and `run` left at `layout.trained`; its
    model file must exist. A missing or invalid record is a `CheckpointError` naming its key."""
    key = layout.trained(fusion, run)
    where = store.uri(key)
    try:
        doc = records.read_json(store, key)
    except ObjectNotFound as exc:
        raise CheckpointError(f"{where}: {fusion} run {run} left no trained record") from exc
    except DataError as exc:
        raise CheckpointError(f"{where}: unreadable trained record ({exc})") from exc
    try:
        ref = TrainedRef.model_validate(doc)
    except ValidationError as exc:
        raise CheckpointError(f"{where}: not a valid TrainedRef ({exc})") from exc
    if (ref.fusion, ref.run) != (fusion, run):
        raise CheckpointError(
            f"{where}: records {ref.fusion} run {ref.run}, expected {fusion} run {run}"
        )
    if not store.exists(ref.model_key):
        raise CheckpointError(
            f"{store.uri(ref.model_key)}: {fusion} run {run} completed without a model"
        )
    return ref
