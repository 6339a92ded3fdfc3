"""The whole `train-all-fusions` recipe through Prefect on a tiny local demo, as `make run` runs it:
every product lands in the bucket, the 19 plots and the run-history trend decode and are not
blank, and a second run on unchanged data with `run.skip_if_unchanged` stops after the manifest."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tasks.io.layout import Layout

TINY = """
storage:
  uri: {bucket}
data:
  n_mels: 32
  spec_frames: 32
  image_size: 32
  shard_size: 32
generator:
  fill_empty_dataset: true
  n_pairs: 96
run:
  skip_if_unchanged: true
training:
  epochs: 1
  log_every: 2
"""


@pytest.mark.usefixtures("prefect_harness")
def test_make_run_equivalent_fills_every_output_then_skips_unchanged(tmp_path: Path) -> None:
    from flows.train_all_fusions import train_all_fusions

    bucket = tmp_path / "bucket"
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(TINY.format(bucket=bucket))

    summary = train_all_fusions(config_path=str(cfg_path))
    run, out = summary.run, bucket / "outputs"
    layout = Layout()
    assert summary.fusions == ["early", "mid", "late"]
    assert set(summary.metrics) == {"early", "mid", "late"}
    assert (bucket / layout.report(run)).stat().st_size > 10_000
    metrics = json.loads((bucket / layout.metrics(run)).read_text())
    assert set(metrics["fusions"]) == {"early", "mid", "late"}
    for fusion in ("early", "mid", "late"):
        assert (bucket / layout.model(fusion, run)).is_file()
        assert (bucket / layout.checkpoint(fusion, run, 1)).is_file()
        assert (bucket / layout.emotion_vectors(fusion, run)).is_file()
        assert (bucket / layout.epoch_log(fusion, run)).is_file()
        champion = json.loads((bucket / layout.champion(fusion)).read_text())
        assert champion["run"] == run
    losses = (bucket / layout.losses(run)).read_text().splitlines()
    assert {line.split(",")[0] for line in losses[1:]} == {"early", "mid", "late"}

    pngs = sorted((out / "plots" / run).glob("*.png"))
    assert len(pngs) == 20  # the 19 plots and the run-history trend
    digests = set()
    for png in pngs:
        data = png.read_bytes()
        digests.add(hash(data))
        image = Image.open(io.BytesIO(data))
        image.load()
        assert image.width >= 400 and image.height >= 300, png.name
        pixels = np.asarray(image.convert("L"), dtype=np.float32)
        assert pixels.std() > 5, f"{png.name} looks blank"
    assert len(digests) == 20  # 20 distinct pictures

    assert (bucket / layout.last_run()).is_file()
    assert not (out / "runs" / "in-progress.json").exists()
    report = (bucket / layout.report(run)).read_text()
    assert "Champions" in report and "first champion" in report
    assert '<section id="run-history"><h2>Run history (1 run)</h2>' in report

    again = train_all_fusions(config_path=str(cfg_path))
    assert again.run != run
    assert again.fusions == []
    assert again.notes and again.notes[0].startswith("skipped: data and settings unchanged")
