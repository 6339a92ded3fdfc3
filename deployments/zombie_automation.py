"""The automation that marks zombie flow runs Crashed (Prefect's "detect zombie flows" recipe).

    PREFECT_API_URL=http://prefect.internal.example:4200/api \\
        python -m deployments.zombie_automation [--within 300]

A flow run whose machine died (a worker SIGKILLed with its flow runs, an instance gone) stays
Running: nothing is left to report its end. Every flow-run process sends a heartbeat event every
PREFECT_FLOWS_HEARTBEAT_FREQUENCY seconds (Prefect 3.9: 180 by default, 30 at least; set in
worker.env, inherited by the flow runs the worker starts). This automation, on the server, marks
a flow run Crashed when no heartbeat and no final state followed its last heartbeat within
`--within` seconds. Idempotent: run it again after changing `--within`, it updates the one
automation of that name instead of adding another. `make stack-up` runs it for the local stack
(scripts/stack.py).

`--within` must exceed the heartbeat interval of EVERY flow run on that server with some slack
(a run beating every 180 s, the default, would be crashed by a 90 s window): three intervals of
the workers' setting, and more than 180 s while any process may run with the default.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from datetime import timedelta
from typing import Any
from uuid import UUID

from prefect.client.schemas.objects import StateType
from prefect.events.actions import ChangeFlowRunState
from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
from prefect.events.schemas.events import ResourceSpecification

log = logging.getLogger(__name__)

NAME = "crash-zombie-flow-runs"
DEFAULT_WITHIN_S = 300  # worker.env beats every 60 s; also > Prefect's default 180 s
MESSAGE = "No heartbeat for {within} s: the flow run's process is gone (marked by {name})."
# Events after which no heartbeat is expected: the run ended.
FINAL_EVENTS = {f"prefect.flow-run.{s}" for s in ("Completed", "Failed", "Cancelled", "Crashed")}


def automation(within_s: float) -> AutomationCore:
    """For each flow run: after a heartbeat, expect another heartbeat or a final state within
    `within_s`; if neither comes, set the run Crashed."""
    return AutomationCore(
        name=NAME,
        description=(
            "Marks a flow run Crashed when its heartbeats stop (worker or machine died); "
            "created by deployments/zombie_automation.py"
        ),
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", *FINAL_EVENTS},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=within_s),
        ),
        actions=[
            ChangeFlowRunState(
                name=None,  # the state type's own name: Crashed
                state=StateType.CRASHED,
                message=MESSAGE.format(within=f"{within_s:.0f}", name=NAME),
                force=False,  # a run that ended meanwhile stays as it ended
            )
        ],
    )


def ensure(client: Any, within_s: float = DEFAULT_WITHIN_S) -> tuple[UUID, str]:
    """Create the automation, or bring the one named NAME up to date and delete any other of
    that name. `client`: a synchronous Prefect client. Returns its id and what was done."""
    wanted = automation(within_s)
    fields = {"description", "enabled", "trigger", "actions"}
    # Python mode keeps the trigger's sets (expect, after, for_each) as sets: in JSON they become
    # lists in hash order, which differs between this process and the server's.
    same = wanted.model_dump(mode="python", include=fields)
    existing = client.read_automations_by_name(NAME)  # the most recently updated first
    if not existing:
        return client.create_automation(wanted), "created"
    matching = [a for a in existing if a.model_dump(mode="python", include=fields) == same]
    keep = (matching or existing)[0]
    for other in existing:
        if other.id != keep.id:
            client.delete_automation(other.id)
    if matching:
        return keep.id, "unchanged"
    client.update_automation(keep.id, wanted)
    return keep.id, "updated"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--within",
        type=float,
        default=DEFAULT_WITHIN_S,
        help="seconds without a heartbeat before a run is marked Crashed (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    if args.within < 60:
        parser.error(f"--within {args.within:g}: heartbeats come every 30 s at best; use >= 60")
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        automation_id, done = ensure(client, args.within)
    print(f"automation {NAME!r} ({automation_id}): {done}, window {args.within:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
