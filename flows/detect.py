"""`detect`: score new media with each fusion's champion, at the threshold fitted on validation.

    deepfake-detect --config config/demo.yaml --audio clip.wav --image face.jpg
    deepfake-detect --config config/demo.yaml --pairs pairs.csv --out scores.csv
    deepfake-detect --config config/demo.yaml --prefix incoming/2026-12-01/
    deepfake-detect --config config/demo.yaml --pairs pairs.csv --run 20261125T020000Z

(or `python -m flows.detect ...`). Files are local paths or keys relative to the storage root;
a --pairs CSV has audio_key,image_key columns, as dataset/pairs.csv. The CSV written (to --out,
else outputs/detections/<id>/detections.csv in the bucket) holds the two keys, then
score_<fusion> (the calibrated probability of fake) and decision_<fusion> (fake or real) per
fusion, and with two or more the ensemble's score_ensemble and decision_ensemble (their mean
rank among their validation reals); the files that could not be scored are listed with the
reason beside it (skipped.json).
As a flow run it also publishes the table as the `detections` artifact.
"""

from __future__ import annotations

import argparse
import sys

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from config import load_config
from config.schema import PipelineConfig
from flows.common import base_parser, enable_project_logging, run_cli
from flows.steps import IO_RETRIES
from tasks.evaluate import detect as detection
from tasks.io.storage import open_storage

TABLE_KEY = "detections"
SKIPPED_KEY = "detections-skipped"


@task(name="score-new-media", **IO_RETRIES)
def score_new_media(
    cfg: PipelineConfig,
    audio: str | None,
    image: str | None,
    pairs: str | None,
    prefix: str | None,
    run: str | None,
    out: str | None,
) -> detection.DetectionRef:
    """Score the pairs with the champions (or `run`'s models); write the CSV; list the skips."""
    ref = detection.detect(
        cfg, open_storage(cfg.storage), audio=audio, image=image, pairs=pairs, prefix=prefix,
        run=run, out=out,
    )  # fmt: skip
    logger = get_run_logger()
    logger.info("%d of %d pairs scored -> %s", ref.n_scored, ref.n_pairs, ref.scores_uri)
    for entry in ref.skipped:
        logger.warning("skipped %s (%s): %s", entry["key"], entry["stage"], entry["reason"])
    return ref


def publish_detections(ref: detection.DetectionRef) -> None:
    """The scores as a table artifact; the skipped files as a markdown list."""
    shown = len(ref.preview)
    more = f", the first {shown} shown" if shown < ref.n_scored else ""
    models = [f"{f} {k} (threshold {ref.thresholds[f]:.4f})" for f, k in ref.models.items()]
    create_table_artifact(
        key=TABLE_KEY,
        table=ref.preview,
        description=(
            f"{ref.n_scored} of {ref.n_pairs} pairs scored{more}; CSV {ref.scores_uri}; models "
            + ", ".join(models)
        ),
    )
    lines = [f"# Files not scored: {len(ref.skipped)}", "", f"List: `{ref.skipped_uri}`", ""]
    lines += [f"- `{s['key']}` ({s['stage']}): {s['reason']}" for s in ref.skipped]
    create_markdown_artifact(key=SKIPPED_KEY, markdown="\n".join(lines))


def run_name() -> str:
    """The flow run's name in the UI: when, and what it scores with what, e.g.
    "detect 2026-12-01 14:05 prefix incoming/ (champions)"."""
    from datetime import UTC, datetime

    from prefect.runtime import flow_run

    p = flow_run.parameters
    what = next((f"{k} {p[k]}" for k in ("pairs", "prefix", "audio") if p.get(k)), "nothing given")
    models = f"run {p['run']}" if p.get("run") else "champions"
    return f"detect {datetime.now(UTC):%Y-%m-%d %H:%M} {what} ({models})"


@flow(name="detect", flow_run_name=run_name, log_prints=False)
def detect(
    config_path: str = "config/config.yaml",
    overrides: list[str] | None = None,
    audio: str | None = None,
    image: str | None = None,
    pairs: str | None = None,
    prefix: str | None = None,
    run: str | None = None,
    out: str | None = None,
) -> detection.DetectionRef:
    """Score one pair (audio + image), a pairs CSV or a bucket prefix with the champions."""
    enable_project_logging()
    detection.check_inputs(audio, image, pairs, prefix)
    cfg = load_config(config_path, overrides or [])
    ref = score_new_media(cfg, audio, image, pairs, prefix, run, out)
    publish_detections(ref)
    return ref


def parser() -> argparse.ArgumentParser:
    p = base_parser(__doc__ or "")
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    what = p.add_argument_group("what to score (one of)")
    what.add_argument("--audio", help="audio file (local path or bucket key); with --image")
    what.add_argument("--image", help="image file (local path or bucket key); with --audio")
    what.add_argument(
        "--pairs", help="CSV with audio_key,image_key columns (a local file or a bucket key)"
    )
    what.add_argument(
        "--prefix", help="bucket prefix whose files are paired as training pairs dataset/"
    )
    p.add_argument("--run", default=None, help="score with this run's models, not the champions")
    p.add_argument(
        "--out",
        default=None,
        help="CSV to write (default: outputs/detections/<id>/detections.csv in the bucket)",
    )
    return p


def main(args: argparse.Namespace) -> detection.DetectionRef:
    # Bad arguments and a bad config fail here, before Prefect starts.
    detection.check_inputs(args.audio, args.image, args.pairs, args.prefix)
    load_config(args.config, args.overrides)
    return detect(
        config_path=args.config, overrides=args.overrides, audio=args.audio, image=args.image,
        pairs=args.pairs, prefix=args.prefix, run=args.run, out=args.out,
    )  # fmt: skip


def cli() -> int:
    """The `deepfake-detect` console script: parse sys.argv, run, return the exit code."""
    return run_cli(main, parser())


if __name__ == "__main__":
    sys.exit(cli())
