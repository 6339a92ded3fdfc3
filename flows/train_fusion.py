"""`train-fusion`: train one fusion model, from bucket set-up to its best model in the bucket.

The unit a separate worker can run. A run killed mid-epoch resumes from its newest checkpoint when
it is started again with the same run id:

    python -m flows.train_fusion --config config/demo.yaml --fusion mid --run 20261125T020000Z

Its runs are named for what they train, e.g. "mid 3 epochs run 20261125T020000Z"; a run that
train-all-fusions fanned out keeps the name its parent gave it ("<run>-<fusion>").
"""

from __future__ import annotations

import argparse
import sys

from prefect import flow, get_run_logger

from config import load_config
from flows.common import base_parser, enable_project_logging, run_cli
from flows.steps import build_features, build_manifest, set_up_folders, train_fusion_task
from models import FUSIONS
from tasks.errors import ConfigError
from tasks.io.layout import new_run_id
from tasks.refs import TrainedRef


def epochs_text(epochs: int) -> str:
    return f"{epochs} epoch" if epochs == 1 else f"{epochs} epochs"


def run_name() -> str:
    """The flow run's name in the UI: the fusion, the epochs the config gives, the run id when
    one is given, e.g. "early 15 epochs"; a fan-out child keeps its parent's name for it."""
    from prefect.runtime import flow_run

    if "fan-out" in flow_run.tags and flow_run.name:
        return str(flow_run.name)
    p = flow_run.parameters
    try:
        cfg = load_config(p.get("config_path", "config/config.yaml"), p.get("overrides") or [])
        epochs = f" {epochs_text(cfg.training.epochs)}"
    except ConfigError:  # the flow itself fails on it, with the message
        epochs = " (invalid config)"
    run = f" run {p['run']}" if p.get("run") else ""
    return f"{p.get('fusion', 'mid')}{epochs}{run}"


@flow(name="train-fusion", flow_run_name=run_name, log_prints=False)
def train_fusion(
    config_path: str = "config/config.yaml",
    fusion: str = "mid",
    run: str | None = None,
    overrides: list[str] | None = None,
) -> TrainedRef:
    """Set up the bucket, build (or reuse) the features, train `fusion` under run id `run`."""
    enable_project_logging()
    cfg = load_config(config_path, overrides or [])
    if fusion not in FUSIONS:
        raise ConfigError(f"fusion {fusion!r}: expected one of {', '.join(FUSIONS)}")
    run = run or cfg.run.name or new_run_id()
    get_run_logger().info(
        "run %s: training %s on %s (config %s); rerun with --run %s to resume it",
        run, fusion, cfg.storage.uri, config_path, run,
    )  # fmt: skip
    set_up_folders(cfg)
    manifest = build_manifest(cfg, run)
    features = build_features(cfg, manifest)
    return train_fusion_task(cfg, features, fusion, run)


def main(args: argparse.Namespace) -> TrainedRef:
    load_config(args.config, args.overrides)  # a bad config fails here, before Prefect starts
    return train_fusion(
        config_path=args.config, fusion=args.fusion, run=args.run, overrides=args.overrides
    )


def parser() -> argparse.ArgumentParser:
    p = base_parser(__doc__ or "")
    p.add_argument("--fusion", required=True, choices=FUSIONS, help="which fusion to train")
    p.add_argument("--run", default=None, help="run id; reuse one to resume its training")
    return p


def cli() -> int:
    """The `deepfake-train-fusion` console script: parse sys.argv, run, return the exit code."""
    return run_cli(main, parser())


if __name__ == "__main__":
    sys.exit(cli())
