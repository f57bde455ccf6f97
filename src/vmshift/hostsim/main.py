"""``vmshift-hostsim``: N simulated hosts with M VMs each in one process, one asyncio loop.

Every host gets its own HTTPS port on 127.0.0.1 (its own bootstrap certificate under
``STATE_DIR/HOST/tls``, enrolled by ``POST /hosts`` like a real agent). A plain-HTTP control port on
127.0.0.1 turns the knobs (docs/scale.md):

- ``GET /hosts``: each host's name, address, bootstrap fingerprint, enrolled, silent, VM count;
- ``POST /hosts/NAME/silent`` and ``POST /hosts/NAME/loud``: stop answering (connections stay open);
- ``PUT /vms`` ``{"per_host": N, "hosts": [NAME, ...]}``: grow or shrink the VMs of those hosts (all
  when "hosts" is left out); new VMs are powered on;
- ``POST /vms/power-off`` ``{"keep": K, "hosts": [...]}``: power off every VM from index K on;
- ``PUT /changes`` ``{"per_s": R}``: VM state changes per second, over all enrolled hosts;
- ``GET /stats``: the simulator's own CPU seconds, changes made, requests served, open connections.

When everything listens it prints one JSON line on stdout: ``{"control": "127.0.0.1:PORT", "hosts": N}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmshift.agent.config import AgentConfig
from vmshift.agent.tls_server import AgentTls
from vmshift.errors import InvalidInputError, NotFoundError, VmshiftError
from vmshift.hostsim.agent_api import SimAgentApi
from vmshift.hostsim.fleet import Fleet, SimHost, host_name
from vmshift.hostsim.http1 import HttpServer, Request, Response, json_response

log = logging.getLogger("vmshift.hostsim")
CHANGE_TICK_S = 0.1
DEFAULT_STATS_INTERVAL_S = 10.0
MAX_HOSTS = 1000
MAX_VMS_PER_HOST = 1000
LOUDNESS = ("silent", "loud")


@dataclass
class SimHostServer:
    host: SimHost
    api: SimAgentApi
    http: HttpServer
    tls: AgentTls


class Simulator:
    """The fleet, its HTTPS servers, the control server and the loops that make changes and stats."""

    def __init__(self, fleet: Fleet, servers: list[SimHostServer]) -> None:
        self.fleet = fleet
        self.servers = servers
        self.control = HttpServer(self.control_api)
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self, control_host: str, control_port: int) -> None:
        for s in self.servers:
            s.host.port = await s.http.start()
        self.control.host, self.control.port = control_host, control_port
        await self.control.start()
        self._tasks.append(asyncio.create_task(self._changes(), name="hostsim-changes"))
        for i, s in enumerate(self.servers):
            offset = self.fleet.stats_interval_s * i / max(1, len(self.servers))
            self._tasks.append(asyncio.create_task(self._stats(s.host, offset), name=f"hostsim-stats-{i}"))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for h in self.fleet.hosts:
            h.loud.set()  # let parked handlers finish
        await asyncio.gather(self.control.close(), *(s.http.close() for s in self.servers))

    async def _changes(self) -> None:
        loop = asyncio.get_running_loop()
        owed, last = 0.0, loop.time()
        while True:
            await asyncio.sleep(CHANGE_TICK_S)
            now = loop.time()
            owed += self.fleet.changes_per_s * (now - last)
            last = now
            count = int(owed)
            owed -= count
            self.fleet.change_some(count, time.monotonic())

    async def _stats(self, host: SimHost, offset: float) -> None:
        await asyncio.sleep(offset)
        while True:
            if host.enrolled:
                host.report_stats(time.monotonic())
            await asyncio.sleep(self.fleet.stats_interval_s)

    # ----- control port -------------------------------------------------------------------------
    def host_info(self, s: SimHostServer) -> dict[str, Any]:
        return {"name": s.host.name, "address": s.host.address, "fingerprint": s.tls.fingerprint(),
                "enrolled": s.host.enrolled, "silent": not s.host.loud.is_set(), "vms": len(s.host.vms),
                "requests": s.api.requests, "connections": s.http.connections}

    def stats(self) -> dict[str, Any]:
        return {"cpu_s": time.process_time(), "changes": self.fleet.changes,
                "requests": sum(s.api.requests for s in self.servers),
                "connections": sum(s.http.connections for s in self.servers),
                "streams": sum(len(h.listeners) for h in self.fleet.hosts),
                "changes_per_s": self.fleet.changes_per_s, "hosts": len(self.fleet.hosts),
                "enrolled": len(self.fleet.enrolled())}

    async def control_api(self, req: Request) -> Response:
        parts = [p for p in req.path.split("/") if p]
        if req.method == "GET" and parts == ["hosts"]:
            return json_response([self.host_info(s) for s in self.servers])
        if req.method == "GET" and parts == ["stats"]:
            return json_response(self.stats())
        if req.method == "POST" and len(parts) == 3 and parts[0] == "hosts" and parts[2] in LOUDNESS:
            host = self.fleet.by_name(parts[1])
            if host is None:
                raise NotFoundError(f"No simulated host {parts[1]!r}.", hint="GET /hosts lists them.")
            if parts[2] == "silent":
                host.loud.clear()
            else:
                host.loud.set()
            log.info("host %s is %s", host.name, parts[2])
            return json_response({"name": host.name, "silent": not host.loud.is_set()})
        if req.method == "PUT" and parts == ["vms"]:
            count = int(_number(req, "per_host", 0, MAX_VMS_PER_HOST))
            hosts = self._hosts_of(req)
            now = time.monotonic()
            for h in hosts:
                h.set_vm_count(count, now)
            return json_response({"per_host": count, "hosts": [h.name for h in hosts]})
        if req.method == "POST" and parts == ["vms", "power-off"]:
            keep = int(_number(req, "keep", 0, MAX_VMS_PER_HOST))
            hosts = self._hosts_of(req)
            now = time.monotonic()
            for h in hosts:
                h.power_off_from(keep, now)
            return json_response({"keep": keep, "hosts": [h.name for h in hosts]})
        if req.method == "PUT" and parts == ["changes"]:
            self.fleet.changes_per_s = _number(req, "per_s", 0, 100_000)
            return json_response({"per_s": self.fleet.changes_per_s})
        raise NotFoundError(f"The control port has no route {req.method} {req.path}.",
                            hint="See 'vmshift-hostsim --help' for its routes.")


    def _hosts_of(self, req: Request) -> list[SimHost]:
        """The hosts a body's optional "hosts" names (all when it names none)."""
        names = req.json().get("hosts")
        if names is None:
            return self.fleet.hosts
        hosts = [self.fleet.by_name(n) if isinstance(n, str) else None for n in names]
        unknown = [n for n, h in zip(names, hosts, strict=True) if h is None]
        if unknown:
            raise NotFoundError(f"No simulated host {unknown[0]!r}.", hint="GET /hosts lists them.")
        return [h for h in hosts if h is not None]


def _number(req: Request, key: str, low: float, high: float) -> float:
    try:
        value = req.json()[key]
    except (ValueError, KeyError, TypeError) as e:
        raise InvalidInputError(f"The body must be a JSON object with {key!r}.",
                                hint=f'e.g. {{"{key}": 10}}') from e
    if not isinstance(value, int | float) or isinstance(value, bool) or not low <= value <= high:
        raise InvalidInputError(f"{key}={value!r} is not a number from {low:g} to {high:g}.",
                                hint="Pick a value in that range.")
    return float(value)


def build(args: argparse.Namespace) -> Simulator:
    rng = random.Random(args.seed)
    hosts = [SimHost(host_name(args.prefix, i + 1), args.vms, rng) for i in range(args.hosts)]
    servers = []
    for i, host in enumerate(hosts):
        port = args.base_port + i if args.base_port else 0
        config = AgentConfig(name=host.name, listen=f"127.0.0.1:{port}",
                             state_dir=args.state_dir / host.name, ca_file=args.ca_file,
                             management_address="127.0.0.1", migration_address="127.0.0.1")
        tls = AgentTls(config)
        host.enrolled = tls.files.enrolled  # a restarted simulator keeps its issued certificates
        api = SimAgentApi(host, tls)
        http = HttpServer(api.handle, port=port, context=tls.context())
        servers.append(SimHostServer(host, api, http, tls))
    return Simulator(Fleet(hosts, args.changes_per_s, args.stats_interval, rng), servers)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vmshift-hostsim", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hosts", type=int, default=8, help="simulated hosts (default 8)")
    p.add_argument("--vms", type=int, default=104, help="VMs per host (default 104)")
    p.add_argument("--ca-file", type=Path, required=True, help="the cluster CA (vmshift-server ca show)")
    p.add_argument("--state-dir", type=Path, required=True, help="certificates of each host: DIR/HOST/tls")
    p.add_argument("--prefix", default="sim", help="host names: PREFIX-001, PREFIX-002, ...")
    p.add_argument("--base-port", type=int, default=0, help="first host's port (default: free ports)")
    p.add_argument("--control", default="127.0.0.1:0", help="HOST:PORT of the plain-HTTP control port")
    p.add_argument("--changes-per-s", type=float, default=10.0, help="VM state changes per second in all")
    p.add_argument("--stats-interval", type=float, default=DEFAULT_STATS_INTERVAL_S,
                   help="seconds between a host's stats reports on its stream")
    p.add_argument("--seed", type=int, default=1, help="random seed of the VMs' numbers and changes")
    p.add_argument("--log-level", default="warning")
    return p


def check(args: argparse.Namespace) -> None:
    if not 1 <= args.hosts <= MAX_HOSTS:
        raise InvalidInputError(f"--hosts {args.hosts} is out of range.", hint=f"Use 1 to {MAX_HOSTS}.")
    if not 0 <= args.vms <= MAX_VMS_PER_HOST:
        raise InvalidInputError(f"--vms {args.vms} is out of range.", hint=f"Use 0 to {MAX_VMS_PER_HOST}.")
    if args.stats_interval <= 0 or args.changes_per_s < 0:
        raise InvalidInputError("--stats-interval must be positive and --changes-per-s not negative.",
                                hint="e.g. --stats-interval 10 --changes-per-s 10")
    if not args.ca_file.is_file():
        raise InvalidInputError(f"The CA file {args.ca_file} does not exist.",
                                hint="Give the server's CA ('vmshift-server ca show > ca.pem').")


async def serve(args: argparse.Namespace) -> None:
    sim = build(args)
    host, _, port = args.control.rpartition(":")
    await sim.start(host or "127.0.0.1", int(port))
    print(json.dumps({"control": f"{sim.control.host}:{sim.control.port}", "hosts": len(sim.servers)}),
          flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await sim.stop()


def run(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        check(args)
        asyncio.run(serve(args))
    except VmshiftError as e:
        print(f"vmshift-hostsim: {e.message} {e.hint or ''}".rstrip(), file=sys.stderr)
        raise SystemExit(2) from e
