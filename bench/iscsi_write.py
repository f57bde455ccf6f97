"""Guest disk write throughput on iSCSI (iscsi-1) against a directory datastore (local-host-1), one run.

    sudo .venv/bin/python -m bench.iscsi_write [--seconds 10]

One lab with ``--iscsi``; one VM at a time on host-1 with a 256 MiB second disk on the datastore
under test and the lab guest's writer flat out on it (``vmshift.diskwrite=0``: 1 MiB O_DIRECT
chunks, fdatasync after each, so every MiB reaches the datastore before the next). The figure is
the bytes it wrote over at least ``--seconds`` of guest uptime. The writer has no 4 KiB random mode:
only sequential throughput is measured. Not a test: numbers depend on the machine's load.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent
DATASTORES = ("iscsi-1", "local-host-1")
MIB = 1 << 20


def vmshift(env: dict[str, str], *args: str, timeout: float = 300) -> Any:
    proc = subprocess.run([str(BIN / "vmshift"), *args, "--json"], env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"vmshift {' '.join(args)} failed: {proc.stdout}{proc.stderr}")
    return json.loads(proc.stdout)


def writer_mibps(env: dict[str, str], lab: str, vm: str, seconds: float) -> tuple[float, list[float]]:
    """The writer's rate over at least ``seconds`` of guest uptime (bytes it wrote over the uptime
    between two checks), and its own per-second rates seen on the way."""
    deadline = time.monotonic() + 120
    while True:  # the boot scan first, then a durable chunk
        first = vmshift(env, "lab", "check", vm, "--name", lab)
        if (first.get("diskwrite") or {}).get("durable_seq", 0) > 16:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"the writer of {vm} did not start: {first}")
        time.sleep(1)
    seen: list[float] = []
    while True:
        last = vmshift(env, "lab", "check", vm, "--name", lab)
        seen.append(float(last["diskwrite"]["mibps"]))
        elapsed = float(last["uptime_s"]) - float(first["uptime_s"])
        if elapsed >= seconds:
            written = last["diskwrite"]["bytes_written"] - first["diskwrite"]["bytes_written"]
            return written / MIB / elapsed, seen
        time.sleep(1)


def measure(env: dict[str, str], lab: str, datastore: str, seconds: float) -> dict[str, Any]:
    vm = f"bw-{datastore}"
    vmshift(env, "vm", "create", vm, "--host", "host-1", "--cpus", "1", "--memory", "192", "--datastore",
            datastore, "--network", "VM Network", "--disk", "64M", "--disk", "256M", "--image", "lab-guest",
            "--kernel-args", "vmshift.diskwrite=0", "--start")
    try:
        mibps, seen = writer_mibps(env, lab, vm, seconds)
    finally:
        subprocess.run([str(BIN / "vmshift"), "vm", "stop", vm], env=env, capture_output=True, check=False)
        subprocess.run([str(BIN / "vmshift"), "vm", "delete", vm], env=env, capture_output=True, check=False)
    return {"datastore": datastore, "mibps": round(mibps, 1), "per_second_seen": seen}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    lab = f"iscsi-bench-{secrets.token_hex(2)}"
    env = {**os.environ, "VMSHIFT_CONFIG_DIR": tempfile.mkdtemp(prefix="vmshift-bench-")}
    subprocess.run([str(BIN / "vmshift"), "lab", "up", "--name", lab, "--iscsi", "--json"], env=env,
                   capture_output=True, check=True, timeout=900)
    try:
        results = [measure(env, lab, ds, args.seconds) for ds in DATASTORES]
    finally:
        subprocess.run([str(BIN / "vmshift"), "lab", "down", "--name", lab], env=env, capture_output=True,
                       check=False, timeout=300)
    iscsi, directory = results
    ratio = iscsi["mibps"] / directory["mibps"] if directory["mibps"] else 0.0
    print(json.dumps({"results": results, "iscsi_vs_directory": round(ratio, 3), "target": 0.7}, indent=2))


if __name__ == "__main__":
    main()
