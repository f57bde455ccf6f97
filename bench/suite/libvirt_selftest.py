"""Verify the libvirt peer for real: its own lab, a light guest moved both ways, a heavy one aborted.

    .venv/bin/python -m bench.suite.libvirt_selftest     # from the repository root, as root

A 256 MiB guest (memtest 64 MiB at 50 MiB/s) goes host-1 -> host-2 -> host-1 with `virsh migrate
--live`; after each move memtest must finish two more passes with 0 mismatches and disklog must
advance. Then a 1 GiB guest dirtying 512 MiB flat out on a 1 Gbit/s link gets 20 s: the abort must
leave it running, intact, on host-1. Prints one JSON document; exit 0 when all of it held, 2 when
libvirt is unavailable (the reason is in the JSON).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmshift.lab import lab as labmod

from .libvirt_peer import LibvirtGuest, LibvirtLab, LibvirtPeerError


@dataclass
class _Selftest:
    lab_name: str
    work: Path
    steps: list[dict[str, Any]] = field(default_factory=list)

    def wait_passes(self, lv: LibvirtLab, ip: str, passes: int, timeout_s: float = 180) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            answer = lv.check(ip)
            if answer.get("echo") and (answer.get("memtest") or {}).get("passes", 0) >= passes:
                return answer
            if time.monotonic() > deadline:
                raise LibvirtPeerError(f"memtest at {ip} did not reach {passes} passes: {answer}")
            time.sleep(1.0)

    def verify(self, lv: LibvirtLab, ip: str, before: dict[str, Any], what: str) -> dict[str, Any]:
        after = self.wait_passes(lv, ip, before["memtest"]["passes"] + 2)
        ok = (after["memtest"]["mismatches"] == 0 and not after["memtest"].get("error")
              and after["disklog"]["durable_seq"] > before["disklog"]["durable_seq"]
              and not after["disklog"].get("error"))  # fmt: skip
        self.steps.append(
            {"step": what, "guest_ok": ok, "memtest": after["memtest"], "disklog": after["disklog"]}
        )
        if not ok:
            raise LibvirtPeerError(f"{what}: the guest is not intact: {after}")
        return after

    def run(self) -> dict[str, Any]:
        from vmshift.lab import topology

        result: dict[str, Any] = {"lab": self.lab_name, "work": str(self.work), "steps": self.steps}
        with LibvirtLab(self.lab_name, self.work) as lv:
            result["unavailable"] = lv.unavailable
            if lv.unavailable:
                return result
            result["versions"] = lv._virsh(1, "version").strip().splitlines()
            ip, mac = lv.pick_guest(self.lab_name, 0)
            light = LibvirtGuest("lvp-light", 256, 1, "vmshift.memtest=64,50 vmshift.disklog=1", ip, mac)
            lv.start_guest(1, light)
            state = self.wait_passes(lv, ip, 1)
            self.steps.append({"step": "booted light guest on host-1", "memtest": state["memtest"]})
            for src, dst in ((1, 2), (2, 1)):
                mig = lv.migrate(light.name, src, dst, timeout_s=120)
                self.steps.append({"step": f"migrate {light.name} {src}->{dst}", **mig})
                if not mig["converged"] or lv.host_of(light.name) != dst:
                    raise LibvirtPeerError(f"migration {src}->{dst} did not complete: {mig['error']}")
                state = self.verify(lv, ip, state, f"guest after {src}->{dst}")
            lv.destroy_guest(light.name)

            ip, mac = lv.pick_guest(self.lab_name, 1)
            heavy = LibvirtGuest("lvp-heavy", 1024, 1, "vmshift.memtest=512,0 vmshift.disklog=1", ip, mac)
            lay = lv.layout
            try:
                for k in lay.host_numbers:
                    topology.set_migration_link_rate(lay, k, "1gbit")
                lv.start_guest(1, heavy)
                state = self.wait_passes(lv, ip, 1)
                mig = lv.migrate(heavy.name, 1, 2, timeout_s=20)
                self.steps.append({"step": f"migrate {heavy.name} 1->2, 1gbit link, 20 s timeout", **mig})
                if (
                    mig["converged"]
                    or lv.host_of(heavy.name) != 1
                    or not mig["state_after"].startswith("running")
                ):
                    raise LibvirtPeerError(f"the heavy guest should run on host-1 after the abort: {mig}")
                self.verify(lv, ip, state, "heavy guest on host-1 after the abort")
            finally:
                for k in lay.host_numbers:
                    topology.set_migration_link_rate(lay, k, None)
            lv.destroy_guest(heavy.name)
        return result


def selftest() -> int:
    """Bring up a lab, run the libvirt peer's verification, print JSON, tear everything down."""
    name = f"lvp{os.getpid()}"
    work = Path(tempfile.mkdtemp(prefix=f"{name}-"))
    test = _Selftest(name, work)
    result: dict[str, Any] = {"lab": name, "work": str(work)}
    code = 1
    try:
        labmod.up(name=name, hosts=2, migration_link_rate=None)
        result = test.run()
        code = 0 if result.get("unavailable") is None else 2
    except Exception as e:
        result.update(error=f"{type(e).__name__}: {e}", steps=test.steps)
    finally:
        problems = labmod.down(name)
        result["teardown_problems"] = problems
    result["ok"] = code == 0
    keys = ("converged", "aborted", "host_after", "total_ms", "wall_ms", "downtime_ms", "bytes_sent", "error")
    result["summary"] = [
        {"step": st["step"], **{k: st.get(k) for k in keys}}
        for st in result.get("steps", [])
        if "converged" in st
    ]
    print(json.dumps(result, indent=2, default=str))
    return code


if __name__ == "__main__":
    sys.exit(selftest())
