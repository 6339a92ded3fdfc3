"""What training minimises, built once per fusion from the config and the training split:

    total = BCE (classes balanced)
          + consistency_weight x consistency
          + emotion_weight x emotion
          + file_label_weight x file BCE

- BCE on the fusion's logit; with `training.balance_classes` each class weighs half of the batch
  whatever its share of the train split, so a skewed split does not teach the majority answer.
- consistency: with emotion labels (the emotion vocabulary is not empty), a BCE teaching the
  agreement of the two modalities' emotion classifiers (models.emotion_agreement) to say whether
  the voice's and the face's emotions are the same; without labels, the label-conditioned
  contrastive loss on the cosine similarity of the two embeddings (models.consistency_loss).
- emotion: the mean cross-entropy of the voice's and the face's emotion classifiers, on the
  samples whose emotion is known (0 without labels).
- file BCE: the model's audio head (`FusionOutput.file_logits`) against the audio file's own
  label and its image head against the image file's (their folders: audio/fake/, images/real/,
  ...), on the files whose label is known. A fake pair may fake one modality only; through the
  fused logit alone a fake's gradient goes mostly to the part already leading (late fusion's
  highest head), or reaches one modality's layers only through the joint ones (early fusion's
  stems), so a modality's own fakes could stay unlearned. Late fusion's heads are the ones its
  decision combines; early's and mid's are auxiliary. Unweighted: the fused BCE balances the
  classes. With `training.pseudo_fake_rate`, some fake-voice pairs' real pictures arrive as
  self-blended pseudo-fakes with an image label of 1 (tasks/data/pseudofake.py), so the image
  heads also learn what manipulated faces share, not only the bucket's own generators' traces.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from config.schema import TrainingConfig
from models import FusionOutput, consistency_loss, emotion_agreement

UNKNOWN = -1  # the emotion index of a sample whose emotion is not known


class LossParts(NamedTuple):
    bce: Tensor
    consistency: Tensor
    emotion: Tensor
    total: Tensor
    file: Tensor | None = None  # the per-modality heads' BCE; None when not computed


@dataclass(frozen=True)
class Objective:
    consistency_weight: float
    consistency_margin: float
    emotion_weight: float
    file_label_weight: float = 0.0
    emotions: tuple[str, ...] = ()  # the vocabulary; () = no emotion labels
    real_weight: float = 1.0  # per-sample BCE weights that balance the classes
    fake_weight: float = 1.0

    @classmethod
    def build(
        cls, tcfg: TrainingConfig, emotions: Sequence[str], train_counts: Mapping[str, int]
    ) -> Objective:
        real, fake = int(train_counts.get("real", 0)), int(train_counts.get("fake", 0))
        weights = (1.0, 1.0)
        if tcfg.balance_classes and real and fake:
            weights = ((real + fake) / (2 * real), (real + fake) / (2 * fake))
        return cls(
            consistency_weight=tcfg.consistency_weight,
            consistency_margin=tcfg.consistency_margin,
            emotion_weight=tcfg.emotion_weight if emotions else 0.0,
            file_label_weight=tcfg.file_label_weight,
            emotions=tuple(emotions),
            real_weight=weights[0],
            fake_weight=weights[1],
        )

    @property
    def n_emotions(self) -> int:
        """Size of the models' emotion classifiers (0: none)."""
        return len(self.emotions) if self.emotion_weight > 0 else 0

    def emotion_targets(self, names: Sequence[str], device: torch.device) -> Tensor:
        """(B,) int64 indices into the vocabulary; UNKNOWN for "" or a name it lacks."""
        index = {name: i for i, name in enumerate(self.emotions)}
        return torch.tensor([index.get(n, UNKNOWN) for n in names], dtype=torch.long).to(device)

    def __call__(
        self, out: FusionOutput, batch: Mapping[str, Any], device: torch.device
    ) -> LossParts:
        label = batch["label"].to(device)  # (B,)
        weight = torch.where(label > 0.5, self.fake_weight, self.real_weight)
        bce = F.binary_cross_entropy_with_logits(out.logit.float(), label, weight=weight)
        zero = bce.new_zeros(())
        if self.n_emotions and out.audio_emotion.numel():
            audio_t = self.emotion_targets(batch.get("audio_emotion", []), device)
            image_t = self.emotion_targets(batch.get("image_emotion", []), device)
            emotion = _mean_ce(out.audio_emotion, audio_t) + _mean_ce(out.image_emotion, image_t)
            emotion = emotion / 2
            known = (audio_t != UNKNOWN) & (image_t != UNKNOWN)
            if known.any():
                agree = emotion_agreement(out.audio_emotion[known], out.image_emotion[known])
                same = (audio_t[known] == image_t[known]).float()
                consistency = F.binary_cross_entropy(agree.clamp(1e-6, 1 - 1e-6), same)
            else:
                consistency = zero
        else:
            emotion = zero
            consistency = consistency_loss(
                out.audio_emb, out.image_emb, label, self.consistency_margin
            )
        total = bce
        if self.consistency_weight:
            total = total + self.consistency_weight * consistency
        if self.emotion_weight and self.n_emotions:
            total = total + self.emotion_weight * emotion
        file = None
        if self.file_label_weight and out.file_logits.numel() and "file_label" in batch:
            file = _known_bce(out.file_logits.float(), batch["file_label"].to(device))
            total = total + self.file_label_weight * file
        return LossParts(bce, consistency, emotion, total, file)


def _known_bce(logits: Tensor, target: Tensor) -> Tensor:
    """BCE of (B, M) logits against (B, M) targets over the entries whose target is known
    (>= 0); 0 when none is."""
    known = target >= 0
    if not known.any():
        return logits.new_zeros(())
    return F.binary_cross_entropy_with_logits(logits[known], target[known])


def _mean_ce(logits: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy over the samples whose target is known; 0 when none is."""
    known = target != UNKNOWN
    if not known.any():
        return logits.new_zeros(()).float()
    return F.cross_entropy(logits[known].float(), target[known])
