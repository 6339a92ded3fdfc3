"""Fan-out through the Prefect API: one deployment run per fusion, each child's result (the
`TrainedRef` its `fit` wrote as trained.json) read from the bucket.

A thread stands in for the workers: it picks up the runs `train_on_workers` created on a real
(test-harness) Prefect API, writes what `train-fusion` writes into the bucket and sets the final
state. The real workers are exercised by tests/e2e/test_stack.py.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

from config.load import validate_config
from flows.fanout import FanOutError, train_on_workers, trained_ref_from_bucket
from tasks.errors import CheckpointError
from tasks.io import records
from tasks.io.layout import Layout
from tasks.io.storage import LocalStorage, open_storage
from tasks.refs import TrainedRef


def write_training(store, fusion: str, run: str, val_losses: list[float]) -> None:
    """What a train-fusion run leaves in the bucket: best model and its `TrainedRef` record."""
    best = min(range(len(val_losses)), key=lambda i: val_losses[i])
    ref = TrainedRef(
        fusion=fusion, run=run, model_key=Layout().model(fusion, run), epochs=len(val_losses),
        best_epoch=best + 1, best_val_loss=val_losses[best],
    )  # fmt: skip
    store.write_bytes(ref.model_key, b"weights")
    records.write_json(store, Layout().trained(fusion, run), ref.model_dump(mode="json"))


def test_trained_ref_from_bucket(tmp_path):
    store = LocalStorage(str(tmp_path))
    write_training(store, "mid", "r1", [0.9, 0.4, 0.5])
    ref = trained_ref_from_bucket(store, Layout(), "mid", "r1")
    assert (ref.epochs, ref.best_epoch, ref.best_val_loss) == (3, 2, 0.4)
    assert ref.model_key == "outputs/models/mid/r1/model.pt" and ref.fusion == "mid"


def test_trained_ref_needs_record_and_model(tmp_path):
    store = LocalStorage(str(tmp_path))
    key = Layout().trained("mid", "r1")
    with pytest.raises(CheckpointError, match="trained.json: mid run r1 left no trained record"):
        trained_ref_from_bucket(store, Layout(), "mid", "r1")
    write_training(store, "mid", "r1", [0.3])
    store.delete(Layout().model("mid", "r1"))
    with pytest.raises(CheckpointError, match="model.pt: mid run r1 completed without a model"):
        trained_ref_from_bucket(store, Layout(), "mid", "r1")
    store.write_bytes(key, b"not json\n")
    with pytest.raises(CheckpointError, match="trained.json: unreadable trained record"):
        trained_ref_from_bucket(store, Layout(), "mid", "r1")
    records.write_json(store, key, {"fusion": "mid", "run": "r1"})
    with pytest.raises(CheckpointError, match="trained.json: not a valid TrainedRef"):
        trained_ref_from_bucket(store, Layout(), "mid", "r1")
    write_training(store, "late", "r1", [0.3])
    store.write_bytes(key, store.read_bytes(Layout().trained("late", "r1")))
    with pytest.raises(CheckpointError, match="records late run r1, expected mid run r1"):
        trained_ref_from_bucket(store, Layout(), "mid", "r1")


@pytest.fixture
def deployment(prefect_harness) -> str:
    """A fresh deployment of a flow named train-fusion on the harness API (no work pool)."""
    from prefect.client.orchestration import get_client

    name = f"fan-out-{uuid.uuid4().hex[:8]}"
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name("train-fusion")
        client.create_deployment(flow_id=flow_id, name=name)
    return f"train-fusion/{name}"


def fake_workers(deployment: str, finish: Callable[[dict], str], stop: threading.Event) -> None:
    """Take every scheduled run of `deployment`, let `finish(parameters)` do the work and name
    the final state ("COMPLETED", "FAILED"), and report it to the API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, FlowRunFilter
    from prefect.states import Completed, Failed, Running

    flow_name, dep_name = deployment.split("/")
    with get_client(sync_client=True) as client:
        dep_id = client.read_deployment_by_name(deployment).id
        while not stop.is_set():
            runs = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(state={"type": {"any_": ["SCHEDULED"]}}),
                deployment_filter=DeploymentFilter(id={"any_": [dep_id]}),
            )
            for fr in runs:
                client.set_flow_run_state(fr.id, Running(), force=True)
                outcome = finish(fr.parameters)
                final = Completed() if outcome == "COMPLETED" else Failed(message="boom")
                client.set_flow_run_state(fr.id, final, force=True)
            stop.wait(0.2)


@pytest.fixture
def workers(deployment) -> Iterator[Callable[[Callable[[dict], str]], None]]:
    stop = threading.Event()
    threads: list[threading.Thread] = []

    def start(finish: Callable[[dict], str]) -> None:
        t = threading.Thread(target=fake_workers, args=(deployment, finish, stop), daemon=True)
        t.start()
        threads.append(t)

    yield start
    stop.set()
    for t in threads:
        t.join(timeout=30)


def config(tmp_path, fusions=("early", "mid", "late")):
    return validate_config(
        {"storage": {"uri": str(tmp_path)}, "training": {"fusions": list(fusions)}}
    )


def test_fan_out_runs_one_deployment_run_per_fusion(tmp_path, deployment, workers):
    cfg = config(tmp_path)
    store = open_storage(cfg.storage)
    seen: list[dict] = []

    def train(params: dict) -> str:
        seen.append(params)
        write_training(store, params["fusion"], params["run"], [0.5, 0.25])
        return "COMPLETED"

    @flow(name="fan-out-parent")
    def parent() -> list[TrainedRef]:
        """As train-all-fusions calls it: inside a flow run, so the runs become its subflows."""
        return train_on_workers(
            cfg, "config/e2e.yaml", ["training.epochs=2"], "r7",
            deployment=deployment, timeout_s=60, poll_s=0.2,
        )  # fmt: skip

    workers(train)
    state = parent(return_state=True)
    refs = state.result()
    assert [r.fusion for r in refs] == ["early", "mid", "late"]
    with get_client(sync_client=True) as client:
        children = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=["run-r7"]))
        )
        links = {c.name: c.parent_task_run_id for c in children}
        parents = {client.read_task_run(t).flow_run_id for t in links.values() if t}
    assert sorted(links) == ["r7-early", "r7-late", "r7-mid"] and None not in links.values()
    assert parents == {state.state_details.flow_run_id}
    assert all(r.run == "r7" and r.epochs == 2 and r.best_epoch == 2 for r in refs)
    assert sorted(p["fusion"] for p in seen) == ["early", "late", "mid"]
    assert all(
        p["config_path"] == "config/e2e.yaml"
        and p["overrides"] == ["training.epochs=2"]
        and p["run"] == "r7"
        for p in seen
    )


def test_fan_out_names_the_failed_fusion(tmp_path, deployment, workers):
    cfg = config(tmp_path, fusions=("early", "late"))
    store = open_storage(cfg.storage)

    def train(params: dict) -> str:
        if params["fusion"] == "late":
            return "FAILED"
        write_training(store, params["fusion"], params["run"], [0.5])
        return "COMPLETED"

    workers(train)
    with pytest.raises(
        FanOutError,
        match=r"1 of 2 fusion runs did not complete:\nlate: run 'r8-late'.*Failed: boom",
    ):
        train_on_workers(cfg, "c.yaml", [], "r8", deployment=deployment, timeout_s=60, poll_s=0.2)


def test_fan_out_times_out_without_workers(tmp_path, deployment):
    cfg = config(tmp_path, fusions=("mid",))
    with pytest.raises(FanOutError, match=r"not finished after 1 s: mid \(.*Scheduled\)"):
        train_on_workers(cfg, "c.yaml", [], "r9", deployment=deployment, timeout_s=1, poll_s=0.2)
