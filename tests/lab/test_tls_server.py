"""Issue 9, the user's side of TLS: the lab's server serves HTTPS and clients trust it only through its CA.

No VM is needed: the CLI, the SDK, curl and a bare TLS handshake against the lab's real server.
"""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from tests.lab.helpers import BIN, LabHandle, vmshift
from vmshift.lab.layout import load_record
from vmshift.tls import pki

pytestmark = pytest.mark.lab


def said(proc: subprocess.CompletedProcess[str]) -> str:
    """stderr with the console's line wrapping undone."""
    return " ".join(proc.stderr.split())


def without_ca(lab: LabHandle, tmp_path: Path, **extra: str) -> dict[str, str]:
    """The lab's environment minus every way to the CA (no VMSHIFT_CA_FILE, an empty CLI context)."""
    env = {k: v for k, v in lab.env.items() if k != "VMSHIFT_CA_FILE"}
    return {**env, "VMSHIFT_CONFIG_DIR": str(tmp_path), **extra}


def test_without_the_ca_the_cli_refuses_the_server(lab: LabHandle, tmp_path: Path) -> None:
    proc = vmshift(lab, "host", "list", check=False, env=without_ca(lab, tmp_path))
    err = said(proc)
    assert proc.returncode != 0
    assert "does not verify" in err and lab.server in err, err
    assert "--ca-file" in err and "VMSHIFT_CA_FILE" in err and "vmshift-server ca show" in err
    assert "Traceback" not in err


def test_plain_http_is_refused(lab: LabHandle, tmp_path: Path) -> None:
    plain = lab.server.replace("https://", "http://", 1)
    proc = vmshift(lab, "host", "list", check=False, env={**lab.env, "VMSHIFT_SERVER": plain})
    err = said(proc)
    assert proc.returncode != 0
    assert "plain HTTP" in err and lab.server in err and "--ca-file" in err, err
    # and the server itself does not answer plain HTTP on its port
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{plain}/api/v1/about", headers={"Authorization": f"Bearer {lab.token}"},
                  trust_env=False, timeout=10)


def test_with_the_ca_and_without_a_token_401(lab: LabHandle, tmp_path: Path) -> None:
    r = httpx.get(f"{lab.server}/api/v1/hosts", verify=lab.tls(), trust_env=False, timeout=10)
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    env = {**lab.env, "VMSHIFT_TOKEN": "wrong-token", "VMSHIFT_CONFIG_DIR": str(tmp_path)}
    proc = vmshift(lab, "host", "list", check=False, env=env)
    assert proc.returncode != 0 and "token" in proc.stderr.lower(), proc.stderr


def test_with_the_ca_and_the_token_it_works(lab: LabHandle, tmp_path: Path) -> None:
    env = without_ca(lab, tmp_path)
    hosts = json.loads(vmshift(lab, "--ca-file", lab.ca_file, "host", "list", "--json", env=env).stdout)
    assert sorted(h["name"] for h in hosts) == ["host-1", "host-2"]
    with_env = {**env, "VMSHIFT_CA_FILE": lab.ca_file}
    hosts = json.loads(vmshift(lab, "host", "list", "--json", env=with_env).stdout)
    assert len(hosts) == 2
    curl = subprocess.run(["curl", "-sS", "--fail", "--cacert", lab.ca_file, "-H",
                           f"Authorization: Bearer {lab.token}", f"{lab.server}/api/v1/about"],
                          capture_output=True, text=True, timeout=30)
    assert curl.returncode == 0 and "database" in json.loads(curl.stdout), curl.stderr


def test_ca_show_prints_the_ca_the_server_serves_with(lab: LabHandle) -> None:
    rec = load_record(lab.name)
    assert rec is not None
    show = subprocess.run(
        [str(BIN / "vmshift-server"), "ca", "show", "--state-dir", str(rec.layout.server_dir)],
        capture_output=True, text=True, timeout=30,
    )
    assert show.returncode == 0, show.stderr
    assert show.stdout.startswith("-----BEGIN CERTIFICATE-----")
    assert pki.fingerprint(show.stdout.encode()) in show.stderr
    assert show.stdout.encode() == Path(lab.ca_file).read_bytes()  # what `lab env` exports

    url = urlsplit(lab.server)
    assert url.hostname and url.port
    ctx = ssl.create_default_context(cadata=show.stdout)  # the shown CA and nothing else
    with socket.create_connection((url.hostname, url.port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname=url.hostname) as tls:
        served = tls.getpeercert(binary_form=True)
    assert served is not None
    info = pki.info_from_der(served)
    assert info.role is pki.Role.SERVER and url.hostname in info.sans

    stranger = ssl.create_default_context(cadata=pki.create_ca("not this cluster").cert_pem.decode())
    with socket.create_connection((url.hostname, url.port), timeout=10) as raw, \
            pytest.raises(ssl.SSLCertVerificationError):
        stranger.wrap_socket(raw, server_hostname=url.hostname)
