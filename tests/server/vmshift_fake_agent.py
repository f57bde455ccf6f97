"""A small fake host agent (real HTTP on loopback) for server-only tests, plus a uvicorn-in-a-thread runner.

It speaks the agent API of docs/design/contracts.md with canned facts and an in-memory VM table, and
records every mutating request so tests can assert that a refused request never reached the agent.
Tests may put any runtime into ``vms`` (a copy of another host's VM, a receiving QEMU): ``GET /vms``
reports the table as it is, and ``vm_lists`` counts those requests (one per heartbeat).

With ``stream=True`` it also serves ``GET /stream`` like a real agent (model/host_stream.py): it
notices changes of its table every ``TICK_S`` (tests change it directly), numbers them in a
``ChangeLog`` and sends a keepalive every ``keepalive_s``, each counted in ``vm_lists`` too (one report
of the host). Without it, /stream answers 404 like an older agent, which the server polls.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
import ssl
import tempfile
import threading
import time
import zlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from vmshift.model.enums import MIGRATION_RUN_STATES, Accelerator, DatastoreKind, PowerAction, PowerState
from vmshift.model.host import CpuModelInfo, DatastoreInfo, HostFacts
from vmshift.model.host_stream import (
    STREAM_MEDIA_TYPE,
    ChangeLog,
    FactsChanged,
    Keepalive,
    Snapshot,
    StatsReport,
    VmChanged,
    VmRemoved,
    VmStats,
    encode,
    facts_state,
    vm_state,
)
from vmshift.model.vm import VmRuntime, VmSpec
from vmshift.tls import pki
from vmshift.tls.contexts import server_context

TICK_S = 0.05  # how often a streaming fake agent looks for changes of its table
SHARED_DS_UUID = "11111111-0000-4000-8000-000000000001"

CPU_MODELS = [
    CpuModelInfo(name="qemu64"),
    CpuModelInfo(name="Opteron_G1-v1"),
    CpuModelInfo(name="Opteron_G2-v1"),
    CpuModelInfo(name="EPYC-v4", unavailable_features=["avx2", "sha-ni"]),
    CpuModelInfo(name="max"),
    CpuModelInfo(name="Haswell-v1", unavailable_features=["avx2"]),
]


def make_facts(
    name: str, *, memory_mib: int = 2048, shared: bool = True, cpu_models: list[CpuModelInfo] | None = None
) -> HostFacts:
    stores = [
        DatastoreInfo(
            uuid=f"22222222-0000-4000-8000-{zlib.crc32(name.encode()):012d}",
            name=f"local-{name}",
            path=f"/srv/{name}/local",
            capacity_mib=10_000,
            free_mib=9_000,
            images=["lab-guest"],
        )
    ]
    if shared:
        stores.insert(
            0,
            DatastoreInfo(
                uuid=SHARED_DS_UUID,
                name="shared-1",
                path="/srv/shared-1",
                capacity_mib=50_000,
                free_mib=40_000,
                images=["lab-disk", "lab-guest"],
                disk_images={"lab-disk": 20},
            ),
        )
    return HostFacts(
        name=name,
        cpu_vendor="AuthenticAMD",
        cpu_model="fake",
        cpus=2,
        qemu_version="10.0.2",
        machine_types=["pc-i440fx-9.2", "pc-i440fx-10.0", "pc-q35-9.2", "pc-q35-10.0", "microvm"],
        default_machine_type="pc-q35-10.0",
        cpu_models=cpu_models or list(CPU_MODELS),
        accelerator=Accelerator.TCG,
        memory_total_mib=memory_mib,
        memory_free_mib=memory_mib // 2,
        datastores=stores,
        networks={"VM Network": "br0"},
        management_address="127.0.0.1",
        migration_address="127.0.0.1",
    )


@contextlib.contextmanager
def pem_files(cert_pem: bytes, key_pem: bytes) -> Iterator[tuple[Path, Path]]:
    """ssl loads certificates from files only: these exist while the context loads them."""
    with tempfile.TemporaryDirectory(prefix="fake-agent-") as tmp:
        cert, key = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
        cert.write_bytes(cert_pem)
        key.write_bytes(key_pem)
        yield cert, key


class FakeAgentTls:
    """A fake agent's HTTPS like the real one's: a self-signed bootstrap certificate until the
    server enrolls it (POST /tls/csr, PUT /tls/cert), then the issued one; once enrolled it
    requires the caller's certificate from the CA it was given (the server's)."""

    def __init__(self, name: str) -> None:
        self.name = name
        boot = pki.self_signed(name, [name, "127.0.0.1"])
        self.bootstrap_fingerprint = pki.fingerprint(boot.cert_pem)
        with pem_files(boot.cert_pem, boot.key_pem) as (cert, key):
            self.context = server_context(cert, key)
        self.pending_key: bytes | None = None
        self.issued: list[str] = []  # fingerprints of the certificates it was given, in order

    def csr(self) -> str:
        pair = pki.make_key_and_csr(self.name)
        self.pending_key = pair.key_pem
        return pair.cert_pem.decode()

    def install(self, cert_pem: str, ca_pem: str) -> str:
        assert self.pending_key is not None, "PUT /tls/cert before POST /tls/csr"
        info = pki.check_issued(cert_pem.encode(), self.pending_key, ca_pem.encode(), common_name=self.name)
        with pem_files(cert_pem.encode(), self.pending_key) as (cert, key):
            self.context.load_cert_chain(cert, key)
        self.context.load_verify_locations(cadata=ca_pem)
        self.context.verify_mode = ssl.CERT_REQUIRED
        self.issued.append(info.fingerprint)
        return info.fingerprint


@dataclass
class FakeAgent:
    facts: HostFacts
    vms: dict[str, VmRuntime] = field(default_factory=dict)
    specs: dict[str, VmSpec] = field(default_factory=dict)
    mutations: list[tuple[str, str]] = field(default_factory=list)
    define_delay_s: float = 0.0
    fail_define: bool = False
    vm_lists: int = 0  # GET /vms requests so far
    power_requests: list[tuple[str, PowerAction, int]] = field(default_factory=list)  # (vm, action, vm_lists)
    stream: bool = False  # serve GET /stream (else 404: an agent the server polls)
    keepalive_s: float = 0.2  # a real agent's is KEEPALIVE_INTERVAL_S; fast here like the tests' polls
    silent: bool = False  # open streams send nothing (the TCP connection stays up)
    down: bool = False  # GET /stream answers 503 and open streams end (a cut that lasts)
    repeat_tail: int = 0  # a resumed stream sends this many changes the server already has first
    stream_opens: list[dict[str, Any]] = field(default_factory=list)  # the query of each GET /stream
    open_streams: int = 0  # streams being served now
    imports: dict[str, dict[str, Any]] = field(default_factory=dict)  # image imports, by image name
    loads: dict[str, float] = field(default_factory=dict)  # cores busy per VM in its stats (DRS tests)
    ovas: dict[str, dict[str, Any]] = field(default_factory=dict)  # OVA path -> what POST /images/ova reads
    removed_images: list[str] = field(default_factory=list)  # DELETE /images/DS/NAME, in order
    dead_portals: set[str] = field(default_factory=set)  # POST /datastores/iscsi: these do not answer
    portal_timeout_s: float = 0.0  # ... after this long (a real agent waits 3 s)
    unregistered: list[str] = field(default_factory=list)  # DELETE /datastores/NAME, in order
    kept_datastores: set[str] = field(default_factory=set)  # DELETE /datastores/NAME: 409, a VM of its own
    tls: FakeAgentTls = field(init=False)
    log: ChangeLog = field(init=False)

    def __post_init__(self) -> None:
        self.tls = FakeAgentTls(self.facts.name)
        self.restart_log()

    def restart_log(self) -> None:
        """A new epoch, as after an agent restart."""
        self.log = ChangeLog(epoch=secrets.token_hex(4))
        self._published: dict[str, dict[str, Any]] = {}
        self._published_facts: dict[str, Any] | None = None
        self._published_numbers: tuple[dict[str, tuple[float, float]], dict[str, float]] = ({}, {})
        self._stats_due = False  # a snapshot went out: send the numbers again (it carries none)
        self._cuts = getattr(self, "_cuts", 0) + 1

    def cut(self) -> None:
        """End every open stream now (the server reconnects)."""
        self._cuts += 1

    def publish(self) -> None:
        """Number whatever changed in the table or the facts since the last look."""
        vms = list(self.vms.items())
        now = {name: vm_state(rt) for name, rt in vms}
        for name, state in now.items():
            if self._published.get(name) != state:
                self.log.append(VmChanged(epoch=self.log.epoch, seq=self.log.next_seq(),
                                         vm=self.vms[name].model_copy()))
        for name in [n for n in self._published if n not in now]:
            self.log.append(VmRemoved(epoch=self.log.epoch, seq=self.log.next_seq(), name=name))
        self._published = now
        numbers = ({name: (rt.cpu_seconds, rt.rss_mib) for name, rt in vms}, dict(self.loads))
        # a real agent reports them every stats_interval_s; this one when they change, and after a
        # snapshot (else a server that connected after the last change would never hear them)
        if numbers != self._published_numbers or self._stats_due:
            self._published_numbers, self._stats_due = numbers, False
            stats = [VmStats(name=n, cpu_seconds=c, rss_mib=r, cpu_cores=self.loads.get(n, 0.0))
                     for n, (c, r) in numbers[0].items()]
            self.log.append(StatsReport(epoch=self.log.epoch, seq=self.log.next_seq(), vms=stats,
                                        memory_free_mib=self.facts.memory_free_mib, cpus=self.facts.cpus,
                                        memory_total_mib=self.facts.memory_total_mib))  # fmt: skip
        facts = facts_state(self.facts)
        if self._published_facts is not None and facts != self._published_facts:
            self.log.append(FactsChanged(epoch=self.log.epoch, seq=self.log.next_seq(), facts=self.facts))
        self._published_facts = facts

    async def _stream(self, epoch: str | None, since: int | None) -> AsyncIterator[bytes]:
        self.open_streams += 1
        try:
            async for line in self._lines(epoch, since):
                yield line
        finally:
            self.open_streams -= 1

    async def _lines(self, epoch: str | None, since: int | None) -> AsyncIterator[bytes]:
        generation = self._cuts
        self.publish()
        log = self.log
        changes = log.since(epoch, since)
        if changes is None:
            vms = [rt.model_copy() for rt in self.vms.values()]
            yield encode(Snapshot(epoch=log.epoch, seq=log.last_seq, facts=self.facts, vms=vms))
            self._stats_due = True
        else:
            if self.repeat_tail and since is not None:
                changes = log.since(epoch, max(0, since - self.repeat_tail)) or changes
            for c in changes:
                yield encode(c)
        sent, last_keepalive = log.last_seq, time.monotonic()
        while generation == self._cuts and not self.down:
            await asyncio.sleep(TICK_S)
            if self.silent:
                continue
            self.publish()
            for c in log.since(log.epoch, sent) or []:
                yield encode(c)
                sent = c.seq
            if time.monotonic() - last_keepalive >= self.keepalive_s:
                last_keepalive = time.monotonic()
                self.vm_lists += 1
                yield encode(Keepalive(epoch=log.epoch, seq=sent, time=time.time()))

    def app(self) -> FastAPI:
        app = FastAPI()
        app.state.on_stop = self.cut  # UvicornThread.stop: open streams end, as a stopping agent's do

        @app.middleware("http")
        async def record(request: Request, call_next: Any) -> Any:
            if request.method != "GET" and not request.url.path.startswith("/api/v1/tls"):
                self.mutations.append((request.method, request.url.path))
            return await call_next(request)

        @app.get("/api/v1/health")
        async def health() -> dict[str, Any]:
            return {"name": self.facts.name, "time": time.time()}

        @app.post("/api/v1/tls/csr")
        async def tls_csr() -> dict[str, Any]:
            return {"csr_pem": self.tls.csr()}

        @app.put("/api/v1/tls/cert")
        async def tls_cert(body: dict[str, Any]) -> dict[str, Any]:
            return {"fingerprint": self.tls.install(body["cert_pem"], body["ca_pem"])}

        @app.get("/api/v1/facts")
        async def facts() -> dict[str, Any]:
            return self.facts.model_dump(mode="json")

        @app.get("/api/v1/vms")
        async def vms() -> list[dict[str, Any]]:
            self.vm_lists += 1
            return [rt.model_dump(mode="json") for rt in self.vms.values()]

        @app.get("/api/v1/stream")
        async def stream(epoch: str | None = None, since: int | None = None) -> Any:
            self.stream_opens.append({"epoch": epoch, "since": since})
            if not self.stream:
                error = {"code": "not_found", "message": "Not Found", "hint": None}
                return JSONResponse({"error": error}, 404)
            if self.down:
                error = {"code": "host_unreachable", "message": "down", "hint": None}
                return JSONResponse({"error": error}, 503)
            return StreamingResponse(self._stream(epoch, since), media_type=STREAM_MEDIA_TYPE)

        @app.post("/api/v1/images/import", status_code=202)
        async def import_image(body: dict[str, Any]) -> Any:
            """A file named .../corrupt* is refused as the real agent refuses a damaged one; any other
            is imported at once: the image joins the datastore's disk images in the facts."""
            damaged = Path(body["file"]).name, body.get("member") or ""
            if any(n.startswith("corrupt") for n in damaged):
                error = {"code": "invalid_input", "message": f"The file {body['file']} is corrupt.",
                         "hint": "Copy the file again."}
                return JSONResponse({"error": error}, 400)
            for ds in self.facts.datastores:
                if ds.name == body["datastore"]:
                    ds.images.append(body["name"])
                    ds.disk_images[body["name"]] = 10
            job = {"name": body["name"], "datastore": body["datastore"], "source": body["file"],
                   "format": body.get("format") or "qcow2", "virtual_size_mib": 10, "state": "done",
                   "share": 1.0}
            self.imports[body["name"]] = job
            return job

        @app.get("/api/v1/images/import/{name}")
        async def import_progress(name: str) -> Any:
            return self.imports[name]

        @app.post("/api/v1/images/ova")
        async def inspect_ova(body: dict[str, Any]) -> Any:
            """The OVAs of ``ovas``; any other file is refused as a real agent refuses a tar without
            a descriptor."""
            found = self.ovas.get(body["file"])
            if found is None:
                error = {"code": "invalid_input", "hint": "Export it again.",
                         "message": f"The file {body['file']} holds no OVF descriptor."}
                return JSONResponse({"error": error}, 400)
            return found

        @app.delete("/api/v1/images/{datastore}/{name}")
        async def delete_image(datastore: str, name: str) -> Any:
            self.removed_images.append(name)
            for ds in self.facts.datastores:
                if ds.name == datastore and name in ds.images:
                    ds.images.remove(name)
                    ds.disk_images.pop(name, None)
            return {"removed": name}

        @app.post("/api/v1/datastores/iscsi", status_code=201)
        async def register_iscsi(body: dict[str, Any]) -> Any:
            """As the real agent, without reaching anything: the test names the dead portals."""
            if body["portal"] in self.dead_portals:
                await asyncio.sleep(self.portal_timeout_s)
                error = {"code": "invalid_input", "hint": "Check the address and port.",
                         "message": f"The iSCSI portal {body['portal']} does not answer from host "
                                    f"{self.facts.name} (no answer in 3 s)."}
                return JSONResponse({"error": error}, 400)
            ds = DatastoreInfo(uuid=body["uuid"], name=body["name"], path=f"/srv/{body['name']}",
                               capacity_mib=1000, free_mib=900, kind=DatastoreKind.ISCSI,
                               portal=body["portal"], target=body["target"])
            self.facts.datastores.append(ds)
            return ds.model_dump(mode="json")

        @app.delete("/api/v1/datastores/{name}")
        async def unregister(name: str) -> Any:
            if name in self.kept_datastores:
                error = {"code": "conflict", "hint": "Move or delete those VMs first.",
                         "message": f"Datastore {name!r} still holds VM db-9 on this host."}
                return JSONResponse({"error": error}, 409)
            self.unregistered.append(name)
            self.facts.datastores = [d for d in self.facts.datastores if d.name != name]
            return {"removed": name}

        @app.put("/api/v1/vms/{name}")
        async def define(name: str, spec: VmSpec) -> Any:
            if self.define_delay_s:
                await asyncio.sleep(self.define_delay_s)  # models a slow host, not used for synchronisation
            if self.fail_define:
                return JSONResponse(
                    {"error": {"code": "qemu_error", "message": "qemu-img failed.", "hint": None}}, 500
                )
            self.specs[name] = spec
            rt = self.vms.get(name) or VmRuntime(
                name=name, uuid=spec.uuid, power_state=PowerState.POWERED_OFF
            )
            self.vms[name] = rt
            return rt.model_dump(mode="json")

        @app.post("/api/v1/vms/{name}/power")
        async def power(name: str, body: dict[str, Any]) -> Any:
            rt = self.vms.get(name)
            action = PowerAction(body["action"])
            self.power_requests.append((name, action, self.vm_lists))
            if rt is None:
                return JSONResponse({"error": {"code": "not_found", "message": "no VM", "hint": None}}, 404)
            if rt.power_state is PowerState.SUSPENDED and action in (PowerAction.START, PowerAction.RESUME):
                rt.power_state, rt.pid, rt.qemu_status = PowerState.POWERED_ON, 4242, "running"  # resumed
                return rt.model_dump(mode="json")
            if action in (PowerAction.PAUSE, PowerAction.RESUME):
                refused = not rt.has_qemu or (
                    action is PowerAction.RESUME
                    and (not rt.is_the_vm or rt.qemu_status in MIGRATION_RUN_STATES)
                )
                if refused:
                    return JSONResponse(
                        {"error": {"code": "conflict", "message": f"cannot {action}", "hint": None}}, 409
                    )
                rt.power_state = PowerState.PAUSED if action is PowerAction.PAUSE else PowerState.POWERED_ON
                rt.qemu_status = "paused" if action is PowerAction.PAUSE else "running"
                return rt.model_dump(mode="json")
            on = action in (PowerAction.START, PowerAction.RESET)
            rt.power_state = PowerState.POWERED_ON if on else PowerState.POWERED_OFF
            rt.died, rt.pid, rt.qemu_status = False, 4242 if on else None, "running" if on else None
            return rt.model_dump(mode="json")

        @app.post("/api/v1/vms/{name}/suspend")
        async def suspend(name: str) -> Any:
            rt = self.vms.get(name)
            if rt is None or not rt.has_qemu:
                error = {"code": "conflict", "message": "not running", "hint": None}
                return JSONResponse({"error": error}, 409)
            rt.power_state, rt.pid, rt.qemu_status = PowerState.SUSPENDED, None, None
            return {"runtime": rt.model_dump(mode="json"), "state_file": f"/ds/{name}/suspended.state",
                    "file_bytes": 1 << 28, "allocated_bytes": 1 << 27, "memory_bytes": 1 << 28,
                    "written_bytes": 1 << 27, "save_s": 0.1, "write_bps": 1 << 30, "total_s": 0.2,
                    "direct_io": True}

        @app.get("/api/v1/vms/{name}/suspend")
        async def suspend_progress(name: str) -> Any:
            return JSONResponse({"error": {"code": "not_found", "message": "none", "hint": None}}, 404)

        @app.delete("/api/v1/vms/{name}")
        async def delete(name: str) -> Any:
            rt = self.vms.get(name)
            if rt is None:
                return JSONResponse({"error": {"code": "not_found", "message": "no VM", "hint": None}}, 404)
            if rt.has_qemu:
                return JSONResponse({"error": {"code": "conflict", "message": "running", "hint": None}}, 409)
            del self.vms[name]
            self.specs.pop(name, None)
            return JSONResponse({}, 200)

        return app


class UvicornThread:
    """Serve an ASGI app on 127.0.0.1 in a thread; ``port`` 0 picks a free one (kept across restarts).
    ``config`` goes to ``uvicorn.Config`` (e.g. ``ssl_certfile``/``ssl_keyfile`` to serve HTTPS)."""

    def __init__(self, app: Any, port: int = 0, tls: FakeAgentTls | None = None, **config: Any) -> None:
        self.app = app
        self.port = port
        self.tls = tls  # None: no client certificates asked (e.g. the server under test, **config: its TLS)
        self.config = config
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._sock = socket.socket()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 30.0) -> UvicornThread:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        self.port = sock.getsockname()[1]
        tls = self.tls
        extra: dict[str, Any] = dict(self.config)
        if tls is not None:
            extra["ssl_context_factory"] = lambda _config, _default: tls.context
        config = uvicorn.Config(self.app, log_level="warning", lifespan="auto", **extra)
        self._server = server = uvicorn.Server(config)
        self._thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the server thread exited during start-up")
            if time.monotonic() > deadline:
                raise TimeoutError("the server did not start in time")
            time.sleep(0.02)
        self._sock = sock
        return self

    def stop(self, force: bool = False) -> None:
        """Graceful stop; ``force`` does not wait for requests in flight (a hung fake agent)."""
        on_stop = getattr(getattr(self.app, "state", None), "on_stop", None)
        if on_stop is not None:
            on_stop()
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._server.force_exit = force
            self._thread.join(timeout=30)
            self._server = self._thread = None
            self._sock.close()
