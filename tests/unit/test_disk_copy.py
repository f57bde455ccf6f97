"""Pure parts of cold copies: qemu-img argv, progress parsing, failure classification, NBD exporter argv."""

from __future__ import annotations

from pathlib import Path

from vmshift.agent.disk_copy import (
    Image,
    ProgressReader,
    compare_argv,
    convert_argv,
    convert_failure,
    parse_progress,
)
from vmshift.agent.nbd_export import (
    ExportedImage,
    nbd_uri,
    qemu_nbd_argv,
    storage_daemon_argv,
)
from vmshift.errors import CapacityError, QemuError
from vmshift.model.enums import DiskFormat

SRC = Image("/ds/a/vm/disk0.qcow2", DiskFormat.QCOW2)
NBD = Image.nbd("nbd://10.0.0.2:40000/move3-disk0")


def test_convert_argv_into_nbd_is_raw_and_skips_zeros() -> None:
    argv = convert_argv("qemu-img", SRC, NBD)
    assert argv[:2] == ["qemu-img", "convert"]
    for flag in ("-p", "-n", "-W", "--target-is-zero"):
        assert flag in argv
    assert argv[argv.index("-m") + 1] == "16"
    assert argv[argv.index("-f") + 1] == "qcow2"
    assert argv[argv.index("-O") + 1] == "raw"
    assert argv[argv.index("-t") + 1] == "writeback"  # qemu-img's default 'unsafe' never flushes
    assert "-U" not in argv  # the source stays locked against writers while it is copied
    assert argv[-2:] == [SRC.location, NBD.location]
    assert NBD.over_nbd and not SRC.over_nbd


def test_convert_argv_without_zero_target_keeps_holes() -> None:
    argv = convert_argv("qemu-img", SRC, Image("/ds/b/vm/disk0.raw", DiskFormat.RAW), target_is_zero=False)
    assert "--target-is-zero" not in argv
    assert argv[argv.index("-S") + 1] == "4k"
    assert argv[argv.index("-O") + 1] == "raw"


def test_compare_argv() -> None:
    argv = compare_argv("qemu-img", SRC, NBD)
    assert argv == ["qemu-img", "compare", "-U", "-f", "qcow2", "-F", "raw", SRC.location, NBD.location]
    assert "-s" not in argv  # qcow2 vs raw allocation differs; only the data must match


def test_parse_progress() -> None:
    out = "    (0.00/100%)\r    (1.56/100%)\r    (100.00/100%)\r\n"
    assert parse_progress(out) == [0.0, 0.0156, 1.0]
    assert parse_progress("no progress here") == []


def test_progress_reader_joins_lines_cut_between_reads() -> None:
    seen: list[float] = []
    reader = ProgressReader(seen.append)
    reader.feed("    (12.5")
    assert seen == []
    reader.feed("0/100%)\r    (25.00/1")
    assert seen == [0.125]
    reader.feed("00%)\r")
    assert seen == [0.125, 0.25]
    reader.feed("    (10.00/100%)\r")  # never goes backwards
    assert seen[-1] == 0.25 and reader.latest == 0.25


def test_enospc_is_a_capacity_error() -> None:
    err = convert_failure("disk 0 of VM web", NBD.location, 1,
                          "qemu-img: error while writing at byte 12345: No space left on device\n")
    assert isinstance(err, CapacityError)
    assert "ran out of space" in err.message and err.hint


def test_killed_and_vanished_exports_say_so() -> None:
    killed = convert_failure("disk 0", NBD.location, -9, "")
    assert isinstance(killed, QemuError) and "SIGKILL" in killed.message
    gone = convert_failure("disk 0", NBD.location, 1,
                           "qemu-img: error while writing at byte 0: Input/output error\n")
    assert "went away" in gone.message
    other = convert_failure("disk 0", "/ds/b/disk0.qcow2", 1, "qemu-img: Could not open 'x': bad\n")
    assert other.message == "qemu-img could not copy disk 0 to /ds/b/disk0.qcow2: Could not open 'x': bad."


def test_storage_daemon_argv_exports_each_image_after_the_server() -> None:
    images = [ExportedImage(name="move3-disk0", path="/ds/b/vm/disk0.qcow2", fmt=DiskFormat.QCOW2),
              ExportedImage(name="move3-state", path="/ds/b/vm/x,y.state", fmt=DiskFormat.RAW)]
    argv = storage_daemon_argv("qemu-storage-daemon", "10.0.0.2", 40000, Path("/run/x/3.qsd.pid"), images)
    assert "driver=file,node-name=file1,filename=/ds/b/vm/x,,y.state" in argv  # commas escaped
    assert "driver=qcow2,node-name=fmt0,file=file0" in argv
    assert "type=nbd,id=exp0,node-name=fmt0,name=move3-disk0,writable=on" in argv
    assert "type=nbd,id=exp1,node-name=file1,name=move3-state,writable=on" in argv  # raw: the file node
    server = argv.index("addr.type=inet,addr.host=10.0.0.2,addr.port=40000")
    assert argv[server - 1] == "--nbd-server"
    assert all(i > server for i, a in enumerate(argv) if a == "--export")
    assert argv[-3:] == ["--pidfile", "/run/x/3.qsd.pid", "--daemonize"]


def test_qemu_nbd_argv() -> None:
    img = ExportedImage(name="move3-disk0", path="/ds/b/vm/disk0.raw", fmt=DiskFormat.RAW)
    argv = qemu_nbd_argv("qemu-nbd", "10.0.0.2", 40001, Path("/run/x/3.nbd0.pid"), img)
    for arg in ("--fork", "--persistent", "--format=raw", "--bind=10.0.0.2", "--port=40001",
                "--export-name=move3-disk0", "--pid-file=/run/x/3.nbd0.pid"):
        assert arg in argv
    assert argv[-1] == img.path


def test_nbd_uri() -> None:
    assert nbd_uri("10.0.0.2", 40000, "move3-disk0") == "nbd://10.0.0.2:40000/move3-disk0"
    assert nbd_uri("fd00::2", 40000, "d") == "nbd://[fd00::2]:40000/d"


def test_convert_argv_caps_the_rate_when_the_move_has_a_bandwidth_limit() -> None:
    argv = convert_argv("qemu-img", SRC, NBD, rate_bps=50e6)
    assert argv[argv.index("-r") + 1] == "50000000"
    assert "-r" not in convert_argv("qemu-img", SRC, NBD)
