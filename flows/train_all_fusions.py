"""`train-all-fusions`: the nightly pipeline, from bucket set-up to published evaluation.

python -m flows.train_all_fusions --config config/demo.yaml [--set training.epochs=1]
"""

from __future__ import annotations

import argparse
import sys

from prefect import flow, get_run_logger

from config import load_config
from config.schema import PipelineConfig
from flows.common import base_parser, enable_project_logging, run_cli
from flows.fanout import cancel_fan_out  # cancelling the run cancels its fan-out
from flows.steps import (
    build_features,
    build_manifest,
    check_unchanged,
    collect_losses,
    evaluate,
    fill_demo_dataset,
    finish_run,
    promote_champions,
    publish_report,
    set_up_folders,
    start_run,
    train_fusion_task,
)
from tasks.refs import FeatureRef, RunSummary, TrainedRef
from tasks.train.memory import plan_concurrency


@flow(name="train-all-fusions", log_prints=False, on_cancellation=[cancel_fan_out])
def train_all_fusions(
    config_path: str = "config/config.yaml", overrides: list[str] | None = None
) -> RunSummary:
    """Set up the bucket, build the manifest and features, train and evaluate every fusion."""
    enable_project_logging()
    cfg = load_config(config_path, overrides or [])
    logger = get_run_logger()
    folders = set_up_folders(cfg)
    started = start_run(cfg)  # run id + config fingerprint, computed once
    run = started.run
    logger.info("run %s on %s (config %s)", run, folders.root_uri, config_path)
    if cfg.generator.fill_empty_dataset:
        fill_demo_dataset(cfg)
    manifest = build_manifest(cfg, run)
    if cfg.run.skip_if_unchanged:
        unchanged = check_unchanged(cfg, started, manifest)
        if unchanged.skip:
            finish_run(cfg, started, manifest)
            return RunSummary(run=run, root_uri=folders.root_uri, n_pairs=manifest.n_pairs,
                              notes=[f"skipped: {unchanged.reason}"])  # fmt: skip
    features = build_features(cfg, manifest)
    if cfg.training.fan_out:
        from flows.fanout import train_on_workers

        trained = train_on_workers(cfg, config_path, overrides or [], run)
    else:
        trained = train_here(cfg, features, run)
    collect_losses(cfg, trained, run)
    evaluation = evaluate(cfg, features, trained, run, manifest)
    decisions = promote_champions(cfg, features, trained, evaluation, manifest)
    report_key = publish_report(cfg, features, trained, evaluation, manifest, decisions)
    finish_run(cfg, started, manifest)
    logger.info("run %s complete: report %s", run, report_key)
    return RunSummary(
        run=run,
        root_uri=folders.root_uri,
        n_pairs=manifest.n_pairs,
        fusions=[t.fusion for t in trained],
        report_key=report_key,
        metrics=evaluation.metrics,
        skipped=len(features.skipped),
        notes=[d.summary() for d in decisions],
    )


def train_here(cfg: PipelineConfig, features: FeatureRef, run: str) -> list[TrainedRef]:
    """Train the configured fusions on this worker, as many at once as memory allows."""
    fusions = list(cfg.training.fusions)
    at_once = plan_concurrency(cfg, len(fusions))
    get_run_logger().info("training %s, %d at a time", ", ".join(fusions), at_once)
    trained: list[TrainedRef] = []
    for start in range(0, len(fusions), at_once):
        wave = fusions[start : start + at_once]
        if len(wave) == 1:
            trained.append(train_fusion_task(cfg, features, wave[0], run))
        else:
            futures = [train_fusion_task.submit(cfg, features, f, run) for f in wave]
            trained.extend(f.result() for f in futures)
    return trained


def main(args: argparse.Namespace) -> RunSummary:
    load_config(args.config, args.overrides)  # a bad config fails here, before Prefect starts
    return train_all_fusions(config_path=args.config, overrides=args.overrides)


def cli() -> int:
    """The `deepfake-train` console script: parse sys.argv, run, return the exit code."""
    return run_cli(main, base_parser(__doc__ or ""))


if __name__ == "__main__":
    sys.exit(cli())
