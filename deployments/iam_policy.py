"""The least-privilege IAM policy of the worker's instance role, generated from a config file, so
it names exactly the configured bucket and prefixes and allows exactly what a run does with those
settings:

    python -m deployments.iam_policy --config config/config.yaml > deployments/iam-policy.json

On `storage.uri`'s bucket only (keys under its prefix, if any), one statement per need:
  - ListTheBucket: s3:ListBucket on the bucket. The manifest lists dataset/, the cache, resume and
    evaluation list outputs/; the start-up check is a HeadBucket, which AWS authorises with
    s3:ListBucket (there is no s3:HeadBucket permission in AWS);
  - ReadTheDataset: s3:GetObject on dataset/* (the raw audio, images and pairs.csv);
  - ReadAndWriteOutputs: s3:GetObject and s3:PutObject on outputs/*: models, checkpoints, logs,
    plots, reports, records (multipart uploads are covered by s3:PutObject);
  - ForgetTheFinishedRun: s3:DeleteObject on outputs/runs/in-progress.json only: finish-run
    deletes the record of the run in progress, or the next night would adopt a finished run;
  - DeleteOldCheckpoints: s3:DeleteObject on outputs/models/*/checkpoints/*, unless
    training.keep_checkpoints is null (it keeps the newest 2 by default and deletes older ones);
  - WriteTheDemoDataset: s3:PutObject on dataset/*, only when generator.fill_empty_dataset is on
    (the synthetic benchmark is then written into an empty dataset/);
  - ReadPretrainedImageWeights: s3:GetObject on the one key model.pretrained_image_weights names,
    when it is a bucket key outside dataset/ and outputs/ (not "imagenet", not an absolute or ~
    path; a relative value may be a local file on the worker, so it is granted to be safe: one
    read of one object).
Nothing else: no other bucket, no bucket settings, no deletes of data or results. A failed
multipart upload cannot be aborted without s3:AbortMultipartUpload; boto3 then leaves the parts
(the failure itself is still reported), so a bucket lifecycle rule "abort incomplete multipart
uploads after 1 day" cleans them instead of a wider role (deployments/README.md).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import PurePosixPath
from typing import Any

from config.load import load_config
from config.schema import PipelineConfig
from flows.common import base_parser
from tasks.errors import ConfigError
from tasks.io.layout import Layout
from tasks.train.checkpoint import IMAGENET


def bucket_and_prefix(uri: str) -> tuple[str, str]:
    """("bucket", "root/prefix/" or "") of an s3:// storage URI."""
    if not uri.startswith("s3://"):
        raise ConfigError(f"storage.uri: an IAM policy needs an s3:// bucket, got {uri!r}")
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    prefix = prefix.strip("/")
    return bucket, f"{prefix}/" if prefix else ""


def weights_key(cfg: PipelineConfig) -> str | None:
    """The bucket key (relative to the storage root) model.pretrained_image_weights may read, or
    None when it names no bucket object or one the dataset/outputs statements already cover."""
    source = cfg.model.pretrained_image_weights
    if source is None or source == IMAGENET or source.startswith(("/", "~")):
        return None
    if ".." in PurePosixPath(source).parts:
        raise ConfigError(
            f"model.pretrained_image_weights: {source!r} escapes the bucket root; "
            "give a key inside it or an absolute local path"
        )
    prefixes = (cfg.storage.dataset_prefix, cfg.storage.outputs_prefix)
    return None if source.startswith(prefixes) else source


def bucket_policy(cfg: PipelineConfig, partition: str = "aws") -> dict[str, Any]:
    """The IAM policy document (a dict, ready for `json.dumps`) for `cfg.storage`'s bucket."""
    bucket, root = bucket_and_prefix(cfg.storage.uri)
    layout = Layout.from_config(cfg.storage)
    arn = f"arn:{partition}:s3:::{bucket}"

    def objects(key_pattern: str) -> str:
        return f"{arn}/{root}{key_pattern}"

    def allow(sid: str, actions: list[str], resource: str) -> dict[str, Any]:
        return {"Sid": sid, "Effect": "Allow", "Action": actions, "Resource": resource}

    statements = [
        allow("ListTheBucket", ["s3:ListBucket"], arn),
        allow("ReadTheDataset", ["s3:GetObject"], objects(f"{layout.dataset}*")),
        allow("ReadAndWriteOutputs", ["s3:GetObject", "s3:PutObject"],
              objects(f"{layout.outputs}*")),
        allow("ForgetTheFinishedRun", ["s3:DeleteObject"], objects(layout.in_progress())),
    ]  # fmt: skip
    if cfg.training.keep_checkpoints is not None:
        statements.append(allow("DeleteOldCheckpoints", ["s3:DeleteObject"],
                                objects(f"{layout.models_root()}*/checkpoints/*")))  # fmt: skip
    if cfg.generator.fill_empty_dataset:
        statements.append(
            allow("WriteTheDemoDataset", ["s3:PutObject"], objects(f"{layout.dataset}*"))
        )
    key = weights_key(cfg)
    if key is not None:
        statements.append(allow("ReadPretrainedImageWeights", ["s3:GetObject"], objects(key)))
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
