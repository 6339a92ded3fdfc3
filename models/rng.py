"""Random streams a model owns, so fusions trained at once in threads of one process stay
reproducible: torch's global generator is shared by every thread, and whichever thread draws
first changes what the others get.

    Dropout                 drop-in for nn.Dropout that draws its masks from the generator given
                            by `use_generator` (the global one until then); no state_dict change
    use_generator(model, g) every `Dropout` of `model` draws from `g` from now on
    seeded_init(seed)       a context in which a model is built from `seed` alone: the global
                            generator is seeded and held for the duration (one builder at a time)

The contract that makes concurrent training reproducible: while models train, nothing draws from
torch's global generator (dropout uses the model's own, data order and augmentation their own
seeded generators), so the only global draws are model construction, serialised here.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_init_lock = threading.Lock()


class Dropout(nn.Module):
    """Dropout with an explicit generator: zeroes each element with probability `p` in training
    and scales the rest by 1 / (1 - p); the identity in eval mode."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p
        self.generator: torch.Generator | None = None

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.generator is None:
            return F.dropout(x, self.p, training=True)
        keep = torch.empty(x.shape, device=self.generator.device, dtype=x.dtype)
        keep.bernoulli_(1.0 - self.p, generator=self.generator)
        return x * keep.to(x.device) / (1.0 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def use_generator(model: nn.Module, generator: torch.Generator) -> int:
    """Point every `Dropout` in `model` at `generator`; returns how many there are."""
    found = [m for m in model.modules() if isinstance(m, Dropout)]
    for module in found:
        module.generator = generator
    return len(found)


@contextmanager
def seeded_init(seed: int) -> Iterator[None]:
    """Build a model from `seed` alone, whatever other threads do with the global generator:
    one builder at a time seeds it, and the caller's state is restored afterwards."""
    with _init_lock, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
