"""Build the QEMU command line for a VM (pure: no I/O, every path is passed in).

Device and node names are derived from the disk/NIC index only (``disk0``, ``drive-disk0``,
``nic0``...), so the source and the destination of a live migration get identical device trees
from the same spec.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from vmshift.model.enums import Accelerator, BootKind
from vmshift.model.iscsi import IscsiLun
from vmshift.model.vm import VmSpec

QEMU_BINARY = "qemu-system-x86_64"
SUSPEND_STATE_FILE = "suspended.state"
SERIAL_CHARDEV = "serial0"
SEED_ISO_FILE = "seed.iso"
#: The cloud-init seed's CD-ROM: a SCSI CD on a virtio-scsi controller (the guests' kernels have the
#: virtio-scsi and sr drivers; Debian's cloud kernel has no AHCI driver for q35's IDE/SATA CD).
SEED_NODE = "drive-seed"
SEED_DEVICE = "seed0"
SCSI_CONTROLLER = "scsi0"
#: QEMU's seccomp filter: no obsolete system calls, no set*uid/set*gid, no fork/exec, no changes to
#: scheduling or CPU affinity. Live migration over TCP, a state file (suspend), blockdev-mirror,
#: NBD exports and fd-passed taps all work under it (QEMU 10.0.2, docs/confinement.md).
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
#: The guest's serial console goes to an in-QEMU ring buffer the agent drains into the capped serial
#: log (agent/serial_log.py). A power of two (QEMU requires it); a guest writing faster than this per
#: drain interval loses its oldest unread output, never the host's disk space.
SERIAL_RING_BYTES = 1 << 20


@dataclass(frozen=True)
class KernelBoot:
    """Direct kernel boot files (absolute paths) and the image's own kernel command line."""

    kernel: Path
    initrd: Path | None = None
    cmdline: str = ""


@dataclass(frozen=True)
class VmPaths:
    """Where a VM's files are on this host.

    ``vm_dir`` is ``DATASTORE/NAME/`` on the home datastore (serial log lives there);
    ``run_dir`` is ``state_dir/vms/NAME/`` (QMP socket, pid file); ``disks`` holds one absolute
    path per ``spec.disks`` entry, in the same order.
    """

    vm_dir: Path
    run_dir: Path
    disks: list[Path] = field(default_factory=list)
    #: disks (by index) that are LUNs of iSCSI datastores: QEMU's initiator opens them
    luns: dict[int, IscsiLun] = field(default_factory=dict)
    #: disk files (by index) opened with O_DIRECT: they are on a directory datastore other hosts share
    direct: frozenset[int] = frozenset()

    @property
    def serial_log(self) -> Path:
        """The newest part of the serial log (the agent writes it, see agent/serial_log.py)."""
        return self.vm_dir / "serial.log"

    @property
    def serial_log_old(self) -> Path:
        """The part before: ``serial.log`` is renamed to this when it reaches half the cap."""
        return self.vm_dir / "serial.log.1"

    @property
    def suspend_state(self) -> Path:
        """The saved memory and device state of a suspended VM (QEMU ``mapped-ram`` format)."""
        return self.vm_dir / SUSPEND_STATE_FILE

    @property
    def seed_iso(self) -> Path:
        """The VM's cloud-init seed (made from ``spec.seed`` where it is missing, agent/seed_iso.py)."""
        return self.vm_dir / SEED_ISO_FILE

    @property
    def qmp_socket(self) -> Path:
        """Bound by the agent and handed to QEMU as a listening fd, so QEMU needs no access to it."""
        return self.run_dir / "qmp.sock"


@dataclass(frozen=True)
class PassedFds:
    """File descriptors the agent opened for QEMU (inherited through exec): the listening QMP socket
    and one tap per NIC. QEMU then needs no path to the agent's state dir and no /dev/net/tun access."""

    qmp: int
    taps: list[int] = field(default_factory=list)


def disk_node_name(index: int) -> str:
    """The qcow2 format node of disk ``index`` (what block jobs and NBD exports refer to)."""
    return f"drive-disk{index}"


def disk_device_id(index: int) -> str:
    return f"disk{index}"


def nic_device_id(index: int) -> str:
    return f"nic{index}"


def tap_name(vm_uuid: str, index: int) -> str:
    """Host tap device of NIC ``index``: ``vt-<8 hex of uuid>-<index>`` (Linux allows 15 chars)."""
    short = vm_uuid.replace("-", "")[:8]
    name = f"vt-{short}-{index}"
    if len(name) > 15:
        raise ValueError(f"tap name {name!r} is longer than 15 characters")
    return name


def _opt_value(value: str) -> str:
    """Escape a value for QEMU's ``key=value,...`` option syntax (a comma is written twice)."""
    return value.replace(",", ",,")


def _json_arg(obj: dict[str, object]) -> str:
    return json.dumps(obj, separators=(",", ":"), sort_keys=False)


def build_qemu_argv(
    spec: VmSpec,
    paths: VmPaths,
    *,
    accelerator: Accelerator,
    taps: list[str],
    kernel_boot: KernelBoot | None = None,
    incoming: str | None = None,
    qemu_binary: str = QEMU_BINARY,
    fds: PassedFds | None = None,
) -> list[str]:
    """Return the argv that runs ``spec``; ``taps[i]`` is the host tap of ``spec.nics[i]``.

    ``incoming`` (for example ``"defer"``) starts QEMU waiting for a migration stream, with its
    vCPUs stopped (``-S``): a received VM runs only when the agent sends ``cont`` after the source
    confirmed the stream completed (docs/migration.md, "Switchover").

    With ``fds`` QEMU uses the agent's pre-opened QMP socket and taps (how the agent always starts
    it); without, it opens them by path itself.
    """
    if len(paths.disks) != len(spec.disks):
        raise ValueError(f"{len(spec.disks)} disks in the spec but {len(paths.disks)} disk paths given")
    if len(taps) != len(spec.nics):
        raise ValueError(f"{len(spec.nics)} NICs in the spec but {len(taps)} tap devices given")
    if spec.boot.kind is BootKind.KERNEL and kernel_boot is None:
        raise ValueError("the spec boots a kernel but no kernel files were given")
    if fds is not None and len(fds.taps) != len(taps):
        raise ValueError(f"{len(taps)} tap devices but {len(fds.taps)} tap fds given")
    qmp = (f"socket,id=qmp0,fd={fds.qmp},server=on,wait=off" if fds is not None
           else f"socket,id=qmp0,path={_opt_value(str(paths.qmp_socket))},server=on,wait=off")

    argv: list[str] = [
        qemu_binary,
        "-name", f"guest={_opt_value(spec.name)}",
        "-uuid", spec.uuid,
        "-machine", spec.machine_type,
        "-accel", accelerator.value,
        "-cpu", spec.cpu_model,
        "-smp", str(spec.cpus),
        "-m", f"{spec.memory_mib}M",
        "-nodefaults",
        "-no-user-config",
        "-display", "none",
        "-msg", "timestamp=on",
        "-sandbox", SANDBOX,
        # A guest that powers off (or panics) leaves QEMU paused in state "shutdown" instead of exiting:
        # the agent drains the serial ring (the guest's last words) and then quits it (supervisor.py).
        "-action", "shutdown=pause",
        "-chardev", f"ringbuf,id={SERIAL_CHARDEV},size={SERIAL_RING_BYTES}",
        "-serial", f"chardev:{SERIAL_CHARDEV}",
        "-chardev", qmp,
        "-mon", "chardev=qmp0,mode=control",
    ]

    for index, (disk, disk_path) in enumerate(zip(spec.disks, paths.disks, strict=True)):
        file_node = f"file-disk{index}"
        lun = paths.luns.get(index)
        protocol: dict[str, object] = (lun.blockdev(file_node) if lun is not None
                    else {"driver": "file", "node-name": file_node, "filename": str(disk_path)})
        fmt: dict[str, object] = {"driver": disk.format.value, "node-name": disk_node_name(index),
                                  "file": file_node}
        if index in paths.direct:
            # shared storage: no host page cache, so the target of a live migration reads what the
            # source wrote (libvirt requires cache=none there); set on the format node too, for the
            # backing image its qcow2 opens
            protocol["cache"] = fmt["cache"] = {"direct": True}
        argv += ["-blockdev", _json_arg(protocol)]
        argv += ["-blockdev", _json_arg(fmt)]
        device: dict[str, object] = {
            "driver": "virtio-blk-pci", "id": disk_device_id(index), "drive": disk_node_name(index),
        }
        if lun is not None:
            # A target that stops answering fails requests after the initiator's timeout: the VM
            # then pauses (BLOCK_IO_ERROR, run state io-error) instead of its guest seeing errors,
            # and `cont` retries them once the target is back.
            device |= {"werror": "stop", "rerror": "stop"}
        if spec.boot.kind is BootKind.DISK and index == 0:
            device["bootindex"] = 0
        argv += ["-device", _json_arg(device)]

    if spec.seed is not None:
        argv += ["-blockdev", _json_arg({
            "driver": "file", "node-name": "file-seed", "filename": str(paths.seed_iso), "read-only": True,
        })]
        argv += ["-blockdev", _json_arg({
            "driver": "raw", "node-name": SEED_NODE, "file": "file-seed", "read-only": True,
        })]
        argv += ["-device", _json_arg({"driver": "virtio-scsi-pci", "id": SCSI_CONTROLLER})]
        argv += ["-device", _json_arg({
            "driver": "scsi-cd", "id": SEED_DEVICE, "bus": f"{SCSI_CONTROLLER}.0", "drive": SEED_NODE,
        })]

    for index, (nic, tap) in enumerate(zip(spec.nics, taps, strict=True)):
        netdev = f"net{index}"
        tap_opt = f"fd={fds.taps[index]}" if fds is not None else f"ifname={tap},script=no,downscript=no"
        argv += ["-netdev", f"tap,id={netdev},{tap_opt}"]
        argv += ["-device", _json_arg({
            "driver": "virtio-net-pci", "id": nic_device_id(index), "netdev": netdev, "mac": nic.mac,
        })]

    if spec.boot.kind is BootKind.KERNEL:
        assert kernel_boot is not None
        argv += ["-kernel", str(kernel_boot.kernel)]
        if kernel_boot.initrd is not None:
            argv += ["-initrd", str(kernel_boot.initrd)]
        append = " ".join(part for part in (kernel_boot.cmdline, spec.boot.cmdline) if part)
        if append:
            argv += ["-append", append]

    if incoming is not None:
        argv += ["-S", "-incoming", incoming]
    return argv
