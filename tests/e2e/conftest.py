"""The end-to-end stack, shared by every module of tests/e2e: one real `prefect server start`, two
process workers and SeaweedFS (scripts/stack.py, the code of `make stack-up`) on free ports in a
temporary folder, started once per session and always stopped at the end (process groups, and the
flow runs the workers started in sessions of their own), with a check that no process, socket or
folder is left; and one finished `train-all-fusions/nightly` run on config/e2e.yaml
(`nightly_run`), which test_stack.py checks over the APIs and test_browser.py in the UI.

Nothing starts unless a test asks for `running`, `stack` or `nightly_run`.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from scripts import stack as stack_mod
from scripts.stack import StackSettings, StackState, WeedPorts

CONFIG = "config/e2e.yaml"
BUCKET = "deepfake-e2e"  # config/e2e.yaml's storage.uri
RUN = f"e2e-{uuid.uuid4().hex[:8]}"  # run.name override: every key of the run is known
WATCH_TIMEOUT_S = 600


@dataclass(frozen=True)
class Running:
    state: StackState
    settings: StackSettings


@contextmanager
def started_stack(prefix: str = "e2e-stack-", **settings: Any) -> Iterator[Running]:
    """Server, two workers (at most two runs each), SeaweedFS, benchmark, deployments, on free
    ports in a fresh folder (`settings` override StackSettings' fields); stopped and removed
    afterwards whatever happened, with a check that nothing is left behind."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    ports = stack_mod.free_ports(9)
    fields: dict[str, Any] = {
        "root": root,
        "prefect_port": ports[0],
        "weed": WeedPorts(*ports[1:]),
        "workers": 2,
        "worker_limit": 2,
        "worker_poll_s": 2,
        "bucket": BUCKET,
        "dataset_config": CONFIG,
        "dataset_pairs": 96,
        "scheduler": False,  # the nightly schedule exists, but no 02:00 run joins the test
        "startup_timeout_s": 240,
    }
    chosen = StackSettings(**{**fields, **settings})
    try:
        yield Running(stack_mod.up(chosen), chosen)
    finally:
        leftovers: list[str] = []
        if (root / stack_mod.STATE_FILE).exists():
            recorded = StackState.load(root)
            try:
                stack_mod.down(root, grace_s=3)  # the store's data is thrown away: no need to wait
            except stack_mod.StackError as exc:
                leftovers.append(str(exc))
            leftovers += [p.name for p in recorded.processes if stack_mod._tree(p)]
            leftovers += [str(proc.pid) for proc in stack_mod._marked(root.resolve())]
            leftovers += [
                str(s) for s in stack_mod._weed_tmp_sockets(recorded.weed_ports) if s.exists()
            ]
        shutil.rmtree(root, ignore_errors=True)
        assert not leftovers, f"left behind: {leftovers}"
        assert not root.exists()


@pytest.fixture(scope="session")
def running() -> Iterator[Running]:
    """The session's stack (`started_stack` with its defaults)."""
    with started_stack() as running:
        yield running


@pytest.fixture
def stack(running: Running) -> StackState:
    return running.state


@pytest.fixture(scope="session")
def nightly_run(running: Running) -> str:
    """The flow run id of one `prefect deployment run train-all-fusions/nightly --watch` with
    run.name=RUN, run once for the session (the first run on the bucket: its champions are the
    first ones)."""
    return run_nightly(running.state, [f"run.name={RUN}"])


def run_deployment(state: StackState, name: str, params: dict, watch: bool = True) -> str:
    """`prefect deployment run <name> [--watch]` on config/e2e.yaml; returns the flow run id."""
    params = {"config_path": CONFIG, **params}
    params["overrides"] = [f"storage.endpoint_url={state.s3_endpoint}", *params["overrides"]]
    argv = ["prefect", "deployment", "run", name, "--params", json.dumps(params)]
    if watch:
        argv += ["--watch", "--watch-timeout", str(WATCH_TIMEOUT_S)]
    log_path = Path(state.root) / "logs" / "deployment-run.log"
    try:
        output = stack_mod.run_cli(argv, state.client_env(), log_path, cwd=stack_mod.PROJECT_DIR,
                                   timeout_s=WATCH_TIMEOUT_S + 60)  # fmt: skip
    except stack_mod.StackError as exc:
        pytest.fail(f"{exc}\n\n{worker_logs(state)}")
    match = re.search(r"UUID: ([0-9a-f-]{36})", output)
    assert match, f"no flow run id in the CLI output:\n{output}"
    return match.group(1)


def run_nightly(state: StackState, overrides: list[str]) -> str:
    """`prefect deployment run train-all-fusions/nightly --watch`; returns the flow run id."""
    return run_deployment(state, "train-all-fusions/nightly", {"overrides": overrides})


def worker_logs(state: StackState) -> str:
    return "\n".join(
        f"--- {p.name} ---\n{stack_mod._tail(stack_mod._read(p.log), 40)}"
        for p in state.processes
        if p.name.startswith("stack-worker")
    )


def bucket_keys(state: StackState) -> list[str]:
    client = stack_mod.s3_client(state)
    keys = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=state.bucket):
        keys += [obj["Key"] for obj in page.get("Contents", [])]
    return keys


def read_run(
    state: StackState, flow_run_id: str
) -> tuple[object, list[object], list[object], list[object]]:
    """The flow run, its task runs, its logs (task logs included) and its artifacts."""
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterId,
        LogFilter,
        LogFilterFlowRunId,
    )

    run_id = uuid.UUID(flow_run_id)
    with stack_mod.prefect_client(state) as client:
        flow_run = client.read_flow_run(run_id)
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id]))
        )
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
        )
    return flow_run, task_runs, logs, artifacts
