"""Give each lab host its cluster certificate the way the server issues one at ``host add``.

For tests and benchmarks of the encrypted migration that run at the agent level: a host that holds
an issued certificate already keeps it. The CA is the lab server's (``STATE_DIR/tls``) when it has
one, else a CA made here for the lab (its key is not kept).
"""

from __future__ import annotations

from vmshift.lab.layout import LabRecord
from vmshift.tls import pki
from vmshift.tls.files import HostTlsFiles, ServerTlsFiles, write_private


def host_name(rec: LabRecord, k: int) -> str:
    return rec.host_names.get(str(k), f"host-{k}")


def _cluster_ca(rec: LabRecord) -> pki.KeyPair:
    server = ServerTlsFiles.of(rec.layout.server_dir)
    if server.ca_cert.exists() and server.ca_key.exists():
        return server.ca()
    return pki.create_ca("vmshift lab CA")


def enroll_hosts(rec: LabRecord) -> dict[int, HostTlsFiles]:
    """Every lab host's TLS files, each with an issued certificate (name and addresses as SANs)."""
    lay = rec.layout
    ca: pki.KeyPair | None = None
    files = {}
    for k in lay.host_numbers:
        f = HostTlsFiles.of(lay.agent_state_dir(k))
        if not f.enrolled:
            ca = ca or _cluster_ca(rec)
            name = host_name(rec, k)
            req = pki.make_key_and_csr(name)
            cert = pki.issue(ca, req.cert_pem, common_name=name, role=pki.Role.HOST,
                             sans=[name, lay.host_mgmt_address(k), lay.host_mig_address(k)])
            write_private(f.key, req.key_pem)
            write_private(f.cert, cert)
            write_private(f.ca_cert, ca.cert_pem)
        files[k] = f
    return files
