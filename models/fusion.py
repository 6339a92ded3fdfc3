"""The three fusion strategies. Each takes a log-mel (B, 1, M, T) and an image (B, 3, S, S) in
[0, 1] and returns a `FusionOutput`: logit (B,), score = sigmoid(logit) (B,), and the audio and
image emotion embeddings (B, D) that the consistency loss compares.

- early: the inputs are joined before any learning: the log-mel is resized to the image grid and
  stacked with the RGB channels, and one joint CNN decides. The same joint CNN also reads each
  modality alone (the other one blanked), and those features give the per-modality emotion
  embeddings, so the consistency signal compares what the voice and the face carry on their
  own while still training the joint CNN.
- mid: an `AudioModel` and an `ImageModel` each give an embedding; the two are concatenated and
  dense layers decide.
- late: each modality has its own encoder and classifier; the two predictions are combined by a
  configured rule (mean or max of the probabilities) or a learned weighting of the two logits.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.audio import AudioModel, conv_block
from models.image import ImageModel, ImageNorm
from models.rng import Dropout


class FusionOutput(NamedTuple):
    """What every fusion model returns."""

    logit: Tensor  # (B,) raw score; BCE is computed on it
    score: Tensor  # (B,) sigmoid(logit): probability of fake
    audio_emb: Tensor  # (B, D) audio emotion embedding
    image_emb: Tensor  # (B, D) image emotion embedding


def _check_inputs(audio: Tensor, image: Tensor) -> None:
    if audio.ndim != 4 or audio.shape[1] != 1:
        raise ValueError(f"audio must be (B, 1, n_mels, frames), got {tuple(audio.shape)}")
    if image.ndim != 4 or image.shape[1] != 3 or image.shape[2] != image.shape[3]:
        raise ValueError(f"image must be (B, 3, S, S), got {tuple(image.shape)}")
    if audio.shape[0] != image.shape[0]:
        raise ValueError(f"batch sizes differ: audio {audio.shape[0]}, image {image.shape[0]}")


def _output(logit: Tensor, audio_emb: Tensor, image_emb: Tensor) -> FusionOutput:
    return FusionOutput(logit, torch.sigmoid(logit), audio_emb, image_emb)


JOINT_CHANNELS = (32, 64, 128, 256)  # widths of the early-fusion joint CNN's conv blocks


class EarlyFusionModel(nn.Module):
    """Log-mel resized to the image grid + RGB -> (B, 4, S, S) -> one joint CNN.

    The joint CNN is a compact stack of ReLU conv blocks, trained from scratch: unlike the mid and
    late models it has no ResNet18 image branch, so `model.pretrained_image_weights` does not
    apply to it. (On the generated benchmark a 4-channel ResNet18 here fitted the training set
    but stayed at chance on validation within a few epochs; this CNN, which keeps the spatial
    detail of both inputs longer, did not.)
    """

    def __init__(self, embedding_dim: int = 128) -> None:
        super().__init__()
        self.norm = ImageNorm()
        widths = (4, *JOINT_CHANNELS)  # channel 0: log-mel, 1-3: RGB
        self.joint = nn.Sequential(
            *(conv_block(c_in, c_out) for c_in, c_out in itertools.pairwise(widths)),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        features = JOINT_CHANNELS[-1]
        self.classifier = nn.Sequential(Dropout(0.2), nn.Linear(features, 1))
        self.audio_head = nn.Linear(features, embedding_dim)
        self.image_head = nn.Linear(features, embedding_dim)

    def forward(self, audio: Tensor, image: Tensor) -> FusionOutput:
        _check_inputs(audio, image)
        b = audio.shape[0]
        spec = F.interpolate(audio, size=image.shape[-2:], mode="bilinear", align_corners=False)
        rgb = self.norm(image)  # (B, 3, S, S)
        joint = torch.cat([spec, rgb], dim=1)  # (B, 4, S, S)
        audio_only = torch.cat([spec, torch.zeros_like(rgb)], dim=1)
        image_only = torch.cat([torch.zeros_like(spec), rgb], dim=1)
        # One pass over the three views keeps a single joint CNN (and one set of BN statistics).
        feats = self.joint(torch.cat([joint, audio_only, image_only]))  # (3B, 256)
        logit = self.classifier(feats[:b]).squeeze(1)  # (B,)
        return _output(logit, self.audio_head(feats[b : 2 * b]), self.image_head(feats[2 * b :]))


class MidFusionModel(nn.Module):
    """Audio and image embeddings concatenated -> dense layers -> one logit."""

    def __init__(
        self, embedding_dim: int = 128, pretrained: Mapping[str, Tensor] | None = None
    ) -> None:
        super().__init__()
        self.audio = AudioModel(embedding_dim)
        self.image = ImageModel(embedding_dim, pretrained)
        self.head = nn.Sequential(
            nn.Linear(2 * embedding_dim, embedding_dim),
            nn.ReLU(inplace=True),
            Dropout(0.2),
            nn.Linear(embedding_dim, 1),
        )

    def forward(self, audio: Tensor, image: Tensor) -> FusionOutput:
        _check_inputs(audio, image)
        audio_emb = self.audio(audio)  # (B, D)
        image_emb = self.image(image)  # (B, D)
        logit = self.head(torch.cat([audio_emb, image_emb], dim=1)).squeeze(1)  # (B,)
        return _output(logit, audio_emb, image_emb)


LATE_RULES = ("learned", "mean", "max")


class LateFusionModel(nn.Module):
    """Separate audio and image classifiers; their predictions are combined by `rule`:
    "mean" / "max" of the two probabilities, or "learned": a trained weighting of the two logits."""

    def __init__(
        self,
        embedding_dim: int = 128,
        pretrained: Mapping[str, Tensor] | None = None,
        rule: str = "learned",
    ) -> None:
        super().__init__()
        if rule not in LATE_RULES:
            raise ValueError(f"late fusion rule {rule!r} is not one of {', '.join(LATE_RULES)}")
        self.rule = rule
        self.audio = AudioModel(embedding_dim)
        self.image = ImageModel(embedding_dim, pretrained)
        self.audio_head = nn.Sequential(nn.ReLU(), Dropout(0.2), nn.Linear(embedding_dim, 1))
        self.image_head = nn.Sequential(nn.ReLU(), Dropout(0.2), nn.Linear(embedding_dim, 1))
        self.combine = nn.Linear(2, 1)  # used by the "learned" rule only
        with torch.no_grad():  # start as the mean of the two logits
            self.combine.weight.fill_(0.5)
            self.combine.bias.zero_()

    def forward(self, audio: Tensor, image: Tensor) -> FusionOutput:
        _check_inputs(audio, image)
        audio_emb = self.audio(audio)  # (B, D)
        image_emb = self.image(image)  # (B, D)
        logits = torch.cat(
            [self.audio_head(audio_emb), self.image_head(image_emb)], dim=1
        )  # (B, 2)
        if self.rule == "learned":
            logit = self.combine(logits).squeeze(1)
        elif self.rule == "max":  # max of the probabilities = sigmoid of the max logit
            logit = logits.max(dim=1).values
        else:  # mean of the probabilities, as a logit computed in log space (no overflow)
            log_p = torch.logsumexp(F.logsigmoid(logits), dim=1) - math.log(2)
            log_q = torch.logsumexp(F.logsigmoid(-logits), dim=1) - math.log(2)
            logit = log_p - log_q
        return _output(logit, audio_emb, image_emb)
