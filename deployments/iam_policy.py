"""The least-privilege IAM policy of the worker's instance role, generated from a config file, so
it names exactly the configured bucket and prefixes:

    python -m deployments.iam_policy --config config/config.yaml > deployments/iam-policy.json

It allows, on `storage.uri`'s bucket only (keys under its prefix, if any):
  - s3:ListBucket on the bucket: the manifest lists dataset/, the cache and evaluation list
    outputs/; HeadBucket (the start-up check) needs it too;
  - s3:GetObject on dataset/*: the raw audio and images are read, never written;
  - s3:GetObject and s3:PutObject on outputs/*: models, checkpoints, logs, plots, reports
    (multipart uploads are covered by s3:PutObject);
  - s3:DeleteObject on outputs/models/*/checkpoints/* only when training.keep_checkpoints is set
    (the trainer then deletes older checkpoints); nothing is deleted otherwise.
Nothing else: no other bucket, no bucket settings, no deletes of data or results.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

from config.load import load_config
from config.schema import PipelineConfig
from flows.common import base_parser
from tasks.errors import ConfigError


def bucket_and_prefix(uri: str) -> tuple[str, str]:
    """("bucket", "root/prefix/" or "") of an s3:// storage URI."""
    if not uri.startswith("s3://"):
        raise ConfigError(f"storage.uri: an IAM policy needs an s3:// bucket, got {uri!r}")
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    prefix = prefix.strip("/")
    return bucket, f"{prefix}/" if prefix else ""


def bucket_policy(cfg: PipelineConfig, partition: str = "aws") -> dict[str, Any]:
    """The IAM policy document (a dict, ready for `json.dumps`) for `cfg.storage`'s bucket."""
    bucket, root = bucket_and_prefix(cfg.storage.uri)
    arn = f"arn:{partition}:s3:::{bucket}"
    dataset = f"{arn}/{root}{cfg.storage.dataset_prefix}*"
    outputs = f"{arn}/{root}{cfg.storage.outputs_prefix}*"
    statements: list[dict[str, Any]] = [
        {"Sid": "ListTheBucket", "Effect": "Allow", "Action": ["s3:ListBucket"], "Resource": arn},
        {"Sid": "ReadTheDataset", "Effect": "Allow", "Action": ["s3:GetObject"],
         "Resource": dataset},
        {"Sid": "ReadAndWriteOutputs", "Effect": "Allow",
         "Action": ["s3:GetObject", "s3:PutObject"], "Resource": outputs},
    ]  # fmt: skip
    if cfg.training.keep_checkpoints is not None:
        statements.append({
            "Sid": "DeleteOldCheckpoints", "Effect": "Allow", "Action": ["s3:DeleteObject"],
            "Resource": f"{arn}/{root}{cfg.storage.outputs_prefix}models/*/checkpoints/*",
        })  # fmt: skip
    return {"Version": "2012-10-17", "Statement": statements}


def main(argv: Sequence[str] | None = None) -> int:
    parser = base_parser((__doc__ or "").splitlines()[0])
    parser.add_argument("--partition", default="aws", help="ARN partition (aws, aws-cn, ...)")
    args = parser.parse_args(argv)
    try:
        policy = bucket_policy(load_config(args.config, args.overrides), args.partition)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(policy, indent=2))
    return 0


def cli() -> int:
    """The `deepfake-iam-policy` console script: parse sys.argv, run, return the exit code."""
    return main()


if __name__ == "__main__":
    sys.exit(cli())
