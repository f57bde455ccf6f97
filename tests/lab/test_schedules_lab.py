"""Issue 8, item 6 in the lab: a scheduled migration of a real guest fires once at its time.

One VM, one schedule a few seconds away; the test waits on the run (not a sleep), then verifies the
guest on its new host and that the schedule is done with exactly one run. The restart case is proven by
tests/server/test_schedules.py (a server restart on the same database).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.lab.helpers import LabHandle, guest_check, vmshift, vmshift_json, wait_for
from tests.lab.vmotion import verify_guest, wait_migration_end
from vmshift.client import VmshiftClient

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def sched_vm(lab: LabHandle) -> Iterator[dict[str, Any]]:
    vm = dict(vmshift_json(
        lab, "vm", "create", "sched-1", "--host", "host-1", "--cpus", "1", "--memory", "192",
        "--datastore", "shared-1", "--network", "VM Network", "--disk", "64M", "--image", "lab-guest",
        "--kernel-args", "vmshift.memtest=32,20 vmshift.disklog=1", "--start",
    ))  # fmt: skip
    guest_check(lab, "sched-1")
    yield vm
    vmshift(lab, "schedule", "delete", "sched-1-away", check=False)
    vmshift(lab, "vm", "stop", "sched-1", check=False)
    vmshift(lab, "vm", "delete", "sched-1", check=False)


def test_a_scheduled_migration_fires_once_and_the_guest_is_intact(
    lab: LabHandle, api: VmshiftClient, sched_vm: dict[str, Any]
) -> None:
    before = guest_check(lab, "sched-1")
    added = vmshift_json(lab, "schedule", "add", "--at", "+5s", "--name", "sched-1-away", "--json", "--",
                         "vm", "migrate", "sched-1", "--host", "host-2")  # fmt: skip
    assert added["next_due_at"] is not None and added["runs"] == []
    run = wait_for(
        "the scheduled run to start",
        lambda: (
            r
            if (r := (api.get_schedule("sched-1-away")["runs"] or [None])[0]) and r["outcome"] != "claimed"
            else None
        ),
        timeout=60,
    )
    assert run["outcome"] == "started", run
    m = wait_migration_end(api, run["migration_id"])
    assert m["status"] == "completed", m.get("error")
    verify_guest(lab, api, "sched-1", "host-2", before)
    shown = vmshift_json(lab, "schedule", "show", "sched-1-away", "--json")
    assert shown["next_due_at"] is None and len(shown["runs"]) == 1
    assert shown["runs"][0]["migration_status"] == "completed"
    events = [e["kind"] for e in api.list_events(200, "sched-1")]
    assert "schedule.run_started" in events and "schedule.run_skipped" not in events
