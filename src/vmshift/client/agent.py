"""HTTP client of one host agent; maps transport failures and error answers into the vmshift error tree.

The server uses it for every host, and a source agent uses it to talk to the target agent of a
migration: one client per peer, one place where httpx exceptions become vmshift errors.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from pydantic import BaseModel, TypeAdapter, ValidationError

from vmshift.errors import ApiError, HostUnreachableError, StreamUnsupportedError
from vmshift.model.agent_migration import (
    DirtyRate,
    DirtyRateRequest,
    Incoming,
    IncomingRequest,
    IncomingState,
    Measurement,
    MeasureRequest,
    MigrationProgress,
    OutgoingMigration,
    Sink,
    SinkRequest,
)
from vmshift.model.enums import PowerAction
from vmshift.model.host import DatastoreInfo, HostFacts
from vmshift.model.host_stream import STREAM_PATH, Change, Keepalive, Snapshot, decode
from vmshift.model.images import AgentImageImport, ImportProgress, OvaContents, OvaRequest
from vmshift.model.iscsi import AgentIscsiDatastore
from vmshift.model.moves import DiskExportRequest, DiskExports, DiskMoveRequest, MoveProgress
from vmshift.model.suspend import SuspendProgress, SuspendResult
from vmshift.model.vm import VmRuntime, VmSpec
from vmshift.tls.contexts import client_context
from vmshift.tls.files import HostTlsFiles, ServerTlsFiles
from vmshift.tls.peer import CAPABILITY_HEADER

API_PREFIX = "/api/v1"
_RUNTIMES = TypeAdapter(list[VmRuntime])


class AgentHealth(BaseModel):
    name: str
    time: float


@dataclass(frozen=True)
class AgentCredentials:
    """How a caller proves itself to an agent: a TLS context that verifies agents against the
    cluster CA and presents the caller's certificate, plus headers (a migration's capability)."""

    ssl: ssl.SSLContext | None
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of_server(cls, state_dir: Path) -> AgentCredentials:
        """The server: its own certificate (``ServerTlsFiles.ensure`` made it)."""
        files = ServerTlsFiles.of(state_dir)
        return cls(client_context(files.ca_cert, cert=files.cert, key=files.key))

    @classmethod
    def of_host(cls, state_dir: Path, capability: str) -> AgentCredentials:
        """A source agent calling its migration's target: the host's issued certificate and the
        capability the server minted for that migration."""
        files = HostTlsFiles.of(state_dir)
        return cls(client_context(files.ca_cert, cert=files.cert, key=files.key),
                   {CAPABILITY_HEADER: capability})


class AgentClient:
    """One agent at ``address`` (HOST:PORT). Owns an ``httpx.AsyncClient``: call ``aclose``.

    The connection is kept alive between calls (httpx's pool), so a source agent's call to the
    target at the switchover costs no TCP handshake. Proxy variables are ignored (``trust_env``
    off): agents talk directly on the management or migration network.
    """

    def __init__(
        self,
        address: str,
        credentials: AgentCredentials,
        *,
        timeout_s: float = 10.0,
        connect_timeout_s: float = 3.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.address = address
        self._connect_timeout_s = connect_timeout_s
        self._http = httpx.AsyncClient(
            base_url=f"{'https' if credentials.ssl is not None else 'http'}://{address}{API_PREFIX}",
            headers=credentials.headers,
            verify=credentials.ssl if credentials.ssl is not None else True,
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, connect_timeout_s)),
            transport=transport,
            trust_env=False,
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, Any] | None = None,
        timeout_s: float | None = None,
    ) -> httpx.Response:
        extra: dict[str, Any] = {}
        if timeout_s is not None:
            extra["timeout"] = httpx.Timeout(timeout_s, connect=self._connect_timeout_s)
        try:
            resp = await self._http.request(method, path, json=json, params=params, **extra)
        except httpx.TransportError as e:
            raise self._unreachable(e, f"did not answer {method} {path} in time") from e
        if resp.status_code >= 400:
            raise _error_from(resp, self.address)
        return resp

    def _unreachable(self, e: httpx.TransportError, timed_out: str) -> HostUnreachableError:
        """The one translation of httpx's transport errors (``timed_out``: what a timeout means)."""
        if isinstance(e, httpx.TimeoutException):
            return HostUnreachableError(f"The agent at {self.address} {timed_out}.",
                                        hint="Check that the host is up and the agent is running.")
        if _tls_refused(e):
            return HostUnreachableError(
                f"The agent at {self.address} failed the TLS check ({_tls_refused(e)}).",
                hint="Its certificate must come from the cluster CA and name this address; "
                "re-add the host ('vmshift host add') or rotate its certificate.",
            )
        return HostUnreachableError(
            f"The agent at {self.address} cannot be reached ({type(e).__name__}).",
            hint="Check the address, that vmshift-agent runs there, and the network.",
        )

    async def stream(
        self, params: Mapping[str, str | int], *, silence_s: float
    ) -> AsyncIterator[Snapshot | Change | Keepalive]:
        """The host stream (model/host_stream.py), message by message, until the agent ends it.

        Raises HostUnreachableError when nothing arrived for ``silence_s`` (the agent sends a
        keepalive each second) or the connection broke, StreamUnsupportedError for an agent without
        the stream, ApiError for an answer it cannot read."""
        timeout = httpx.Timeout(silence_s, connect=min(silence_s, self._connect_timeout_s))
        try:
            async with self._http.stream("GET", STREAM_PATH, params=dict(params), timeout=timeout) as resp:
                if resp.status_code == 404:
                    raise StreamUnsupportedError(f"The agent at {self.address} has no host stream.",
                                                 hint="Upgrade it; until then the server polls it.")
                if resp.status_code >= 400:
                    await resp.aread()
                    raise _error_from(resp, self.address)
                async for line in resp.aiter_lines():
                    if not line:
                        continue
                    try:
                        yield decode(line)
                    except ValidationError as e:
                        raise ApiError(f"The agent at {self.address} sent a stream message vmshift "
                                       "does not understand.", status=502, code="bad_agent_answer",
                                       hint="Check that the agent and server versions match.") from e
        except httpx.TransportError as e:
            raise self._unreachable(e, f"sent nothing on its host stream for {silence_s:g} s") from e

    def _parse(self, resp: httpx.Response, model: type[Any]) -> Any:
        try:
            return model.model_validate(resp.json())
        except (ValidationError, ValueError) as e:
            raise ApiError(
                f"The agent at {self.address} sent an answer vmshift does not understand.",
                status=502,
                code="bad_agent_answer",
                hint="Check that the agent and server versions match.",
            ) from e

    async def health(self, timeout_s: float | None = None) -> AgentHealth:
        result: AgentHealth = self._parse(
            await self._request("GET", "/health", timeout_s=timeout_s), AgentHealth
        )
        return result

    async def tls_csr(self) -> str:
        """Enrollment (the server only): the agent makes a new key and answers its CSR."""
        body = (await self._request("POST", "/tls/csr")).json()
        return str(body["csr_pem"])

    async def tls_install(self, cert_pem: str, ca_pem: str) -> dict[str, Any]:
        """Enrollment: the agent checks the certificate against its pending key and CA, serves it."""
        resp = await self._request("PUT", "/tls/cert", json={"cert_pem": cert_pem, "ca_pem": ca_pem})
        body: dict[str, Any] = resp.json()
        return body

    async def facts(self) -> HostFacts:
        result: HostFacts = self._parse(await self._request("GET", "/facts"), HostFacts)
        return result

    async def register_iscsi_datastore(self, req: AgentIscsiDatastore) -> DatastoreInfo:
        """The agent checks the portal and the storage role, then makes the datastore's folder."""
        resp = await self._request("POST", "/datastores/iscsi", json=req.model_dump(mode="json"),
                                   timeout_s=30)
        result: DatastoreInfo = self._parse(resp, DatastoreInfo)
        return result

    async def unregister_datastore(self, name: str) -> None:
        await self._request("DELETE", f"/datastores/{name}", timeout_s=30)

    async def list_vms(self, timeout_s: float | None = None) -> list[VmRuntime]:
        resp = await self._request("GET", "/vms", timeout_s=timeout_s)
        try:
            return _RUNTIMES.validate_python(resp.json())
        except (ValidationError, ValueError) as e:
            raise ApiError(
                f"The agent at {self.address} sent a VM list vmshift does not understand.",
                status=502,
                code="bad_agent_answer",
            ) from e

    async def get_vm(self, name: str) -> VmRuntime:
        result: VmRuntime = self._parse(await self._request("GET", f"/vms/{name}"), VmRuntime)
        return result

    async def define_vm(self, spec: VmSpec) -> VmRuntime:
        resp = await self._request(
            "PUT", f"/vms/{spec.name}", json=spec.model_dump(mode="json"), timeout_s=120
        )
        result: VmRuntime = self._parse(resp, VmRuntime)
        return result

    async def import_image(self, req: AgentImageImport) -> ImportProgress:
        """Check an image file on the host and start converting it onto a datastore (image_import.py)."""
        resp = await self._request("POST", "/images/import", json=req.model_dump(mode="json"), timeout_s=300)
        result: ImportProgress = self._parse(resp, ImportProgress)
        return result

    async def inspect_ova(self, file: str) -> OvaContents:
        """The OVF descriptor and file list of an OVA on the host (nothing written)."""
        resp = await self._request("POST", "/images/ova", json=OvaRequest(file=file).model_dump(mode="json"),
                                   timeout_s=120)
        result: OvaContents = self._parse(resp, OvaContents)
        return result

    async def delete_image(self, datastore: str, name: str) -> None:
        """Remove an image that ``import_image`` made (the undo of an import cut short)."""
        await self._request("DELETE", f"/images/{datastore}/{name}", timeout_s=120)

    async def import_progress(self, name: str) -> ImportProgress:
        result: ImportProgress = self._parse(await self._request("GET", f"/images/import/{name}"),
                                             ImportProgress)
        return result

    async def power(self, name: str, action: PowerAction, timeout_s: int = 30) -> VmRuntime:
        resp = await self._request(
            "POST",
            f"/vms/{name}/power",
            json={"action": action.value, "timeout_s": timeout_s},
            timeout_s=timeout_s + 30,
        )
        result: VmRuntime = self._parse(resp, VmRuntime)
        return result

    async def delete_vm(self, name: str, *, keep_files: bool = False) -> None:
        """Delete the VM and its files here; ``keep_files``: only unregister a stopped VM."""
        params = {"keep_files": "true"} if keep_files else None
        await self._request("DELETE", f"/vms/{name}", params=params, timeout_s=60)

    # -- suspend (docs/suspend.md); resume is the power action RESUME (or START) --------------
    async def suspend(self, name: str, timeout_s: float) -> SuspendResult:
        """Save the VM's state to its folder and stop QEMU; answers when it is suspended, or with
        the error after which the VM runs on. ``timeout_s`` must cover writing its RAM."""
        resp = await self._request("POST", f"/vms/{name}/suspend", timeout_s=timeout_s)
        result: SuspendResult = self._parse(resp, SuspendResult)
        return result

    async def suspend_progress(self, name: str) -> SuspendProgress:
        """The running (or last) suspend of the VM on this host."""
        result: SuspendProgress = self._parse(
            await self._request("GET", f"/vms/{name}/suspend", timeout_s=5), SuspendProgress
        )
        return result

    # -- live migration (docs/design/contracts.md, "Live migration") -------------------------
    async def dirty_rate(self, name: str, seconds: int = 1) -> DirtyRate:
        """Source role: the guest's dirty rate (QMP calc-dirty-rate over ``seconds``)."""
        body = DirtyRateRequest(seconds=seconds).model_dump(mode="json")
        resp = await self._request("POST", f"/vms/{name}/dirty-rate", json=body, timeout_s=seconds + 15)
        result: DirtyRate = self._parse(resp, DirtyRate)
        return result

    async def netperf_sink(self, req: SinkRequest) -> Sink:
        """Target role: open a TCP sink on the migration address for ``req.seconds``."""
        resp = await self._request("POST", "/netperf/sink", json=req.model_dump(mode="json"))
        result: Sink = self._parse(resp, Sink)
        return result

    async def netperf_measure(self, req: MeasureRequest) -> Measurement:
        """Source role: send to a sink from the migration address; reachability and bandwidth."""
        resp = await self._request(
            "POST", "/netperf/measure", json=req.model_dump(mode="json"), timeout_s=req.seconds + 15
        )
        result: Measurement = self._parse(resp, Measurement)
        return result

    async def migration_incoming(self, req: IncomingRequest) -> Incoming:
        """Target role: start the receiving QEMU (``-incoming defer``) and listen."""
        resp = await self._request(
            "POST", "/migrations/incoming", json=req.model_dump(mode="json"), timeout_s=120
        )
        result: Incoming = self._parse(resp, Incoming)
        return result

    async def migration_incoming_state(self, migration_id: int) -> IncomingState:
        """Target role: what the receiving QEMU itself says (run state, incoming stream status)."""
        resp = await self._request("GET", f"/migrations/{migration_id}/incoming")
        result: IncomingState = self._parse(resp, IncomingState)
        return result

    async def migration_activate(self, migration_id: int, timeout_s: float = 40.0) -> VmRuntime:
        """Target role: run the received VM (``cont``, then announce); only after the source's
        QEMU reached ``completed``."""
        resp = await self._request("POST", f"/migrations/{migration_id}/activate", timeout_s=timeout_s)
        result: VmRuntime = self._parse(resp, VmRuntime)
        return result

    async def migration_rollback(self, migration_id: int, timeout_s: float = 60) -> None:
        """Target role: discard the incoming QEMU of a migration (idempotent)."""
        await self._request("DELETE", f"/migrations/{migration_id}", timeout_s=timeout_s)

    async def migration_revoke_grant(self, migration_id: int) -> None:
        """Target role: the migration ended; its source host may call this agent no more."""
        await self._request("DELETE", f"/migrations/{migration_id}/grant", timeout_s=10)

    async def migration_start(self, req: OutgoingMigration) -> MigrationProgress:
        """Source role: start the control loop of an outgoing migration."""
        resp = await self._request("POST", "/migrations", json=req.model_dump(mode="json"), timeout_s=60)
        result: MigrationProgress = self._parse(resp, MigrationProgress)
        return result

    async def migration_progress(
        self, migration_id: int, timeout_s: float | None = None
    ) -> MigrationProgress:
        """Source role: the control loop's latest sample."""
        resp = await self._request("GET", f"/migrations/{migration_id}", timeout_s=timeout_s)
        result: MigrationProgress = self._parse(resp, MigrationProgress)
        return result

    async def migration_finalize(self, migration_id: int, body: dict[str, Any]) -> MigrationProgress:
        """Source role: finish a move left paused on both sides (target unreachable after
        ``completed``)."""
        resp = await self._request(
            "POST", f"/migrations/{migration_id}/finalize", json=body, timeout_s=60
        )
        result: MigrationProgress = self._parse(resp, MigrationProgress)
        return result

    async def migration_cancel(self, migration_id: int) -> MigrationProgress:
        """Source role: cancel; the VM keeps running on the source and the target is rolled back."""
        resp = await self._request("POST", f"/migrations/{migration_id}/cancel", timeout_s=60)
        result: MigrationProgress = self._parse(resp, MigrationProgress)
        return result

    # -- disk moves (model/moves.py; docs/design/contracts.md, "Disk moves") ---------------------
    async def move_start(self, req: DiskMoveRequest) -> MoveProgress:
        """Source role: start copying a VM's files (Storage vMotion, cold or suspended move)."""
        resp = await self._request("POST", "/moves", json=req.model_dump(mode="json"), timeout_s=120)
        result: MoveProgress = self._parse(resp, MoveProgress)
        return result

    async def move_progress(self, move_id: int, timeout_s: float | None = None) -> MoveProgress:
        resp = await self._request("GET", f"/moves/{move_id}", timeout_s=timeout_s)
        result: MoveProgress = self._parse(resp, MoveProgress)
        return result

    async def move_cancel(self, move_id: int) -> MoveProgress:
        """Source role: stop the copy; the VM stays on its original files and the copies are removed."""
        resp = await self._request("POST", f"/moves/{move_id}/cancel", timeout_s=120)
        result: MoveProgress = self._parse(resp, MoveProgress)
        return result

    async def disk_exports_create(self, req: DiskExportRequest) -> DiskExports:
        """Target role: create the VM's disks on the target datastore and export them over NBD."""
        resp = await self._request("POST", "/disk-exports", json=req.model_dump(mode="json"), timeout_s=120)
        result: DiskExports = self._parse(resp, DiskExports)
        return result

    async def disk_exports_delete(self, move_id: int, *, keep_files: bool) -> None:
        """Target role: stop the exports; ``keep_files`` false also removes the files they served."""
        params = {"keep_files": str(keep_files).lower()}
        await self._request("DELETE", f"/disk-exports/{move_id}", params=params, timeout_s=120)


def _tls_refused(exc: BaseException) -> str | None:
    """The TLS failure behind a transport error, if one is (a certificate not from the CA, ...)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return seen.verify_message or "certificate verify failed"
        if isinstance(seen, ssl.SSLError):
            return seen.reason or "TLS error"
        seen = seen.__cause__ or seen.__context__
    return None


def _error_from(resp: httpx.Response, address: str) -> ApiError:
    """Turn an agent's error body into ApiError with the agent's status, code, message and hint."""
    return ApiError.from_response(resp, f"The agent at {address} answered HTTP {resp.status_code}.")


class AgentPool:
    """One client per agent address, reused by the heartbeat loop and tasks."""

    def __init__(self, credentials: AgentCredentials, timeout_s: float = 10.0) -> None:
        self._credentials = credentials
        self._timeout_s = timeout_s
        self._clients: dict[str, AgentClient] = {}

    def get(self, address: str) -> AgentClient:
        client = self._clients.get(address)
        if client is None:
            client = self._clients[address] = AgentClient(address, self._credentials,
                                                             timeout_s=self._timeout_s)
        return client

    async def aclose(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for c in clients:
            await c.aclose()
