"""`evaluate-models`: re-evaluate a finished run from the bucket alone.

`python -m flows.evaluate_models --config config/demo.yaml [--run RUN]` (or `python -m
flows.evaluate`): loads the run's models (weights only), streams its test shards, and rewrites its
metrics.json and plots, then renders its report again (with the run's stored champion decisions,
when it has them); with the same models and shards the metrics come out identical, and the flow
logs whether they did. Without --run: the newest run that has models and
was evaluated once (its refs.json names its test shards and models).
"""

from __future__ import annotations

import argparse
import sys

from prefect import flow, get_run_logger

from config import load_config
from flows.common import base_parser, enable_project_logging, run_cli
from flows.steps import evaluate, load_champion_decisions, load_run_refs, publish_report
from tasks.refs import EvaluationRef


@flow(name="evaluate-models", log_prints=False)
def evaluate_models(
    config_path: str = "config/config.yaml",
    overrides: list[str] | None = None,
    run: str | None = None,
) -> EvaluationRef:
    """Score a run's models on its test split again and republish its evaluation."""
    enable_project_logging()
    cfg = load_config(config_path, overrides or [])
    refs = load_run_refs(cfg, run)
    get_run_logger().info("evaluating run %s on %s", refs.run, cfg.storage.uri)
    evaluation = evaluate(refs.config, refs.features, refs.trained, refs.run, refs.manifest)
    decisions = load_champion_decisions(refs.config, refs.run)
    publish_report(refs.config, refs.features, refs.trained, evaluation, refs.manifest, decisions)
    return evaluation


def parser() -> argparse.ArgumentParser:
    p = base_parser(__doc__ or "")
    p.add_argument(
        "--run",
        default=None,
        help="run id to evaluate (default: the newest evaluated run with models in the bucket)",
    )
    return p


def main(args: argparse.Namespace) -> EvaluationRef:
    load_config(args.config, args.overrides)  # a bad config fails here, before Prefect starts
    return evaluate_models(config_path=args.config, overrides=args.overrides, run=args.run)


def cli() -> int:
    """The `deepfake-evaluate` console script: parse sys.argv, run, return the exit code."""
    return run_cli(main, parser())


if __name__ == "__main__":
    sys.exit(cli())
