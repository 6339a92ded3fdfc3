"""The whole pipeline under an S3 server that enforces IAM, with credentials that hold only the
policy `deployments/iam_policy.py` generates for the run's own settings: a first night, a second
night that skips unchanged data, and a run killed mid-training and then resumed all succeed; with
any one statement of the policy removed, some step of that sequence fails with AccessDenied.

moto's server enforces IAM once `INITIAL_NO_AUTH_ACTION_COUNT` requests have been served: those
first requests (made with the fake root keys) create the bucket, the IAM user, its inline policy,
its access key and the pretrained weights object; every later request must be signed by a known
key and allowed by that key's policies. The session's shared moto server (tests/conftest.py) runs
in this process and its auth switch is a process-wide setting, so this module starts its own
`moto_server` process per test instead.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from config import load_config
from deployments.iam_policy import bucket_policy
from tasks.errors import AccessDenied
from tasks.io.layout import Layout

ROOT = Path(__file__).resolve().parents[2]
MOTO_SERVER = Path(sys.executable).with_name("moto_server")
WEIGHTS_KEY = "weights/resnet18.pt"  # outside dataset/ and outputs/: needs its own statement

# Every setting that widens the policy is on: a demo dataset written into the empty bucket,
# checkpoint pruning, pretrained weights read from the bucket. One fusion, tiny inputs: the
# policy does not depend on the fusions, and each run must stay short.
CONFIG = """
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
model:
  pretrained_image_weights: {weights}
run:
  skip_if_unchanged: true
training:
  fusions: [early]
  epochs: 2
  keep_checkpoints: 1
  log_every: 2
"""
# moto authorises HeadBucket as the action "s3:HeadBucket"; AWS has no such permission and
# authorises HeadBucket with s3:ListBucket, which the generated policy grants. This alias adds
# to the tested policy only what moto, not AWS, asks for (nothing else in the run needs it).
MOTO_HEAD_BUCKET_ALIAS = {
    "Sid": "MotoNamesHeadBucketItsOwnAction",
    "Effect": "Allow",
    "Action": ["s3:HeadBucket"],
    "Resource": "arn:aws:s3:::{bucket}",
}
SETUP_REQUESTS = 5  # create_bucket, create_user, put_user_policy, create_access_key, put weights


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class IamServer:
    endpoint: str
    process: subprocess.Popen[bytes]


@pytest.fixture
def iam_server(tmp_path: Path) -> Iterator[IamServer]:
    """A moto server process on 127.0.0.1 that enforces IAM after SETUP_REQUESTS requests."""
    port = free_port()
    env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT=str(SETUP_REQUESTS))
    log = (tmp_path / "moto.log").open("wb")
    proc = subprocess.Popen(
        [str(MOTO_SERVER), "-H", "127.0.0.1", "-p", str(port)], env=env, stdout=log, stderr=log
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"moto_server did not start: {tmp_path / 'moto.log'}") from None
            time.sleep(0.2)
    try:
        yield IamServer(endpoint=endpoint, process=proc)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def weights_file() -> bytes:
    import torch
    from torchvision.models import resnet18

    torch.manual_seed(0)
    buf = io.BytesIO()
    torch.save(resnet18(weights=None).state_dict(), buf)
    return buf.getvalue()


def provision(endpoint: str, bucket: str, policy: dict[str, Any]) -> dict[str, str]:
    """The SETUP_REQUESTS unauthenticated requests: the bucket, the weights object, an IAM user
    holding only `policy`; returns that user's credentials as environment variables."""
    import boto3

    root = {"endpoint_url": endpoint, "region_name": "us-east-1"}
    s3 = boto3.client("s3", **root)
    iam = boto3.client("iam", **root)
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key=WEIGHTS_KEY, Body=weights_file())
    iam.create_user(UserName="worker")
    iam.put_user_policy(
        UserName="worker", PolicyName="deepfake-bucket", PolicyDocument=json.dumps(policy)
    )
    key = iam.create_access_key(UserName="worker")["AccessKey"]
    return {
        "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
        "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
    }


def worker_client(endpoint: str, creds: dict[str, str]) -> Any:
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=creds["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=creds["AWS_SECRET_ACCESS_KEY"],
    )


@dataclass
class Setup:
    cfg_path: Path
    endpoint: str
    bucket: str
    creds: dict[str, str]
    policy: dict[str, Any]


def set_up(
    tmp_path: Path, server: IamServer, monkeypatch: pytest.MonkeyPatch, drop: str | None = None
) -> Setup:
    """Config, generated policy (less the statement `drop`), provisioned user; the process's AWS
    credentials become the user's, so every S3 request of the pipeline is signed with them."""
    bucket = f"iam-{uuid.uuid4().hex[:10]}"
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(CONFIG.format(bucket=bucket, endpoint=server.endpoint, weights=WEIGHTS_KEY))
    policy = bucket_policy(load_config(cfg_path))
    if drop is not None:
        kept = [s for s in policy["Statement"] if s["Sid"] != drop]
        assert len(kept) == len(policy["Statement"]) - 1, f"no statement {drop}"
        policy = {**policy, "Statement": kept}
    alias = json.loads(json.dumps(MOTO_HEAD_BUCKET_ALIAS).replace("{bucket}", bucket))
    tested = {**policy, "Statement": [*policy["Statement"], alias]}
    creds = provision(server.endpoint, bucket, tested)
    # IAM is enforced from here on: the fake root keys are refused, and the user may not do what
    # the policy does not grant (here: create a bucket).
    from botocore.exceptions import ClientError

    with pytest.raises(ClientError, match="AccessDenied|InvalidAccessKeyId|403"):
        worker_client(server.endpoint, creds).create_bucket(Bucket=f"{bucket}-other")
    for name, value in creds.items():
        monkeypatch.setenv(name, value)
    return Setup(cfg_path, server.endpoint, bucket, creds, policy)


def killed_mid_training(setup: Setup, overrides: list[str], first_run: str) -> str:
    """Run the pipeline in a process of its own and SIGKILL it once a new run's first checkpoint
    is in the bucket, as a dying worker would; returns the killed run's id."""
    from prefect.settings import PREFECT_API_URL

    env = dict(os.environ, **setup.creds, PREFECT_API_URL=str(PREFECT_API_URL.value()))
    args = ["--config", str(setup.cfg_path)] + [a for o in overrides for a in ("--set", o)]
    log_path = setup.cfg_path.with_name("killed-run.log")
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "flows.train_all_fusions", *args],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    s3 = worker_client(setup.endpoint, setup.creds)
    prefix = Layout().models_root() + "early/"
    deadline = time.monotonic() + 600
    try:
        while True:
            listed = s3.list_objects_v2(Bucket=setup.bucket, Prefix=prefix).get("Contents", [])
            keys = [o["Key"] for o in listed]
            started = [k for k in keys if "/checkpoints/epoch-" in k and f"/{first_run}/" not in k]
            if started:
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace")[-4000:]
                raise AssertionError(f"no checkpoint of the run to kill; its log ends:\n{tail}")
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    return started[0][len(prefix) :].split("/")[0]


def mark_crashed(flow_run_id: str) -> None:
    """What Prefect's zombie detection does to a flow run whose worker died (the test harness
    runs no such automation): the killed run is Crashed, no longer live."""
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    with get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run_id, Crashed(message="worker killed"), force=True)


def whole_sequence(setup: Setup) -> None:
    """First night, skip-unchanged second night, killed run, resumed run: all must succeed."""
    from flows.train_all_fusions import train_all_fusions

    s3 = worker_client(setup.endpoint, setup.creds)
    layout = Layout()

    def in_progress() -> dict[str, Any] | None:
        try:
            body = s3.get_object(Bucket=setup.bucket, Key=layout.in_progress())["Body"]
        except s3.exceptions.NoSuchKey:
            return None
        return dict(json.loads(body.read()))

    first = train_all_fusions(config_path=str(setup.cfg_path))
    assert first.fusions == ["early"] and first.report_key
    assert in_progress() is None  # finish-run could delete it
    ckpts = s3.list_objects_v2(Bucket=setup.bucket, Prefix=layout.checkpoints("early", first.run))
    assert [o["Key"] for o in ckpts["Contents"]] == [layout.checkpoint("early", first.run, 2)]

    second = train_all_fusions(config_path=str(setup.cfg_path))
    assert second.notes and second.notes[0].startswith("skipped"), second.notes
    assert second.run != first.run and in_progress() is None

    overrides = ["training.epochs=3"]  # other settings than the last run: trains again
    killed = killed_mid_training(setup, overrides, first.run)
    record = in_progress()
    assert record is not None and record["run"] == killed
    mark_crashed(record["flow_run_id"])
    resumed = train_all_fusions(config_path=str(setup.cfg_path), overrides=overrides)
    assert resumed.run == killed and resumed.fusions == ["early"]
    trained = json.loads(
        s3.get_object(Bucket=setup.bucket, Key=layout.trained("early", killed))["Body"].read()
    )
    assert trained["resumed_from"] is not None and trained["resumed_from"] >= 1
    assert trained["epochs"] == 3
    assert in_progress() is None


# Each statement, and the key the run is first denied at without it.
STATEMENTS = {
    "ListTheBucket": "dataset/",  # the empty-dataset check lists dataset/
    "ReadTheDataset": "dataset/pairs.csv",  # the manifest reads pairs.csv
    "ReadAndWriteOutputs": "outputs/",  # set-up writes the output folders
    "ForgetTheFinishedRun": "outputs/runs/in-progress.json",  # finish-run, end of night 1
    "DeleteOldCheckpoints": "/checkpoints/epoch-1.pt",  # pruned after epoch 2 is saved
    "WriteTheDemoDataset": "dataset/",  # the demo data written into the empty bucket
    "ReadPretrainedImageWeights": WEIGHTS_KEY,  # read as training starts
}


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_the_generated_policy_suffices_for_nights_skips_and_resumes(
    tmp_path: Path, iam_server: IamServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    setup = set_up(tmp_path, iam_server, monkeypatch)
    sids = [s["Sid"] for s in setup.policy["Statement"]]
    # every statement the settings can add is there: the parametrized test below drops each
    assert sids == list(STATEMENTS)
    whole_sequence(setup)


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
@pytest.mark.parametrize("drop", list(STATEMENTS))
def test_without_any_one_statement_the_run_is_denied(
    tmp_path: Path, iam_server: IamServer, monkeypatch: pytest.MonkeyPatch, drop: str
) -> None:
    setup = set_up(tmp_path, iam_server, monkeypatch, drop=drop)
    with pytest.raises(AccessDenied) as denied:
        whole_sequence(setup)
    message = str(denied.value)
    assert message.startswith(f"s3://{setup.bucket}/") and "access denied" in message
    assert STATEMENTS[drop] in message.split(":")[1], message
