"""Emotional consistency: does the voice carry the same emotion as the face?

The measure is the cosine similarity of the two 128-d emotion embeddings. The loss is
label-conditioned (a contrastive loss): real pairs are pulled together (similarity towards 1),
fake pairs are pushed apart until their similarity falls below a margin. Pulling every pair
together would let the two encoders collapse onto one constant vector and carry no signal.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def emotional_consistency(audio_emb: Tensor, image_emb: Tensor) -> Tensor:
    """Cosine similarity of each pair's embeddings: (B, D), (B, D) -> (B,) in [-1, 1]."""
    if audio_emb.shape != image_emb.shape or audio_emb.ndim != 2:
        raise ValueError(
            f"embeddings must both be (B, D), got {tuple(audio_emb.shape)} "
            f"and {tuple(image_emb.shape)}"
        )
    cos = F.cosine_similarity(audio_emb.float(), image_emb.float(), dim=1, eps=1e-8)
    return cos.clamp(-1.0, 1.0)  # rounding can land an ulp outside; the range holds exactly


def consistency_loss(
    audio_emb: Tensor, image_emb: Tensor, label: Tensor, margin: float = 0.0
) -> Tensor:
    """Mean over the batch of: real (label 0) 1 - cos, fake (label 1) max(0, cos - margin)."""
    if label.shape != audio_emb.shape[:1]:
        raise ValueError(f"label must be (B,) = ({audio_emb.shape[0]},), got {tuple(label.shape)}")
    similarity = emotional_consistency(audio_emb, image_emb)  # (B,)
    pull = 1.0 - similarity  # real pairs: 0 when the emotions agree
    push = torch.clamp(similarity - margin, min=0.0)  # fake pairs: 0 once below the margin
    return torch.where(label.float() > 0.5, push, pull).mean()
