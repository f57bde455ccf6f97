"""Host facts an agent reports: CPU, QEMU capabilities, working accelerator, memory.

QEMU's machine types and CPU models (with the features this host lacks for each) come from a
short-lived ``qemu-system-x86_64 -machine none -qmp stdio``; the answer is cached per QEMU binary
(path + mtime) because it only changes when QEMU is upgraded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from vmshift.errors import QemuError
from vmshift.model.enums import Accelerator
from vmshift.model.host import CpuModelInfo
from vmshift.qemu.cmdline import QEMU_BINARY, KernelBoot

log = logging.getLogger(__name__)

CAPS_CACHE_VERSION = 1
# Lines a Linux kernel prints once it is about to start userspace: the guest really ran.
KERNEL_ALIVE_MARKERS = (b"Run /", b"Freeing unused kernel")


@dataclass(frozen=True)
class CpuInfo:
    vendor: str
    model: str
    flags: list[str]
    cpus: int


@dataclass(frozen=True)
class QemuCapabilities:
    version: str
    machine_types: list[str]
    default_machine_type: str
    cpu_models: list[CpuModelInfo] = field(default_factory=list)


def read_cpuinfo(path: Path = Path("/proc/cpuinfo")) -> CpuInfo:
    """Vendor, model name and flags of the first processor in ``/proc/cpuinfo``."""
    fields: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if not line.strip():
            break
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return CpuInfo(
        vendor=fields.get("vendor_id", "unknown"),
        model=fields.get("model name", "unknown"),
        flags=sorted(fields.get("flags", "").split()),
        cpus=os.cpu_count() or 1,
    )


def memory_mib() -> tuple[int, int]:
    """(total, available) host memory in MiB."""
    vm = psutil.virtual_memory()
    return vm.total // (1 << 20), vm.available // (1 << 20)


def _find_binary(qemu_binary: str) -> Path:
    found = shutil.which(qemu_binary)
    if found is None:
        raise QemuError(
            f"The QEMU binary {qemu_binary!r} was not found.",
            hint="Install qemu-system-x86 (QEMU 10 from bookworm-backports) or fix the PATH.",
        )
    return Path(found)


def _ask_qmp_stdio(binary: Path, commands: list[str], timeout_s: float) -> dict[str, Any]:
    """Run QEMU with no machine, send QMP commands on stdin, return each answer by command name."""
    lines = [json.dumps({"execute": "qmp_capabilities"})]
    lines += [json.dumps({"execute": cmd, "id": cmd}) for cmd in commands]
    lines.append(json.dumps({"execute": "quit"}))
    argv = [str(binary), "-machine", "none", "-accel", "tcg", "-nodefaults", "-no-user-config",
            "-display", "none", "-qmp", "stdio"]
    try:
        proc = subprocess.run(argv, input="\n".join(lines) + "\n", capture_output=True, text=True,
                              timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as exc:
        raise QemuError(f"QEMU did not answer capability queries within {timeout_s:g} s.",
                        hint="Run the same QEMU by hand with -qmp stdio to see why.") from exc
    answers: dict[str, Any] = {}
    for line in proc.stdout.splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            msg = json.loads(line)
            if isinstance(msg, dict) and msg.get("id") in commands and "return" in msg:
                answers[msg["id"]] = msg["return"]
    missing = [c for c in commands if c not in answers]
    if missing:
        raise QemuError(f"QEMU gave no answer to {', '.join(missing)} (exit code {proc.returncode}).",
                        hint=f"QEMU said: {proc.stderr.strip()[:300] or 'nothing'}")
    return answers


def _parse_caps(answers: dict[str, Any]) -> QemuCapabilities:
    ver = answers["query-version"]["qemu"]
    machines: list[str] = []
    default = ""
    for m in answers["query-machines"]:
        machines.append(m["name"])
        if m.get("alias"):
            machines.append(m["alias"])
        if m.get("is-default"):
            default = m["name"]
    cpus = [
        CpuModelInfo(name=d["name"], unavailable_features=sorted(d.get("unavailable-features", [])))
        for d in answers["query-cpu-definitions"]
    ]
    return QemuCapabilities(
        version=f"{ver['major']}.{ver['minor']}.{ver['micro']}",
        machine_types=sorted(set(machines)),
        default_machine_type=default,
        cpu_models=sorted(cpus, key=lambda c: c.name),
    )


def qemu_capabilities(
    qemu_binary: str = QEMU_BINARY, cache_dir: Path | None = None, timeout_s: float = 10.0
) -> QemuCapabilities:
    """QEMU version, machine types and CPU models (as runnable under TCG on this host)."""
    binary = _find_binary(qemu_binary)
    stamp = {"v": CAPS_CACHE_VERSION, "binary": str(binary.resolve()), "mtime": binary.stat().st_mtime}
    cache = cache_dir / "qemu-capabilities.json" if cache_dir else None
    if cache is not None and cache.exists():
        with contextlib.suppress(ValueError, KeyError, TypeError):
            data = json.loads(cache.read_text())
            if data.get("stamp") == stamp:
                caps = data["caps"]
                return QemuCapabilities(
                    version=caps["version"], machine_types=caps["machine_types"],
                    default_machine_type=caps["default_machine_type"],
                    cpu_models=[CpuModelInfo(**c) for c in caps["cpu_models"]],
                )
    caps = _parse_caps(_ask_qmp_stdio(
        binary, ["query-version", "query-machines", "query-cpu-definitions"], timeout_s))
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        payload = asdict(caps)
        payload["cpu_models"] = [c.model_dump() for c in caps.cpu_models]
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps({"stamp": stamp, "caps": payload}))
        tmp.replace(cache)
    return caps


def kvm_device_usable(path: str = "/dev/kvm") -> bool:
    return os.path.exists(path) and os.access(path, os.R_OK | os.W_OK)


async def kvm_boots(kernel: KernelBoot, *, qemu_binary: str = QEMU_BINARY, timeout_s: float = 6.0) -> bool:
    """Boot ``kernel`` under KVM and report whether it reaches userspace within ``timeout_s``.

    Merely opening /dev/kvm proves little: under broken nested virtualization firmware runs and
    then the guest kernel hangs, so only a kernel that gets to run init counts.
    """
    argv = [qemu_binary, "-machine", "q35", "-accel", "kvm", "-cpu", "qemu64", "-m", "128M", "-smp", "1",
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot", "-serial", "stdio",
            "-kernel", str(kernel.kernel), "-append", "console=ttyS0 panic=-1 quiet loglevel=7"]
    if kernel.initrd is not None:
        argv += ["-initrd", str(kernel.initrd)]
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    assert proc.stdout is not None
    seen = b""
    deadline = time.monotonic() + timeout_s
    try:
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                chunk = await asyncio.wait_for(proc.stdout.read(4096), timeout=remaining)
            except TimeoutError:
                break
            if not chunk:
                break
            seen = (seen + chunk)[-8192:]
            if any(marker in seen for marker in KERNEL_ALIVE_MARKERS):
                return True
        return False
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


async def choose_accelerator(
    wanted: str, probe_kernel: KernelBoot | None, *, qemu_binary: str = QEMU_BINARY, timeout_s: float = 6.0,
    cache_dir: Path | None = None,
) -> Accelerator:
    """``wanted`` is "kvm", "tcg" or "auto"; "auto" means KVM only if a probe guest really boots.

    The verdict of a probe boot is cached in ``cache_dir`` for this host boot and QEMU binary.
    """
    if wanted in (Accelerator.KVM.value, Accelerator.TCG.value):
        return Accelerator(wanted)
    if not kvm_device_usable():
        log.info("accelerator: /dev/kvm is not usable, using TCG")
        return Accelerator.TCG
    if probe_kernel is None:
        log.warning("accelerator: no kernel image on any datastore to prove KVM works, using TCG")
        return Accelerator.TCG
    binary = _find_binary(qemu_binary)
    stamp = {"boot_id": _boot_id(), "binary": str(binary.resolve()), "mtime": binary.stat().st_mtime}
    cache = cache_dir / "accelerator.json" if cache_dir else None
    if cache is not None and cache.exists():
        with contextlib.suppress(ValueError, KeyError, TypeError):
            data = json.loads(cache.read_text())
            if data.get("stamp") == stamp:
                return Accelerator(data["accelerator"])
    started = time.monotonic()
    ok = await kvm_boots(probe_kernel, qemu_binary=qemu_binary, timeout_s=timeout_s)
    log.info("accelerator: KVM probe guest %s after %.1f s", "booted" if ok else "did not boot",
             time.monotonic() - started)
    accel = Accelerator.KVM if ok else Accelerator.TCG
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"stamp": stamp, "accelerator": accel.value}))
    return accel
