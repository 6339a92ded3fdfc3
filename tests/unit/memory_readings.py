"""A scripted memory reader for tests of the memory guard (injected, never a patch of psutil)."""

from __future__ import annotations

from collections.abc import Callable


def readings(*values: float) -> Callable[[], float]:
    """A memory reader that plays `values`, then repeats the last one."""
    it = iter(values)
    last = [values[-1]]

    def read() -> float:
        last[0] = next(it, last[0])
        return last[0]

    return read
