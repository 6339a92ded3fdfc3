"""`train-all-fusions`: the nightly pipeline, from bucket set-up to published evaluation."""

from __future__ import annotations

import argparse
import sys

from prefect import flow, get_run_logger

from config import load_config
from flows.common import base_parser, enable_project_logging, run_cli
from tasks.layout import new_run_id
from tasks.refs import RunSummary
from tasks.steps import set_up_folders


@flow(name="train-all-fusions", log_prints=False)
def train_all_fusions(
    config_path: str = "config/config.yaml", overrides: list[str] | None = None
) -> RunSummary:
    """Set up the bucket, then train and evaluate every configured fusion."""
    enable_project_logging()
    cfg = load_config(config_path, overrides or [])
    run = cfg.run.name or new_run_id()
    get_run_logger().info("run %s on %s (config %s)", run, cfg.storage.uri, config_path)
    folders = set_up_folders(cfg)
    return RunSummary(run=run, root_uri=folders.root_uri)


def main(args: argparse.Namespace) -> RunSummary:
    load_config(args.config, args.overrides)  # a bad config fails here, before Prefect starts
    return train_all_fusions(config_path=args.config, overrides=args.overrides)


if __name__ == "__main__":
    sys.exit(run_cli(main, base_parser(__doc__ or "")))
