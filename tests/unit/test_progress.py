"""Progress bars: drawn only on a terminal, quiet anywhere else; log lines go above the bar."""

from __future__ import annotations

import io
import logging
import re
import sys
from pathlib import Path

import pytest
from rich.console import Console

from tasks import progress


class FakeTerminal(io.StringIO):
    """Standard error as a terminal would present it (isatty true), keeping what is written."""

    def isatty(self) -> bool:
        return True


def test_no_bar_without_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    err = io.StringIO()  # CI, a worker's log, a pipe: not a terminal
    monkeypatch.setattr(sys, "stderr", err)
    assert not progress.enabled()
    seen = []
    for item in progress.track(range(5), total=5, description="training mid"):
        assert progress._display is None
        seen.append(item)
    assert seen == [0, 1, 2, 3, 4]
    assert err.getvalue() == ""


def test_bar_on_a_terminal_counts_the_items_and_goes_away(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    term = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", term)
    assert progress.enabled()
    seen = []
    for item in progress.track(iter("abc"), total=3, description="preprocessing"):
        assert progress._display is not None and progress._bars == 1
        (bar,) = progress._display.tasks
        assert (bar.completed, bar.total) == (len(seen), 3)  # the items consumed so far
        seen.append(item)
    assert seen == ["a", "b", "c"]
    assert progress._display is None and sys.stderr is term  # the display stopped, stderr back
    assert "preprocessing" in term.getvalue() and "0/3" in term.getvalue()


def test_bars_at_once_share_one_display(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stderr", FakeTerminal())
    outer = progress.track(range(2), total=2, description="early")
    next(outer)
    display = progress._display
    assert list(progress.track(range(3), total=3, description="late")) == [0, 1, 2]
    assert progress._display is display and progress._bars == 1  # still showing "early"
    assert list(outer) == [1]
    assert progress._display is None


def test_log_lines_print_above_the_bar_then_the_handler_is_restored(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    term = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", term)
    handler = logging.StreamHandler(term)
    logger = logging.getLogger("tests.progress")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        for _ in progress.track(range(2), total=2, description="evaluating"):
            assert handler.stream is not term  # routed through the display's console
            logger.info("epoch 1 step 10: bce 0.6931")
    finally:
        logger.removeHandler(handler)
    assert handler.stream is term
    assert term.getvalue().count("epoch 1 step 10: bce 0.6931") == 2


class RichConsoleHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Like Prefect's console handler: prints each record through a rich Console of its own."""

    def __init__(self, stream: io.StringIO) -> None:
        super().__init__(stream)
        self.console = Console(file=stream)

    def emit(self, record: logging.LogRecord) -> None:
        self.console.print(self.format(record), soft_wrap=True)


def test_a_handler_printing_through_its_own_rich_console_prints_above_the_bar(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    term = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", term)
    handler = RichConsoleHandler(term)
    logger = logging.getLogger("tests.progress.rich")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        for _ in progress.track(range(1), total=1, description="late epoch 1/2"):
            before = term.getvalue()
            logger.info("late epoch 1 step 2: bce 0.6931")
            written = term.getvalue()[len(before) :]
    finally:
        logger.removeHandler(handler)
    assert handler.console.file is term
    # the display clears its line, prints the record (its colours kept) on a line of its own,
    # then draws the bar again below it
    assert written.startswith("\r\x1b[2K")
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", written)
    record, bar = plain.removeprefix("\r").split("\n")
    assert record == "late epoch 1 step 2: bce 0.6931" and bar.startswith("late epoch 1/2 ")


def test_fit_reports_each_epoch_done_from_the_resume_on(tmp_path: Path) -> None:
    from tasks.io.layout import Layout
    from tasks.io.storage import open_storage
    from tasks.train.fit import fit
    from tests.unit.test_training import make_cfg, write_features

    cfg = make_cfg(str(tmp_path / "bucket"), training={"epochs": 1})
    store = open_storage(cfg.storage)
    store.check()
    features = write_features(store, n_train=16, n_val=8)
    heard: list[tuple[int, int]] = []
    fit(store, Layout(), cfg, features, "early", "r1", on_epoch=lambda *a: heard.append(a))
    assert heard == [(0, 1), (1, 1)]

    heard.clear()  # the same run with two more epochs resumes after epoch 1
    longer = make_cfg(str(tmp_path / "bucket"), training={"epochs": 3})
    fit(store, Layout(), longer, features, "early", "r1", on_epoch=lambda *a: heard.append(a))
    assert heard == [(1, 3), (2, 3), (3, 3)]
