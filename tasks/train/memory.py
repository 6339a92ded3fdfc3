"""The memory guard: the seed's `monitor_memory()` and `adjust_batch_size()`, and what uses them.

Before each training batch the guard reads system memory (psutil):
- above `memory.shrink_threshold` (70%) the batch size is halved, for the rest of the epoch, never
  below `memory.min_batch_size`;
- the next batch's own footprint (a measured per-sample size) must fit under `memory.cap` (80%):
  the batch is halved until it does; at the minimum batch the trainer waits up to
  `memory.cap_wait_s` for memory to be freed, then fails with `MemoryCapReached`;
- a CUDA out-of-memory error halves the batch and the step is retried (see `tasks.train.loop`).
Every change is logged with the reading that caused it.

Readings are percentages of system memory in use (0-100), as psutil and the step log report them;
the config's thresholds are fractions (0.7 = 70%).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import psutil
import torch
from torch import Tensor, nn

from config.schema import DataConfig, MemoryConfig, PipelineConfig
from tasks.errors import ConfigError

log = logging.getLogger(__name__)

MemoryReader = Callable[[], float]  # () -> percent of system memory in use, 0-100
TRAIN_FACTOR = 2  # a training step keeps each activation for backward and makes its gradient
OPTIMIZER_COPIES = 4  # weights, gradients and Adam's two moments, each the size of the weights


class MemoryCapReached(MemoryError):
    """Memory stayed too full for even the smallest batch to fit under the cap."""


def monitor_memory() -> float:
    """Percent of system memory in use now (psutil), 0-100."""
    return float(psutil.virtual_memory().percent)


def total_memory_bytes() -> int:
    return int(psutil.virtual_memory().total)


def adjust_batch_size(batch_size: int, memory_percent: float, cfg: MemoryConfig) -> int:
    """Halve `batch_size` when `memory_percent` passes `cfg.shrink_threshold` (a `MemoryConfig`);
    never below `cfg.min_batch_size`; otherwise unchanged."""
    if memory_percent > 100 * cfg.shrink_threshold:
        return max(cfg.min_batch_size, batch_size // 2)
    return batch_size


def _tensor_bytes(value: Any) -> int:
    if isinstance(value, Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def estimate_sample_bytes(model: nn.Module, data_cfg: DataConfig) -> int:
    """Measured training footprint of one sample: run a 2-sample batch of the configured input
    size (`data.n_mels`, `data.spec_frames`, `data.image_size`) through `model` and add up every
    layer's output, times `TRAIN_FACTOR`. Runs in eval mode without gradients: no side effects."""
    device = next(model.parameters()).device
    audio = torch.zeros(2, 1, data_cfg.n_mels, data_cfg.spec_frames, device=device)  # (2, 1, M, T)
    image = torch.zeros(
        2, 3, data_cfg.image_size, data_cfg.image_size, device=device
    )  # (2, 3, S, S)
    total = 0

    def count(_module: nn.Module, _inputs: Any, output: Any) -> None:
        nonlocal total
        total += _tensor_bytes(output)

    leaves = [m for m in model.modules() if not any(True for _ in m.children())]
    hooks = [m.register_forward_hook(count) for m in leaves]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(audio, image)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return int(TRAIN_FACTOR * total / 2 + _tensor_bytes([audio, image]) / 2)


def model_state_bytes(model: nn.Module) -> int:
    """Weights, gradients and Adam state of `model`, in bytes."""
    return OPTIMIZER_COPIES * sum(p.numel() * p.element_size() for p in model.parameters())


def estimate_batch_size(
    configured: int, sample_bytes: int, memory_percent: float, total_bytes: int, cfg: MemoryConfig
) -> int:
    """The initial batch size: the configured one, or fewer samples when the free memory below
    the shrink threshold (`cfg` a `MemoryConfig`) cannot hold that many measured samples."""
    if sample_bytes <= 0:
        return configured
    headroom = total_bytes * (100 * cfg.shrink_threshold - memory_percent) / 100
    fits = math.floor(headroom / sample_bytes) if headroom > 0 else 0
    return max(cfg.min_batch_size, min(configured, fits))


class MemoryGuard:
    """Picks the batch size before each batch from a memory reading (see the module docstring).

    `read_memory` is injectable so tests can play a sequence of readings; `sleep` likewise.
    `batch_size` is what the next batch gets; `reading` the last reading (percent).
    """

    def __init__(
        self,
        cfg: MemoryConfig,
        batch_size: int,
        *,
        sample_bytes: int = 0,
        read_memory: MemoryReader = monitor_memory,
        total_bytes: int | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if batch_size < cfg.min_batch_size:
            raise ConfigError(
                f"training.batch_size ({batch_size}) is below memory.min_batch_size "
                f"({cfg.min_batch_size})"
            )
        self.cfg = cfg
        self.initial = batch_size  # every epoch starts from here
        self.batch_size = batch_size
        self.sample_bytes = sample_bytes
        self.read_memory = read_memory
        self.total_bytes = total_bytes or total_memory_bytes()
        self.sleep = sleep
        self.reading = float("nan")

    def start_epoch(self) -> None:
        """A shrink lasts for the rest of its epoch; the next epoch starts from the initial size."""
        self.batch_size = self.initial

    def _read(self) -> float:
        self.reading = float(self.read_memory())
        return self.reading

    def _projected(self, reading: float, batch: int) -> float:
        """Percent in use once a batch of `batch` samples is allocated on top of `reading`."""
        return reading + 100 * batch * self.sample_bytes / self.total_bytes

    def check(self) -> str | None:
        """Before each batch: read memory, shrink if needed; returns "shrink" when it shrank."""
        reading = self._read()
        new = adjust_batch_size(self.batch_size, reading, self.cfg)
        cap = 100 * self.cfg.cap
        while new > self.cfg.min_batch_size and self._projected(reading, new) > cap:
            new = max(self.cfg.min_batch_size, new // 2)
        if self._projected(reading, new) > cap:
            reading = self._wait_under_cap(new)
        if new >= self.batch_size:
            return None
        log.warning(
            "memory %.1f%% in use (shrink above %.0f%%, cap %.0f%%): batch size %d -> %d "
            "for the rest of the epoch",
            reading,
            100 * self.cfg.shrink_threshold,
            cap,
            self.batch_size,
            new,
        )
        self.batch_size = new
        return "shrink"

    def _wait_under_cap(self, batch: int) -> float:
        cap = 100 * self.cfg.cap
        deadline = time.monotonic() + self.cfg.cap_wait_s
        reading = self.reading
        log.warning(
            "memory %.1f%% in use: a batch of %d would pass the %.0f%% cap; waiting up to %.0f s",
            reading,
            batch,
            cap,
            self.cfg.cap_wait_s,
        )
        while self._projected(reading, batch) > cap:
            left = deadline - time.monotonic()
            if left <= 0:
                raise MemoryCapReached(
                    f"memory {reading:.1f}% in use: even a batch of {batch} "
                    f"(memory.min_batch_size) would pass the {cap:.0f}% cap (memory.cap) after "
                    f"waiting {self.cfg.cap_wait_s:.0f} s; free memory or train fewer fusions "
                    "at once"
                )
            self.sleep(min(1.0, left))
            reading = self._read()
        return reading

    def on_oom(self, failed_batch: int) -> int | None:
        """CUDA ran out of memory on a batch of `failed_batch` samples: returns the halved size
        for the retry (kept for the rest of the epoch), or None when already at the minimum."""
        if failed_batch <= self.cfg.min_batch_size:
            return None
        new = max(self.cfg.min_batch_size, failed_batch // 2)
        log.warning(
            "CUDA out of memory at batch size %d (system memory %.1f%% in use): batch size -> %d, "
            "retrying the step",
            failed_batch,
            self._read(),
            new,
        )
        self.batch_size = min(self.batch_size, new)
        return new


def plan_concurrency(
    cfg: PipelineConfig,
    n_fusions: int,
    *,
    read_memory: MemoryReader = monitor_memory,
    total_bytes: int | None = None,
    footprints: Iterable[int] | None = None,
) -> int:
    """How many of `n_fusions` trainings may run at once: `training.concurrency` when it is a
    number; "auto": as many as fit, each with its model, Adam state and a full batch, in the
    memory left below the shrink threshold (and in free GPU memory on CUDA); at least 1.

    `footprints` (bytes per fusion) defaults to measuring each of `training.fusions`.
    """
    if n_fusions <= 1:
        return 1
    if cfg.training.concurrency != "auto":
        return max(1, min(int(cfg.training.concurrency), n_fusions))
    if footprints is None:
        footprints = [fusion_footprint(f, cfg) for f in cfg.training.fusions]
    need = max(footprints, default=0)
    if need <= 0:
        return n_fusions
    total = total_bytes or total_memory_bytes()
    headroom = total * (100 * cfg.memory.shrink_threshold - read_memory()) / 100
    fits = int(headroom // need)
    if cfg.training.device != "cpu" and torch.cuda.is_available():
        free_gpu, _ = torch.cuda.mem_get_info()
        fits = min(fits, int(free_gpu // need))
    planned = max(1, min(n_fusions, fits))
    log.info(
        "concurrency: %d of %d fusions at once (%.0f MB each, %.0f MB free below the %.0f%% "
        "threshold)",
        planned,
        n_fusions,
        need / 2**20,
        max(headroom, 0) / 2**20,
        100 * cfg.memory.shrink_threshold,
    )
    return planned


def plan_threads(cfg: PipelineConfig, at_once: int, available: int | None = None) -> int:
    """Torch's CPU threads for each of `at_once` trainings run side by side in one process: the
    `available` threads (torch's default, one per core) shared out, at least 1. Trainings on
    CUDA, or one alone, keep them all. Each training thread otherwise runs its own OpenMP team of
    the full size, and three fusions on two cores ran 6 threads: measured with
    benchmarks/bench_train.py, 1 thread each gave 1.2x the samples/s of the default."""
    available = available or torch.get_num_threads()
    on_cuda = cfg.training.device != "cpu" and torch.cuda.is_available()
    if at_once <= 1 or on_cuda:
        return available
    return max(1, available // at_once)


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with torch's intra-op thread count at `n`, restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def fusion_footprint(fusion: str, cfg: PipelineConfig) -> int:
    """Bytes one training of `fusion` needs: model and Adam state plus a full batch."""
    from models import build_model

    model = build_model(fusion, cfg)
    return model_state_bytes(model) + cfg.training.batch_size * estimate_sample_bytes(
        model, cfg.data
    )
