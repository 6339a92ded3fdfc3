"""An exponential moving average of a model's weights (`training.average_epochs`).

Model selection picks one epoch out of a noisy sequence: on a small validation split the epoch
with the best validation ROC-AUC is often a lucky draw of the optimizer's last few steps, and the
test split then sees a model a few hundredths worse. The average of the weights over the last
epochs moves smoothly, so the epoch it picks is the trend rather than the noise. The averaged copy
is what `fit` validates, selects and saves as `model.pt`; the optimizer keeps training the raw
weights, and a checkpoint carries both.

    average = WeightAverage(model, decay_for(average_epochs, steps_per_epoch))
    average.update()          # after each optimizer step
    average.module            # the averaged model: validate and save this one

Every floating tensor of the state dict (weights and BatchNorm running statistics) is averaged;
integer buffers (BatchNorm's batch counter) are copied. The first updates use a shorter horizon,
(1 + n) / (10 + n), so the random initial weights do not linger in the average.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import Tensor, nn

from tasks.errors import CheckpointError


def decay_for(average_epochs: float, steps_per_epoch: int) -> float:
    """The per-step decay whose horizon (1 / (1 - decay)) is `average_epochs` epochs of steps."""
    if average_epochs <= 0 or steps_per_epoch <= 0:
        raise ValueError(
            f"average over {average_epochs} epochs of {steps_per_epoch} steps: both must be > 0"
        )
    return 1.0 - 1.0 / max(1.0, average_epochs * steps_per_epoch)


def steps_per_epoch(n_train: int, batch_size: int) -> int:
    """Optimizer steps in one pass over `n_train` samples at `batch_size` (at least 1)."""
    return max(1, math.ceil(n_train / max(batch_size, 1)))


class WeightAverage:
    """A frozen copy of `model` whose weights follow the model's as an exponential moving
    average with per-step `decay`. Built after the model is on its device."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"weight-average decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.source = model
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        # state_dict() tensors share storage with the modules', so these pairs stay valid
        # (load_state_dict copies in place).
        pairs = list(
            zip(self.module.state_dict().values(), model.state_dict().values(), strict=True)
        )
        self._avg: list[Tensor] = [a for a, _ in pairs if a.dtype.is_floating_point]
        self._cur: list[Tensor] = [c for a, c in pairs if a.dtype.is_floating_point]
        self._copied = [(a, c) for a, c in pairs if not a.dtype.is_floating_point]

    def update(self) -> None:
        """Move the average towards the model's current weights (one optimizer step done)."""
        self.updates += 1
        decay = min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))
        with torch.no_grad():
            if self._avg:
                torch._foreach_lerp_(self._avg, self._cur, 1.0 - decay)
            for a, c in self._copied:
                a.copy_(c)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps: the averaged weights (on the CPU) and the update count."""
        return {
            "updates": self.updates,
            "model": {k: v.detach().cpu() for k, v in self.module.state_dict().items()},
        }

    def load_state_dict(self, state: dict[str, Any], where: str) -> None:
        """Restore a checkpoint's average (`where` names the file in errors)."""
        try:
            self.module.load_state_dict(state["model"])
            self.updates = int(state["updates"])
        except (RuntimeError, KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{where}: its weight average does not fit ({exc})") from exc

    def restart(self) -> None:
        """Start the average over from the model's current weights (a checkpoint without one)."""
        self.module.load_state_dict(self.source.state_dict())
        self.updates = 0
