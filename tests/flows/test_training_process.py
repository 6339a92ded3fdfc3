"""Training in a process of its own and through Prefect: resume after a real SIGKILL of the
training process, and the train-fusion flow whose rerun of the same run id resumes.

The data and config helpers are those of tests/unit/test_training.py (tiny feature shards with a
learnable difference: 16x16 log-mels, 32x32 images).
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from config.schema import PipelineConfig
from tasks.io.layout import Layout
from tasks.io.storage import Storage, open_storage
from tasks.refs import FeatureRef, TrainedRef
from tasks.train.checkpoint import list_checkpoints
from tasks.train.fit import fit
from tests.unit.test_training import M, S, T, jsonl, make_cfg, write_features

REPO = Path(__file__).resolve().parents[2]

# --- resume after SIGKILL --------------------------------------------------------------------

RESUME_SCRIPT = """
import json, logging, sys, time
import psutil
import torch
from config.load import validate_config
from tasks.io.layout import Layout
from tasks.io.storage import open_storage
from tasks.refs import FeatureRef
from tasks.train.fit import fit

logging.basicConfig(level=logging.INFO)
torch.set_num_threads(1)  # as in the test process, so both runs compute alike
cfg = validate_config(json.loads(sys.argv[1]))
features = FeatureRef.model_validate_json(sys.argv[2])

def slow_reading():  # stretches every batch so the test can kill the run mid-epoch
    time.sleep(0.15)
    return psutil.virtual_memory().percent

store, layout = open_storage(cfg.storage), Layout.from_config(cfg.storage)
ref = fit(store, layout, cfg, features, sys.argv[3], sys.argv[4], read_memory=slow_reading)
print(ref.model_dump_json())
"""


def run_training(cfg: PipelineConfig, features: FeatureRef, run: str) -> subprocess.Popen[str]:
    args = [cfg.model_dump_json(), features.model_dump_json(), "mid", run]
    env = dict(os.environ)  # the venv's python imports the installed project
    return subprocess.Popen(
        [sys.executable, "-c", RESUME_SCRIPT, *args], cwd=REPO, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip


def digest(store: Storage, key: str) -> str:
    return hashlib.sha256(store.read_bytes(key)).hexdigest()


def test_sigkill_mid_epoch_then_rerun_resumes_from_the_saved_epoch(tmp_path: Path) -> None:
    # every checkpoint kept (the default prunes all but 2), so the test sees none was rewritten
    cfg = make_cfg(str(tmp_path / "bucket"), training={"epochs": 3, "keep_checkpoints": None})
    store = open_storage(cfg.storage)
    store.check()
    layout = Layout()
    features = write_features(store, n_train=16, n_val=8)

    proc = run_training(cfg, features, "killed")
    deadline = time.monotonic() + 240
    while not store.exists(layout.checkpoint("mid", "killed", 1)):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no epoch-1 checkpoint within 240 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    saved = {key: digest(store, key) for _, key in list_checkpoints(store, layout, "mid", "killed")}
    done = len(saved)
    assert 1 <= done < 3, f"the run was not killed mid-way: {sorted(saved)}"

    proc = run_training(cfg, features, "killed")  # the retry
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    resumed = TrainedRef.model_validate_json(out.strip().splitlines()[-1])
    assert resumed.resumed_from == done and resumed.epochs == 3
    assert f"(epoch {done} done)" in err
    for key, before in saved.items():  # finished epochs were not redone, nor their files lost
        assert digest(store, key) == before, key
    epochs = jsonl(store, layout.epoch_log("mid", "killed"))
    assert [e["epoch"] for e in epochs] == [1, 2, 3]
    step_numbers = [s["step"] for s in jsonl(store, layout.step_log("mid", "killed"))]
    assert step_numbers == sorted(set(step_numbers))  # no epoch's steps logged twice

    straight = fit(store, layout, cfg, features, "mid", "straight")  # never interrupted
    assert straight.epochs == resumed.epochs == 3
    uninterrupted = jsonl(store, layout.epoch_log("mid", "straight"))
    assert [e["val_loss"] for e in epochs] == pytest.approx(
        [e["val_loss"] for e in uninterrupted], rel=1e-4
    )  # seeded data order and restored RNG states: the resumed run continues the same training


# --- the train-fusion flow -------------------------------------------------------------------


@pytest.mark.slow  # Prefect's test server, preprocessing and three epochs
def test_train_fusion_flow_trains_then_a_rerun_of_the_run_resumes(
    prefect_harness: None, tmp_path: Path
) -> None:
    """The whole recipe through Prefect on a generated benchmark of 32 pairs: set-up, manifest,
    features, training; then the same run id with one more epoch continues, not restarts."""
    from flows.train_fusion import parser, train_fusion
    from tasks.data.synthetic import generate

    bucket = tmp_path / "bucket"
    bucket.mkdir()
    generate(open_storage(make_cfg(str(bucket)).storage), Layout(), 32, seed=5, workers=1)
    config = tmp_path / "tiny.yaml"
    config.write_text(
        f"storage: {{uri: '{bucket}'}}\n"
        f"data: {{n_mels: {M}, spec_frames: {T}, image_size: {S}, shard_size: 8, "
        "val_fraction: 0.25, test_fraction: 0.25}\n"  # 14 train, 9 val, 9 test pairs
        "training: {epochs: 1, batch_size: 4, device: cpu}\n"
    )
    first = train_fusion(config_path=str(config), fusion="late", run="flow1")
    assert (first.fusion, first.epochs, first.resumed_from) == ("late", 1, None)
    again = train_fusion(str(config), "late", "flow1", ["training.epochs=2"])
    assert (again.epochs, again.resumed_from) == (2, 1)
    epochs = jsonl(open_storage(make_cfg(str(bucket)).storage), Layout().epoch_log("late", "flow1"))
    assert [e["epoch"] for e in epochs] == [1, 2]

    args = parser().parse_args(["--config", str(config), "--fusion", "mid", "--run", "r9"])
    assert (args.fusion, args.run, args.overrides) == ("mid", "r9", [])
    with pytest.raises(SystemExit):
        parser().parse_args(["--config", str(config), "--fusion", "hybrid"])
