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

Cancelling the parent cancels its children (`cancel_fan_out`, the `on_cancellation` hook of
train-all-fusions). The worker that ran the parent kills its process, runs the hook and only then
marks the parent Cancelled: the hook sets every unfinished child Cancelling (a worker kills its
process and marks it Cancelled), or Cancelled at once when no worker has taken it yet. Prefect's
server would cascade too, but only to subflows, only after the parent is Cancelled and only on
its cleanup service's next pass (20 s by default; not at all with the service off): a child
would go on training meanwhile. A parent that stops waiting (`timeout_s`) cancels its children
the same way before it fails.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterParentFlowRunId,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import FlowRun, State, StateType
from prefect.deployments import run_deployment
from prefect.logging.loggers import flow_run_logger
from prefect.states import Cancelled, Cancelling
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
                message = f"the parent stopped waiting after {timeout_s:.0f} s"
                for fr in pending.values():  # nobody would read their results: stop them
                    cancel_run(client, fr, message)
                raise FanOutError(f"fusion runs not finished after {timeout_s:.0f} s: {waiting}")
            time.sleep(poll_s)
    return {fusion: done[fusion] for fusion in flow_runs}


# States a run is still going in; SCHEDULED ones (Scheduled, Late, AwaitingRetry...) have no
# process yet, the others may have one that a worker must kill.
UNFINISHED = [StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING, StateType.PAUSED]


def cancel_run(client: Any, flow_run: FlowRun, message: str) -> State | None:
    """Cancel one flow run: Cancelled when it is still scheduled (no process to stop), else
    Cancelling, which the worker that runs it answers by killing its process and marking it
    Cancelled. Returns the state the API now holds, or None when the run had already finished."""
    fr = client.read_flow_run(flow_run.id)
    if not fr.state or fr.state.type not in UNFINISHED:
        return None
    if fr.state.type == StateType.SCHEDULED:
        result = client.set_flow_run_state(fr.id, Cancelled(message=message))
    else:
        result = client.set_flow_run_state(fr.id, Cancelling(message=message))
    return result.state


def cancel_child_runs(parent_id: UUID, message: str) -> dict[str, str]:
    """Cancel (`cancel_run`) every unfinished flow run started from flow run `parent_id`
    (the fan-out's deployment runs are its subflow runs); returns run name -> state now."""
    unfinished = FlowRunFilter(
        parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent_id]),
        state=FlowRunFilterState(type=FlowRunFilterStateType(any_=UNFINISHED)),
    )
    done: dict[str, str] = {}
    with get_client(sync_client=True) as client:
        for child in client.read_flow_runs(flow_run_filter=unfinished):
            state = cancel_run(client, child, message)
            done[child.name] = (state.name or state.type.value) if state else "already finished"
    return done


def cancel_fan_out(flow: Any, flow_run: FlowRun, state: State) -> None:
    """`on_cancellation` hook of train-all-fusions: cancel the fusion runs it started.
    Prefect calls it with (flow, flow run, state); it runs where the parent ran (in the worker's
    hook process under a worker), after the parent's own process was stopped."""
    logger = flow_run_logger(flow_run)
    cancelled = cancel_child_runs(flow_run.id, f"parent run {flow_run.name!r} was cancelled")
    if cancelled:
        logger.info(
            "cancelled %d fan-out run(s): %s",
            len(cancelled),
            ", ".join(f"{name} -> {s}" for name, s in sorted(cancelled.items())),
        )


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
