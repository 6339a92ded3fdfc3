"""Process faults on the production shape: a real `prefect server start`, two real process
workers, SeaweedFS, the two deployments, started by scripts/stack.py on free ports in a
temporary folder (as `make stack-up`), stopped and removed at the end.

- Cancelling a fanned-out train-all-fusions run cancels its train-fusion runs: every child ends
  Cancelled and its process is gone. The server's cancellation-cleanup service (which would
  cancel subflows of a Cancelled parent on its own, later) is off here, so what the test sees is
  the flow's on_cancellation hook (flows/fanout.py).
- A flow run whose worker is SIGKILLed with its process group and flow-run processes (a dead
  machine) is marked Crashed by the zombie automation `make stack-up` creates, once its
  heartbeats stop (deployments/zombie_automation.py).

    .venv/bin/python -m pytest tests/e2e/test_process_faults.py -q    # ~6-10 min on 2 cores
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import psutil
import pytest

from deployments.zombie_automation import MESSAGE, NAME
from scripts import stack as stack_mod
from scripts.stack import StackState
from tests.e2e.conftest import BUCKET, CONFIG, Running, started_stack

pytestmark = pytest.mark.e2e

FUSIONS = ("early", "mid", "late")
RUN = f"faults-{uuid.uuid4().hex[:8]}"
HEARTBEAT_S = 30  # Prefect's minimum
ZOMBIE_AFTER_S = 90.0  # the stack's default window
START_TIMEOUT_S = 600  # a run reaching a given point (features built, children started...)


@pytest.fixture(scope="module")
def running() -> Iterator[Running]:
    """A stack of this module's own: heartbeats and the zombie window set, the fan-out
    deployments only, and Prefect's own (later) cancel cascade off, so that only the flow's hook
    can cancel the children."""
    with started_stack(
        "faults-stack-",
        worker_limit=None,
        deployments=("train-all-fusions/nightly", "train-fusion/fan-out"),
        heartbeat_s=HEARTBEAT_S,
        zombie_after_s=ZOMBIE_AFTER_S,
        server_env=(("PREFECT_SERVER_SERVICES_CANCELLATION_CLEANUP_ENABLED", "false"),),
    ) as running:
        yield running


def start_run(state: StackState, name: str, params: dict[str, Any]) -> uuid.UUID:
    """`prefect deployment run <name>` (no --watch) on config/e2e.yaml; the flow run's id."""
    params = {"config_path": CONFIG, **params}
    params["overrides"] = [f"storage.endpoint_url={state.s3_endpoint}", *params["overrides"]]
    from prefect.client.orchestration import SyncPrefectClient

    with SyncPrefectClient(state.api_url) as client:
        deployment = client.read_deployment_by_name(name)
        return client.create_flow_run_from_deployment(deployment.id, parameters=params).id


def read(state: StackState, flow_run_id: uuid.UUID) -> Any:
    with stack_mod.prefect_client(state) as client:
        return client.read_flow_run(flow_run_id)


def children_of(state: StackState, parent_id: uuid.UUID) -> list[Any]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    with stack_mod.prefect_client(state) as client:
        return client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent_id])
            )
        )


def wait_for(what: str, check: Any, timeout_s: float, state: StackState, poll_s: float = 1.0):
    """Poll `check()` until it returns something truthy; fail naming `what` at the deadline
    (a bound on waiting, not a timing assertion)."""
    deadline = time.monotonic() + timeout_s
    while not (found := check()):
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not after {timeout_s:.0f} s\n{worker_logs(state)}")
        time.sleep(poll_s)
    return found


def worker_logs(state: StackState) -> str:
    return "\n".join(
        f"--- {p.name} ---\n{stack_mod._tail(stack_mod._read(p.log), 40)}"
        for p in state.processes
        if p.name.startswith("stack-worker")
    )


def pid_of(flow_run: Any) -> int:
    return int(str(flow_run.infrastructure_pid).rsplit(":", 1)[-1])  # "<hostname>:<pid>"


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def run_logs(state: StackState, flow_run_id: uuid.UUID) -> list[str]:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with stack_mod.prefect_client(state) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return [log.message for log in logs]


def test_stack_up_created_the_zombie_automation_once(running: Running):
    state = running.state
    assert (
        state.zombie_automation.startswith(f"{NAME} (") and " created:" in state.zombie_automation
    )
    assert state.client_env()["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == str(HEARTBEAT_S)
    again = stack_mod.ensure_zombie_automation(state, ZOMBIE_AFTER_S)  # a second stack-up
    assert " unchanged:" in again
    with stack_mod.prefect_client(state) as client:
        [automation] = client.read_automations_by_name(NAME)
    assert automation.enabled and automation.trigger.within.total_seconds() == ZOMBIE_AFTER_S


def test_cancelling_train_all_fusions_cancels_its_fan_out_runs(running: Running):
    from prefect.states import Cancelling

    state, run = running.state, f"{RUN}-cancel"
    overrides = [f"run.name={run}", "training.fan_out=true", "training.epochs=500"]
    parent_id = start_run(state, "train-all-fusions/nightly", {"overrides": overrides})

    def all_children_running() -> list[Any]:
        children = children_of(state, parent_id)
        running_ = [c for c in children if c.state_type and c.state_type.value == "RUNNING"]
        return (
            children
            if len(running_) == len(FUSIONS) and all(c.infrastructure_pid for c in children)
            else []
        )

    children = wait_for("three running fan-out runs", all_children_running, START_TIMEOUT_S, state)
    assert sorted(c.name for c in children) == sorted(f"{run}-{f}" for f in FUSIONS)
    pids = {c.name: pid_of(c) for c in children}
    assert all(alive(p) for p in pids.values()), pids

    with stack_mod.prefect_client(state) as client:
        client.set_flow_run_state(parent_id, Cancelling(message="cancelled by the test"))

    def all_final() -> list[Any]:
        runs = [read(state, parent_id), *children_of(state, parent_id)]
        return runs if all(r.state and r.state.is_final() for r in runs) else []

    parent, *children = wait_for("parent and children final", all_final, 300, state)
    assert parent.state_type.value == "CANCELLED", parent.state
    assert {c.name: c.state_type.value for c in children} == {
        f"{run}-{f}": "CANCELLED" for f in FUSIONS
    }, [(c.name, c.state) for c in children]
    assert not [name for name, pid in pids.items() if alive(pid)], "a training process survived"
    messages = run_logs(state, parent_id)
    assert any(f"cancelled {len(FUSIONS)} fan-out run(s)" in m for m in messages), messages
    keys = [
        o["Key"]
        for page in stack_mod.s3_client(state)
        .get_paginator("list_objects_v2")
        .paginate(Bucket=BUCKET, Prefix="outputs/models/")
        for o in page.get("Contents", [])
    ]
    # model.pt lands with each epoch that improves (a loaded machine may finish one before the
    # cancel); trained.json only when a training has run all its epochs.
    assert not [k for k in keys if k.endswith(f"/{run}/trained.json")], "a training finished"


def heartbeats(state: StackState, flow_run_id: uuid.UUID) -> int:
    """Heartbeat events the server has received from the flow run."""
    body = {
        "filter": {
            "event": {"name": ["prefect.flow-run.heartbeat"]},
            "resource": {"id": [f"prefect.flow-run.{flow_run_id}"]},
            "occurred": {"since": "2000-01-01T00:00:00Z"},
        },
        "limit": 50,
    }
    resp = httpx.post(f"{state.api_url}/events/filter", json=body, timeout=30)
    resp.raise_for_status()
    return len(resp.json()["events"])


def test_a_run_whose_worker_died_is_marked_crashed(running: Running):
    state, run = running.state, f"{RUN}-zombie"
    params = {"overrides": ["training.epochs=500"], "fusion": "mid", "run": run}
    flow_run_id = start_run(state, "train-fusion/fan-out", params)
    fr = wait_for(
        "the run Running on a worker",
        lambda: (
            (f := read(state, flow_run_id)).state_type.value == "RUNNING"
            and f.infrastructure_pid
            and f
        ),
        START_TIMEOUT_S,
        state,
    )
    wait_for("a heartbeat", lambda: heartbeats(state, flow_run_id), 120, state)
    pid = pid_of(fr)
    owners = [
        p.name
        for p in state.processes
        if p.name.startswith("stack-worker") and pid in {m.pid for m in stack_mod._tree(p)}
    ]
    assert len(owners) == 1, f"flow run process {pid} belongs to {owners}"

    stack_mod.kill(state, owners[0])  # the worker, its group and the flow run: a dead machine
    assert not alive(pid)
    assert read(state, flow_run_id).state_type.value == "RUNNING"  # nobody reported the end

    window = ZOMBIE_AFTER_S + HEARTBEAT_S + 60  # last beat up to one interval ago, + evaluation
    crashed = wait_for(
        "the zombie run marked Crashed",
        lambda: (f := read(state, flow_run_id)).state_type.value == "CRASHED" and f,
        window,
        state,
        poll_s=2.0,
    )
    assert MESSAGE.format(within=f"{ZOMBIE_AFTER_S:.0f}", name=NAME) in crashed.state.message
    stack_mod.start_worker(state, running.settings, owners[0])  # the pool is whole again
    stack_mod.wait_for_workers(state, 120)
