"""The local stack's bookkeeping: `down` stops exactly the process groups `up` recorded, the
clients it configures point only at 127.0.0.1. (The services themselves: tests/e2e.)"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from scripts import stack
from scripts.stack import Proc, StackError, StackSettings, StackState, WeedPorts


@pytest.fixture
def spawned() -> Iterator[list[subprocess.Popen]]:
    """Processes a test starts, each leading its own group; killed afterwards in any case."""
    procs: list[subprocess.Popen] = []
    yield procs
    for p in procs:
        try:
            stack._killpg(p.pid, signal.SIGKILL)
        finally:
            p.wait(timeout=10)


def start(spawned, argv: list[str]) -> subprocess.Popen:
    proc = subprocess.Popen(argv, start_new_session=True)
    spawned.append(proc)
    return proc


def record(root: Path, procs: list[tuple[str, subprocess.Popen, float]]) -> StackState:
    state = StackState(
        root=str(root),
        api_url="http://127.0.0.1:1/api",
        ui_url="",
        s3_endpoint="http://127.0.0.1:2",
        bucket="b",
        pool="p",
        access_key="k",
        secret_key="s",
        weed_ports=vars(WeedPorts.free()),
    )
    for name, p, skew in procs:
        ct = psutil.Process(p.pid).create_time() + skew
        state.processes.append(Proc(name=name, pid=p.pid, create_time=ct, argv=[], log=""))
    state.save()
    return state


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_down_stops_each_group_with_its_children(tmp_path, spawned):
    leader = start(spawned, ["bash", "-c", "sleep 60 & sleep 60 & wait"])
    time.sleep(0.3)
    children = [c.pid for c in psutil.Process(leader.pid).children()]
    assert len(children) == 2
    record(tmp_path, [("stack-worker-1", leader, 0.0)])
    assert stack.down(tmp_path, grace_s=5) == ["stack-worker-1"]
    leader.wait(timeout=5)
    assert not any(alive(pid) for pid in children)
    assert StackState.load(tmp_path).processes == []
    assert stack.down(tmp_path) == []  # a second down has nothing to stop


def test_down_stops_descendants_in_sessions_of_their_own(tmp_path, spawned):
    """Prefect's process worker starts each flow run with setsid: outside the worker's group."""
    worker = start(spawned, ["bash", "-c", "setsid sleep 61 & wait"])
    time.sleep(0.5)
    [flow_run] = psutil.Process(worker.pid).children()
    assert flow_run.pid == flow_run.ppid() or os.getsid(flow_run.pid) != os.getsid(worker.pid)
    record(tmp_path, [("stack-worker-1", worker, 0.0)])
    assert stack.down(tmp_path, grace_s=5) == ["stack-worker-1"]
    assert not alive(flow_run.pid)


def test_down_stops_marked_strays(tmp_path, spawned, caplog):
    """A flow run whose worker died earlier still carries the stack's mark."""
    record(tmp_path, [])
    env = dict(os.environ, **{stack.STACK_MARK: str(tmp_path.resolve())})
    stray = subprocess.Popen(["sleep", "62"], env=env, start_new_session=True)
    spawned.append(stray)
    with caplog.at_level(logging.WARNING, logger="scripts.stack"):
        assert stack.down(tmp_path, grace_s=5) == []
    assert not alive(stray.pid)
    assert f"stray process(es) of this stack: {stray.pid}" in caplog.text


def test_down_kills_what_ignores_sigterm(tmp_path, spawned, caplog):
    stubborn = start(
        spawned,
        [
            sys.executable,
            "-c",
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
            " print('ready', flush=True); time.sleep(60)",
        ],
    )
    time.sleep(0.5)
    record(tmp_path, [("seaweedfs", stubborn, 0.0)])
    with caplog.at_level(logging.WARNING, logger="scripts.stack"):
        assert stack.down(tmp_path, grace_s=0.5) == ["seaweedfs"]
    assert not alive(stubborn.pid)
    assert "seaweedfs (pid" in caplog.text and "ignored SIGTERM" in caplog.text


def test_down_leaves_a_reused_pid_alone(tmp_path, spawned):
    other = start(spawned, ["sleep", "60"])
    # Same pid, other start time: the process we recorded is gone and the pid was reused.
    record(tmp_path, [("prefect-server", other, -100.0)])
    assert stack.down(tmp_path, grace_s=1) == []
    assert alive(other.pid)


def test_up_refuses_a_folder_whose_stack_still_runs(tmp_path, spawned):
    record(tmp_path, [("prefect-server", start(spawned, ["sleep", "60"]), 0.0)])
    with pytest.raises(StackError, match="still running; run `make stack-down`"):
        stack.up(StackSettings(root=tmp_path))


def test_down_without_state_names_the_folder(tmp_path):
    with pytest.raises(StackError, match=f"{tmp_path}/stack.json: no stack state"):
        stack.down(tmp_path)


def test_client_env_points_only_at_the_stack(tmp_path):
    state = record(tmp_path, [])
    env = state.client_env(
        {
            "PREFECT_API_URL": "https://api.prefect.cloud/x",
            "PREFECT_API_KEY": "secret",
            "AWS_PROFILE": "prod",
            "AWS_SECRET_ACCESS_KEY": "real",
            "PREFECT_LOGGING_LEVEL": "DEBUG",
            "PATH": "/usr/bin",
        }
    )
    assert env["PREFECT_API_URL"] == "http://127.0.0.1:1/api"
    assert env["AWS_ENDPOINT_URL"] == "http://127.0.0.1:2"
    assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == ("k", "s")
    assert "PREFECT_API_KEY" not in env and "AWS_PROFILE" not in env
    assert env["PREFECT_LOGGING_LEVEL"] == "DEBUG" and env["PATH"] == "/usr/bin"
    assert env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert env["PREFECT_HOME"].startswith(str(tmp_path))


def test_weed_binds_loopback_without_telemetry(tmp_path):
    ports = WeedPorts.free()
    argv = stack.weed_argv(tmp_path, ports)
    assert "-ip=127.0.0.1" in argv and "-ip.bind=127.0.0.1" in argv
    assert "-master.telemetry=false" in argv and "-logtostderr" in argv
    for port in vars(ports).values():
        assert any(a.endswith(f"={port}") for a in argv), port
    assert f"-dir={tmp_path / 'seaweedfs'}" in argv
    assert '"accessKey": "stack-access-key"' in (tmp_path / "seaweedfs-s3.json").read_text()


def test_ports_and_names():
    ports = stack.free_ports(8)
    assert len(set(ports)) == 8
    assert WeedPorts.around(8333, 9333, 8080, 8888) == WeedPorts()
    root = Path(__file__).resolve().parents[2]
    assert stack.bucket_of(root / "config/e2e.yaml") == "deepfake-e2e"
    assert stack._with_bucket("s3://a/team/x", "b") == "s3://b/team/x"
    with pytest.raises(StackError, match="not an s3:// bucket"):
        stack.bucket_of(root / "config/demo.yaml")
