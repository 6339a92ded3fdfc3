"""Run ids that survive a crash, and the nightly bookkeeping around a run.

A flow run writes `outputs/runs/in-progress.json` when it starts a new run id and deletes it when
the run completes. If the worker dies mid-run, the next flow run with the same settings finds the
record and takes over that run id, so training resumes from the checkpoints already in the bucket
instead of starting again (DESIGN.md: nothing lost on failure).
"""

from __future__ import annotations

import html
import json
import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from tasks.errors import ObjectNotFound
from tasks.io.layout import Layout, new_run_id
from tasks.io.storage import Storage

log = logging.getLogger(__name__)


def in_progress_key(layout: Layout) -> str:
    return f"{layout.outputs}runs/in-progress.json"


def begin_run(
    store: Storage, layout: Layout, config_hash: str, explicit: str | None = None
) -> tuple[str, bool]:
    """The run id to use and whether it resumes an interrupted run.

    `explicit` (run.name, or --run) always wins. Otherwise an interrupted run with the same config
    fingerprint is resumed; else a new timestamped id is recorded as in progress.
    """
    if explicit:
        return explicit, False
    key = in_progress_key(layout)
    try:
        record = json.loads(store.read_bytes(key))
    except ObjectNotFound:
        record = None
    except ValueError:
        log.warning("%s: unreadable run record, starting a new run", store.uri(key))
        record = None
    if isinstance(record, dict) and record.get("config_hash") == config_hash and record.get("run"):
        log.info("resuming interrupted run %s (started %s)", record["run"], record.get("started"))
        return str(record["run"]), True
    run = new_run_id()
    doc = {"run": run, "config_hash": config_hash, "started": datetime.now(UTC).isoformat()}
    store.write_bytes(key, json.dumps(doc, indent=2).encode(), "application/json")
    return run, False


def end_run(store: Storage, layout: Layout, run: str) -> None:
    """Forget the in-progress record of `run` (a newer run's record is left alone)."""
    key = in_progress_key(layout)
    try:
        record = json.loads(store.read_bytes(key))
    except (ObjectNotFound, ValueError):
        return
    if isinstance(record, dict) and record.get("run") == run:
        store.delete(key)


def add_report_section(
    store: Storage, layout: Layout, run: str, title: str, lines: Sequence[str]
) -> None:
    """Append a section (title + one paragraph per line) to the run's report.html."""
    key = layout.report(run)
    page = store.read_bytes(key).decode("utf-8")
    items = "\n".join(f"<li>{html.escape(line)}</li>" for line in lines)
    section = f'<section id="{html.escape(title.lower().replace(" ", "-"))}">'
    section += f"<h2>{html.escape(title)}</h2>\n<ul>\n{items}\n</ul></section>\n"
    if "</body>" in page:
        page = page.replace("</body>", section + "</body>", 1)
    else:
        page += section
    store.write_bytes(key, page.encode("utf-8"), "text/html; charset=utf-8")


def json_bytes(doc: Any) -> bytes:
    return json.dumps(doc, indent=2, sort_keys=True).encode()
