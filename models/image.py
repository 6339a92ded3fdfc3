"""`ImageModel`: torchvision's ResNet18 with a 128-d emotion embedding in place of its classifier.

Weights start random (`weights=None`): the model itself downloads nothing. Pretrained ResNet18
weights, when the config names them (torchvision's ImageNet weights, a file or a bucket key),
arrive as a state dict (read by the trainer with `weights_only=True`) and are applied with
`load_resnet_weights`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torchvision.models import ResNet, resnet18

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # ResNet18's expected input statistics
IMAGENET_STD = (0.229, 0.224, 0.225)
RESNET_FEATURES = 512  # width of ResNet18's pooled features
RESNET_STEM_FEATURES = 64  # channels after ResNet18's conv1 and layer1


class ImageNorm(nn.Module):
    """[0, 1] RGB -> ImageNet-normalised RGB; constants, not weights (kept out of state dicts)."""

    mean: Tensor
    std: Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, image: Tensor) -> Tensor:
        return (image - self.mean) / self.std


def resnet_trunk() -> ResNet:
    """ResNet18 without its classifier: (B, 3, S, S) -> (B, 512)."""
    net = resnet18(weights=None)
    net.fc = nn.Identity()  # type: ignore[assignment]
    return net


def load_resnet_weights(net: ResNet, state: Mapping[str, Tensor]) -> None:
    """Apply torchvision ResNet18 weights to a trunk from `resnet_trunk`; the classifier (fc.*)
    is dropped. Raises ValueError on anything that is not ResNet18 weights."""
    weights = {k: v for k, v in state.items() if not k.startswith("fc.")}
    own = net.state_dict()
    wrong = [k for k, v in weights.items() if k in own and v.shape != own[k].shape]
    if wrong:
        k = wrong[0]
        raise ValueError(
            f"not ResNet18 weights: {k} has shape {tuple(weights[k].shape)}, "
            f"expected {tuple(own[k].shape)}"
        )
    missing, unexpected = net.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(
            "not ResNet18 weights: "
            f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )


class ImageModel(nn.Module):
    """RGB image (B, 3, S, S) in [0, 1] -> emotion embedding (B, embedding_dim)."""

    def __init__(
        self, embedding_dim: int = 128, pretrained: Mapping[str, Tensor] | None = None
    ) -> None:
        super().__init__()
        self.norm = ImageNorm()
        self.backbone = resnet_trunk()
        if pretrained is not None:
            load_resnet_weights(self.backbone, pretrained)
        self.proj = nn.Linear(RESNET_FEATURES, embedding_dim)
        self.embedding_dim = embedding_dim

    def forward(self, image: Tensor) -> Tensor:
        if image.ndim != 4 or image.shape[1] != 3:
            raise ValueError(f"image must be (B, 3, S, S), got {tuple(image.shape)}")
        return self.proj(self.backbone(self.norm(image)))  # (B, D)
