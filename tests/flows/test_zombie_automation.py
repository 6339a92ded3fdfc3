"""The zombie automation (deployments/zombie_automation.py) on the test-harness API: what it
watches, what it does, and that creating it again changes nothing. Its effect on a real dead
worker is tests/e2e/test_process_faults.py."""

from __future__ import annotations

import pytest
from prefect.client.orchestration import get_client

from deployments import zombie_automation as zombies


@pytest.fixture
def client(prefect_harness):
    with get_client(sync_client=True) as c:
        for a in c.read_automations_by_name(zombies.NAME):
            c.delete_automation(a.id)
        yield c


def test_marks_a_run_crashed_when_its_heartbeats_stop() -> None:
    a = zombies.automation(300)
    trigger = a.trigger
    assert trigger.posture.value == "Proactive" and trigger.threshold == 1
    assert trigger.after == {"prefect.flow-run.heartbeat"}
    assert trigger.expect == {
        "prefect.flow-run.heartbeat",
        "prefect.flow-run.Completed",
        "prefect.flow-run.Failed",
        "prefect.flow-run.Cancelled",
        "prefect.flow-run.Crashed",
    }
    assert trigger.for_each == {"prefect.resource.id"}  # one window per flow run
    assert trigger.within.total_seconds() == 300
    [action] = a.actions
    assert action.type == "change-flow-run-state" and action.state.value == "CRASHED"
    assert "No heartbeat for 300 s" in (action.message or "")


def test_ensure_is_idempotent(client) -> None:
    first, done = zombies.ensure(client, 120)
    assert done == "created"
    assert zombies.ensure(client, 120) == (first, "unchanged")
    assert zombies.ensure(client, 240) == (first, "updated")
    [stored] = client.read_automations_by_name(zombies.NAME)
    assert stored.id == first and stored.trigger.within.total_seconds() == 240
    client.create_automation(zombies.automation(60))  # another one of that name, by hand
    kept, done = zombies.ensure(client, 240)
    assert done == "unchanged"  # the matching one is kept, the other deleted
    assert [a.id for a in client.read_automations_by_name(zombies.NAME)] == [kept] == [first]


def test_cli_refuses_a_window_shorter_than_two_heartbeats() -> None:
    with pytest.raises(SystemExit):
        zombies.main(["--within", "45"])
