"""The simulated hosts' state: VMs with plausible numbers, one change log per host, stream listeners.

No I/O here: the HTTP side (``agent_api``) reads it, the loops in ``main`` drive it. Changes land
only on hosts some server enrolled (the change rate is what a cluster sees, however many simulated
hosts wait to be added).
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from dataclasses import dataclass, field

from vmshift.model.enums import Accelerator, PowerState
from vmshift.model.host import CpuModelInfo, DatastoreInfo, HostFacts
from vmshift.model.host_stream import (
    Change,
    ChangeLog,
    Snapshot,
    StatsReport,
    VmChanged,
    VmRemoved,
    VmStats,
    encode,
)
from vmshift.model.vm import VmRuntime

SIM_NAMESPACE = uuid.UUID("7b0c4f7e-5a52-4d0e-9c1f-51d0c0a5e001")  # uuid5 namespace of simulated VMs
SHARED_DATASTORE_UUID = "5100aaaa-0000-4000-8000-000000000001"  # one datastore every simulated host sees
SHARED_DATASTORE = "sim-shared"
SIM_IMAGE = "lab-guest"
SIM_NETWORK = "VM Network"
SIM_CPU_MODEL = "qemu64"
SIM_MACHINE_TYPE = "pc-q35-10.0"
SIM_VM_MEMORY_MIB = (512, 1024, 2048, 4096)
LISTENER_BACKLOG = 10_000  # lines a stream may fall behind before it is cut (the server then resumes)


def host_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:03d}"


def vm_name(host: str, index: int) -> str:
    return f"{host}-vm{index:03d}"


def vm_uuid(name: str) -> str:
    """Stable across runs, so a benchmark can seed the inventory with the VMs a host will report."""
    return str(uuid.uuid5(SIM_NAMESPACE, name))


def vm_memory_mib(name: str) -> int:
    return SIM_VM_MEMORY_MIB[uuid.UUID(vm_uuid(name)).int % len(SIM_VM_MEMORY_MIB)]


@dataclass
class SimVm:
    """One fake VM: CPU time grows while it runs, its resident memory is a steady share of its RAM."""

    name: str
    memory_mib: int
    cpu_rate: float  # cores it burns while running
    rss_share: float
    power_state: PowerState = PowerState.POWERED_ON
    cpu_base: float = 0.0
    since: float = field(default_factory=time.monotonic)

    @property
    def uuid(self) -> str:
        return vm_uuid(self.name)

    def cpu_seconds(self, now: float) -> float:
        running = self.power_state is PowerState.POWERED_ON
        return self.cpu_base + ((now - self.since) * self.cpu_rate if running else 0.0)

    def rss_mib(self) -> float:
        return round(self.memory_mib * self.rss_share, 1)

    def set_state(self, state: PowerState, now: float) -> None:
        self.cpu_base = self.cpu_seconds(now)
        self.since = now
        self.power_state = state

    def runtime(self, now: float) -> VmRuntime:
        if self.power_state is PowerState.POWERED_OFF:
            return VmRuntime(name=self.name, uuid=self.uuid, power_state=self.power_state,
                             cpu_seconds=round(self.cpu_base, 2))
        return VmRuntime(name=self.name, uuid=self.uuid, power_state=self.power_state,
                         pid=10_000 + (uuid.UUID(self.uuid).int % 50_000),
                         cpu_seconds=round(self.cpu_seconds(now), 2), rss_mib=self.rss_mib(),
                         qemu_status="running" if self.power_state is PowerState.POWERED_ON else "paused")

    def stats(self, now: float) -> VmStats:
        running = self.power_state is PowerState.POWERED_ON
        return VmStats(name=self.name, cpu_seconds=round(self.cpu_seconds(now), 2), rss_mib=self.rss_mib(),
                       cpu_cores=self.cpu_rate if running else 0.0)


@dataclass(eq=False)
class Listener:
    """One open stream's queue of (seq, line); None ends the stream (it fell too far behind)."""

    queue: asyncio.Queue[tuple[int, bytes] | None] = field(
        default_factory=lambda: asyncio.Queue(LISTENER_BACKLOG + 1))
    cut: bool = False


class SimHost:
    """A simulated host: its facts, VMs and change log, and whether it answers at all (``loud``)."""

    def __init__(self, name: str, vms: int, rng: random.Random, memory_total_mib: int = 1_048_576) -> None:
        self.name = name
        self.port = 0
        self.enrolled = False
        self.log = ChangeLog(epoch=uuid.uuid4().hex)
        self.vms: dict[str, SimVm] = {}
        self.listeners: set[Listener] = set()
        self.loud = asyncio.Event()
        self.loud.set()
        self.memory_total_mib = memory_total_mib
        self._rng = rng
        now = time.monotonic()
        for i in range(vms):
            self._add_vm(i, now)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _add_vm(self, index: int, now: float) -> SimVm:
        name = vm_name(self.name, index)
        vm = SimVm(name, vm_memory_mib(name), cpu_rate=self._rng.uniform(0.01, 0.5),
                   rss_share=self._rng.uniform(0.3, 0.9), cpu_base=self._rng.uniform(0, 3600), since=now)
        self.vms[name] = vm
        return vm

    def facts(self) -> HostFacts:
        used = sum(vm.memory_mib for vm in self.vms.values() if vm.power_state is not PowerState.POWERED_OFF)
        return HostFacts(
            name=self.name, cpu_vendor="GenuineIntel", cpu_model="simulated", cpus=64, qemu_version="10.0.2",
            machine_types=[SIM_MACHINE_TYPE, "pc-i440fx-10.0"], default_machine_type=SIM_MACHINE_TYPE,
            cpu_models=[CpuModelInfo(name=SIM_CPU_MODEL)], accelerator=Accelerator.KVM,
            memory_total_mib=self.memory_total_mib, memory_free_mib=max(0, self.memory_total_mib - used),
            datastores=[DatastoreInfo(uuid=SHARED_DATASTORE_UUID, name=SHARED_DATASTORE,
                                      path="/srv/sim-shared", capacity_mib=50_000_000, free_mib=40_000_000,
                                      images=[SIM_IMAGE])],
            networks={SIM_NETWORK: "br0"}, management_address="127.0.0.1", migration_address="127.0.0.1",
            agent_version="hostsim", migration_tls=self.enrolled)

    def runtimes(self, now: float) -> list[VmRuntime]:
        return [vm.runtime(now) for vm in self.vms.values()]

    def snapshot(self, now: float) -> Snapshot:
        return Snapshot(epoch=self.log.epoch, seq=self.log.last_seq, facts=self.facts(),
                        vms=self.runtimes(now))

    # ----- changes ------------------------------------------------------------------------------
    def listen(self) -> Listener:
        listener = Listener()
        self.listeners.add(listener)
        return listener

    def unlisten(self, listener: Listener) -> None:
        self.listeners.discard(listener)

    def _publish(self, change: Change) -> None:
        self.log.append(change)
        line = encode(change)
        for listener in list(self.listeners):
            if listener.cut:
                continue
            if listener.queue.qsize() >= LISTENER_BACKLOG:
                listener.cut = True
                listener.queue.put_nowait(None)
            else:
                listener.queue.put_nowait((change.seq, line))

    def toggle_random_vm(self, now: float) -> str | None:
        """Pause a running VM or resume a paused one (a state change the server must notice)."""
        vm = self.vms[self._rng.choice(list(self.vms))] if self.vms else None
        if vm is None or vm.power_state is PowerState.POWERED_OFF:
            return None
        paused = vm.power_state is PowerState.PAUSED
        vm.set_state(PowerState.POWERED_ON if paused else PowerState.PAUSED, now)
        self._publish(VmChanged(epoch=self.log.epoch, seq=self.log.next_seq(), vm=vm.runtime(now)))
        return vm.name

    def set_vm_count(self, count: int, now: float) -> None:
        """Grow to (new VMs appear, powered on) or shrink to ``count`` VMs (the last ones go)."""
        for i in range(len(self.vms), count):
            vm = self._add_vm(i, now)
            self._publish(VmChanged(epoch=self.log.epoch, seq=self.log.next_seq(), vm=vm.runtime(now)))
        for i in range(len(self.vms) - 1, count - 1, -1):
            name = vm_name(self.name, i)
            del self.vms[name]
            self._publish(VmRemoved(epoch=self.log.epoch, seq=self.log.next_seq(), name=name))

    def power_off_from(self, index: int, now: float) -> None:
        """Power off VMs ``index`` and up (they stay registered, reported powered off)."""
        for i in range(index, len(self.vms)):
            vm = self.vms[vm_name(self.name, i)]
            if vm.power_state is not PowerState.POWERED_OFF:
                vm.set_state(PowerState.POWERED_OFF, now)
                self._publish(VmChanged(epoch=self.log.epoch, seq=self.log.next_seq(), vm=vm.runtime(now)))

    def report_stats(self, now: float) -> None:
        facts = self.facts()
        self._publish(StatsReport(epoch=self.log.epoch, seq=self.log.next_seq(),
                                  vms=[vm.stats(now) for vm in self.vms.values()],
                                  memory_free_mib=facts.memory_free_mib,
                                  datastore_free_mib={d.uuid: d.free_mib for d in facts.datastores},
                                  cpus=facts.cpus, memory_total_mib=facts.memory_total_mib,
                                  time=time.time()))


@dataclass
class Fleet:
    """All simulated hosts of the process and the knobs the control port turns."""

    hosts: list[SimHost]
    changes_per_s: float
    stats_interval_s: float
    rng: random.Random
    changes: int = 0

    def by_name(self, name: str) -> SimHost | None:
        return next((h for h in self.hosts if h.name == name), None)

    def enrolled(self) -> list[SimHost]:
        return [h for h in self.hosts if h.enrolled]

    def change_some(self, count: int, now: float) -> int:
        """``count`` state changes spread at random over the enrolled hosts; how many were made."""
        hosts = self.enrolled()
        made = 0
        for _ in range(count if hosts else 0):
            if self.rng.choice(hosts).toggle_random_vm(now) is not None:
                made += 1
        self.changes += made
        return made
