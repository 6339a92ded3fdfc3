"""Storage faults met by the Prefect steps, through the fault-injecting proxy (tests/faultproxy.py)
in front of a moto server that checks upload checksums as S3 does.

- The two retry layers multiply as `flows.common.io_step_worst_case_wait_s` says: a persistent
  503 reaches the store `storage.max_attempts` x (1 + IO_TASK_RETRIES) times, no more, and the
  configured bounds keep a step's worst case under IO_STEP_WAIT_LIMIT_S.
- A run that fails before promotion (its plots' uploads cut in transit, every retry) leaves the
  champion record and the champion's model as they were and no cut object under any key; the
  rerun takes the run over, reuses what the first attempt finished (the same checkpoint and
  model objects, no second copy) and completes.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from config.schema import StorageConfig
from flows import common
from tasks.errors import Throttled
from tests import faultproxy
from tests.faultproxy import Fault, FaultProxy


@pytest.fixture(scope="module")
def checking_server() -> Iterator[str]:
    with faultproxy.checking_moto() as url:
        yield url


@pytest.fixture
def proxy(checking_server: str) -> Iterator[FaultProxy]:
    p = FaultProxy(checking_server).start()
    try:
        yield p
    finally:
        p.stop()


def new_bucket(endpoint: str) -> str:
    import uuid

    name = f"steps-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=name)
    return name


def test_the_steps_retries_match_the_stated_settings() -> None:
    from flows.steps import IO_RETRIES

    assert IO_RETRIES["retries"] == common.IO_TASK_RETRIES
    nominal = IO_RETRIES["retry_delay_seconds"](IO_RETRIES["retries"])
    assert nominal == [common.IO_RETRY_BACKOFF_S * 2**r for r in range(common.IO_TASK_RETRIES)]
    assert IO_RETRIES["retry_jitter_factor"] == common.IO_RETRY_JITTER
    assert common.io_retry_delay_bounds_s() == [d * (1 + common.IO_RETRY_JITTER) for d in nominal]


@pytest.mark.parametrize("config", ["defaults", "config/config.yaml", "config/e2e.yaml"])
def test_a_steps_worst_case_wait_stays_under_the_stated_limit(config: str) -> None:
    from config.load import load_config

    root = Path(__file__).resolve().parents[2]
    cfg = StorageConfig() if config == "defaults" else load_config(root / config).storage
    worst = common.io_step_worst_case_wait_s(cfg)
    assert worst <= common.IO_STEP_WAIT_LIMIT_S, (config, worst)
    # Before this bound existed: 9 attempts (botocore's legacy max_attempts=8 counts retries),
    # 10 s + 60 s timeouts, backoff up to 20 s: over an hour.
    assert common.io_step_worst_case_wait_s(cfg, multipart=False) < worst


@pytest.mark.usefixtures("prefect_harness")
@pytest.mark.parametrize("attempts", [1, 2])
def test_a_persistent_503_is_tried_botocore_attempts_times_step_attempts(
    proxy: FaultProxy, checking_server: str, attempts: int
) -> None:
    from config.schema import PipelineConfig
    from flows.steps import set_up_folders

    bucket = new_bucket(checking_server)
    cfg = PipelineConfig.model_validate(
        {"storage": {"uri": f"s3://{bucket}", "endpoint_url": proxy.url, "max_attempts": attempts}}
    )
    proxy.add(Fault("503"), key=f"^/{bucket}")
    # The step's own retries and retry condition; only its delays are dropped (they are sleeps).
    step = set_up_folders.with_options(retry_delay_seconds=0)
    state = step(cfg, return_state=True)
    assert state.is_failed()
    with pytest.raises(Throttled) as exc:
        state.result()
    assert f"s3://{bucket}" in str(exc.value) and "503" in str(exc.value)
    assert f"after {attempts} attempt" in str(exc.value)
    assert proxy.attempts(key=f"^/{bucket}") == attempts * (1 + common.IO_TASK_RETRIES)


TINY = """
storage:
  uri: s3://{bucket}
  endpoint_url: {endpoint}
  max_attempts: 2
  read_timeout_s: 5
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


def objects(endpoint: str, bucket: str, prefix: str = "") -> dict[str, dict[str, Any]]:
    s3 = boto3.client("s3", endpoint_url=endpoint)
    out: dict[str, dict[str, Any]] = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            out[item["Key"]] = item
    return out


def body(endpoint: str, bucket: str, key: str) -> bytes:
    data: bytes = (
        boto3.client("s3", endpoint_url=endpoint).get_object(Bucket=bucket, Key=key)["Body"].read()
    )
    return data


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_a_run_failing_before_promotion_keeps_the_champion_and_its_rerun_reuses_its_work(
    proxy: FaultProxy, checking_server: str, tmp_path: Path
) -> None:
    from flows.train_all_fusions import train_all_fusions

    bucket = new_bucket(checking_server)
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY.format(bucket=bucket, endpoint=proxy.url))
    first = train_all_fusions(config_path=str(config))
    champion_key = "outputs/models/mid/champion.json"
    champion = body(checking_server, bucket, champion_key)
    champion_model = f"outputs/models/mid/{first.run}/model.pt"
    model_bytes = body(checking_server, bucket, champion_model)
    assert first.run.encode() in champion

    # The next night: every upload of its plots is cut in transit, so evaluation fails on
    # every retry and the run fails before promotion.
    proxy.add(Fault("cut_upload"), method="PUT", key=r"/outputs/plots/[^/]+/[^/]+$")
    state = train_all_fusions(config_path=str(config), return_state=True)
    assert state.is_failed()
    # The first plot's upload: 2 attempts (storage.max_attempts) in each of the step's 5.
    cut = proxy.attempts("PUT", "/outputs/plots/", fault="cut_upload")
    assert cut == 2 * (1 + common.IO_TASK_RETRIES)
    assert body(checking_server, bucket, champion_key) == champion
    assert body(checking_server, bucket, champion_model) == model_bytes
    runs = {k.split("/")[3] for k in objects(checking_server, bucket, "outputs/models/mid/")}
    (second,) = runs - {first.run, "champion.json"}
    assert not objects(checking_server, bucket, f"outputs/plots/{second}/")  # nothing cut stored
    finished = objects(checking_server, bucket, f"outputs/models/mid/{second}/")
    assert f"outputs/models/mid/{second}/model.pt" in finished

    # The rerun takes the failed run over and completes it without redoing or copying its work.
    proxy.clear()
    again = train_all_fusions(config_path=str(config))
    assert again.run == second
    after = objects(checking_server, bucket, f"outputs/models/mid/{second}/")
    for key, item in finished.items():
        if key.endswith((".pt", ".npz")):  # model, checkpoint, emotion vectors: reused
            assert after[key]["ETag"] == item["ETag"], key
    checkpoints = [k for k in after if "/checkpoints/" in k]
    assert len(checkpoints) == 1  # one epoch, saved once
    plots = objects(checking_server, bucket, f"outputs/plots/{second}/")
    assert plots and all(
        body(checking_server, bucket, k).endswith(b"IEND\xaeB`\x82") for k in plots
    )  # whole PNGs
    assert second.encode() in body(checking_server, bucket, champion_key)  # promoted now
