"""Soak helpers: end a migration like an operator would (finalize, power start, resume when the
system says so) and check the invariants afterwards (one QEMU on the host the inventory names,
running, memtest clean, every durable disklog record present, no stray incoming QEMU).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from soak_faults import ENDED, Lab, retry, wait_until

from vmshift.errors import VmshiftError
from vmshift.lab import lab as labmod
from vmshift.model.enums import PowerAction, TaskState

Json = dict[str, Any]
MEMTEST_PASSES_AFTER = 2
SETTLE_S = 30.0  # how long the inventory and the hosts may take to agree after the end


@dataclass
class Violation:
    kind: str
    message: str
    detail: Json = field(default_factory=dict)


@dataclass
class GuestState:
    uptime_s: float
    passes: int
    mismatches: int
    durable_seq: int
    first_seq: int
    corrupt_at_boot: int
    disk_errors: int
    at: float

    @classmethod
    def read(cls, answer: Json) -> GuestState:
        mt, dl = answer.get("memtest") or {}, answer.get("disklog") or {}
        return cls(float(answer.get("uptime_s") or 0.0), int(mt.get("passes") or 0),
                   int(mt.get("mismatches") or 0),
                   int(dl.get("durable_seq") or 0), int(dl.get("first_seq") or 0),
                   int(dl.get("corrupt_at_boot") or 0), int(dl.get("errors") or 0), time.monotonic())


def guest(lab: Lab, vm: str, wait_s: float = 60.0) -> tuple[GuestState | None, Json]:
    try:
        answer = labmod.check(lab.name, vm, wait_s=wait_s)
    except VmshiftError as e:
        return None, {"error": str(e)}
    if not answer.get("echo") or "error" in answer:
        return None, answer
    return GuestState.read(answer), answer


def wait_end(lab: Lab, mid: int, timeout: float) -> Json | None:
    return wait_until(lambda: m if (m := lab.api.get_migration(mid))["status"] in ENDED else None,
                      timeout=timeout, interval=0.2)


def wait_task(lab: Lab, task_id: int, timeout: float = 180.0) -> Json:
    got = wait_until(lambda: t if TaskState((t := lab.api.get_task(task_id))["state"]).finished else None,
                     timeout=timeout, interval=0.2)
    return got or {"id": task_id, "state": "timeout"}


def critical_events(lab: Lab, vm: str, since: float) -> list[Json]:
    events = retry("events", lambda: lab.api.list_events(limit=100, target=vm))
    out = []
    for e in events:
        if e.get("severity") != "critical":
            continue
        out.append(e)
    return out[:10]


@dataclass
class Recovery:
    actions: list[str] = field(default_factory=list)
    rebooted: bool = False  # the VM was started again from its disks


def recover(lab: Lab, vm: str, uuid: str, m: Json, rec: Recovery, violations: list[Violation],
            killed_qemu: bool) -> Json:
    """What the status tells the operator to do; returns the migration record afterwards."""
    status = m["status"]
    if status == "needs_finalize":
        task = retry("finalize", lambda: lab.api.finalize_migration(m["id"]))
        done = wait_task(lab, int(task["id"]))
        rec.actions.append(f"migration finalize {m['id']}: {done['state']}")
        m = retry("migration", lambda: lab.api.get_migration(m["id"]))
        if done["state"] != "success":
            violations.append(Violation("finalize_failed", f"finalize of migration {m['id']} ended "
                                        f"{done['state']}", {"task": done}))
    info = retry("vm", lambda: lab.api.get_vm(vm))
    power = info.get("power_state")
    if power == "paused":
        crit = [e for e in critical_events(lab, vm, 0) if str(m["id"]) in e.get("message", "")]
        if not crit:
            violations.append(Violation("paused_without_critical_event",
                                        f"{vm} paused after migration {m['id']} ({m['status']}) with no "
                                        "critical event naming it", {"vm": info}))
        task = retry("resume", lambda: lab.api.resume_vm(vm))
        done = wait_task(lab, int(task["id"]))
        rec.actions.append(f"vm resume {vm}: {done['state']}")
    if killed_qemu and power == "poweredOn" and not lab.qemus(uuid):
        # the fault killed the only QEMU outside the migration's reach: the VM crashed, and the
        # inventory must say so within a few heartbeats
        got = wait_until(lambda: i if (i := lab.api.get_vm(vm)).get("power_state") != "poweredOn" else None,
                         timeout=15, interval=0.5)
        if got is None:
            violations.append(Violation("inventory_wrong", f"{vm} has no QEMU anywhere but the inventory "
                                        "still says poweredOn after 15 s", {"vm": info}))
        power = "poweredOff"
        rec.actions.append("VM crashed (its QEMU was killed)")
    if power in ("poweredOff", "missing") or status == "lost":
        # the operator starts it again from its disks (vmshift vm power start)
        try:
            task = retry("start", lambda: lab.api.power_vm(vm, PowerAction.START))
            done = wait_task(lab, int(task["id"]))
            rec.actions.append(f"vm start {vm}: {done['state']}")
            rec.rebooted = done["state"] == "success"
            if done["state"] != "success":
                violations.append(Violation("start_failed", f"starting {vm} again failed", {"task": done}))
        except VmshiftError as e:
            rec.actions.append(f"vm start {vm}: refused: {e}")
            violations.append(Violation("start_refused", f"starting {vm} again was refused: {e}",
                                        {"vm": info}))
    return m


@dataclass
class Placement:
    ok: bool
    host: str | None
    detail: Json


def placement(lab: Lab, vm: str, uuid: str) -> Placement:
    """Where the VM really runs: QEMU processes by namespace, each agent's /vms, the inventory."""
    qemus = lab.qemus(uuid)
    agents: Json = {}
    for k in lab.lay.host_numbers:
        h = f"host-{k}"
        listed = lab.agent_get(h, "/vms")
        agents[h] = (next((v for v in listed if v.get("uuid") == uuid), None) if isinstance(listed, list)
                     else "no answer")
    info = retry("vm", lambda: lab.api.get_vm(vm))
    detail = {"qemus": qemus, "agents": agents,
              "inventory": {"host": info.get("host"), "power_state": info.get("power_state")}}
    hosts = [h for _, h in qemus]
    host = hosts[0] if len(hosts) == 1 else None
    a = agents.get(host) if host else None
    ok = (host is not None and isinstance(a, dict) and a.get("qemu_status") == "running"
          and a.get("incoming_migration") is None and info.get("host") == host
          and info.get("power_state") == "poweredOn"
          and all(agents[h] is None for h in agents if h != host))
    return Placement(ok, host, detail)


def settle(lab: Lab, vm: str, uuid: str, timeout: float = SETTLE_S) -> Placement:
    deadline = time.monotonic() + timeout
    while True:
        try:
            p = placement(lab, vm, uuid)
        except VmshiftError as e:
            p = Placement(False, None, {"error": str(e)})
        if p.ok or time.monotonic() > deadline:
            return p
        time.sleep(0.5)


def judge_placement(p: Placement, violations: list[Violation]) -> tuple[int, int]:
    """(lost, duplicated) from a placement that did not settle."""
    if p.ok:
        return 0, 0
    qemus = p.detail.get("qemus") or []
    agents = p.detail.get("agents") or {}
    running = [h for h, a in agents.items() if isinstance(a, dict) and a.get("qemu_status") == "running"]
    if len(running) > 1:
        violations.append(Violation("duplicated_vm", f"the VM runs on {running}", p.detail))
        return 0, 1
    if not qemus:
        violations.append(Violation("lost_vm", "no QEMU of the VM runs anywhere", p.detail))
        return 1, 0
    if len(qemus) > 1:
        violations.append(Violation("stray_qemu", f"{len(qemus)} QEMU processes of the VM", p.detail))
    else:
        violations.append(Violation("wrong_state", "the VM's QEMU, agents and inventory disagree", p.detail))
    return 0, 0


@dataclass
class GuestVerdict:
    mismatches: int = 0
    lost_writes: int = 0
    after: Json = field(default_factory=dict)


def judge_guest(lab: Lab, vm: str, before: GuestState, rebooted: bool,
                violations: list[Violation], pass_s: float = 2.0) -> GuestVerdict:
    """pass_s: how long one memtest sweep takes (SIZE / RATE): the first look after the two passes
    comes when they should be done, so each guest check (a probe process in the client namespace)
    counts."""
    v = GuestVerdict()
    now, answer = guest(lab, vm)
    if now is None:
        violations.append(Violation("guest_unreachable", f"{vm} does not answer its checks", answer))
        return v
    booted_again = rebooted or now.uptime_s < before.uptime_s
    target = now.passes + MEMTEST_PASSES_AFTER
    deadline = time.monotonic() + 90
    first = True
    while now.passes < target and time.monotonic() < deadline:
        time.sleep(pass_s * MEMTEST_PASSES_AFTER * 0.9 if first else 0.5)
        first = False
        got, answer = guest(lab, vm, wait_s=10)
        now = got or now
    v.after = answer
    if now.passes < target:
        violations.append(Violation("memtest_stalled", f"memtest of {vm} did not make {MEMTEST_PASSES_AFTER} "
                                    "passes in 90 s", answer))
    v.mismatches = now.mismatches if booted_again else now.mismatches - before.mismatches
    if v.mismatches:
        violations.append(Violation("memtest_mismatch", f"{v.mismatches} memtest mismatches in {vm}", answer))
    if booted_again:
        found = now.first_seq - 1  # the boot scan continues after the highest valid record
        if found < before.durable_seq or now.corrupt_at_boot:
            v.lost_writes = max(0, before.durable_seq - found) + now.corrupt_at_boot
    elif now.durable_seq < before.durable_seq:
        v.lost_writes = before.durable_seq - now.durable_seq
    if v.lost_writes:
        violations.append(Violation("lost_writes", f"{v.lost_writes} durable disklog records of {vm} missing "
                                    f"(durable before {before.durable_seq})", answer))
    if now.disk_errors:
        violations.append(Violation("disk_errors", f"{now.disk_errors} disklog I/O errors in {vm}", answer))
    return v
