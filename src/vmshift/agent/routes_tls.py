"""Enrollment routes (the server only, see agent/access.py): the agent makes its key and a CSR,
the server signs it, the agent checks and serves the certificate (docs/agent-tls.md)."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from vmshift.agent.tls_server import AgentTls

router = APIRouter(prefix="/api/v1/tls")


class CertificateRequest(BaseModel):
    csr_pem: str


class IssuedCertificate(BaseModel):
    cert_pem: str = Field(max_length=65536)
    ca_pem: str = Field(max_length=65536)


class TlsStatus(BaseModel):
    fingerprint: str = Field(description="of the certificate this agent serves now")
    enrolled: bool = Field(description="it serves a certificate the cluster CA issued")
    not_after: str
    common_name: str
    role: str | None


def _tls(request: Request) -> AgentTls:
    tls: AgentTls = request.app.state.tls
    return tls


@router.get("")
async def tls_status(request: Request) -> TlsStatus:
    return TlsStatus.model_validate(_tls(request).status())


@router.post("/csr")
async def new_csr(request: Request) -> CertificateRequest:
    """A new key (it never leaves the host) and its certificate request."""
    csr = await asyncio.to_thread(_tls(request).new_csr)
    return CertificateRequest(csr_pem=csr.decode())


@router.put("/cert")
async def install_cert(body: IssuedCertificate, request: Request) -> dict[str, Any]:
    """Check the issued certificate (for the pending key, signed by the agent's CA, naming this
    host), keep it, and serve it to new connections."""
    got = await asyncio.to_thread(_tls(request).install, body.cert_pem.encode(), body.ca_pem.encode())
    return {"fingerprint": got.fingerprint, "not_after": got.not_after.isoformat()}
