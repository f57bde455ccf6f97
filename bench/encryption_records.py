"""Where an encrypted stream's time goes: two bare QEMUs on loopback, plain against TLS.

    sudo .venv/bin/python -m bench.encryption_records [--ram 256M] [--runs 2] [--multifd 2]

No guest and no lab: the source QEMU's RAM is a private mapping of a file of random bytes, so every
page is a normal (non-zero) page, and the stream goes to a receiving QEMU on 127.0.0.1. Each
migration is timed, and ``strace -c`` counts the source QEMU's write/writev/sendmsg calls:
plain QEMU sends a batch of pages per ``sendmsg``, while over TLS it sends two TLS records per page
(the page's header and the page itself, one ``sendmsg`` each). ``--multifd N`` repeats the TLS run
with N multifd channels: they carry the page offsets in the packet header, so only one record per
page is left, and the channels share the work. The host certificates come from a throwaway CA,
set up by agent/migration_tls.py as for a real migration.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from vmshift.agent import migration_tls
from vmshift.model.agent_migration import MigrationTls
from vmshift.qemu import migration_qmp as mq
from vmshift.qemu.qmp import QmpSession
from vmshift.tls import pki
from vmshift.tls.files import HostTlsFiles, write_private

MIB = 1 << 20


def enroll(root: Path, ca: pki.KeyPair, name: str) -> HostTlsFiles:
    files = HostTlsFiles.of(root / name)
    req = pki.make_key_and_csr(name)
    write_private(files.key, req.key_pem)
    write_private(files.cert, pki.issue(ca, req.cert_pem, common_name=name, role=pki.Role.HOST,
                                        sans=[name, "127.0.0.1"]), 0o644)
    write_private(files.ca_cert, ca.cert_pem, 0o644)
    return files


def start_qemu(root: Path, name: str, ram: str, backend: list[str], extra: list[str]) -> tuple[
        subprocess.Popen[bytes], Path]:
    sock = root / f"{name}.qmp"
    argv = ["qemu-system-x86_64", "-machine", "pc,memory-backend=mem0", "-accel", "tcg", "-m", ram,
            "-nodefaults", "-display", "none", "-object", ",".join(backend),
            "-qmp", f"unix:{sock},server=on,wait=off", *extra]
    return subprocess.Popen(argv, stderr=(root / f"{name}.log").open("wb")), sock


def syscalls(text: str) -> dict[str, int]:
    """``strace -c`` summary lines -> calls per syscall."""
    out = {}
    for line in text.splitlines():
        m = re.match(r"\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)(?:\s+\d+)?\s+(\w+)$", line)
        if m and m.group(2) != "total":
            out[m.group(2)] = int(m.group(1))
    return out


async def one(root: Path, ram: str, ram_file: Path, tls: bool, multifd: int,
              files: tuple[HostTlsFiles, HostTlsFiles]) -> dict[str, Any]:
    src, src_sock = start_qemu(root, "src", ram, ["memory-backend-file", "id=mem0", f"size={ram}",
                                                  f"mem-path={ram_file}", "share=off"], [])
    dst, dst_sock = start_qemu(root, "dst", ram, ["memory-backend-ram", "id=mem0", f"size={ram}"],
                               ["-incoming", "defer"])
    sessions: list[QmpSession] = []
    try:
        s, t = await QmpSession.connect(src_sock), await QmpSession.connect(dst_sock)
        sessions += [s, t]
        if multifd:
            for q in (s, t):
                await mq.set_capabilities(q, {"multifd": True})
                await mq.set_parameters(q, {"multifd-channels": multifd})
        if tls:
            await migration_tls.setup_target(t, files[1], dst.pid, MigrationTls(peer="host-1"))
        await mq.migrate_incoming(t, "tcp:127.0.0.1:0")
        uri = f"tcp:127.0.0.1:{await mq.listening_port(t)}"
        if tls:
            await migration_tls.setup_source(s, files[0], src.pid, uri)
        await mq.set_parameters(s, {"max-bandwidth": mq.UNLIMITED_BANDWIDTH})
        trace = root / "strace.txt"
        with trace.open("w") as out:
            strace = subprocess.Popen(["strace", "-f", "-c", "-e", "trace=write,writev,sendmsg",
                                       "-p", str(src.pid)], stderr=out)
        await asyncio.sleep(0.5)  # strace attached to every thread
        began = time.monotonic()
        await mq.migrate(s, uri)
        while (answer := await mq.query_migrate(s)).get("status") not in ("completed", "failed"):
            await asyncio.sleep(0.02)
        wall = time.monotonic() - began
        strace.terminate()
        strace.wait()
        ram_info = answer.get("ram", {})
        calls = syscalls(trace.read_text())
        pages = int(ram_info.get("normal", 0)) or 1
        return {"stream": "tls" if tls else "plain", "multifd_channels": multifd, "status": answer["status"],
                "seconds": round(wall, 2), "qemu_total_ms": answer.get("total-time"),
                "mib_sent": int(ram_info.get("transferred", 0)) // MIB, "pages": pages,
                "syscalls": calls, "sends_per_page": round(sum(calls.values()) / pages, 2)}
    finally:
        for session in sessions:
            await session.close()
        src.kill()
        dst.kill()


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    results = []
    with tempfile.TemporaryDirectory(prefix="vmshift-tls-records-") as tmp:
        root = Path(tmp)
        ram_file = root / "ram.bin"
        with ram_file.open("wb") as f, Path("/dev/urandom").open("rb") as rnd:
            size = int(args.ram.rstrip("M")) * MIB
            while f.tell() < size:
                f.write(rnd.read(MIB))
        ca = pki.create_ca()
        files = (enroll(root, ca, "host-1"), enroll(root, ca, "host-2"))
        for _ in range(args.runs):
            modes = [(False, 0), (True, 0)] + ([(True, args.multifd)] if args.multifd else [])
            for tls, multifd in modes:
                r = await one(root, args.ram, ram_file, tls, multifd, files)
                print(json.dumps(r), flush=True)
                results.append(r)
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ram", default="256M", help="guest RAM in MiB, e.g. 256M")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--multifd", type=int, default=2, help="channels for a third, multifd TLS run (0: none)")
    asyncio.run(run(ap.parse_args()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
