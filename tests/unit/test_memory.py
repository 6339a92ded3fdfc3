"""The memory guard, driven by injected memory readings (percent of system memory in use)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable

import pytest
import torch

from config.load import validate_config
from config.schema import MemoryConfig
from models import build_model
from tasks.errors import ConfigError, is_transient_error
from tasks.train.memory import (
    MemoryCapReached,
    MemoryGuard,
    adjust_batch_size,
    estimate_batch_size,
    estimate_sample_bytes,
    model_state_bytes,
    monitor_memory,
    plan_concurrency,
    plan_threads,
    torch_threads,
)
from tests.unit.memory_readings import readings

GB = 2**30
CFG = MemoryConfig(cap=0.8, shrink_threshold=0.7, min_batch_size=2, cap_wait_s=0)


def test_monitor_memory_reads_system_memory_in_percent() -> None:
    value = monitor_memory()
    assert 0.0 < value < 100.0


def test_adjust_batch_size_halves_above_the_threshold_only() -> None:
    assert adjust_batch_size(16, 69.9, CFG) == 16
    assert adjust_batch_size(16, 70.0, CFG) == 16  # "passes" 70%: strictly above
    assert adjust_batch_size(16, 70.1, CFG) == 8
    assert adjust_batch_size(3, 95.0, CFG) == 2
    assert adjust_batch_size(2, 95.0, CFG) == 2  # never below min_batch_size


def test_guard_halves_each_batch_while_memory_stays_high_and_logs_the_reading(
    caplog: pytest.LogCaptureFixture,
) -> None:
    guard = MemoryGuard(CFG, 16, read_memory=readings(50, 72, 75, 74, 60), total_bytes=16 * GB)
    caplog.set_level(logging.WARNING, logger="tasks.train.memory")
    events = [guard.check() for _ in range(6)]
    assert events == [None, "shrink", "shrink", "shrink", None, None]
    assert guard.batch_size == 2  # 16 -> 8 -> 4 -> 2, then stays for the rest of the epoch
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3
    assert "memory 72.0% in use" in messages[0] and "batch size 16 -> 8" in messages[0]
    assert "batch size 4 -> 2" in messages[2]
    guard.start_epoch()
    assert guard.batch_size == 16  # the next epoch starts from the initial size


def test_guard_keeps_the_next_batch_under_the_cap() -> None:
    # 60% in use, 16 GB: the cap leaves 20% = 3.2 GB; each sample needs 0.5 GB -> 6 fit, so 4.
    guard = MemoryGuard(
        CFG, 16, sample_bytes=GB // 2, read_memory=readings(60.0), total_bytes=16 * GB
    )
    assert guard.check() == "shrink"
    assert guard.batch_size == 4
    assert guard._projected(60.0, guard.batch_size) <= 80.0


def test_guard_waits_at_the_minimum_batch_then_fails_with_the_reading() -> None:
    slept: list[float] = []
    cfg = MemoryConfig(cap=0.8, shrink_threshold=0.7, min_batch_size=2, cap_wait_s=0.05)
    guard = MemoryGuard(cfg, 8, read_memory=readings(85.0), total_bytes=16 * GB, sleep=slept.append)
    with pytest.raises(MemoryCapReached, match=r"memory 85.0% in use.*batch of 2.*80% cap"):
        guard.check()
    assert slept  # it waited before giving up
    assert not is_transient_error(MemoryCapReached("x"))  # a task retry would not help


def test_guard_resumes_when_memory_is_freed_while_it_waits() -> None:
    slept: list[float] = []
    cfg = MemoryConfig(cap=0.8, shrink_threshold=0.7, min_batch_size=2, cap_wait_s=30)
    guard = MemoryGuard(
        cfg, 8, read_memory=readings(85.0, 65.0), total_bytes=16 * GB, sleep=slept.append
    )
    assert guard.check() == "shrink"  # shrank to the minimum, then waited for memory
    assert guard.batch_size == 2
    assert len(slept) == 1 and guard.reading == 65.0


def test_out_of_memory_halves_until_the_minimum(caplog: pytest.LogCaptureFixture) -> None:
    guard = MemoryGuard(CFG, 16, read_memory=readings(40.0), total_bytes=16 * GB)
    caplog.set_level(logging.WARNING, logger="tasks.train.memory")
    assert guard.on_oom(16) == 8
    assert guard.batch_size == 8
    assert guard.on_oom(3) == 2
    assert guard.on_oom(2) is None  # nothing left to halve: the caller re-raises
    assert "CUDA out of memory at batch size 16 (system memory 40.0% in use)" in caplog.text


def test_initial_batch_below_the_minimum_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"training.batch_size \(1\).*memory.min_batch_size"):
        MemoryGuard(CFG, 1, read_memory=readings(10.0), total_bytes=GB)


def test_initial_batch_size_from_free_memory_and_sample_footprint() -> None:
    # 50% in use of 10 GB: 2 GB below the 70% threshold; 0.25 GB per sample -> 8 fit.
    assert estimate_batch_size(16, GB // 4, 50.0, 10 * GB, CFG) == 8
    assert estimate_batch_size(4, GB // 4, 50.0, 10 * GB, CFG) == 4  # never above the config
    assert estimate_batch_size(16, GB // 4, 90.0, 10 * GB, CFG) == 2  # no room: the minimum
    assert estimate_batch_size(16, 0, 50.0, 10 * GB, CFG) == 16  # unknown footprint


def test_sample_footprint_is_measured_from_the_model() -> None:
    cfg = validate_config({"data": {"n_mels": 16, "spec_frames": 16, "image_size": 32}})
    big = validate_config({"data": {"n_mels": 16, "spec_frames": 16, "image_size": 64}})
    model = build_model("mid", cfg)
    small_bytes = estimate_sample_bytes(model, cfg.data)
    big_bytes = estimate_sample_bytes(model, big.data)
    assert small_bytes > 32 * 32 * 3 * 4  # more than its own input
    assert 3 * small_bytes < big_bytes  # 4x the pixels: about 4x the activations
    assert model.training  # measuring left the model as it was
    assert model_state_bytes(model) == 4 * 4 * sum(p.numel() for p in model.parameters())


def concurrency_cfg(concurrency: object, batch: int = 16) -> object:
    return validate_config(
        {
            "training": {"concurrency": concurrency, "batch_size": batch, "device": "cpu"},
            "memory": {"shrink_threshold": 0.7, "cap": 0.8},
        }
    )


def plan(cfg: object, n: int, reading: float, footprints: Iterable[int]) -> int:
    return plan_concurrency(
        cfg, n, read_memory=readings(reading), total_bytes=10 * GB, footprints=list(footprints)
    )


def test_plan_concurrency_fits_fusions_in_the_memory_below_the_threshold() -> None:
    auto = concurrency_cfg("auto")
    assert plan(auto, 3, 10.0, [GB, GB, 2 * GB]) == 3  # 6 GB free, 2 GB each
    assert plan(auto, 3, 40.0, [GB, GB, 2 * GB]) == 1  # 3 GB free: one at a time
    assert plan(auto, 3, 30.0, [GB, GB, 2 * GB]) == 2
    assert plan(auto, 3, 69.0, [GB]) == 1  # never zero
    assert plan(concurrency_cfg(2), 3, 99.0, [GB]) == 2  # a configured number wins
    assert plan(concurrency_cfg(5), 3, 10.0, [GB]) == 3
    assert plan(auto, 1, 10.0, [GB]) == 1


def test_plan_concurrency_measures_the_configured_fusions() -> None:
    cfg = validate_config(
        {
            "data": {"n_mels": 16, "spec_frames": 16, "image_size": 32},
            "training": {"fusions": ["mid", "late"], "batch_size": 4, "device": "cpu"},
        }
    )
    # Plenty of room (1 TB, 1% in use): both at once; almost none: one at a time.
    assert plan_concurrency(cfg, 2, read_memory=readings(1.0), total_bytes=2**40) == 2
    assert plan_concurrency(cfg, 2, read_memory=readings(69.9), total_bytes=2**30) == 1


def test_concurrent_trainings_share_the_cores_torch_threads() -> None:
    cpu = concurrency_cfg("auto")
    assert plan_threads(cpu, 3, available=2) == 1  # three fusions on two cores: one each
    assert plan_threads(cpu, 2, available=16) == 8
    assert plan_threads(cpu, 3, available=16) == 5
    assert plan_threads(cpu, 1, available=16) == 16  # alone: all of them
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
        seen: list[int] = []
        worker = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        worker.start()
        worker.join()
        assert seen == [1]  # a training thread started inside the block gets the plan too
    assert torch.get_num_threads() == before
