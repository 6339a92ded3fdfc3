"""No secret goes out: fake AWS keys (access key, secret key, session token) and a fake Prefect
API key are planted in the environment of a tiny `train-all-fusions` run on S3 (moto's server
over HTTP, which takes any keys), an `evaluate` and a `detect` run after it, and of runs that
fail on purpose; then every output is scanned:
every object in the bucket, every Prefect artifact, log and flow or task run state message of
those runs (read back through the Prefect client), the captured console, and the errors raised.
A planted value, raw or URL-encoded, must appear in none of them."""

from __future__ import annotations

import traceback
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote

import boto3
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterStartTime,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.logging.handlers import APILogWorker

# Distinctive fakes, shaped like the real ones (the secret key and token carry '/' and '+').
PLANTED = {
    "AWS_ACCESS_KEY_ID": "AKIAPLANTEDFAKE7Q3ZX",
    "AWS_SECRET_ACCESS_KEY": "pLaNtEd/FakeSecret+Key0123456789abcdefGHIJ",
    "AWS_SESSION_TOKEN": "FwoGZXIvYXdzEPlantedFakeSessionToken/+0123456789ABCDEFabcdef==",
    "PREFECT_API_KEY": "pnu_PlantedFakePrefectApiKey0123456789",
}

TINY = """
storage:
  uri: s3://{bucket}
  endpoint_url: {endpoint}
  max_attempts: 2
data:
  n_mels: 32
  spec_frames: 32
  image_size: 32
  shard_size: 32
  decode_workers: 1
generator:
  fill_empty_dataset: true
  n_pairs: 96
training:
  fusions: [mid]
  epochs: 1
  log_every: 2
"""


def forms(value: str) -> set[str]:
    """The value as it could appear: raw or URL-encoded (in a query string)."""
    return {value, quote(value, safe=""), quote(value)}


def leaks(where: str, text: str) -> list[str]:
    return [f"{where}: {name}" for name, v in PLANTED.items() for f in forms(v) if f in text]


@pytest.fixture
def planted(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name, value in PLANTED.items():
        monkeypatch.setenv(name, value)
    yield


def bucket_text(endpoint: str, bucket: str) -> dict[str, str]:
    """Every object in the bucket, as text (bytes decoded leniently; binary files too)."""
    s3 = boto3.client("s3", endpoint_url=endpoint)
    out: dict[str, str] = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for item in page.get("Contents", []):
            body = s3.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
            out[f"s3://{bucket}/{item['Key']}"] = item["Key"] + body.decode("latin-1")
    return out


def prefect_text(since: datetime) -> dict[str, str]:
    """Artifacts, logs, parameters and state messages of every flow run started since `since`
    and of their task runs, read through the Prefect client."""
    APILogWorker.drain_all(timeout=10)
    out: dict[str, str] = {}
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(start_time=FlowRunFilterStartTime(after_=since))
        )
        assert runs, "no flow run was recorded"
        ids = [r.id for r in runs]
        for r in runs:
            out[f"flow run {r.name}"] = r.model_dump_json()
        by_run = FlowRunFilter(id={"any_": ids})
        for t in client.read_task_runs(flow_run_filter=by_run):
            out[f"task run {t.name}"] = t.model_dump_json()
        for a in client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=ids))
        ):
            out[f"artifact {a.key}"] = a.model_dump_json()
        offset = 0
        while True:
            page = client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=ids)),
                limit=200,
                offset=offset,
            )
            for i, entry in enumerate(page):
                out[f"log {offset + i} ({entry.name})"] = entry.message
            if len(page) < 200:
                break
            offset += 200
        assert any(k.startswith("log ") for k in out), "no log was read back"
    return out


@pytest.mark.usefixtures("prefect_harness", "planted")
def test_planted_keys_appear_in_no_output(
    tmp_path: Path, s3_server, s3_bucket: str, capfd: pytest.CaptureFixture[str]
) -> None:
    from flows.detect import detect
    from flows.evaluate import evaluate_models
    from flows.train_all_fusions import train_all_fusions

    since = datetime.now(UTC)
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY.format(bucket=s3_bucket, endpoint=s3_server.endpoint_url))
    summary = train_all_fusions(config_path=str(config))
    assert summary.fusions == ["mid"] and summary.report_key
    # the other flows that write into the bucket and make artifacts: re-evaluation, detection
    assert evaluate_models(config_path=str(config)).reproduced is True
    assert detect(config_path=str(config), prefix="dataset/").n_scored > 0

    # runs that fail on purpose: a bucket that does not exist, a bad override, a missing file
    errors: dict[str, str] = {}
    missing = tmp_path / "missing-bucket.yaml"
    missing.write_text(
        TINY.format(bucket=f"nope-{uuid.uuid4().hex[:8]}", endpoint=s3_server.endpoint_url)
    )
    failing = [
        (str(missing), []),
        (str(config), ["training.batch_size=sixteen"]),
        (str(tmp_path / "absent.yaml"), []),
    ]
    for path, overrides in failing:
        state = train_all_fusions(config_path=path, overrides=overrides, return_state=True)
        assert state.is_failed(), path
        try:
            state.result()
        except Exception as exc:
            errors[f"error of {path} {overrides}"] = "".join(traceback.format_exception(exc))
        else:
            raise AssertionError(f"{path}: expected a failure")

    captured = capfd.readouterr()
    outputs = {
        **bucket_text(s3_server.endpoint_url, s3_bucket),
        **prefect_text(since),
        **errors,
        "stdout": captured.out,
        "stderr": captured.err,
    }
    assert any("report.html" in k for k in outputs) and any("artifact" in k for k in outputs)
    found = [leak for where, text in outputs.items() for leak in leaks(where, text)]
    assert not found, "planted secrets leaked:\n" + "\n".join(found)
