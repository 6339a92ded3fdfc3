"""One night at a time, through Prefect: a flow run never adopts (nor starts beside) the run of
another flow run that is still live; once that one is Crashed, Failed or gone, its run is adopted
and the record then names the adopter; a retry of the holder itself keeps its run. The nightly
deployment cancels a second night while the first runs (prefect.yaml's concurrency limit)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import yaml
from prefect import flow

from config import load_config
from config.schema import PipelineConfig
from tasks.errors import RunInProgress
from tasks.io.layout import Layout
from tasks.io.storage import LocalStorage

ROOT = Path(__file__).resolve().parents[2]


def config(tmp_path: Path) -> PipelineConfig:
    path = tmp_path / "cfg.yaml"
    path.write_text(f"storage:\n  uri: {tmp_path / 'bucket'}\n")
    (tmp_path / "bucket").mkdir(exist_ok=True)
    return load_config(path)


@flow(name="night")
def night(cfg: PipelineConfig) -> dict[str, object]:
    """The start-run step of train-all-fusions, as its own flow run."""
    from flows.steps import start_run

    return start_run(cfg).model_dump()


def holder_flow_run(state: str) -> str:
    """A real flow run in the Prefect API, in `state` (the other night)."""
    from prefect.client.orchestration import get_client
    from prefect.states import State, StateType

    with get_client(sync_client=True) as client:
        flow_run = client.create_flow_run(night, name=f"other-night-{uuid.uuid4().hex[:6]}")
        client.set_flow_run_state(flow_run.id, State(type=StateType[state]), force=True)
        return str(flow_run.id)


def set_state(flow_run_id: str, state: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.states import State, StateType

    with get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run_id, State(type=StateType[state]), force=True)


@pytest.mark.usefixtures("prefect_harness")
@pytest.mark.parametrize("live", ["RUNNING", "PENDING", "PAUSED", "CANCELLING"])
def test_a_live_flow_run_keeps_its_run(tmp_path: Path, live: str) -> None:
    cfg = config(tmp_path)
    store, layout = LocalStorage(cfg.storage.uri), Layout()
    first = night(cfg)  # a night that then died, leaving its record
    record = json.loads(store.read_bytes(layout.in_progress()))
    assert record["run"] == first["run"] and record["flow_run_id"]  # the holder is recorded

    other = holder_flow_run(live)  # ...now held by another flow run that is live
    store.write_bytes(layout.in_progress(), json.dumps({**record, "flow_run_id": other}).encode())
    with pytest.raises(RunInProgress) as err:
        night(cfg)
    message = str(err.value)
    assert f"run {first['run']} is held by flow run {other}" in message
    assert "in-progress.json" in message and "one night at a time" in message
    # refused without a trace: the record still names the live holder
    assert json.loads(store.read_bytes(layout.in_progress()))["flow_run_id"] == other

    # other settings would not start beside it either (a single record, a single run)
    other_cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"seed": 7})})
    with pytest.raises(RunInProgress):
        night(other_cfg)


@pytest.mark.usefixtures("prefect_harness")
@pytest.mark.parametrize("dead", ["CRASHED", "FAILED", "CANCELLED", "COMPLETED"])
def test_a_dead_holders_run_is_adopted_and_then_held_by_the_adopter(
    tmp_path: Path, dead: str
) -> None:
    cfg = config(tmp_path)
    store, layout = LocalStorage(cfg.storage.uri), Layout()
    first = night(cfg)
    record = json.loads(store.read_bytes(layout.in_progress()))
    other = holder_flow_run("RUNNING")
    store.write_bytes(layout.in_progress(), json.dumps({**record, "flow_run_id": other}).encode())
    set_state(other, dead)  # e.g. zombie detection marked the dead worker's run Crashed

    adopted = night(cfg)
    assert adopted["run"] == first["run"] and adopted["resumed"] is True
    now = json.loads(store.read_bytes(layout.in_progress()))
    assert now["run"] == first["run"] and now["flow_run_id"] not in {other, record["flow_run_id"]}


@pytest.mark.usefixtures("prefect_harness")
def test_a_holder_unknown_to_the_api_does_not_block(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    store, layout = LocalStorage(cfg.storage.uri), Layout()
    first = night(cfg)
    record = json.loads(store.read_bytes(layout.in_progress()))
    gone = str(uuid.uuid4())  # e.g. a flow run deleted from the API, or another server's
    store.write_bytes(layout.in_progress(), json.dumps({**record, "flow_run_id": gone}).encode())
    assert night(cfg)["run"] == first["run"]


@pytest.mark.usefixtures("prefect_harness")
def test_a_retry_of_the_holder_keeps_its_own_run(tmp_path: Path) -> None:
    """Prefect's flow retries rerun the body in the same flow run: its own record is adopted."""
    cfg = config(tmp_path)
    attempts: list[dict[str, object]] = []

    @flow(name="night-that-retries", retries=1, retry_delay_seconds=0)
    def night_that_retries() -> None:
        from flows.steps import start_run

        attempts.append(start_run(cfg).model_dump())
        if len(attempts) == 1:
            raise RuntimeError("the first attempt dies after start-run")

    night_that_retries()
    assert [a["resumed"] for a in attempts] == [False, True]
    assert attempts[0]["run"] == attempts[1]["run"]


@pytest.mark.usefixtures("prefect_harness")
def test_the_nightly_deployment_cancels_a_second_night_while_one_runs() -> None:
    """prefect.yaml's nightly concurrency limit, as Prefect's server enforces it: while one
    nightly flow run holds the slot, a second one is cancelled when it tries to start; once the
    first has ended, a third starts."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import ConcurrencyOptions
    from prefect.states import Completed, Pending, Running

    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    [nightly] = [d for d in spec["deployments"] if d["name"] == "nightly"]
    limit = nightly["concurrency_limit"]
    assert limit == {"limit": 1, "collision_strategy": "CANCEL_NEW"}

    with get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name(f"train-all-fusions-{uuid.uuid4().hex[:6]}")
        deployment_id = client.create_deployment(
            flow_id=flow_id,
            name="nightly",
            entrypoint=nightly["entrypoint"],
            concurrency_limit=limit["limit"],
            concurrency_options=ConcurrencyOptions(collision_strategy=limit["collision_strategy"]),
        )

        def start(run_id: uuid.UUID) -> str:
            """What a worker does with a scheduled run: propose Pending (the server takes the
            deployment's slot or applies the collision strategy), then Running if accepted."""
            pending = client.set_flow_run_state(run_id, Pending())
            if pending.state is None or pending.state.type.value != "PENDING":
                state = client.read_flow_run(run_id).state
                assert state is not None, pending
                return state.type.value
            client.set_flow_run_state(run_id, Running())
            state = client.read_flow_run(run_id).state
            assert state is not None
            return state.type.value

        first, second, third = (
            client.create_flow_run_from_deployment(deployment_id).id for _ in range(3)
        )
        assert start(first) == "RUNNING"
        assert start(second) == "CANCELLED"  # the second night, while the first still runs
        client.set_flow_run_state(first, Completed())
        assert start(third) == "RUNNING"
