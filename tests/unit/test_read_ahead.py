"""`read_ahead`: the training samples produced in a thread of their own, a bounded number ahead of
the step, in the same order, with the source's errors raised where they happened."""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from config.schema import PipelineConfig, TrainingConfig
from tasks.data.shards import DeepfakeDataset, read_ahead, write_shard
from tasks.errors import DataError
from tasks.io.storage import open_storage
from tasks.train.fit import read_ahead_depth


def _threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name == "read-ahead"]


def test_items_come_in_order_and_the_thread_ends_with_them() -> None:
    assert list(read_ahead(range(200), 3)) == list(range(200))
    assert list(read_ahead(iter([]), 3)) == []
    assert _threads() == []


def test_it_never_runs_more_than_depth_items_ahead_of_the_consumer() -> None:
    consumed = 0
    ahead = []  # how far ahead of the consumer each item was produced

    def source() -> Iterator[int]:
        for i in range(100):
            ahead.append(i - consumed)
            yield i

    for i in read_ahead(source(), 4):
        assert i == consumed
        consumed += 1
    # an item can be made while `depth` wait in the queue and the consumer holds none: depth + 1
    assert max(ahead) <= 4 + 1
    assert consumed == 100


def test_an_error_in_the_source_is_raised_after_the_items_before_it() -> None:
    def source() -> Iterator[int]:
        yield from range(5)
        raise DataError("s3://bucket/features/shard-3.npz: not a readable feature shard")

    got = []
    with pytest.raises(DataError, match="shard-3.npz"):
        for i in read_ahead(source(), 2):
            got.append(i)
    assert got == [0, 1, 2, 3, 4]
    assert _threads() == []


def test_stopping_early_closes_the_source_and_joins_the_thread() -> None:
    closed = threading.Event()

    def source() -> Iterator[int]:
        try:
            yield from range(10_000)
        finally:
            closed.set()

    it = read_ahead(source(), 8)
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    it.close()
    assert closed.is_set()  # its own cleanup ran (a dataset's shard prefetch pool)
    assert _threads() == []


def test_the_source_runs_in_the_callers_context() -> None:
    run = contextvars.ContextVar("run", default="none")
    run.set("flow-run-7")

    def source() -> Iterator[str]:
        yield run.get()
        yield threading.current_thread().name

    assert list(read_ahead(source(), 1)) == ["flow-run-7", "read-ahead"]
    assert list(read_ahead(source(), 0)) == ["flow-run-7", threading.current_thread().name]


def test_augmented_samples_read_ahead_are_those_read_in_line(tmp_path: Path) -> None:
    """The augmentation's random stream is drawn in the reading thread in sample order, so a
    training epoch sees the same samples whichever thread makes them."""
    storage = PipelineConfig(storage={"uri": str(tmp_path)}).storage
    store = open_storage(storage)
    rng = np.random.default_rng(3)
    for s in range(3):
        write_shard(
            store, f"s{s}.npz", audio=rng.standard_normal((6, 1, 8, 16)).astype(np.float32),
            image=rng.integers(0, 255, (6, 3, 40, 40), dtype=np.uint8),
            label=np.array([0, 1] * 3, dtype=np.int8), pair_id=[f"{s}-{i}" for i in range(6)],
            family=["real", "f"] * 3, crop=32,
            file_label=np.array([[0, 0], [0, 1], [0, 0], [1, 0], [0, 0], [1, 1]], dtype=np.int8),
        )  # fmt: skip
    data = DeepfakeDataset(
        storage, [f"s{s}.npz" for s in range(3)], shuffle=True, seed=9, augment=True,
        pseudo_fake_rate=0.5, audio_pseudo_fake_rate=0.5,
    )  # fmt: skip
    data.set_epoch(2)
    in_line = list(data)
    ahead = list(read_ahead(data, 4))
    assert [it["pair_id"] for it in ahead] == [it["pair_id"] for it in in_line]
    for a, b in zip(ahead, in_line, strict=True):
        for key in ("audio", "image", "label", "file_label"):
            assert np.array_equal(a[key].numpy(), b[key].numpy())


def test_the_depth_is_two_configured_batches() -> None:
    assert read_ahead_depth(TrainingConfig(batch_size=16)) == 32
    assert read_ahead_depth(TrainingConfig(batch_size=3)) == 6
