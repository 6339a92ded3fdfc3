"""The torch modules: per-modality encoders, the three fusion models, the consistency measure.

`build_model(fusion, cfg)` is the one way the rest of the pipeline makes a model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from models.audio import AudioModel
from models.consistency import consistency_loss, emotional_consistency
from models.fusion import (
    LATE_RULES,
    NO_EMOTIONS,
    TRAINING_ONLY,
    EarlyFusionModel,
    FusionOutput,
    LateFusionModel,
    MidFusionModel,
    emotion_agreement,
)
from models.image import ImageModel
from models.rng import Dropout, seeded_init, use_generator

FUSIONS = ("early", "mid", "late")

__all__ = [
    "FUSIONS",
    "LATE_RULES",
    "NO_EMOTIONS",
    "TRAINING_ONLY",
    "AudioModel",
    "Dropout",
    "EarlyFusionModel",
    "FusionOutput",
    "ImageModel",
    "LateFusionModel",
    "MidFusionModel",
    "build_model",
    "consistency_loss",
    "emotion_agreement",
    "emotional_consistency",
    "seeded_init",
    "use_generator",
]


def build_model(
    fusion: str,
    cfg: Any,
    image_weights: Mapping[str, Tensor] | None = None,
    n_emotions: int = 0,
) -> nn.Module:
    """The fusion model named `fusion` ("early", "mid" or "late") for a `PipelineConfig`.

    `image_weights`: an optional torchvision ResNet18 state dict (what
    `model.pretrained_image_weights` names, already read by the caller) for the image branch of
    the mid and late models, and for the early one's image stem and joint trunk. `n_emotions`:
    the size of the emotion vocabulary when emotion labels are known (each modality then gets an
    emotion classifier); 0 without.
    """
    dim = cfg.model.embedding_dim
    model: nn.Module
    if fusion == "early":
        model = EarlyFusionModel(dim, n_emotions, image_weights)
    elif fusion == "mid":
        model = MidFusionModel(dim, image_weights, n_emotions)
    elif fusion == "late":
        model = LateFusionModel(
            dim, image_weights, rule=cfg.model.late_fusion_rule, n_emotions=n_emotions
        )
    else:
        raise ValueError(f"unknown fusion {fusion!r}: expected one of {', '.join(FUSIONS)}")
    return model.to(memory_format=torch.channels_last)  # the layout the forwards give the inputs
