"""Bodies of the VM tasks (vm.create, vm.power, vm.suspend, vm.delete): agent calls plus inventory updates."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from vmshift.client.agent import AgentPool
from vmshift.errors import ApiError, ConflictError, NotFoundError, VmshiftError
from vmshift.model.api import EventKind
from vmshift.model.enums import ConnectionState, EventSeverity, PowerAction, PowerState
from vmshift.model.suspend import SuspendPhase, SuspendProgress, state_timeout_s
from vmshift.model.vm import VmRuntime, VmSpec
from vmshift.server.db.schema import HostRow, VmRow
from vmshift.server.events import record_event
from vmshift.server.tasks import TaskBody, TaskContext


def _load(sessions: sessionmaker[Session], name: str) -> tuple[VmSpec, str, str]:
    with sessions() as s:
        vm = s.scalar(select(VmRow).where(VmRow.name == name))
        if vm is None:
            raise NotFoundError(f"VM {name!r} no longer exists.", hint="It was deleted meanwhile.")
        return VmSpec.model_validate(vm.spec), vm.host.address, vm.host.name


def _store_runtime(sessions: sessionmaker[Session], name: str, rt: VmRuntime) -> None:
    with sessions.begin() as s:
        vm = s.scalar(select(VmRow).where(VmRow.name == name))
        if vm is None:
            return
        if vm.power_state is not rt.power_state:
            record_event(
                s,
                EventKind.VM_POWER_CHANGED,
                name,
                f"VM {name} is now {rt.power_state.value} (was {vm.power_state.value}).",
            )
        vm.power_state = rt.power_state
        vm.stats = {"cpu_seconds": rt.cpu_seconds, "rss_mib": rt.rss_mib}


def _forget(sessions: sessionmaker[Session], name: str, why: str, severity: EventSeverity) -> None:
    """Remove a VM from the inventory; its MAC and IP allocations go with it (cascade)."""
    with sessions.begin() as s:
        vm = s.scalar(select(VmRow).where(VmRow.name == name))
        if vm is not None:
            s.delete(vm)
            record_event(s, EventKind.VM_DELETED, name, why, severity)


def create_body(sessions: sessionmaker[Session], agents: AgentPool, name: str, start: bool) -> TaskBody:
    async def body(ctx: TaskContext) -> dict[str, Any]:
        spec, address, host = _load(sessions, name)
        ctx.progress("define on host", 10)
        try:
            rt = await agents.get(address).define_vm(spec)
        except asyncio.CancelledError:
            if not ctx.server_stopping:
                _forget(
                    sessions, name, f"VM {name} removed: its creation was cancelled.", EventSeverity.WARNING
                )
            raise
        except Exception as e:
            _forget(
                sessions, name, f"VM {name} removed: the host could not define it ({e}).", EventSeverity.ERROR
            )
            raise
        _store_runtime(sessions, name, rt)
        if start:
            ctx.progress("power on", 60)
            rt = await agents.get(address).power(name, PowerAction.START)
            _store_runtime(sessions, name, rt)
        return {"vm": name, "host": host, "power_state": rt.power_state.value}

    return body


def _power_state(sessions: sessionmaker[Session], name: str) -> PowerState | None:
    with sessions() as s:
        return s.scalar(select(VmRow.power_state).where(VmRow.name == name))


def _is_missing(sessions: sessionmaker[Session], name: str) -> bool:
    return _power_state(sessions, name) is PowerState.MISSING


def _power_timeout_s(sessions: sessionmaker[Session], name: str, spec: VmSpec, action: PowerAction) -> int:
    """30 s, or as long as loading a suspended VM's state may take (its resume is this power action)."""
    resumes = action in (PowerAction.START, PowerAction.RESUME)
    if resumes and _power_state(sessions, name) is PowerState.SUSPENDED:
        return min(3600, max(30, int(state_timeout_s(spec.memory_mib << 20))))
    return 30


def power_body(
    sessions: sessionmaker[Session], agents: AgentPool, name: str, action: PowerAction
) -> TaskBody:
    async def body(ctx: TaskContext) -> dict[str, Any]:
        spec, address, _host = _load(sessions, name)
        if action is PowerAction.START and _is_missing(sessions, name):
            # its host forgot the VM (reconcile marked it missing): register its folder there again
            ctx.progress("define on host", 10)
            await agents.get(address).define_vm(spec)
        ctx.progress(f"power {action.value}", 20)
        rt = await agents.get(address).power(name, action, _power_timeout_s(sessions, name, spec, action))
        _store_runtime(sessions, name, rt)
        return {"vm": name, "power_state": rt.power_state.value}

    return body


# a suspend's progress while the agent saves: phases before the save's own percent, and after it
_SAVE_PERCENT = {SuspendPhase.STOPPING: 5, SuspendPhase.SYNCING: 95, SuspendPhase.QUITTING: 97}
_SAVE_RUNNING = frozenset({SuspendPhase.STOPPING, SuspendPhase.SAVING, SuspendPhase.SYNCING,
                           SuspendPhase.QUITTING})  # fmt: skip


def _save_percent(p: SuspendProgress) -> int:
    return _SAVE_PERCENT.get(p.phase, 5 + p.percent * 90 // 100)


def suspend_body(
    sessions: sessionmaker[Session], agents: AgentPool, name: str, poll_s: float = 0.5
) -> TaskBody:
    """vm.suspend: the agent saves the VM's state to its folder and stops QEMU (docs/suspend.md);
    the task shows the save's progress. A failed save leaves the VM running, which the task stores."""

    async def body(ctx: TaskContext) -> dict[str, Any]:
        spec, address, host = _load(sessions, name)
        agent = agents.get(address)
        ctx.progress("save state", 2)
        call = asyncio.create_task(agent.suspend(name, state_timeout_s(spec.memory_mib << 20) + 30))
        started = False  # the progress the agent keeps may be an earlier suspend's until this one starts
        try:
            while not call.done():
                await asyncio.wait({call}, timeout=poll_s)
                with contextlib.suppress(VmshiftError):
                    p = await agent.suspend_progress(name)
                    started = started or p.phase in _SAVE_RUNNING
                    if started and not call.done():
                        mib = f"{p.written_bytes >> 20}/{p.ram_bytes >> 20} MiB"
                        ctx.progress(f"{p.phase.value} {mib}", _save_percent(p))
            result = call.result()
        except VmshiftError:
            with contextlib.suppress(VmshiftError):  # the VM runs on: show what the host says
                _store_runtime(sessions, name, await agent.get_vm(name))
            raise
        finally:
            call.cancel()
        _store_runtime(sessions, name, result.runtime)
        return {"vm": name, "host": host, "power_state": result.runtime.power_state.value,
                **result.model_dump(mode="json", exclude={"runtime"})}

    return body


async def refuse_delete_while_a_qemu_runs(
    sessions: sessionmaker[Session], agents: AgentPool, name: str, timeout_s: float = 10.0
) -> None:
    """ConflictError unless every connected host proves it runs no QEMU of the VM (by uuid, receiving
    copies included): the VM's files are shared, and a QEMU anywhere may hold them open."""
    with sessions() as s:
        uuid = s.scalar(select(VmRow.uuid).where(VmRow.name == name))
        hosts = [
            (h.name, h.address)
            for h in s.scalars(select(HostRow).where(HostRow.connection_state == ConnectionState.CONNECTED))
        ]
    if uuid is None:
        raise NotFoundError(f"VM {name!r} no longer exists.", hint="It was deleted meanwhile.")

    async def ask(address: str) -> list[VmRuntime] | VmshiftError:
        try:
            return await agents.get(address).list_vms(timeout_s=timeout_s)
        except VmshiftError as e:
            return e

    answers = await asyncio.gather(*(ask(address) for _, address in hosts))
    for (host, _), answer in zip(hosts, answers, strict=True):
        if isinstance(answer, VmshiftError):
            raise ConflictError(
                f"VM {name} cannot be deleted now: host {host} did not answer, so nothing proves that "
                "it runs no QEMU of the VM.",
                hint="Try again once the host answers (or remove the host if it is gone for good).",
            )
        for rt in answer:
            if rt.uuid == uuid and rt.has_qemu:
                what = "a receiving QEMU" if not rt.is_the_vm else "a QEMU"
                raise ConflictError(
                    f"VM {name} cannot be deleted: host {host} runs {what} of it "
                    f"({rt.qemu_status or rt.power_state.value}) that may hold its files open.",
                    hint="Stop that QEMU first, then delete again (docs/server.md, 'Reconcile').",
                )


def delete_body(sessions: sessionmaker[Session], agents: AgentPool, name: str) -> TaskBody:
    async def body(ctx: TaskContext) -> dict[str, Any]:
        _spec, address, host = _load(sessions, name)
        ctx.progress("check hosts", 10)
        await refuse_delete_while_a_qemu_runs(sessions, agents, name)
        ctx.progress("delete on host", 20)
        try:
            await agents.get(address).delete_vm(name)
        except ApiError as e:
            if not e.not_found:  # already gone from the host is fine
                raise
        _forget(sessions, name, f"VM {name} deleted from host {host}.", EventSeverity.INFO)
        return {"vm": name}

    return body
