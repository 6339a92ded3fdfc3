"""The weight average (`training.average_epochs`, tasks/train/average.py): its arithmetic, what
`fit` validates and saves with it, and a resume that continues it exactly.

Data and config: the tiny learnable feature shards of tests/unit/test_training.py.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from torch import nn

from tasks.errors import CheckpointError
from tasks.io.layout import Layout
from tasks.io.storage import open_storage
from tasks.train.average import WeightAverage, decay_for, steps_per_epoch
from tasks.train.checkpoint import list_checkpoints, load_model
from tasks.train.fit import fit
from tests.unit.test_training import make_cfg, write_features


def test_decay_gives_the_horizon_in_epochs_of_steps() -> None:
    assert (
        steps_per_epoch(32, 8) == 4 and steps_per_epoch(33, 8) == 5 and steps_per_epoch(0, 8) == 1
    )
    assert 1 / (1 - decay_for(2.0, 50)) == pytest.approx(100)
    assert decay_for(0.01, 4) == 0.0  # a horizon under one step: the average is the last weights
    with pytest.raises(ValueError, match="must be > 0"):
        decay_for(0.0, 10)
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        WeightAverage(nn.Linear(2, 2), 1.0)


def test_average_follows_the_ema_formula_and_copies_integer_buffers() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    average = WeightAverage(model, decay=0.9)
    start = model[0].weight.detach().clone()
    expected = start.clone()
    for step in range(1, 6):
        with torch.no_grad():
            model[0].weight.add_(1.0)
        model[1].num_batches_tracked += 1
        average.update()
        decay = min(0.9, (1 + step) / (10 + step))  # the shorter horizon of the first updates
        expected = decay * expected + (1 - decay) * model[0].weight.detach()
    torch.testing.assert_close(average.module[0].weight, expected)
    assert int(average.module[1].num_batches_tracked) == 5
    # the model itself is untouched, and the average holds no gradients
    torch.testing.assert_close(model[0].weight.detach(), start + 5.0)
    assert not any(p.requires_grad for p in average.module.parameters())

    state = average.state_dict()
    other = WeightAverage(model, decay=0.9)
    other.load_state_dict(state, "ckpt.pt")
    assert other.updates == 5
    torch.testing.assert_close(other.module[0].weight, expected)
    with pytest.raises(CheckpointError, match="ckpt.pt: its weight average does not fit"):
        other.load_state_dict({"updates": 1, "model": {"0.weight": torch.zeros(9)}}, "ckpt.pt")


def test_fit_validates_and_saves_the_average_and_a_resume_continues_it(tmp_path: Path) -> None:
    """model.pt holds the averaged weights (not the raw ones the optimizer trains), every
    checkpoint holds both, and a run stopped after epoch 1 then resumed ends with the same
    model.pt as one that ran both epochs at once."""
    settings = {"epochs": 2, "batch_size": 4, "average_epochs": 1.0}
    cfg = make_cfg(str(tmp_path / "whole"), training=settings)
    store = open_storage(cfg.storage)
    layout = Layout()
    features = write_features(store)
    whole = fit(store, layout, cfg, features, "mid", "r")
    saved = torch.load(io.BytesIO(store.read_bytes(whole.model_key)), weights_only=True)
    (_, key), *_ = list_checkpoints(store, layout, "mid", "r")
    ckpt = torch.load(io.BytesIO(store.read_bytes(key)), weights_only=True)
    assert ckpt["average"]["updates"] == 16  # 2 epochs of 8 steps
    raw, averaged = ckpt["model"], ckpt["average"]["model"]
    weight = "head.0.weight" if "head.0.weight" in raw else next(iter(raw))
    assert not torch.equal(raw[weight], averaged[weight])
    keys = dict(list_checkpoints(store, layout, "mid", "r"))
    best = torch.load(io.BytesIO(store.read_bytes(keys[whole.best_epoch])), weights_only=True)
    for name, tensor in best["average"]["model"].items():  # model.pt: the best epoch's average
        torch.testing.assert_close(saved["state_dict"][name], tensor)

    # the same training in two attempts: forget epoch 2, and a resume trains it again
    store.delete(key)
    resumed = fit(store, layout, cfg, features, "mid", "r")
    assert resumed.resumed_from == 1 and resumed.best_epoch == whole.best_epoch
    again = torch.load(io.BytesIO(store.read_bytes(key)), weights_only=True)
    assert again["average"]["updates"] == 16
    for name, tensor in averaged.items():
        torch.testing.assert_close(again["average"]["model"][name], tensor, rtol=1e-5, atol=1e-6)
    model, meta = load_model(store.read_bytes(resumed.model_key), resumed.model_key)
    assert not model.training and meta["epoch"] == whole.best_epoch


def test_a_checkpoint_without_an_average_starts_it_from_the_resumed_weights(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = make_cfg(str(tmp_path), training={"epochs": 1, "batch_size": 4})
    store = open_storage(cfg.storage)
    features = write_features(store)
    fit(store, Layout(), cfg, features, "late", "r")  # no average in its checkpoint
    on = cfg.model_copy(
        update={"training": cfg.training.model_copy(update={"epochs": 2, "average_epochs": 2.0})}
    )
    with caplog.at_level("WARNING"):
        ref = fit(store, Layout(), on, features, "late", "r")
    assert ref.resumed_from == 1 and "holds no weight average" in caplog.text
