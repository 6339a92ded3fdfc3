"""The training progress artifact, through Prefect's test harness: the train-fusion-model task
of a tiny training leaves a `training-progress-<fusion>` progress artifact at 100; outside a task
run the reporter creates nothing."""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.runtime import flow_run

from config.schema import PipelineConfig
from flows import artifacts, steps
from tasks.io.storage import open_storage
from tasks.refs import FeatureRef
from tests.unit.test_training import make_cfg, write_features


def artifacts_of(flow_run_id: str) -> list:  # type: ignore[type-arg]
    with get_client(sync_client=True) as client:
        return client.read_artifacts(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )


@flow(name="progress-test")
def train_one(cfg: PipelineConfig, features: FeatureRef) -> str:
    steps.train_fusion_task(cfg, features, "mid", "progress1")
    return str(flow_run.id)


@flow(name="progress-outside-task-test")
def report_from_the_flow() -> str:
    artifacts.TrainingProgress("mid", "r")(1, 2)  # in a flow run, but in no task run
    return str(flow_run.id)


def test_training_leaves_a_progress_artifact_at_100(prefect_harness: None, tmp_path: Path) -> None:
    cfg = make_cfg(str(tmp_path / "bucket"), training={"epochs": 2})
    store = open_storage(cfg.storage)
    store.check()
    features = write_features(store, n_train=16, n_val=8)

    found = artifacts_of(train_one(cfg, features))
    progress = [a for a in found if a.type == "progress"]
    assert [a.key for a in progress] == ["training-progress-mid"]
    assert progress[0].data == 100.0
    assert progress[0].description == "mid, run progress1: 2/2 epochs done"


def test_no_progress_artifact_outside_a_task_run(prefect_harness: None) -> None:
    assert artifacts_of(report_from_the_flow()) == []
