"""`make bench-scale`: what 8, 24, 48 and 96 simulated hosts with ~104 VMs each cost the server.

One vmshift-server on PostgreSQL (database ``vmshift_bench_scale``, created and dropped here) and one
``vmshift-hostsim`` process. Hosts are added through ``POST /hosts`` with their fingerprints (the real
enrollment); their VM rows are seeded through the server's schema module (bench set-up, see
vmshift/hostsim/seed.py), powered off, and then the simulated hosts start reporting them running, so
the server adopts them as it would VMs started on their hosts. Per size it measures (docs/scale.md):

- ``server_cpu_percent``: the server process's CPU over ``--cpu-window`` s at steady state, % of one core;
- ``api_p50_ms`` / ``api_p99_ms`` / ``api_rate``: an open-loop load of mixed reads at ``--rate`` /s;
- ``silent_host_detect_s``: a host stops answering (connections stay open) until GET /hosts shows it
  disconnected;
- ``list_all_vms_ms``: every VM through GET /vms, page by page when the server pages (else one call).

At the smallest size (``--double-at``) it doubles every host's VMs at the same change rate and reports
the CPU ratio, then goes back to ``--vms`` per host.
Writes ``scale-latest.json`` and ``scale-latest.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
from bench.raw_http import RawHttpClient, RawHttpError
from sqlalchemy import create_engine, func, select
from sqlalchemy.orm import Session

from vmshift.hostsim.fleet import host_name, vm_name
from vmshift.hostsim.seed import remove_vms, seed_vms
from vmshift.lab.http_load import percentile
from vmshift.model.enums import PowerState
from vmshift.server.db.schema import VmRow
from vmshift.tls.contexts import client_context
from vmshift.tls.files import ServerTlsFiles

ROOT = Path(__file__).resolve().parent.parent
DB_NAME = "vmshift_bench_scale"
DB_URL = f"postgresql+psycopg://vmshift:vmshift@127.0.0.1/{DB_NAME}"
SIZES = (8, 24, 48, 96)
VMS_PER_HOST = 104
PAGE_LIMIT = 1000
NEXT_CURSOR_HEADER = "x-next-cursor"
REQUEST_TIMEOUT_S = 5.0
MAX_IN_FLIGHT = 100  # = the connections: more would only queue in the server behind abandoned requests
DROPPED = "dropped (too many in flight)"
SILENT_WAIT_S = 30.0  # longer: reported as null (not detected)
RECONNECT_WAIT_S = 45.0
SETTLE_WAIT_S = 90.0
LIST_TIMEOUT_S = 60.0


@dataclass
class SizeResult:
    hosts: int
    vms: int
    server_cpu_percent: float
    db_cpu_percent: float
    sim_cpu_percent: float
    api_p50_ms: float | None
    api_p99_ms: float | None
    api_rate: float
    api_offered_rate: float
    api_errors: dict[str, int]
    silent_host_detect_s: float | None
    list_all_vms_ms: float | None
    list_pages: int
    list_mode: str
    enroll_s: float
    changes_per_s: float
    load_average: float  # the machine's 1-minute load average after the size's measurements
    notes: list[str] = field(default_factory=list)


def log(msg: str) -> None:
    print(f"[bench-scale {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----- processes ----------------------------------------------------------------------------------
def psql(sql: str) -> None:
    subprocess.run(["su", "postgres", "-c", f'psql -v ON_ERROR_STOP=1 -tAq -c "{sql}"'], check=True,
                   cwd="/", stdout=subprocess.DEVNULL)


def fresh_database() -> None:
    subprocess.run([str(ROOT / "scripts/setup-postgres.sh")], check=True, stdout=subprocess.DEVNULL)
    psql(f"DROP DATABASE IF EXISTS {DB_NAME} WITH (FORCE)")
    subprocess.run([str(ROOT / "scripts/setup-postgres.sh"), DB_NAME], check=True, stdout=subprocess.DEVNULL)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def bin_path(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


@contextlib.contextmanager
def process(argv: list[str], log_file: Path,
            ready_line: bool = False) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """Run ``argv`` (stderr to ``log_file``); with ``ready_line``, wait for its first stdout line."""
    with log_file.open("w") as err:
        out = subprocess.PIPE if ready_line else subprocess.DEVNULL
        proc = subprocess.Popen(argv, stdout=out, stderr=err, text=True)
        try:
            line = proc.stdout.readline() if ready_line and proc.stdout is not None else ""
            if ready_line and not line:
                raise RuntimeError(f"{argv[0]} exited before it was ready; see {log_file}")
            yield proc, line
        finally:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


class ServerProcess:
    """vmshift-server as a child process; ``restart`` drops whatever work an overload left queued."""

    def __init__(self, argv: list[str], log_file: Path) -> None:
        self.argv, self.log_file = argv, log_file
        self.proc: subprocess.Popen[str] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        with self.log_file.open("a") as err:
            self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=err, text=True)

    def stop(self, grace_s: float = 5.0) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


class CpuMeter:
    """CPU seconds the processes ``pids`` spent since the meter was made (processes that ended in
    between count for nothing: their last times cannot be read)."""

    def __init__(self, pids: list[int]) -> None:
        self.start = {p: t for p in pids if (t := _cpu_s(p)) is not None}

    def spent(self) -> float:
        return sum(max(0.0, now - t0) for p, t0 in self.start.items() if (now := _cpu_s(p)) is not None)


def _cpu_s(pid: int) -> float | None:
    try:
        c = psutil.Process(pid).cpu_times()
    except psutil.NoSuchProcess:
        return None
    return float(c.user + c.system)


def postgres_pids() -> list[int]:
    return [p.pid for p in psutil.process_iter(["name"]) if str(p.info["name"] or "").startswith("postgres")]


# ----- the bench ----------------------------------------------------------------------------------
@dataclass
class Bench:
    api: httpx.Client
    control: httpx.Client
    server: ServerProcess
    sim_pid: int
    url: str
    token: str
    ca: Path
    args: argparse.Namespace
    enrolled: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def sim_hosts(self) -> list[dict[str, Any]]:
        hosts: list[dict[str, Any]] = self.control.get("/hosts").json()
        return hosts

    def api_hosts(self) -> dict[str, str]:
        """Each host's connection state as GET /hosts shows it; {} when the server does not answer."""
        try:
            r = self.api.get("/hosts")
        except httpx.HTTPError as e:
            self.note(f"GET /hosts failed ({type(e).__name__})")
            return {}
        return {h["name"]: h["connection_state"] for h in r.json()} if r.status_code == 200 else {}

    def note(self, text: str) -> None:
        """Something that went wrong in this size's measurements: kept in its row, the bench goes on."""
        if text not in self.notes:
            self.notes.append(text)
            log(text)

    def wait(self, what: str, predicate: Any, timeout_s: float, step_s: float = 0.5) -> float:
        start = time.monotonic()
        while not predicate():
            if time.monotonic() - start > timeout_s:
                raise RuntimeError(f"timed out after {timeout_s:g} s waiting for {what}")
            time.sleep(step_s)
        return time.monotonic() - start

    def grow(self, hosts: int) -> float:
        """Add simulated hosts up to ``hosts``: enroll (0 VMs), seed their rows, let them report VMs."""
        sim = {h["name"]: h for h in self.sim_hosts()}
        new = [host_name(self.args.prefix, i + 1) for i in range(len(self.enrolled), hosts)]
        started = time.monotonic()

        async def add_all() -> None:
            limits = asyncio.Semaphore(8)
            async with httpx.AsyncClient(base_url=f"{self.url}/api/v1", verify=client_context(self.ca),
                                         headers={"Authorization": f"Bearer {self.token}"}, timeout=60,
                                         trust_env=False) as client:
                async def add(name: str) -> None:
                    async with limits:
                        r = await client.post("/hosts", json={"address": sim[name]["address"],
                                                              "fingerprint": sim[name]["fingerprint"]})
                        if r.status_code != 201:
                            raise RuntimeError(f"adding {name} failed: HTTP {r.status_code} {r.text}")
                await asyncio.gather(*(add(n) for n in new))

        asyncio.run(add_all())
        enroll_s = time.monotonic() - started
        engine = create_engine(DB_URL)
        with Session(engine) as s, s.begin():
            seed_vms(s, new, range(self.args.vms), PowerState.POWERED_OFF)
        engine.dispose()
        r = self.control.put("/vms", json={"per_host": self.args.vms, "hosts": new})
        r.raise_for_status()
        self.enrolled += new
        log(f"{len(new)} hosts added in {enroll_s:.1f} s, {len(new) * self.args.vms} VMs seeded")
        return enroll_s

    def settle(self, per_host: int | None = None) -> None:
        """Every added host connected and every VM they run adopted as powered on (seeded VMs start
        powered off: adopting 10,000 of them is set-up, not steady state), then ``--settle`` s."""
        def all_connected() -> bool:
            states = self.api_hosts()
            return len(states) == len(self.enrolled) and set(states.values()) == {"connected"}

        expected = len(self.enrolled) * (per_host if per_host is not None else self.args.vms)
        engine = create_engine(DB_URL)

        def all_adopted() -> bool:
            with Session(engine) as s:
                on = s.scalar(select(func.count()).select_from(VmRow).where(  # running or paused
                    VmRow.power_state != PowerState.POWERED_OFF))
            return on is not None and on >= expected

        try:
            self.wait("every host connected", all_connected, SETTLE_WAIT_S)
            self.wait(f"{expected} VMs shown running or paused", all_adopted, SETTLE_WAIT_S)
        except RuntimeError as e:
            self.note(str(e))
        finally:
            engine.dispose()
        time.sleep(self.args.settle)

    def cpu(self) -> tuple[float, float, float]:
        """(server, database, simulator) CPU % of one core over the window."""
        sim0 = self.control.get("/stats").json()["cpu_s"]
        server, db, t0 = CpuMeter([self.server.pid]), CpuMeter(postgres_pids()), time.monotonic()
        time.sleep(self.args.cpu_window)
        wall = time.monotonic() - t0
        sim1 = self.control.get("/stats").json()["cpu_s"]
        return 100 * server.spent() / wall, 100 * db.spent() / wall, 100 * (sim1 - sim0) / wall

    def silent_host(self) -> float | None:
        victim = self.enrolled[-1]
        self.control.post(f"/hosts/{victim}/silent").raise_for_status()
        try:
            return self.wait(f"{victim} shown disconnected",
                             lambda: self.api_hosts().get(victim) == "disconnected", SILENT_WAIT_S,
                             step_s=0.1)
        except RuntimeError as e:
            self.note(str(e))
            return None
        finally:
            self.control.post(f"/hosts/{victim}/loud").raise_for_status()
            try:
                self.wait(f"{victim} connected again", lambda: self.api_hosts().get(victim) == "connected",
                          RECONNECT_WAIT_S)
            except RuntimeError as e:
                self.note(str(e))

    def list_all(self) -> tuple[float, int, str, int]:
        """(ms, pages, mode, VMs) to read every VM; pages when the server gives a next cursor."""
        started = time.monotonic()
        params: dict[str, Any] = {"limit": PAGE_LIMIT}
        names: list[str] = []
        pages = 0
        paged = False
        while True:
            r = self.api.get("/vms", params=params, timeout=LIST_TIMEOUT_S)
            r.raise_for_status()
            pages += 1
            names += [v["name"] for v in r.json()]
            cursor = r.headers.get(NEXT_CURSOR_HEADER)
            if not cursor:
                break
            paged = True
            params = {"limit": PAGE_LIMIT, "cursor": cursor}
        ms = 1000 * (time.monotonic() - started)
        mode = f"paged (limit {PAGE_LIMIT})" if paged else "one plain GET /vms (this server does not page)"
        return ms, pages, mode, len(set(names))

    def load(self) -> tuple[float | None, float | None, float, float, dict[str, int]]:
        """Open loop: a request every 1/rate s whatever the answers; (p50, p99, achieved /s, offered /s,
        errors by kind). Latency counts from the planned send time, so queueing in the client counts.
        The client is bench/raw_http.py: httpx took a third to three quarters of a core at 200/s."""
        rng = random.Random(7)
        vm_names = [vm_name(h, i) for h in self.enrolled for i in range(self.args.vms)]
        def mixed() -> tuple[str, dict[str, Any]]:
            """One of five reads, equally likely (the paged list reads ask for one page)."""
            kind = rng.randrange(5)
            if kind == 0:
                return "/vms", {"limit": 100}
            if kind == 1:
                return "/hosts", {}
            if kind == 2:
                return f"/vms/{rng.choice(vm_names)}", {}
            if kind == 3:
                return "/events", {"limit": 100}
            return "/tasks", {"limit": 50}

        rate, duration = self.args.rate, self.args.load_s

        async def run() -> tuple[list[float], dict[str, int], int]:
            lat: list[float] = []
            errors: dict[str, int] = {}
            in_flight = 0
            host, port = self.url.removeprefix("https://").rsplit(":", 1)
            client = RawHttpClient(host, int(port), client_context(self.ca),
                                   {"Authorization": f"Bearer {self.token}"}, MAX_IN_FLIGHT)

            async def one(planned: float, path: str, params: dict[str, Any]) -> None:
                nonlocal in_flight
                in_flight += 1
                try:
                    r = await asyncio.wait_for(client.get(f"/api/v1{path}", params), REQUEST_TIMEOUT_S)
                    if r.status != 200:
                        errors[f"http {r.status}"] = errors.get(f"http {r.status}", 0) + 1
                    else:
                        lat.append(loop.time() - planned)
                except TimeoutError:
                    errors["timeout"] = errors.get("timeout", 0) + 1
                except RawHttpError as e:
                    kind = type(e.__cause__).__name__ if e.__cause__ else "RawHttpError"
                    errors[kind] = errors.get(kind, 0) + 1
                finally:
                    in_flight -= 1

            loop = asyncio.get_running_loop()
            start = loop.time()
            tasks = []
            sent = 0
            try:
                while (planned := start + sent / rate) < start + duration:
                    await asyncio.sleep(max(0.0, planned - loop.time()))
                    sent += 1
                    if in_flight >= MAX_IN_FLIGHT:
                        errors[DROPPED] = errors.get(DROPPED, 0) + 1
                        continue
                    path, params = mixed()
                    tasks.append(asyncio.create_task(one(planned, path, params)))
                await asyncio.gather(*tasks)
            finally:
                await client.close()
            return lat, errors, sent

        started = time.monotonic()
        lat, errors, sent = asyncio.run(run())
        wall = time.monotonic() - started
        lat.sort()
        p50, p99 = percentile(lat, 50), percentile(lat, 99)
        return (None if p50 is None else 1000 * p50, None if p99 is None else 1000 * p99, len(lat) / wall,
                sent / duration, errors)

    def restart(self) -> None:
        """A fresh server after the load: one that fell behind would go on answering requests the
        load generator gave up on, into the next measurement. Its hosts reconnect on its first beat."""
        self.server.stop()
        self.server.start()
        self.wait("the server after its restart", lambda: _up(self.api), 60)

    def measure(self, hosts: int, enroll_s: float) -> SizeResult:
        self.notes = []
        self.settle()
        server_cpu, db_cpu, sim_cpu = self.cpu()
        log(f"{hosts} hosts: server CPU {server_cpu:.1f}% (db {db_cpu:.1f}%, simulator {sim_cpu:.1f}%)")
        detect = self.silent_host()
        log(f"{hosts} hosts: silent host shown disconnected after {detect} s")
        try:
            list_ms, pages, mode, listed = self.list_all()
        except httpx.HTTPError as e:
            self.note(f"listing every VM failed: {type(e).__name__}")
            list_ms, pages, mode, listed = float("nan"), 0, "failed", 0
        log(f"{hosts} hosts: listed {listed} VMs in {list_ms:.0f} ms ({pages} pages, {mode})")
        p50, p99, rate, offered, errors = self.load()
        self.restart()
        log(f"{hosts} hosts: API p50 {_r(p50)} ms, p99 {_r(p99)} ms, {rate:.0f}/s of {offered:.0f}/s, "
            f"errors {errors}")
        vms = hosts * self.args.vms
        if listed != vms:
            self.note(f"listed {listed} VMs, expected {vms}")
        notes = list(self.notes)
        return SizeResult(hosts, vms, round(server_cpu, 1), round(db_cpu, 1), round(sim_cpu, 1),
                          _r(p50), _r(p99), round(rate, 1), round(offered, 1), errors,
                          None if detect is None else round(detect, 2),
                          None if list_ms != list_ms else round(list_ms, 1), pages, mode,
                          round(enroll_s, 1), self.args.changes_per_s, round(os.getloadavg()[0], 1), notes)

    def doubled(self) -> dict[str, Any]:
        """Every enrolled host's VMs doubled at the same change rate: server CPU after / before. Then
        back to ``--vms`` per host: the extra VMs are powered off on their hosts first (the server
        adopts that), then the hosts drop them and their rows go, so no reconcile finding appears."""
        self.settle()
        before, _, _ = self.cpu()
        extra = range(self.args.vms, 2 * self.args.vms)
        engine = create_engine(DB_URL)
        with Session(engine) as s, s.begin():
            seed_vms(s, self.enrolled, extra, PowerState.POWERED_OFF)
        doubled = {"per_host": 2 * self.args.vms, "hosts": self.enrolled}
        self.control.put("/vms", json=doubled).raise_for_status()
        self.settle(per_host=2 * self.args.vms)
        after, _, _ = self.cpu()
        log(f"doubled VMs on {len(self.enrolled)} hosts: server CPU {before:.1f}% -> {after:.1f}%")
        stop = {"keep": self.args.vms, "hosts": self.enrolled}
        self.control.post("/vms/power-off", json=stop).raise_for_status()
        names = [vm_name(h, i) for h in self.enrolled for i in extra]

        def adopted_off() -> bool:
            with Session(engine) as s:
                on = s.scalar(select(func.count()).select_from(VmRow).where(
                    VmRow.name.in_(names), VmRow.power_state != PowerState.POWERED_OFF))
                return on == 0

        self.wait("the extra VMs shown powered off", adopted_off, 120)
        self.control.put("/vms", json={"per_host": self.args.vms, "hosts": self.enrolled}).raise_for_status()
        with Session(engine) as s, s.begin():
            remove_vms(s, self.enrolled, extra)
        engine.dispose()
        self.restart()  # the next size starts like the others: a server that saw no load before it
        return {"hosts": len(self.enrolled), "vms_before": len(self.enrolled) * self.args.vms,
                "vms_after": 2 * len(self.enrolled) * self.args.vms, "changes_per_s": self.args.changes_per_s,
                "server_cpu_percent_before": round(before, 1), "server_cpu_percent_after": round(after, 1),
                "cpu_ratio": round(after / before, 2) if before > 0 else None}


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 1)


def git_commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return out.stdout.strip()


def plot(rows: list[SizeResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hosts = [r.hosts for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot(hosts, [r.server_cpu_percent for r in rows], "o-", label="server")
    a.plot(hosts, [r.db_cpu_percent for r in rows], "s--", label="PostgreSQL")
    a.plot(hosts, [r.sim_cpu_percent for r in rows], "^:", label="simulator")
    a.axhline(15, color="grey", lw=0.8, ls="--", label="target (server)")
    a.set_xlabel("hosts (104 VMs each)")
    a.set_ylabel("CPU, % of one core (steady state)")
    a.legend()
    b.plot(hosts, [r.api_p50_ms or 0 for r in rows], "o-", label="p50")
    b.plot(hosts, [r.api_p99_ms or 0 for r in rows], "s-", label="p99")
    b.axhline(50, color="grey", lw=0.8, ls="--", label="p99 target")
    b.set_yscale("log")
    b.set_xlabel("hosts (104 VMs each)")
    b.set_ylabel(f"latency of answered reads, ms ({rows[0].api_offered_rate:.0f}/s offered)")
    b.legend(loc="upper left")
    answered = b.twinx()  # few answers make the latency of a saturated server look better than it is
    answered.bar(hosts, [r.api_rate for r in rows], width=3, alpha=0.3, color="green")
    answered.set_ylabel("reads answered per second (bars)")
    fig.suptitle(f"vmshift server cost vs simulated hosts ({git_commit()})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default=",".join(map(str, SIZES)), help="host counts, ascending")
    p.add_argument("--vms", type=int, default=VMS_PER_HOST, help="VMs per host")
    p.add_argument("--changes-per-s", type=float, default=10.0, help="VM state changes/s over all hosts")
    p.add_argument("--rate", type=float, default=200.0, help="API reads per second offered")
    p.add_argument("--load-s", type=float, default=10.0, help="seconds of API load per size")
    p.add_argument("--cpu-window", type=float, default=20.0, help="seconds of each CPU measurement")
    p.add_argument("--settle", type=float, default=5.0, help="seconds to wait after all hosts connected")
    p.add_argument("--double-at", type=int, default=SIZES[0],
                   help="the size at which the VMs are doubled for the CPU ratio (0: never)")
    p.add_argument("--budget-s", type=float, default=580.0,
                   help="skip the next size (or the doubling) when it would end after this many seconds")
    p.add_argument("--prefix", default="sim")
    p.add_argument("--out", type=Path, default=ROOT / "bench/results")
    args = p.parse_args(argv)
    sizes = sorted(int(s) for s in args.sizes.split(","))
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="vmshift-bench-scale-"))
    try:
        fresh_database()
        state = work / "server"
        ServerTlsFiles.of(state).ensure([])  # the CA exists before the simulated hosts need it
        token = secrets.token_hex(16)
        (work / "token").write_text(token)
        os.chmod(work / "token", 0o600)
        port = free_port()
        url = f"https://127.0.0.1:{port}"
        ca = ServerTlsFiles.of(state).ca_cert
        sim_argv = [sys.executable, "-m", "vmshift.hostsim", "--hosts", str(sizes[-1]), "--vms", "0",
                    "--ca-file", str(ca), "--state-dir", str(work / "sim"), "--prefix", args.prefix,
                    "--changes-per-s", str(args.changes_per_s)]
        server_argv = [bin_path("vmshift-server"), "--listen", f"127.0.0.1:{port}", "--state-dir", str(state),
                       "--db-url", DB_URL, "--token-file", str(work / "token")]
        server = ServerProcess(server_argv, work / "server.log")
        with process(sim_argv, work / "hostsim.log", ready_line=True) as (sim, ready), \
                contextlib.ExitStack() as stack:
            server.start()
            stack.callback(server.stop, 15.0)
            control = f"http://{json.loads(ready)['control']}"
            api = httpx.Client(base_url=f"{url}/api/v1", headers={"Authorization": f"Bearer {token}"},
                               verify=client_context(ca), timeout=30, trust_env=False)
            knobs = httpx.Client(base_url=control, trust_env=False, timeout=30)
            bench = Bench(api, knobs, server, sim.pid, url, token, ca, args)
            bench.wait("the server", lambda: _up(api), 60)
            rows: list[SizeResult] = []
            skipped: list[str] = []
            doubling: dict[str, Any] | None = None
            last_s = 0.0
            for size in sizes:
                if rows and time.monotonic() - started + 1.25 * last_s > args.budget_s:
                    skipped.append(f"{size} hosts: over the {args.budget_s:g} s budget")
                    continue
                t0 = time.monotonic()
                try:
                    enroll_s = bench.grow(size)
                    rows.append(bench.measure(size, enroll_s))
                    if size == args.double_at:
                        doubling = bench.doubled()
                except (RuntimeError, httpx.HTTPError) as e:  # the server gave up: report what was measured
                    skipped.append(f"{size} hosts and up: {type(e).__name__}: {e}")
                    log(f"stopped at {size} hosts: {e}")
                    break
                last_s = time.monotonic() - t0
            for note in skipped:
                log(f"skipped {note}")
        write(args, rows, doubling, skipped, time.monotonic() - started)
    except Exception:
        for name in ("server.log", "hostsim.log"):
            with contextlib.suppress(OSError):
                tail = (work / name).read_text().splitlines()[-30:]
                print(f"--- last lines of {name}:\n" + "\n".join(tail), file=sys.stderr)
        raise
    finally:
        with contextlib.suppress(Exception):
            psql(f"DROP DATABASE IF EXISTS {DB_NAME} WITH (FORCE)")
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _up(api: httpx.Client) -> bool:
    try:
        return api.get("/about").status_code == 200
    except httpx.HTTPError:
        return False


def write(args: argparse.Namespace, rows: list[SizeResult], doubling: dict[str, Any] | None,
          skipped: list[str], wall_s: float) -> None:
    if not rows:  # not one size measured: say why, and leave the last results as they are
        log("no size was measured: " + "; ".join(skipped))
        raise SystemExit(1)
    largest = rows[-1]
    keys = ("hosts", "vms", "server_cpu_percent", "api_p50_ms", "api_p99_ms", "api_rate",
            "silent_host_detect_s", "list_all_vms_ms")
    result = {
        **{k: getattr(largest, k) for k in keys},
        "list_mode": largest.list_mode,
        "rows": [asdict(r) for r in rows],
        "doubled_vms": doubling,
        "skipped": skipped,
        "targets": {"server_cpu_percent": 15, "silent_host_detect_s": 3, "api_p99_ms": 50,
                    "list_all_vms_ms": 2000, "doubled_vms_cpu_ratio": 1.2},
        "setup": {"commit": git_commit(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "database": "PostgreSQL 15 (local)", "vms_per_host": args.vms,
                  "changes_per_s": args.changes_per_s, "api_rate_offered": args.rate, "load_s": args.load_s,
                  "cpu_window_s": args.cpu_window, "simulator": "vmshift-hostsim, one process",
                  "wall_s": round(wall_s, 1)},
    }
    (args.out / "scale-latest.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, args.out / "scale-latest.png")
    log(f"wrote {args.out / 'scale-latest.json'} and scale-latest.png in {wall_s:.0f} s")


if __name__ == "__main__":
    raise SystemExit(main())
