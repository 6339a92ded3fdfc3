"""Model-owned random streams: dropout masks and initial weights that no other thread can move."""

from __future__ import annotations

import threading

import pytest
import torch

from models import Dropout, build_model, seeded_init, use_generator
from tests.unit.synthetic_data import tiny_config


def test_dropout_draws_from_its_own_generator_whatever_the_global_one_does() -> None:
    drop = Dropout(0.5).train()
    x = torch.ones(4, 64)
    masks = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)  # the shared generator moves; ours must not care
        use_generator(drop, torch.Generator().manual_seed(7))
        masks.append(drop(x))
    assert torch.equal(masks[0], masks[1])
    kept = masks[0][masks[0] != 0]
    assert torch.allclose(kept, torch.full_like(kept, 2.0))  # survivors scaled by 1 / (1 - p)
    assert 0.3 < (masks[0] == 0).float().mean().item() < 0.7
    assert torch.equal(drop.eval()(x), x)  # identity in eval mode


def test_dropout_refuses_a_probability_outside_zero_to_one() -> None:
    with pytest.raises(ValueError, match="dropout probability"):
        Dropout(1.0)


def _train_outputs(cfg, fusion: str, seed: int, steps: int = 3) -> list[torch.Tensor]:
    """Build `fusion` from `seed`, then a few training-mode forward passes (dropout active)."""
    with seeded_init(seed):
        model = build_model(fusion, cfg)
    use_generator(model, torch.Generator().manual_seed(seed))
    model.train()
    data = torch.Generator().manual_seed(0)
    outs = []
    for _ in range(steps):
        audio = torch.rand(2, 1, 16, 16, generator=data)
        image = torch.rand(2, 3, 32, 32, generator=data)
        outs.append(model(audio, image).logit.detach())
    return outs


def test_models_built_and_run_in_threads_at_once_match_the_sequential_run(tmp_path) -> None:
    cfg = tiny_config("local", tmp_path)
    fusions = {"early": 11, "mid": 12, "late": 13}
    alone = {f: _train_outputs(cfg, f, seed) for f, seed in fusions.items()}
    together: dict[str, list[torch.Tensor]] = {}
    threads = [
        threading.Thread(target=lambda f=f, s=s: together.__setitem__(f, _train_outputs(cfg, f, s)))
        for f, s in fusions.items()
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for fusion in fusions:
        assert all(torch.equal(a, b) for a, b in zip(alone[fusion], together[fusion], strict=True))
    assert not torch.equal(_train_outputs(cfg, "mid", 99)[0], alone["mid"][0])  # the seed matters
