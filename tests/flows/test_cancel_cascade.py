"""Cancelling train-all-fusions cancels its fan-out runs (`flows.fanout.cancel_fan_out`).

On the test-harness API: a parent flow run starts three `train-fusion` deployment runs the way
`train_on_workers` does (subflow runs of the parent); the states a worker would give them are
set by hand; then the hook is called as Prefect calls it. A real worker killing real processes
is tests/e2e/test_process_faults.py.
"""

from __future__ import annotations

import uuid

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
from prefect.client.schemas.objects import FlowRun
from prefect.context import get_run_context
from prefect.deployments import run_deployment
from prefect.states import Cancelling, Completed, Pending, Running

from config.load import validate_config
from flows.fanout import FanOutError, cancel_fan_out, train_on_workers
from flows.train_all_fusions import train_all_fusions


@pytest.fixture
def deployment(prefect_harness) -> str:
    """A fresh deployment of a flow named train-fusion on the harness API (no work pool)."""
    name = f"cancel-{uuid.uuid4().hex[:8]}"
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name("train-fusion")
        client.create_deployment(flow_id=flow_id, name=name)
    return f"train-fusion/{name}"


def start_children(deployment: str, tag: str, fusions: tuple[str, ...]) -> FlowRun:
    """A finished parent flow run whose body created one deployment run per fusion, as
    `train_on_workers` does (run_deployment inside the flow: subflow runs); returns the parent."""

    @flow(name="fan-out-parent")
    def parent() -> str:
        for fusion in fusions:
            run_deployment(deployment, flow_run_name=f"{tag}-{fusion}", tags=[tag], timeout=0)
        return str(get_run_context().flow_run.id)  # type: ignore[union-attr]

    parent_id = parent()
    with get_client(sync_client=True) as client:
        return client.read_flow_run(uuid.UUID(parent_id))


def children_by_fusion(tag: str) -> dict[str, FlowRun]:
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[tag]))
        )
    return {r.name.rsplit("-", 1)[1]: r for r in runs}


def test_train_all_fusions_has_the_hook():
    assert cancel_fan_out in train_all_fusions.on_cancellation_hooks


def test_hook_cancels_every_unfinished_child_and_only_those(deployment):
    tag = f"run-{uuid.uuid4().hex[:6]}"
    parent = start_children(deployment, tag, ("early", "mid", "late", "audio"))
    other = start_children(deployment, f"{tag}-other", ("early",))  # another parent's child
    runs = children_by_fusion(tag)
    with get_client(sync_client=True) as client:
        # What workers would have done by the time the parent is cancelled:
        client.set_flow_run_state(runs["early"].id, Running(), force=True)  # training
        client.set_flow_run_state(runs["mid"].id, Pending(), force=True)  # being started
        client.set_flow_run_state(runs["audio"].id, Completed(), force=True)  # done already
        # "late": still Scheduled, no worker took it

    cancel_fan_out(train_all_fusions, parent, Cancelling())

    after = {f: r.state for f, r in children_by_fusion(tag).items()}
    assert {f: s.type.value for f, s in after.items() if s} == {
        "early": "CANCELLING",  # a worker kills its process, then marks it Cancelled
        "mid": "CANCELLING",
        "late": "CANCELLED",  # nothing to kill
        "audio": "COMPLETED",  # untouched
    }
    assert all(
        "was cancelled" in (after[f].message or "") for f in ("early", "mid", "late") if after[f]
    )
    [untouched] = children_by_fusion(f"{tag}-other").values()
    assert untouched.state and untouched.state.type.value == "SCHEDULED"
    # Called again (a second cancellation request): nothing left to cancel, no error.
    cancel_fan_out(train_all_fusions, parent, Cancelling())
    assert children_by_fusion(tag)["early"].state.type.value == "CANCELLING"  # type: ignore[union-attr]
    assert other.id != parent.id


def test_hook_without_children_does_nothing(deployment):
    parent = start_children(deployment, f"run-{uuid.uuid4().hex[:6]}", ())
    cancel_fan_out(train_all_fusions, parent, Cancelling())  # fan_out off: no query result


def test_parent_that_stops_waiting_cancels_its_children(tmp_path, deployment):
    """No worker takes the runs: at its timeout the parent fails and leaves no child behind."""
    run = f"t{uuid.uuid4().hex[:6]}"
    cfg = validate_config(
        {"storage": {"uri": str(tmp_path)}, "training": {"fusions": ["early", "late"]}}
    )

    @flow(name="fan-out-parent")
    def parent() -> None:
        train_on_workers(cfg, "c.yaml", [], run, deployment=deployment, timeout_s=1, poll_s=0.2)

    with pytest.raises(FanOutError, match="not finished after 1 s"):
        parent()
    states = {
        f: r.state_type.value for f, r in children_by_fusion(f"run-{run}").items() if r.state_type
    }
    assert states == {"early": "CANCELLED", "late": "CANCELLED"}
