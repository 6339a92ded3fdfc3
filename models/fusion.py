"""The three fusion strategies. Each takes a log-mel (B, 1, M, T) and an image (B, 3, S, S) in
[0, 1] and returns a `FusionOutput`: logit (B,), score = sigmoid(logit) (B,), and the audio and
image emotion embeddings (B, D) that the consistency loss compares.

- early: a short stem per modality (ResNet18's first layers on the image, two conv blocks on the
  log-mel), then the rest of ResNet18 reads the two joined as one stack of feature maps and
  decides; per-modality encoders give the emotion embeddings.
- mid: an `AudioModel` and an `ImageModel` each give an embedding; the two are concatenated and
  dense layers decide.
- late: each modality has its own encoder and classifier; the two predictions are combined by a
  configured rule (mean or max of the probabilities) or a learned weighting of the two logits.

Every fusion also returns per-modality "is this file fake" logits (`file_logits`), which training
teaches each file's own label (training.file_label_weight): in late fusion they are the audio and
image heads whose logits it combines; in early and mid fusion auxiliary heads on the parts that
see one modality alone (early: the log-mel stem and the image branch on the image stem; mid: the
two embeddings), never read by the decision. A fake pair may fake one modality only; through the
fused BCE alone, one modality's evidence can stay unlearned for many epochs (early fusion at 224
px sat near chance for seven epochs on one seed), while the per-file label teaches each
modality's features directly.

Emotional consistency reaches every decision. With `n_emotions` > 0 (emotion labels known), each
modality's embedding also feeds an emotion classifier, and the agreement of the two (the
probability that voice and face show the same emotion, `emotion_agreement`) is an input of the
fusion head; without labels the agreement is the cosine similarity of the two embeddings, mapped
to [0, 1]. Either way a pair whose voice and face disagree can be called fake although neither
file carries an artefact.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock

from models.audio import AudioModel, conv_block
from models.image import (
    RESNET_FEATURES,
    RESNET_STEM_FEATURES,
    ImageModel,
    ImageNorm,
    load_resnet_weights,
    resnet_trunk,
)
from models.rng import Dropout

NO_EMOTIONS = torch.zeros(0, 0)  # the emotion logits of a model without emotion heads


class FusionOutput(NamedTuple):
    """What every fusion model returns."""

    logit: Tensor  # (B,) raw score; BCE is computed on it
    score: Tensor  # (B,) sigmoid(logit): probability of fake
    audio_emb: Tensor  # (B, D) audio emotion embedding
    image_emb: Tensor  # (B, D) image emotion embedding
    audio_emotion: Tensor = NO_EMOTIONS  # (B, K) emotion logits of the voice; (0, 0) without heads
    image_emotion: Tensor = NO_EMOTIONS  # (B, K) emotion logits of the face
    # (B, 2) the audio and image file's own "fake" logits, each taught its own file's label
    # (training.file_label_weight); (0, 0) for a model without per-modality heads
    file_logits: Tensor = NO_EMOTIONS


def emotion_agreement(audio_logits: Tensor, image_logits: Tensor) -> Tensor:
    """P(voice and face show the same emotion) = sum_k p_audio(k) p_image(k): (B, K) x2 -> (B,)
    in [0, 1]."""
    p = torch.softmax(audio_logits.float(), dim=1)
    q = torch.softmax(image_logits.float(), dim=1)
    return (p * q).sum(dim=1).clamp(0.0, 1.0)


class EmotionHeads(nn.Module):
    """Per-modality emotion classifiers and the agreement feature the fusion heads read."""

    def __init__(self, embedding_dim: int, n_emotions: int) -> None:
        super().__init__()
        self.n_emotions = n_emotions
        self.audio = nn.Linear(embedding_dim, n_emotions) if n_emotions else None
        self.image = nn.Linear(embedding_dim, n_emotions) if n_emotions else None

    def forward(self, audio_emb: Tensor, image_emb: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(agreement (B,) in [0, 1], audio logits (B, K), image logits (B, K))."""
        if self.audio is None or self.image is None:
            cos = F.cosine_similarity(audio_emb.float(), image_emb.float(), dim=1, eps=1e-8)
            return ((1.0 + cos) / 2.0).clamp(0.0, 1.0), NO_EMOTIONS, NO_EMOTIONS
        a, i = self.audio(audio_emb), self.image(image_emb)  # (B, K) each
        return emotion_agreement(a, i), a, i


def file_head(width: int) -> nn.Sequential:
    """One modality's "this file is fake" logit from its (B, width) features: (B, 1)."""
    return nn.Sequential(nn.ReLU(), Dropout(0.2), nn.Linear(width, 1))


# Parameters that only training reads (the auxiliary per-file heads of early and mid fusion):
# a model file written before they existed loads without them, since no score depends on them.
TRAINING_ONLY = ("audio_file_head.", "image_file_head.")


def _check_inputs(audio: Tensor, image: Tensor) -> tuple[Tensor, Tensor]:
    """The inputs, checked, in the channels-last layout `build_model` gives the weights: the
    CPU's max-pooling runs 7-16x faster in it, a demo training step 3-12% faster."""
    if audio.ndim != 4 or audio.shape[1] != 1:
        raise ValueError(f"audio must be (B, 1, n_mels, frames), got {tuple(audio.shape)}")
    if image.ndim != 4 or image.shape[1] != 3 or image.shape[2] != image.shape[3]:
        raise ValueError(f"image must be (B, 3, S, S), got {tuple(image.shape)}")
    if audio.shape[0] != image.shape[0]:
        raise ValueError(f"batch sizes differ: audio {audio.shape[0]}, image {image.shape[0]}")
    last = torch.channels_last
    return audio.contiguous(memory_format=last), image.contiguous(memory_format=last)


class ConsistencyHead(nn.Module):
    """The agreement (B,) in [0, 1] -> a logit of "fake" (low agreement: fake), joined to the
    fusion's own logit as a soft OR: the pair is fake when either says so."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(1, 1)
        # Start with: full agreement says real (-5), none says fake (+1), chance agreement
        # between untrained emotion classifiers (1/K) about neutral, so the fusion's own head
        # is not drowned out while the emotion classifiers learn.
        with torch.no_grad():
            self.linear.weight.fill_(-6.0)
            self.linear.bias.fill_(1.0)

    def logit(self, agree: Tensor) -> Tensor:
        return self.linear(agree[:, None]).squeeze(1)  # (B,)

    def forward(self, logit: Tensor, agree: Tensor) -> Tensor:
        both = torch.stack([logit, self.logit(agree)], dim=1)  # (B, 2)
        return torch.logsumexp(both, dim=1) - math.log(2)  # (B,)


def _output(
    logit: Tensor,
    audio_emb: Tensor,
    image_emb: Tensor,
    audio_emo: Tensor,
    image_emo: Tensor,
    file_logits: Tensor = NO_EMOTIONS,
) -> FusionOutput:
    return FusionOutput(
        logit, torch.sigmoid(logit), audio_emb, image_emb, audio_emo, image_emo, file_logits
    )


AUDIO_STEM_CHANNELS = (16, 32)  # the log-mel's stem: two conv blocks before it joins the image
# Early fusion's face emotion encoder: conv blocks of its own on the picture averaged down to at
# most FACE_SIDE px (mouth and brows are coarse shapes). Reading the image stem's features at
# 224 px, as it once did, it learned the face's emotion to 0.62 accuracy (mid's ResNet18: 0.96).
FACE_SIDE = 64
FACE_ENCODER_CHANNELS = (16, 32, 64, 128)


class PoolTo(nn.Module):
    """Average a map (B, C, H, W) down to at most `size` x `size`; a smaller one is left as it is
    (never replicated up)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        if h <= self.size and w <= self.size:
            return x
        return F.adaptive_avg_pool2d(x, (min(h, self.size), min(w, self.size)))


def stem_file_head(channels: int) -> nn.Sequential:
    """A modality's "this file is fake" logit read off its stem's (B, channels, H, W) maps."""
    return nn.Sequential(
        conv_block(channels, 2 * channels),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        file_head(2 * channels),
    )


def widen_input(block: BasicBlock, extra: int, zero_extra: bool) -> None:
    """Give a ResNet block `extra` more input channels (its first conv and its shortcut), keeping
    the weights it has for the channels it already reads. The new channels start with ResNet's own
    initialisation, or at zero (`zero_extra`, for pretrained weights: the block then computes
    exactly what it did until training teaches it to use what the new channels bring)."""
    downsample = block.downsample
    if downsample is None:
        raise ValueError("widen_input needs a block with a projection shortcut (stride 2)")
    block.conv1 = _widened(block.conv1, extra, zero_extra)
    downsample[0] = _widened(downsample[0], extra, zero_extra)


def _widened(conv: nn.Module, extra: int, zero_extra: bool) -> nn.Conv2d:
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"expected a Conv2d, got {type(conv).__name__}")
    wide = nn.Conv2d(
        conv.in_channels + extra,
        conv.out_channels,
        kernel_size=conv.kernel_size,  # type: ignore[arg-type]
        stride=conv.stride,  # type: ignore[arg-type]
        padding=conv.padding,  # type: ignore[arg-type]
        bias=False,
    )
    with torch.no_grad():
        nn.init.kaiming_normal_(wide.weight, mode="fan_out", nonlinearity="relu")  # as ResNet
        if zero_extra:
            wide.weight[:, conv.in_channels :].zero_()
        wide.weight[:, : conv.in_channels].copy_(conv.weight)
    return wide


class EarlyFusionModel(nn.Module):
    """The two modalities joined after a short stem each, one ResNet18 trunk on the joined maps.

    RGB (B, 3, S, S)    -> ResNet18 conv1 + layer1     -> (B, 64, S/4, S/4)
    log-mel (B, 1, M, T) -> two conv blocks (B, 32, M/4, T/4) -> resized to the S/4 grid
    concatenated (B, 96, S/4, S/4) -> ResNet18 layer2..layer4 (layer2 widened to read the 32
    audio channels too) -> pooled (B, 512) -> [+ agreement] -> logit

    Five of ResNet18's seventeen weighted layers see the image alone, two the audio alone; every
    other layer reads both, so the decision is made on the joined inputs: the fusion is early.
    Two auxiliary heads, one on each stem, give `file_logits`, each taught its own file's label,
    so each stem learns its modality's artefacts from the first epoch instead of only through the
    joint trunk; the decision never reads them.
    The trunk is ResNet18's own, so `model.pretrained_image_weights` fills the image stem and the
    trunk (the widened inputs' audio channels start at zero). The emotion embeddings that the
    consistency signal compares come from encoders of their own: an `AudioModel` (CNN + LSTM:
    pitch contour and rate need the time axis) on the log-mel and four conv blocks on the picture
    averaged down to at most `FACE_SIDE` px (mouth and brows are coarse shapes; the stem's fine
    artefact features are not what carries a face's emotion).
    """

    def __init__(
        self,
        embedding_dim: int = 128,
        n_emotions: int = 0,
        pretrained: Mapping[str, Tensor] | None = None,
    ) -> None:
        super().__init__()
        net = resnet_trunk()
        if pretrained is not None:
            load_resnet_weights(net, pretrained)
        self.norm = ImageNorm()
        self.image_stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1)
        widths = (1, *AUDIO_STEM_CHANNELS)
        self.audio_stem = nn.Sequential(
            *(conv_block(c_in, c_out) for c_in, c_out in itertools.pairwise(widths))
        )
        widen_input(net.layer2[0], AUDIO_STEM_CHANNELS[-1], zero_extra=pretrained is not None)
        self.joint = nn.Sequential(net.layer2, net.layer3, net.layer4, net.avgpool, nn.Flatten())
        self.audio_branch = AudioModel(embedding_dim)
        face_widths = (3, *FACE_ENCODER_CHANNELS)
        self.image_branch = nn.Sequential(
            PoolTo(FACE_SIDE),
            *(conv_block(c_in, c_out) for c_in, c_out in itertools.pairwise(face_widths)),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(FACE_ENCODER_CHANNELS[-1], embedding_dim),
        )
        self.emotions = EmotionHeads(embedding_dim, n_emotions)
        self.classifier = nn.Sequential(Dropout(0.2), nn.Linear(RESNET_FEATURES + 1, 1))
        self.consistency = ConsistencyHead()
        self.audio_file_head = stem_file_head(AUDIO_STEM_CHANNELS[-1])
        self.image_file_head = stem_file_head(RESNET_STEM_FEATURES)

    def forward(self, audio: Tensor, image: Tensor) -> FusionOutput:
        audio, image = _check_inputs(audio, image)
        image = self.norm(image)
        image_feats = self.image_stem(image)  # (B, 64, S/4, S/4)
        audio_feats = self.audio_stem(audio)  # (B, 32, M/4, T/4)
        audio_grid = F.interpolate(
            audio_feats, size=image_feats.shape[-2:], mode="bilinear", align_corners=False
        )  # (B, 32, S/4, S/4)
        joint = self.joint(torch.cat([image_feats, audio_grid], dim=1))  # (B, 512)
        audio_emb = self.audio_branch(audio)  # (B, D)
        image_emb = self.image_branch(image)  # (B, D), from the picture at <= FACE_SIDE px
        agree, audio_emo, image_emo = self.emotions(audio_emb, image_emb)
        logit = self.classifier(torch.cat([joint, agree[:, None]], dim=1)).squeeze(1)  # (B,)
        logit = self.consistency(logit, agree)
        files = torch.cat([self.audio_file_head(audio_feats), self.image_file_head(image_feats)], 1)
        return _output(logit, audio_emb, image_emb, audio_emo, image_emo, files)  # files: (B, 2)


class MidFusionModel(nn.Module):
    """Audio and image embeddings concatenated -> dense layers -> one logit. An auxiliary head on
    each embedding gives `file_logits`, each taught its own file's label; the decision never
    reads them."""

    def __init__(
        self,
        embedding_dim: int = 128,
        pretrained: Mapping[str, Tensor] | None = None,
        n_emotions: int = 0,
    ) -> None:
        super().__init__()
        self.audio = AudioModel(embedding_dim)
        self.image = ImageModel(embedding_dim, pretrained)
        self.emotions = EmotionHeads(embedding_dim, n_emotions)
        self.head = nn.Sequential(
            nn.Linear(2 * embedding_dim + 1, embedding_dim),
            nn.ReLU(inplace=True),
            Dropout(0.2),
            nn.Linear(embedding_dim, 1),
        )
        self.consistency = ConsistencyHead()
        self.audio_file_head = file_head(embedding_dim)
        self.image_file_head = file_head(embedding_dim)

    def forward(self, audio: Tensor, image: Tensor) -> FusionOutput:
        audio, image = _check_inputs(audio, image)
        audio_emb = self.audio(audio)  # (B, D)
        image_emb = self.image(image)  # (B, D)
        agree, audio_emo, image_emo = self.emotions(audio_emb, image_emb)
        joined = torch.cat([audio_emb, image_emb, agree[:, None]], dim=1)  # (B, 2D + 1)
        logit = self.consistency(self.head(joined).squeeze(1), agree)  # (B,)
        files = torch.cat([self.audio_file_head(audio_emb), self.image_file_head(image_emb)], 1)
        return _output(logit, audio_emb, image_emb, audio_emo, image_emo, files)  # files: (B, 2)


LATE_RULES = ("learned", "mean", "max")


class LateFusionModel(nn.Module):
    """Separate decisions combined at the end: an audio head, an image head and a consistency
    head (on the agreement of the two modalities' emotions) each give a logit; `rule` combines
    them: "mean" / "max" of the three probabilities, or "learned": a soft maximum of the three
    logits, each with a learned scale and offset (a pair is fake when any one source says so).

    The audio and image heads' logits are also returned (`file_logits`): where each file's own
    label is known, training teaches each head its file's label, so the image head learns the
    image-only fakes whichever head happens to lead (through the soft maximum alone, a fake's
    gradient goes mostly to the head already highest)."""

    def __init__(
        self,
        embedding_dim: int = 128,
        pretrained: Mapping[str, Tensor] | None = None,
        rule: str = "learned",
        n_emotions: int = 0,
    ) -> None:
        super().__init__()
        if rule not in LATE_RULES:
            raise ValueError(f"late fusion rule {rule!r} is not one of {', '.join(LATE_RULES)}")
        self.rule = rule
        self.audio = AudioModel(embedding_dim)
        self.image = ImageModel(embedding_dim, pretrained)
        self.emotions = EmotionHeads(embedding_dim, n_emotions)
        self.audio_head = file_head(embedding_dim)
        self.image_head = file_head(embedding_dim)
        self.consistency_head = ConsistencyHead()  # agreement in [0, 1] -> logit of "fake"
        self.scale = nn.Parameter(torch.ones(3))  # the "learned" rule's per-head scale ...
        self.offset = nn.Parameter(torch.zeros(3))  # ... and offset

    def head_logits(self, audio_emb: Tensor, image_emb: Tensor, agree: Tensor) -> Tensor:
        """(B, 3): the audio, image and consistency heads' logits."""
        return torch.cat(
            [
                self.audio_head(audio_emb),
                self.image_head(image_emb),
                self.consistency_head.logit(agree)[:, None],
            ],
            dim=1,
        )

    def forward(self, audio: Tensor, image: Tensor) -> FusionOutput:
        audio, image = _check_inputs(audio, image)
        audio_emb = self.audio(audio)  # (B, D)
        image_emb = self.image(image)  # (B, D)
        agree, audio_emo, image_emo = self.emotions(audio_emb, image_emb)
        logits = self.head_logits(audio_emb, image_emb, agree)  # (B, 3)
        if self.rule == "learned":
            logit = torch.logsumexp(logits * self.scale + self.offset, dim=1) - math.log(3)
        elif self.rule == "max":  # max of the probabilities = sigmoid of the max logit
            logit = logits.max(dim=1).values
        else:  # mean of the probabilities, as a logit computed in log space (no overflow)
            log_p = torch.logsumexp(F.logsigmoid(logits), dim=1) - math.log(3)
            log_q = torch.logsumexp(F.logsigmoid(-logits), dim=1) - math.log(3)
            logit = log_p - log_q
        return _output(logit, audio_emb, image_emb, audio_emo, image_emo, logits[:, :2])
