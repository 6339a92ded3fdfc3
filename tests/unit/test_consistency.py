"""The emotional consistency measure and its label-conditioned contrastive loss."""

from __future__ import annotations

import pytest
import torch

from models import consistency_loss, emotional_consistency
from tasks.io.layout import FAKE, REAL


def pairs(d: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An audio embedding, the same direction (matching) and the opposite one (mismatching)."""
    audio = torch.randn(4, d, generator=torch.Generator().manual_seed(0))
    return audio, 3.0 * audio, -audio


def test_consistency_is_the_cosine_similarity() -> None:
    audio, matching, mismatching = pairs()
    assert torch.allclose(emotional_consistency(audio, matching), torch.ones(4), atol=1e-6)
    assert torch.allclose(emotional_consistency(audio, mismatching), -torch.ones(4), atol=1e-6)
    orthogonal = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    assert emotional_consistency(*orthogonal).item() == pytest.approx(0.0, abs=1e-6)


def test_consistency_never_leaves_its_documented_range() -> None:
    # Parallel vectors of awkward magnitudes: rounding alone would put some cosines an ulp
    # outside [-1, 1] on some float kernels; the range must hold exactly, on any CPU.
    gen = torch.Generator().manual_seed(3)
    audio = torch.randn(512, 128, generator=gen) * torch.logspace(-3, 3, 512)[:, None]
    for other in (audio * 7.3, -audio * 0.11, audio):
        cos = emotional_consistency(audio, other)
        assert cos.min().item() >= -1.0 and cos.max().item() <= 1.0


def test_real_pairs_lose_less_when_their_emotions_match() -> None:
    audio, matching, mismatching = pairs()
    real = torch.full((4,), float(REAL))
    low = consistency_loss(audio, matching, real)
    high = consistency_loss(audio, mismatching, real)
    assert low.item() == pytest.approx(0.0, abs=1e-6)
    assert high.item() == pytest.approx(2.0, abs=1e-6)
    assert low < high


def test_fake_pairs_lose_more_when_their_emotions_match() -> None:
    audio, matching, mismatching = pairs()
    fake = torch.full((4,), float(FAKE))
    high = consistency_loss(audio, matching, fake)
    low = consistency_loss(audio, mismatching, fake)
    assert high.item() == pytest.approx(1.0, abs=1e-6)  # cos 1 is 1 above the margin 0
    assert low.item() == pytest.approx(0.0, abs=1e-6)  # already below the margin: no push
    assert low < high


def test_margin_sets_how_far_fake_pairs_are_pushed() -> None:
    a = torch.tensor([[1.0, 0.0]])
    b = torch.tensor([[0.6, 0.8]])  # cos = 0.6
    fake = torch.tensor([float(FAKE)])
    assert consistency_loss(a, b, fake, margin=0.0).item() == pytest.approx(0.6, abs=1e-6)
    assert consistency_loss(a, b, fake, margin=0.5).item() == pytest.approx(0.1, abs=1e-6)
    assert consistency_loss(a, b, fake, margin=0.7).item() == pytest.approx(0.0, abs=1e-6)


def test_mixed_batch_averages_each_pair_by_its_label() -> None:
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([[0.0, 1.0], [0.0, 1.0]])  # orthogonal: cos 0
    label = torch.tensor([float(REAL), float(FAKE)])
    # real: 1 - 0 = 1; fake: max(0, 0 - (-0.5)) = 0.5
    assert consistency_loss(a, b, label, margin=-0.5).item() == pytest.approx(0.75, abs=1e-6)


def test_gradient_pulls_real_together_and_pushes_fake_apart() -> None:
    a = torch.tensor([[1.0, 0.0]])
    for label, direction in ((REAL, 1.0), (FAKE, -1.0)):
        b = torch.tensor([[0.6, 0.8]], requires_grad=True)
        consistency_loss(a, b, torch.tensor([float(label)])).backward()
        step = -b.grad  # gradient descent moves b this way
        moved = torch.nn.functional.cosine_similarity(a, b.detach() + 0.1 * step)
        assert (moved.item() - 0.6) * direction > 0


def test_shapes_are_checked() -> None:
    with pytest.raises(ValueError, match=r"\(B, D\)"):
        emotional_consistency(torch.zeros(2, 4), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="label"):
        consistency_loss(torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(3))
