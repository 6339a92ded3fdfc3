"""End to end in the production shape: a real `prefect server start`, two real process workers,
a real SeaweedFS S3 store, `prefect --no-prompt deploy --all`, then
`prefect deployment run train-all-fusions/nightly --watch` on config/e2e.yaml.

Checked over the Prefect API: the run Completed, its task runs, its log lines, its artifacts;
over the S3 API: what the run left in the bucket. The expectations are listed per pipeline stage
(STAGES); WIRED names the stages train-all-fusions runs today, and every wired stage is asserted
in full. When a step is wired into the flow, add its stage to WIRED.

A second test fans the fusions out over both workers (once train-all-fusions fans out), a third
kills the worker running a training and shows the re-run resuming from the last checkpoint.

The stack is started by the same code as `make stack-up` (scripts/stack.py), on free ports in a
temporary folder, once for tests/e2e (conftest.py, which also runs the nightly deployment once for
this module and test_browser.py), and always stopped at the end (process groups, and the flow runs
the workers started in sessions of their own), checking that no process, socket or folder is left.

    .venv/bin/python -m pytest tests/e2e -q    # 4-7 minutes on the shared 2-core machine
"""

from __future__ import annotations

import fnmatch
import json
import re
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from scripts import stack as stack_mod
from scripts.stack import StackState
from tests.e2e.conftest import (
    BUCKET,
    CONFIG,
    RUN,
    WATCH_TIMEOUT_S,
    Running,
    bucket_keys,
    read_run,
    run_deployment,
    run_nightly,
    worker_logs,
)

pytestmark = pytest.mark.e2e

FUSIONS = ("early", "mid", "late")
DEPLOYMENTS = {
    "train-all-fusions/nightly",
    "train-fusion/fan-out",
    "evaluate-models/on-demand",
    "detect/new-media",
}


@dataclass(frozen=True)
class Stage:
    """What one pipeline stage leaves behind."""

    tasks: tuple[str, ...] = ()  # task run names (Prefect may add a "-abc" suffix), one run each
    objects: tuple[tuple[str, int | None], ...] = ()  # (glob over bucket keys, count; None: >= 1)
    logs: tuple[str, ...] = ()  # regexes, each matched by at least one log line of the run
    loggers: tuple[str, ...] = ()  # logger names with INFO lines in the run's logs (project's own)
    artifacts: tuple[str, ...] = ()  # artifact keys created by the run
    report: tuple[str, ...] = ()  # texts the run's report.html must contain


OUTPUT_FOLDERS = (
    "models",
    "plots",
    "logs",
    "manifests",
    "cache/features",
    "intermediates",
    "reports",
)
STAGES: dict[str, Stage] = {
    "set-up": Stage(
        tasks=("set-up-folders",),
        objects=tuple((f"outputs/{folder}/", 1) for folder in OUTPUT_FOLDERS),
        logs=(rf"run {RUN} on s3://{BUCKET}", rf"output folders ready in s3://{BUCKET}"),
    ),
    "manifest": Stage(
        tasks=("build-manifest",),
        objects=((f"outputs/manifests/{RUN}/manifest.parquet", 1),),
    ),
    "preprocess": Stage(
        tasks=("build-features",),
        objects=(("outputs/cache/features/*/shard-*", None),),
    ),
    "training": Stage(
        tasks=tuple(f"train-{f}" for f in FUSIONS),
        objects=(
            *((f"outputs/models/{f}/{RUN}/model.pt", 1) for f in FUSIONS),
            *((f"outputs/models/{f}/{RUN}/checkpoints/epoch-1.pt", 1) for f in FUSIONS),
            *((f"outputs/intermediates/{RUN}/emotion_vectors-{f}.npz", 1) for f in FUSIONS),
            (f"outputs/intermediates/{RUN}/losses.csv", 1),
            *((f"outputs/logs/{RUN}/train-{f}.jsonl", 1) for f in FUSIONS),
            *((f"outputs/logs/{RUN}/steps-{f}.jsonl", 1) for f in FUSIONS),
        ),
        logs=tuple(rf"\b{f} epoch 1/1: train loss" for f in FUSIONS),  # the per-epoch lines
        loggers=("tasks.train.fit",),
    ),
    "evaluation": Stage(
        tasks=("evaluate", "publish-report"),
        objects=(
            (f"outputs/reports/{RUN}/report.html", 1),
            (f"outputs/reports/{RUN}/metrics.json", 1),
            (f"outputs/plots/{RUN}/*.png", 20),  # the 19 plots and the run-history trend
        ),
        artifacts=("evaluation-metrics", "evaluation-summary", "run-history", "plot-run-history"),
        report=('<section id="run-history">',),
    ),
    "champion": Stage(
        tasks=("start-run", "promote-champions", "finish-run"),
        objects=(
            *((f"outputs/models/{f}/champion.json", 1) for f in FUSIONS),
            (f"outputs/reports/{RUN}/champions.json", 1),
            ("outputs/manifests/last-run.json", 1),
        ),
        logs=tuple(rf"champion {f}: run {RUN} promoted: first champion" for f in FUSIONS),
        report=tuple(f"{f}: run {RUN} promoted" for f in FUSIONS),
    ),
}
WIRED: tuple[str, ...] = tuple(STAGES)  # stages train-all-fusions runs (all of them by now)
FAN_OUT_WIRED = True  # train-all-fusions calls flows.fanout.train_on_workers when fan_out is on


# --- helpers --------------------------------------------------------------------------------------


def base_name(task_run_name: str, expected: set[str]) -> str:
    """ "set-up-folders-18d" -> "set-up-folders" when that is an expected name."""
    if task_run_name in expected:
        return task_run_name
    stem = task_run_name.rsplit("-", 1)[0]
    return stem if stem in expected else task_run_name


# --- tests ----------------------------------------------------------------------------------------


def test_stack_is_up_and_deployed(stack: StackState):
    """Deployments with the nightly cron, two online workers, the benchmark in the bucket."""
    with stack_mod.prefect_client(stack) as client:
        nightly = client.read_deployment_by_name("train-all-fusions/nightly")
        workers = {w.name for w in client.read_workers_for_work_pool(stack.pool)}
    assert {d.split("  ")[0] for d in stack.deployments} == DEPLOYMENTS
    crons = [(s.schedule.cron, s.schedule.timezone) for s in nightly.schedules]
    assert crons == [("0 2 * * *", "UTC")]
    assert nightly.parameters == {"config_path": "config/config.yaml", "overrides": []}
    assert nightly.work_pool_name == stack.pool
    assert workers == {"stack-worker-1", "stack-worker-2"}
    output = stack_mod.run_cli(
        ["prefect", "deployment", "ls", "-o", "json"],
        stack.client_env(),
        Path(stack.root) / "logs" / "deployment-ls.log",
    )
    listed = json.loads(output[output.index("[") :])  # the acceptance's `prefect deployment ls`
    [listed_nightly] = [d for d in listed if d["id"] == str(nightly.id)]
    assert listed_nightly["name"] == "nightly"
    assert [s["schedule"]["cron"] for s in listed_nightly["schedules"]] == ["0 2 * * *"]
    keys = set(bucket_keys(stack))
    assert "dataset/pairs.csv" in keys
    assert sum(k.startswith("dataset/audio/") for k in keys) == 96
    assert sum(k.startswith("dataset/images/") for k in keys) == 96


def test_nightly_deployment_runs_the_pipeline(stack: StackState, nightly_run: str):
    assert set(WIRED) <= set(STAGES), f"unknown stages in WIRED: {set(WIRED) - set(STAGES)}"
    flow_run_id = nightly_run  # run.name=RUN, shared with test_browser.py (conftest.py)
    flow_run, task_runs, logs, artifacts = read_run(stack, flow_run_id)
    expected = [STAGES[name] for name in WIRED]

    assert flow_run.state_name == "Completed", worker_logs(stack)
    assert flow_run.parameters["config_path"] == CONFIG

    names = {t for stage in expected for t in stage.tasks}
    counts = Counter(base_name(t.name, names) for t in task_runs)
    for name in sorted(names):
        assert counts[name] == 1, f"task {name}: {counts[name]} runs; all: {dict(counts)}"
    assert all(t.state_name == "Completed" for t in task_runs), [
        (t.name, t.state_name) for t in task_runs
    ]

    messages = [log.message for log in logs]
    for stage in expected:
        for pattern in stage.logs:
            assert any(re.search(pattern, m) for m in messages), (
                f"no log line matches {pattern!r}; the run logged:\n" + "\n".join(messages)
            )
        for logger in stage.loggers:
            assert any(log.name == logger and log.level == 20 for log in logs), (
                f"no INFO line from logger {logger!r}: {sorted({log.name for log in logs})}"
            )

    keys = {a.key for a in artifacts if a.key}
    for stage in expected:
        missing = set(stage.artifacts) - keys
        assert not missing, f"artifacts {missing} missing; the run created {sorted(keys)}"
    if "evaluation" in WIRED:
        table = next(a for a in artifacts if a.key == "evaluation-metrics")
        assert table.type == "table" and "auc" in json.dumps(table.data).lower()

    report = ""
    if any(stage.report for stage in expected):
        key = f"outputs/reports/{RUN}/report.html"
        body = stack_mod.s3_client(stack).get_object(Bucket=BUCKET, Key=key)["Body"]
        report = body.read().decode()
    for stage in expected:
        for text in stage.report:
            assert text in report, f"report.html does not say {text!r}"

    objects = bucket_keys(stack)
    for stage in expected:
        for pattern, count in stage.objects:
            found = fnmatch.filter(objects, pattern)
            if count is None:
                assert found, f"nothing in s3://{BUCKET} matches {pattern}"
            else:
                assert len(found) == count, f"{pattern}: {len(found)} objects, expected {count}"


@pytest.mark.skipif(not FAN_OUT_WIRED, reason="train-all-fusions does not fan out yet")
def test_fan_out_spreads_fusions_over_both_workers(stack: StackState):
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterTags,
        LogFilter,
        LogFilterFlowRunId,
    )

    run = f"{RUN}-fan"
    parent_id = run_nightly(stack, [f"run.name={run}", "training.fan_out=true"])
    with stack_mod.prefect_client(stack) as client:
        assert client.read_flow_run(uuid.UUID(parent_id)).state_name == "Completed"
        children = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[f"run-{run}"]))
        )
        assert sorted(c.name for c in children) == sorted(f"{run}-{f}" for f in FUSIONS)
        assert all(c.state_name == "Completed" for c in children)
        logs = client.read_logs(
            LogFilter(flow_run_id=LogFilterFlowRunId(any_=[c.id for c in children]))
        )
    workers_used = {
        m.group(1)
        for log in logs
        if (m := re.match(r"Worker '([\w-]+)' submitting flow run", log.message))
    }
    assert workers_used == {"stack-worker-1", "stack-worker-2"}, worker_logs(stack)
    keys = bucket_keys(stack)
    for f in FUSIONS:
        assert f"outputs/models/{f}/{run}/model.pt" in keys
    # Three processes on two workers update the run's one losses.csv: no fusion's rows are lost.
    losses = (
        stack_mod.s3_client(stack)
        .get_object(Bucket=BUCKET, Key=f"outputs/intermediates/{run}/losses.csv")["Body"]
        .read()
        .decode()
    )
    assert {line.split(",")[0] for line in losses.splitlines()[1:]} == set(FUSIONS)


def test_killed_worker_resumes_training_from_its_checkpoint(running: Running):
    """Kill the worker running a training (SIGKILL to its process group, flow run included),
    start it again, re-run the deployment with the same run id: training goes on after the
    newest checkpoint, and every epoch is in the log exactly once."""
    state, epochs, run = running.state, 3, f"{RUN}-resume"
    params = {"overrides": [f"training.epochs={epochs}"], "fusion": "mid", "run": run}
    first = run_deployment(state, "train-fusion/fan-out", params, watch=False)
    checkpoints = f"outputs/models/mid/{run}/checkpoints/"
    deadline = time.monotonic() + WATCH_TIMEOUT_S
    while not fnmatch.filter(bucket_keys(state), f"{checkpoints}epoch-*.pt"):
        assert time.monotonic() < deadline, f"no checkpoint after {WATCH_TIMEOUT_S} s"
        time.sleep(0.5)
    worker = ran_on(state, first)
    stack_mod.kill(state, worker)
    done_before_kill = fnmatch.filter(bucket_keys(state), f"{checkpoints}epoch-*.pt")
    assert f"{checkpoints}epoch-{epochs}.pt" not in done_before_kill, "finished before the kill"
    stack_mod.start_worker(state, running.settings, worker)
    stack_mod.wait_for_workers(state, 120)

    second = run_deployment(state, "train-fusion/fan-out", params)
    flow_run, _, logs, _ = read_run(state, second)
    assert flow_run.state_name == "Completed", worker_logs(state)
    resumed = [m for log in logs if (m := re.search(r"resumed after epoch (\d+)", log.message))]
    assert resumed and int(resumed[0].group(1)) >= 1, [log.message for log in logs]
    lines = (
        stack_mod.s3_client(state)
        .get_object(Bucket=BUCKET, Key=f"outputs/logs/{run}/train-mid.jsonl")["Body"]
        .read()
        .splitlines()
    )
    assert [json.loads(line)["epoch"] for line in lines] == list(range(1, epochs + 1))
    assert f"outputs/models/mid/{run}/model.pt" in bucket_keys(state)


def ran_on(state: StackState, flow_run_id: str) -> str:
    """The worker that started the flow run's process (its infrastructure_pid)."""
    deadline = time.monotonic() + 60
    with stack_mod.prefect_client(state) as client:
        while not (infra := client.read_flow_run(uuid.UUID(flow_run_id)).infrastructure_pid):
            assert time.monotonic() < deadline, f"flow run {flow_run_id}: no infrastructure_pid"
            time.sleep(0.5)
    pid = int(infra.rsplit(":", 1)[-1])  # "<hostname>:<pid>"
    owners = [
        p.name
        for p in state.processes
        if p.name.startswith("stack-worker") and pid in {m.pid for m in stack_mod._tree(p)}
    ]
    assert len(owners) == 1, f"flow run process {pid} belongs to {owners}"
    return owners[0]
