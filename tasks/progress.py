"""Progress bars on the terminal, one helper for every long loop of the pipeline.

    for item in track(items, total=len(rows), description="preprocessing"):
        ...

A bar is drawn (rich, on standard error) only when standard error is a terminal: in CI, in a
worker's logs, under pytest or piped to a file `track` hands the items through untouched and
writes nothing. All bars of the process share one display (rich allows one live display at a
time, and fusions trained at once run in threads); while it shows, the log lines of the terminal's
logging handlers (Prefect's console handler included) are printed above it instead of through it.
The display goes when its last bar ends.
"""

from __future__ import annotations

import io
import logging
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import IO, TypeVar, cast

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

__all__ = ["enabled", "track"]

T = TypeVar("T")

_lock = threading.Lock()
_display: Progress | None = None
_bars = 0  # bars now on the display
_undo: list[Callable[[], None]] = []  # restores the log handlers routed above the display


def enabled() -> bool:
    """Are bars drawn? Only when standard error is a terminal."""
    isatty = getattr(sys.stderr, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # closed stream
        return False


def track(items: Iterable[T], total: int | None = None, description: str = "") -> Iterator[T]:
    """`items`, one by one; on a terminal, a bar of `description` advances once per item
    handed out and consumed (`total` items: the bar's end and the time left)."""
    if not enabled():
        yield from items
        return
    display, bar = _add_bar(description, total)
    try:
        for item in items:
            yield item
            display.advance(bar)
    finally:
        _remove_bar(bar)


def _add_bar(description: str, total: int | None) -> tuple[Progress, TaskID]:
    global _display, _bars
    with _lock:
        if _display is None:
            console = Console(file=sys.stderr)
            _display = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=console,
                redirect_stdout=True,
                redirect_stderr=True,
            )
            _undo.extend(_route_log_handlers(console))  # before start() swaps sys.stderr
            _display.start()
        _bars += 1
        return _display, _display.add_task(description, total=total)


def _remove_bar(bar: TaskID) -> None:
    global _display, _bars
    with _lock:
        if _display is None:
            return
        _display.remove_task(bar)
        _bars -= 1
        if _bars == 0:
            while _undo:
                _undo.pop()()
            _display.stop()
            _display = None


def _route_log_handlers(console: Console) -> list[Callable[[], None]]:
    """Send the terminal's stream handlers through `console`, so that log lines print above the
    display; returns the calls that undo it."""
    terminal = {id(s) for s in (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__) if s}
    loggers = [logging.getLogger()] + [
        lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]
    handlers = {id(h): h for lg in loggers for h in lg.handlers}
    streams = [h for h in handlers.values() if isinstance(h, logging.StreamHandler)]
    return [_route(h, console) for h in streams if id(h.stream) in terminal]


def _route(handler: logging.StreamHandler, console: Console) -> Callable[[], None]:
    """Point `handler` (and the rich console of Prefect's handler) at a proxy that prints
    through `console`; returns the call that points it back."""
    original = handler.stream
    proxy = cast(IO[str], _PrintAbove(console, original))
    handler.stream = proxy
    inner = getattr(handler, "console", None)
    inner_file = inner.file if isinstance(inner, Console) else None
    if isinstance(inner, Console):
        inner.file = proxy

    def restore() -> None:
        handler.stream = original
        if isinstance(inner, Console) and inner_file is not None:
            inner.file = inner_file

    return restore


class _PrintAbove(io.TextIOBase):
    """A text stream whose complete lines `console` prints (above its live display). Not rich's
    FileProxy: a Console given a FileProxy as its file writes to the file behind it, and Prefect's
    handler prints through a Console of its own."""

    def __init__(self, console: Console, file: IO[str]) -> None:
        self._console, self._file, self._partial = console, file, ""

    def write(self, text: str) -> int:
        *lines, self._partial = (self._partial + text).split("\n")
        for line in lines:
            self._console.print(Text.from_ansi(line), soft_wrap=True)
        return len(text)

    def flush(self) -> None:
        if self._partial:
            self._console.print(Text.from_ansi(self._partial), soft_wrap=True)
            self._partial = ""

    def isatty(self) -> bool:
        return self._file.isatty()

    def fileno(self) -> int:
        return self._file.fileno()
