"""`train-all-fusions` through Prefect: set-up creates the folders; retries only transient faults;
a bad config fails before any work, naming the key and file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from prefect import flow, task

from flows.steps import is_transient
from tasks.errors import ConfigError, Throttled

ROOT = Path(__file__).resolve().parents[2]


def demo_config(tmp_path: Path, uri: str, extra: str = "") -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(f"storage:\n  uri: {uri}\n{extra}")
    return path


@pytest.mark.usefixtures("prefect_harness")
def test_set_up_creates_folders_on_local_bucket(tmp_path: Path) -> None:
    from config import load_config
    from flows.train_all_fusions import set_up_folders

    bucket = tmp_path / "bucket"
    cfg = load_config(demo_config(tmp_path, str(bucket)))

    @flow
    def only_setup() -> list[str]:
        return set_up_folders(cfg).folders

    folders = only_setup()
    for name in ("models", "plots", "logs", "manifests", "reports", "intermediates"):
        assert (bucket / "outputs" / name).is_dir()
    assert "outputs/cache/features/" in folders


@pytest.mark.usefixtures("prefect_harness")
def test_set_up_on_s3_over_http(tmp_path: Path, s3_server, s3_bucket: str) -> None:  # type: ignore[no-untyped-def]
    import boto3

    from config import load_config
    from flows.train_all_fusions import set_up_folders

    cfg = load_config(
        demo_config(tmp_path, f"s3://{s3_bucket}", f"  endpoint_url: {s3_server.endpoint_url}\n")
    )

    @flow
    def only_setup() -> str:
        return set_up_folders(cfg).root_uri

    assert only_setup() == f"s3://{s3_bucket}"
    keys = {
        o["Key"]
        for o in boto3.client("s3", endpoint_url=s3_server.endpoint_url).list_objects_v2(
            Bucket=s3_bucket
        )["Contents"]
    }
    assert {"outputs/models/", "outputs/plots/", "outputs/logs/"} <= keys


def _attempts_of(exc: Exception) -> int:
    calls: list[int] = []

    @task(retries=3, retry_delay_seconds=0, retry_condition_fn=is_transient)
    def flaky() -> None:
        calls.append(1)
        raise exc

    @flow
    def run_it() -> None:
        flaky()

    with pytest.raises(type(exc)):
        run_it()
    return len(calls)


@pytest.mark.usefixtures("prefect_harness")
def test_only_transient_errors_are_retried() -> None:
    assert _attempts_of(Throttled("s3://b/k: throttled")) == 4
    assert _attempts_of(ConfigError("training.epochs: bad")) == 1
    assert _attempts_of(ValueError("a bug")) == 1


def _run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)  # the venv's python imports the installed project anywhere
    return subprocess.run(
        [sys.executable, "-m", "flows.train_all_fusions", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_refuses_misspelt_key_before_any_work(tmp_path: Path) -> None:
    bucket = tmp_path / "bucket"
    cfg = demo_config(tmp_path, str(bucket), "trainng:\n  epochs: 1\n")
    proc = _run_cli("--config", str(cfg), cwd=tmp_path)
    assert proc.returncode == 2
    assert "trainng: unknown setting" in proc.stderr and str(cfg) in proc.stderr
    assert not bucket.exists()  # nothing was started, nothing written


def test_cli_refuses_bad_override(tmp_path: Path) -> None:
    cfg = demo_config(tmp_path, str(tmp_path / "bucket"))
    proc = _run_cli("--config", str(cfg), "--set", "training.batch_size=sixteen", cwd=tmp_path)
    assert proc.returncode == 2
    assert 'training.batch_size: must be a valid integer, got "sixteen"' in proc.stderr


def test_cli_missing_bucket_fails_naming_the_bucket(tmp_path: Path, s3_server) -> None:  # type: ignore[no-untyped-def]
    cfg = demo_config(
        tmp_path, "s3://no-such-bucket-abc", f"  endpoint_url: {s3_server.endpoint_url}\n"
    )
    proc = _run_cli("--config", str(cfg), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: s3://no-such-bucket-abc: bucket does not exist" in proc.stderr
