"""The QEMU command line built from a VmSpec (pure)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vmshift.model.enums import Accelerator, BootKind
from vmshift.model.vm import BootSpec, DiskSpec, NicSpec, VmSpec
from vmshift.qemu.cmdline import SANDBOX, KernelBoot, PassedFds, VmPaths, build_qemu_argv, tap_name

UUID = "0b7c5a4e-1f2d-4c3b-9a8e-7d6c5b4a3f21"


def make_spec(boot: BootKind = BootKind.KERNEL, disks: int = 2, nics: int = 1) -> VmSpec:
    return VmSpec(
        name="web-1", uuid=UUID, cpus=2, memory_mib=256, cpu_model="EPYC", machine_type="pc-q35-10.0",
        datastore="shared-1",
        disks=[DiskSpec(datastore="shared-1", file=f"disk{i}.qcow2", size_mib=64) for i in range(disks)],
        nics=[NicSpec(network="VM Network", mac=f"52:54:00:AA:00:0{i}") for i in range(nics)],
        boot=BootSpec(kind=boot, image="lab-guest" if boot is BootKind.KERNEL else None,
                      cmdline="vmshift.ip=10.0.0.5/24"),
    )


def make_paths(spec: VmSpec) -> VmPaths:
    vm_dir = Path("/ds/shared-1/web-1")
    return VmPaths(vm_dir=vm_dir, run_dir=Path("/run/vms/web-1"),
                   disks=[vm_dir / d.file for d in spec.disks])


KERNEL = KernelBoot(kernel=Path("/ds/images/lab-guest/vmlinuz"),
                    initrd=Path("/ds/images/lab-guest/initrd.img"), cmdline="console=ttyS0 quiet")


def opt(argv: list[str], flag: str) -> list[str]:
    """Every value that follows ``flag`` in argv."""
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_basic_options() -> None:
    spec = make_spec()
    argv = build_qemu_argv(spec, make_paths(spec), accelerator=Accelerator.TCG,
                           taps=["vt-0b7c5a4e-0"], kernel_boot=KERNEL)
    assert argv[0] == "qemu-system-x86_64"
    assert opt(argv, "-uuid") == [UUID]
    assert opt(argv, "-name") == ["guest=web-1"]
    assert opt(argv, "-machine") == ["pc-q35-10.0"]
    assert opt(argv, "-accel") == ["tcg"]
    assert opt(argv, "-cpu") == ["EPYC"]
    assert opt(argv, "-smp") == ["2"]
    assert opt(argv, "-m") == ["256M"]
    for flag in ("-nodefaults", "-no-user-config"):
        assert flag in argv
    assert opt(argv, "-display") == ["none"]
    assert "-pidfile" not in argv  # QEMU may not write into the agent's state dir; running.json has the pid
    assert "-incoming" not in argv


def test_serial_and_qmp() -> None:
    spec = make_spec()
    argv = build_qemu_argv(spec, make_paths(spec), accelerator=Accelerator.KVM,
                           taps=["vt-0b7c5a4e-0"], kernel_boot=KERNEL)
    chardevs = opt(argv, "-chardev")
    assert "ringbuf,id=serial0,size=1048576" in chardevs  # the agent drains it into the capped log
    assert "socket,id=qmp0,path=/run/vms/web-1/qmp.sock,server=on,wait=off" in chardevs
    assert opt(argv, "-serial") == ["chardev:serial0"]
    assert opt(argv, "-mon") == ["chardev=qmp0,mode=control"]
    assert opt(argv, "-accel") == ["kvm"]


def test_sandbox_denies_what_qemu_never_needs() -> None:
    spec = make_spec()
    argv = build_qemu_argv(spec, make_paths(spec), accelerator=Accelerator.TCG, taps=["t0"],
                           kernel_boot=KERNEL)
    assert opt(argv, "-sandbox") == [SANDBOX]
    for deny in ("obsolete", "elevateprivileges", "spawn", "resourcecontrol"):
        assert f"{deny}=deny" in SANDBOX
    assert "-runas" not in argv  # the agent starts QEMU as its user; the sandbox forbids setuid
    assert opt(argv, "-action") == ["shutdown=pause"]  # the agent reads the guest's last words, then quits


def test_passed_fds_replace_paths() -> None:
    spec = make_spec(nics=2)
    argv = build_qemu_argv(spec, make_paths(spec), accelerator=Accelerator.TCG, taps=["tapA", "tapB"],
                           kernel_boot=KERNEL, fds=PassedFds(qmp=3, taps=[4, 5]))
    assert "socket,id=qmp0,fd=3,server=on,wait=off" in opt(argv, "-chardev")
    assert opt(argv, "-netdev") == ["tap,id=net0,fd=4", "tap,id=net1,fd=5"]
    with pytest.raises(ValueError, match="tap fds"):
        build_qemu_argv(spec, make_paths(spec), accelerator=Accelerator.TCG, taps=["tapA", "tapB"],
                        kernel_boot=KERNEL, fds=PassedFds(qmp=3, taps=[4]))


def test_comma_in_path_is_escaped() -> None:
    spec = make_spec()
    paths = VmPaths(vm_dir=Path("/ds/a,b/web-1"), run_dir=Path("/run/a,b/web-1"),
                    disks=[Path("/ds/a,b/web-1/disk0.qcow2"), Path("/ds/a,b/web-1/disk1.qcow2")])
    argv = build_qemu_argv(spec, paths, accelerator=Accelerator.TCG, taps=["t0"],
                           kernel_boot=KERNEL)
    assert "socket,id=qmp0,path=/run/a,,b/web-1/qmp.sock,server=on,wait=off" in opt(argv, "-chardev")
    # -blockdev uses JSON, where a comma needs no escaping
    assert json.loads(opt(argv, "-blockdev")[0])["filename"] == "/ds/a,b/web-1/disk0.qcow2"


def test_disks_have_stable_node_names() -> None:
    spec = make_spec(disks=2)
    argv = build_qemu_argv(spec, make_paths(spec), accelerator=Accelerator.TCG, taps=["t0"],
                           kernel_boot=KERNEL)
    blockdevs = [json.loads(b) for b in opt(argv, "-blockdev")]
    assert blockdevs == [
        {"driver": "file", "node-name": "file-disk0", "filename": "/ds/shared-1/web-1/disk0.qcow2"},
        {"driver": "qcow2", "node-name": "drive-disk0", "file": "file-disk0"},
        {"driver": "file", "node-name": "file-disk1", "filename": "/ds/shared-1/web-1/disk1.qcow2"},
        {"driver": "qcow2", "node-name": "drive-disk1", "file": "file-disk1"},
    ]
    devices = [json.loads(d) for d in opt(argv, "-device")]
    blk = [d for d in devices if d["driver"] == "virtio-blk-pci"]
    assert blk == [{"driver": "virtio-blk-pci", "id": "disk0", "drive": "drive-disk0"},
                   {"driver": "virtio-blk-pci", "id": "disk1", "drive": "drive-disk1"}]


def test_nics_use_taps_and_spec_macs() -> None:
    spec = make_spec(nics=2)
    argv = build_qemu_argv(spec, make_paths(spec), accelerator=Accelerator.TCG, taps=["tapA", "tapB"],
                           kernel_boot=KERNEL)
    assert opt(argv, "-netdev") == ["tap,id=net0,ifname=tapA,script=no,downscript=no",
                                    "tap,id=net1,ifname=tapB,script=no,downscript=no"]
    nets = [json.loads(d) for d in opt(argv, "-device") if "virtio-net" in d]
    assert [(n["id"], n["netdev"], n["mac"]) for n in nets] == [
        ("nic0", "net0", "52:54:00:aa:00:00"), ("nic1", "net1", "52:54:00:aa:00:01")]


def test_kernel_boot_joins_image_and_spec_cmdline() -> None:
    spec = make_spec()
    argv = build_qemu_argv(spec, make_paths(spec), accelerator=Accelerator.TCG, taps=["t0"],
                           kernel_boot=KERNEL)
    assert opt(argv, "-kernel") == ["/ds/images/lab-guest/vmlinuz"]
    assert opt(argv, "-initrd") == ["/ds/images/lab-guest/initrd.img"]
    assert opt(argv, "-append") == ["console=ttyS0 quiet vmshift.ip=10.0.0.5/24"]


def test_disk_boot_marks_first_disk_bootable() -> None:
    spec = make_spec(boot=BootKind.DISK)
    argv = build_qemu_argv(spec, make_paths(spec), accelerator=Accelerator.TCG, taps=["t0"])
    assert "-kernel" not in argv and "-append" not in argv
    blk = [json.loads(d) for d in opt(argv, "-device") if "virtio-blk" in d]
    assert blk[0]["bootindex"] == 0 and "bootindex" not in blk[1]


def test_incoming() -> None:
    spec = make_spec()
    argv = build_qemu_argv(spec, make_paths(spec), accelerator=Accelerator.TCG, taps=["t0"],
                           kernel_boot=KERNEL, incoming="defer")
    assert argv[-3:] == ["-S", "-incoming", "defer"]  # a received VM never runs by itself


def test_same_spec_gives_same_argv() -> None:
    spec = make_spec()
    one = build_qemu_argv(spec, make_paths(spec), accelerator=Accelerator.TCG, taps=["t0"],
                           kernel_boot=KERNEL)
    two = build_qemu_argv(spec.model_copy(deep=True), make_paths(spec), accelerator=Accelerator.TCG,
                          taps=["t0"], kernel_boot=KERNEL)
    assert one == two


@pytest.mark.parametrize(("taps", "disks", "kernel"), [
    ([], None, KERNEL),            # one NIC but no tap
    (["t0"], [], KERNEL),          # two disks but no paths
    (["t0"], None, None),          # kernel boot without kernel files
])
def test_inconsistent_inputs_are_refused(taps: list[str], disks: list[Path] | None,
                                         kernel: KernelBoot | None) -> None:
    spec = make_spec()
    paths = make_paths(spec)
    if disks is not None:
        paths = VmPaths(vm_dir=paths.vm_dir, run_dir=paths.run_dir, disks=disks)
    with pytest.raises(ValueError):
        build_qemu_argv(spec, paths, accelerator=Accelerator.TCG, taps=taps, kernel_boot=kernel)


def test_tap_name_fits_linux_limit() -> None:
    name = tap_name(UUID, 3)
    assert name == "vt-0b7c5a4e-3"
    assert len(name) <= 15


def test_disks_on_shared_storage_bypass_the_page_cache() -> None:
    spec = make_spec(disks=2)
    paths = make_paths(spec)
    paths = VmPaths(vm_dir=paths.vm_dir, run_dir=paths.run_dir, disks=paths.disks, direct=frozenset({1}))
    argv = build_qemu_argv(spec, paths, accelerator=Accelerator.TCG, taps=["t0"], kernel_boot=KERNEL)
    blockdevs = [json.loads(b) for b in opt(argv, "-blockdev")]
    assert [b.get("cache") for b in blockdevs] == [None, None, {"direct": True}, {"direct": True}]


def test_argv_is_accepted_by_qemu(tmp_path: Path) -> None:
    """QEMU itself parses the options (no guest is run: -S plus immediate quit via stdin monitor);
    the disk is an overlay on shared storage: it and its backing image bypass the page cache."""
    import shutil
    import subprocess

    if shutil.which("qemu-system-x86_64") is None:
        pytest.fail("QEMU is not installed: run 'make system' (QEMU 10 from bookworm-backports).")
    spec = make_spec(boot=BootKind.DISK, disks=1, nics=0)
    base, disk = tmp_path / "base.qcow2", tmp_path / "disk0.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "16M"], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base), str(disk)],
                   check=True)
    paths = VmPaths(vm_dir=tmp_path, run_dir=tmp_path, disks=[disk], direct=frozenset({0}))
    argv = build_qemu_argv(spec, paths, accelerator=Accelerator.TCG, taps=[])
    argv = [*argv, "-S", "-qmp", "stdio"]
    commands = ('{"execute":"qmp_capabilities"}\n{"execute":"query-block","id":"b"}\n'
                '{"execute":"query-named-block-nodes","id":"n"}\n'
                '{"execute":"ringbuf-read","id":"r","arguments":{"device":"serial0","size":4096}}\n'
                '{"execute":"quit"}\n')
    proc = subprocess.run(argv, input=commands, capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 0, proc.stderr  # the sandbox is accepted too (QEMU built with seccomp)
    replies = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    blocks = next(r["return"] for r in replies if r.get("id") == "b")
    assert [b["qdev"] for b in blocks] == ["/machine/peripheral/disk0/virtio-backend"]
    nodes = next(r["return"] for r in replies if r.get("id") == "n")
    direct = {n["file"]: n["cache"]["direct"] for n in nodes}
    assert direct == {str(disk): True, str(base): True}, nodes
    assert next(r for r in replies if r.get("id") == "r") == {"return": "", "id": "r"}  # the serial ring
    assert not (tmp_path / "serial.log").exists()  # QEMU writes no log file: the agent does
