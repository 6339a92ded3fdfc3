"""The run's skipped-file list: every file or pairs.csv row left out, with the stage and reason.

One writer, one shape, at `Layout.skipped(run)`:

    {"run": "<run>", "n_skipped": N, "skipped": [{"key": ..., "reason": ..., "stage": ...}, ...]}

stage is "listing", "pairs.csv", "pairing" (the manifest) or "decode" (the feature build).
"""

from __future__ import annotations

from collections.abc import Sequence

from tasks.io.layout import Layout
from tasks.io.records import write_json
from tasks.io.storage import Storage


def write_skipped(
    store: Storage, layout: Layout, run: str, skipped: Sequence[dict[str, str]]
) -> str:
    """Write the run's skipped-file list; returns its key."""
    key = layout.skipped(run)
    write_json(store, key, {"run": run, "n_skipped": len(skipped), "skipped": list(skipped)})
    return key
