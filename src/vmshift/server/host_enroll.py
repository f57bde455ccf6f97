"""Adding a host's certificate: confirm the agent's fingerprint, then issue it one from the cluster CA.

First contact is like SSH's: the agent serves a self-signed bootstrap certificate nobody vouches
for, so the server connects without verifying it (presenting its own certificate, which the agent
does verify), reads its fingerprint and goes on only if the operator confirmed that fingerprint.
Every answer of the enrollment is checked to come over a connection with that same certificate.
Then the agent makes a key and a CSR, the server signs it (role host, CN = the host's name, SANs =
its addresses) and the agent serves the issued certificate from then on; the server verifies it
against the CA like every later call. ``rotate`` repeats the CSR/sign/install over a verified
connection (docs/agent-tls.md).
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from vmshift.client.agent import API_PREFIX, AgentClient, AgentCredentials, AgentHealth
from vmshift.errors import ApiError, ConflictError, HostUnreachableError
from vmshift.model.host import HostFacts
from vmshift.tls import pki
from vmshift.tls.contexts import unverified_context
from vmshift.tls.files import ServerTlsFiles


class FingerprintError(ConflictError):
    """The operator has not confirmed the agent's certificate (or confirmed another one)."""

    code = "fingerprint_unconfirmed"

    def __init__(self, message: str, *, fingerprint: str, hint: str) -> None:
        super().__init__(message, hint=hint)
        self.fingerprint = fingerprint


@dataclass(frozen=True)
class Enrolled:
    name: str
    facts: HostFacts
    fingerprint: str  # of the issued certificate the agent serves now
    not_after: datetime


def _peer_fingerprint(resp: httpx.Response) -> str | None:
    stream = resp.extensions.get("network_stream")
    ssl_object = stream.get_extra_info("ssl_object") if stream is not None else None
    der = ssl_object.getpeercert(binary_form=True) if isinstance(ssl_object, ssl.SSLObject) else None
    return pki.fingerprint(der) if der else None


class _Pinned:
    """HTTP to one agent over TLS whose peer certificate must have ``expected`` (None: only read
    it): every answer is checked, so no other certificate can slip in between two requests."""

    def __init__(self, address: str, files: ServerTlsFiles, timeout_s: float) -> None:
        self.address = address
        self.expected: str | None = None
        self.seen: str | None = None
        self._http = httpx.AsyncClient(
            base_url=f"https://{address}{API_PREFIX}", trust_env=False, timeout=timeout_s,
            verify=unverified_context(cert=files.cert, key=files.key))

    async def aclose(self) -> None:
        await self._http.aclose()

    async def call(self, method: str, path: str, json: Any = None) -> Any:
        try:
            resp = await self._http.request(method, path, json=json)
        except httpx.HTTPError as exc:
            raise HostUnreachableError(
                f"The agent at {self.address} cannot be reached over TLS ({type(exc).__name__}).",
                hint="Check the address and that vmshift-agent runs there with its 'ca_file' set to "
                "this server's CA.") from exc
        self.seen = _peer_fingerprint(resp)
        if self.expected is not None and self.seen != self.expected:
            raise ConflictError(f"The agent at {self.address} changed its certificate during the "
                                "enrollment.", hint="Add the host again and compare the fingerprint.")
        if resp.status_code >= 400:
            raise ApiError.from_response(resp, f"The agent at {self.address} answered HTTP "
                                               f"{resp.status_code}.")
        return resp.json()


def host_sans(address: str, facts: HostFacts) -> list[str]:
    host = address.rpartition(":")[0].strip("[]")
    return [n for n in dict.fromkeys([facts.name, host, facts.management_address, facts.migration_address])
            if n]


CsrFn = Callable[[], Awaitable[str]]
InstallFn = Callable[[str, str], Awaitable[Any]]


async def _issue(csr: CsrFn, install: InstallFn, files: ServerTlsFiles, name: str,
                 sans: list[str]) -> tuple[str, datetime]:
    cert = pki.issue(files.ca(), (await csr()).encode(), common_name=name, role=pki.Role.HOST, sans=sans)
    await install(cert.decode(), files.ca_cert.read_text())
    got = pki.info(cert)
    return got.fingerprint, got.not_after


async def enroll(address: str, confirmed: str | None, state_dir: Path, timeout_s: float,
                 check_new: Any = None) -> Enrolled:
    """Confirm, then enroll the agent at ``address``; ``check_new(name)`` may refuse the host
    (already in the inventory) before anything is issued. Raises FingerprintError (409) when
    ``confirmed`` is missing or is not the agent's fingerprint: nothing happened then."""
    files = ServerTlsFiles.of(state_dir)
    pinned = _Pinned(address, files, timeout_s)
    try:
        health = AgentHealth.model_validate(await pinned.call("GET", "/health"))
        actual = pinned.seen
        if actual is None:
            raise HostUnreachableError(f"The agent at {address} presented no certificate.",
                                       hint="Check that vmshift-agent runs there.")
        if confirmed is None:
            raise FingerprintError(
                f"Confirm the certificate of the agent at {address} ({health.name}): its fingerprint is "
                f"{actual}.", fingerprint=actual,
                hint=f"Compare it with 'vmshift-agent --config FILE fingerprint' on the host, then add it "
                f"with --fingerprint {actual}.")
        if pki.normalise_fingerprint(confirmed) != actual:
            raise FingerprintError(
                f"The agent at {address} presents certificate {actual}, not the confirmed "
                f"{pki.normalise_fingerprint(confirmed)}.", fingerprint=actual,
                hint="Someone may be in between, or the agent made a new certificate: check on the host "
                "with 'vmshift-agent --config FILE fingerprint'.")
        pinned.expected = actual
        if check_new is not None:
            check_new(health.name)
        facts = HostFacts.model_validate(await pinned.call("GET", "/facts"))
        async def csr() -> str:
            return str((await pinned.call("POST", "/tls/csr"))["csr_pem"])

        async def install(cert_pem: str, ca_pem: str) -> Any:
            return await pinned.call("PUT", "/tls/cert", {"cert_pem": cert_pem, "ca_pem": ca_pem})

        fingerprint, not_after = await _issue(csr, install, files, facts.name, host_sans(address, facts))
    finally:
        await pinned.aclose()
    return Enrolled(facts.name, facts, fingerprint, not_after)


async def rotate(name: str, address: str, state_dir: Path, timeout_s: float) -> tuple[str, datetime]:
    """A new key, CSR and certificate for a host already added (over a verified connection)."""
    client = AgentClient(address, AgentCredentials.of_server(state_dir), timeout_s=timeout_s)
    files = ServerTlsFiles.of(state_dir)
    try:
        facts = await client.facts()
        return await _issue(client.tls_csr, client.tls_install, files, name, host_sans(address, facts))
    finally:
        await client.aclose()
