"""Assemble HostFacts: the start-up probe (cached) plus what can change (memory, datastores)."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from importlib.metadata import version as package_version

from vmshift.agent.config import AgentConfig
from vmshift.agent.datastores import Datastores
from vmshift.agent.qemu_user import QemuIdentity
from vmshift.model.enums import Accelerator
from vmshift.model.host import HostFacts
from vmshift.qemu.probe import (
    CpuInfo,
    QemuCapabilities,
    choose_accelerator,
    memory_mib,
    qemu_capabilities,
    read_cpuinfo,
)
from vmshift.tls.files import HostTlsFiles

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HostProbe:
    """What the agent learns once at start-up."""

    cpu: CpuInfo
    qemu: QemuCapabilities
    accelerator: Accelerator


async def probe_host(config: AgentConfig, datastores: Datastores) -> HostProbe:
    started = time.monotonic()
    caps = await asyncio.to_thread(qemu_capabilities, config.qemu_binary, config.state_dir / "cache")
    accel = await choose_accelerator(config.accelerator, datastores.first_kernel(),
                                     qemu_binary=config.qemu_binary, cache_dir=config.state_dir / "cache")
    log.info("host probe: QEMU %s, %d machine types, %d CPU models, accelerator %s (%.1f s)",
             caps.version, len(caps.machine_types), len(caps.cpu_models), accel.value,
             time.monotonic() - started)
    return HostProbe(cpu=read_cpuinfo(), qemu=caps, accelerator=accel)


def host_facts(config: AgentConfig, probe: HostProbe, datastores: Datastores,
               qemu_identity: QemuIdentity | None = None) -> HostFacts:
    total, free = memory_mib()
    identity = qemu_identity or QemuIdentity(why_root="unknown")
    return HostFacts(
        name=config.name, cpu_vendor=probe.cpu.vendor, cpu_model=probe.cpu.model,
        cpu_flags=probe.cpu.flags, cpus=probe.cpu.cpus, qemu_version=probe.qemu.version,
        machine_types=probe.qemu.machine_types, default_machine_type=probe.qemu.default_machine_type,
        cpu_models=probe.qemu.cpu_models, accelerator=probe.accelerator,
        memory_total_mib=total, memory_free_mib=free,
        datastores=datastores.infos(), networks=dict(config.networks),
        management_address=config.management_address, migration_address=config.migration_address,
        agent_version=package_version("vmshift"),
        migration_tls=HostTlsFiles.of(config.state_dir).enrolled,
        qemu_user=identity.user or "", qemu_confined_why_not=identity.why_root,
    )
