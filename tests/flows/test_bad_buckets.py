"""`train-all-fusions` on a bucket it cannot train from (moto's S3 server over HTTP, through
Prefect's test harness): an empty bucket and a bucket with one class only are refused up front,
at build-manifest, with one clear message; nothing is decoded or trained and no model is
written."""

from __future__ import annotations

from pathlib import Path

import boto3
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from tests.unit.synthetic_data import generated

CONFIG = """
storage:
  uri: s3://{bucket}
  endpoint_url: {endpoint}
  max_attempts: 2
data:
  n_mels: 32
  spec_frames: 32
  image_size: 32
training:
  fusions: [mid]
  epochs: 1
"""


def real_only() -> dict[str, bytes]:
    return {k: v for k, v in generated(40, seed=21).items() if "/real/" in k}


@pytest.mark.usefixtures("prefect_harness")
@pytest.mark.parametrize(
    ("objects", "message"),
    [
        ({}, "dataset/: no usable pairs (0 audio and 0 image"),
        (real_only(), "split has no fake pairs"),
    ],
    ids=["empty bucket", "one class only"],
)
def test_a_bucket_it_cannot_train_from_is_refused_at_the_manifest(
    objects: dict[str, bytes], message: str, tmp_path: Path, s3_server, s3_bucket: str
) -> None:
    from flows.train_all_fusions import train_all_fusions

    s3 = boto3.client("s3", endpoint_url=s3_server.endpoint_url)
    for key, data in objects.items():
        s3.put_object(Bucket=s3_bucket, Key=key, Body=data)
    config = tmp_path / "cfg.yaml"
    config.write_text(CONFIG.format(bucket=s3_bucket, endpoint=s3_server.endpoint_url))

    state = train_all_fusions(config_path=str(config), return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception, match=message.replace("(", r"\(")):
        state.result()
    with get_client(sync_client=True) as client:
        flow_run_id = state.state_details.flow_run_id
        tasks = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    failed = sorted({t.name.rsplit("-", 1)[0] for t in tasks if t.state and t.state.is_failed()})
    ran = {t.name.rsplit("-", 1)[0] for t in tasks}
    assert failed == ["build-manifest"], failed
    assert not ran & {"build-features", "train-fusion", "evaluate"}, ran
    listed = s3.list_objects_v2(Bucket=s3_bucket, Prefix="outputs/models/").get("Contents", [])
    assert [o["Key"] for o in listed if not o["Key"].endswith("/")] == []  # set-up's folder only
