"""The cluster's certificates: a CA, the server's and each host's certificate, fingerprints.

Pure functions over PEM bytes (no files: ``tls/files.py`` keeps them on disk). Every certificate
the cluster CA issues names its holder's role in the subject's organizational unit and its name in
the common name, so a TLS peer's certificate alone says who is calling:

- ``Role.SERVER``, CN ``vmshift-server``: the control plane (serves the API; calls agents);
- ``Role.HOST``, CN = the host's name (``host-1``): an agent (serves its API; calls a migration peer),
  with the host's addresses as subject alternative names so the server and peers verify them.

Host keys are made on the host (``make_key_and_csr``): only the CSR travels to the server.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
from dataclasses import dataclass
from enum import StrEnum

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from vmshift.errors import InvalidInputError

SERVER_NAME = "vmshift-server"
CA_DAYS = 3650
CERT_DAYS = 825  # the longest a public CA may issue: short enough that rotation is practised
BOOTSTRAP_DAYS = 3650


class Role(StrEnum):
    CA = "vmshift-ca"
    SERVER = "vmshift-server"
    HOST = "vmshift-host"
    BOOTSTRAP = "vmshift-bootstrap"  # an agent's self-signed certificate before it is added


@dataclass(frozen=True)
class KeyPair:
    cert_pem: bytes
    key_pem: bytes


@dataclass(frozen=True)
class CertInfo:
    common_name: str
    role: Role | None
    fingerprint: str
    not_after: dt.datetime
    sans: tuple[str, ...]


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(common_name: str, role: Role) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "vmshift"),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role.value),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])


def _san(names: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for n in dict.fromkeys(names):  # keep order, drop repeats
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            entries.append(x509.DNSName(n))
    return x509.SubjectAlternativeName(entries)


def _load_cert(pem: bytes) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise InvalidInputError("The data is not a PEM certificate.",
                                hint="Pass the certificate file itself (BEGIN CERTIFICATE).") from exc


def _load_key(pem: bytes) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise InvalidInputError("The CA key is not an EC key.", hint="Let vmshift-server create its CA.")
    return key


def create_ca(common_name: str = "vmshift cluster CA", days: int = CA_DAYS) -> KeyPair:
    key = _new_key()
    name = _name(common_name, Role.CA)
    now = _now()
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return KeyPair(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def make_key_and_csr(common_name: str) -> KeyPair:
    """A new key and a CSR for it (``KeyPair.cert_pem`` holds the CSR)."""
    key = _new_key()
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
           .sign(key, hashes.SHA256()))
    return KeyPair(csr.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def _leaf(subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey,
          signing_key: ec.EllipticCurvePrivateKey, sans: list[str], days: int,
          ca_key_id: x509.SubjectKeyIdentifier | None) -> bytes:
    now = _now()
    builder = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                              ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(_san(sans), critical=False)
    )
    if ca_key_id is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_key_id), critical=False)
    return builder.sign(signing_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def issue(ca: KeyPair, csr_pem: bytes, *, common_name: str, role: Role, sans: list[str],
          days: int = CERT_DAYS) -> bytes:
    """Sign the CSR's key as ``role``/``common_name``; the CSR's own subject is ignored (the CA names
    the holder, not the requester)."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as exc:
        raise InvalidInputError("The certificate request is not a PEM CSR.",
                                hint="Send the CSR the agent generated.") from exc
    if not csr.is_signature_valid:
        raise InvalidInputError("The certificate request's signature is not valid.",
                                hint="Generate a new CSR on the host.")
    public_key = csr.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise InvalidInputError("The certificate request's key is not an EC key.",
                                hint="Use the CSR the agent generated.")
    ca_cert = _load_cert(ca.cert_pem)
    ca_key_id = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return _leaf(_name(common_name, role), ca_cert.subject, public_key, _load_key(ca.key_pem),
                 sans, days, ca_key_id)


def issue_with_key(ca: KeyPair, *, common_name: str, role: Role, sans: list[str],
                   days: int = CERT_DAYS) -> KeyPair:
    """A new key and its certificate (for the server's own identity, made next to the CA)."""
    req = make_key_and_csr(common_name)
    return KeyPair(issue(ca, req.cert_pem, common_name=common_name, role=role, sans=sans, days=days),
                   req.key_pem)


def self_signed(common_name: str, sans: list[str], days: int = BOOTSTRAP_DAYS) -> KeyPair:
    """An agent's certificate before the server has issued it one (its fingerprint is confirmed by
    the operator on `vmshift host add`, like SSH's first contact)."""
    key = _new_key()
    name = _name(common_name, Role.BOOTSTRAP)
    return KeyPair(_leaf(name, name, key.public_key(), key, sans, days, None), _key_pem(key))


def fingerprint(cert: bytes) -> str:
    """``SHA256:`` and the colon-separated hex SHA-256 of the DER certificate (PEM or DER input)."""
    der = _load_cert(cert).public_bytes(serialization.Encoding.DER) if cert.lstrip().startswith(b"-----") \
        else cert
    digest = hashlib.sha256(der).hexdigest().upper()
    return "SHA256:" + ":".join(digest[i:i + 2] for i in range(0, len(digest), 2))


def normalise_fingerprint(text: str) -> str:
    """Accept ``SHA256:AB:CD...``, ``ab:cd...`` or plain hex; answer the canonical form."""
    hexpart = text.strip().removeprefix("SHA256:").removeprefix("sha256:").replace(":", "").upper()
    if len(hexpart) != 64 or any(c not in "0123456789ABCDEF" for c in hexpart):
        raise InvalidInputError(f"{text!r} is not a SHA-256 certificate fingerprint.",
                                hint="Copy it as shown, e.g. SHA256:4F:2A:... (64 hex digits).")
    return "SHA256:" + ":".join(hexpart[i:i + 2] for i in range(0, 64, 2))


def _role_of(name: x509.Name) -> Role | None:
    units = name.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    try:
        return Role(str(units[0].value)) if units else None
    except ValueError:
        return None


def info_from_der(der: bytes) -> CertInfo:
    return _info(x509.load_der_x509_certificate(der), der)


def info(cert_pem: bytes) -> CertInfo:
    cert = _load_cert(cert_pem)
    return _info(cert, cert.public_bytes(serialization.Encoding.DER))


def _info(cert: x509.Certificate, der: bytes) -> CertInfo:
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        sans = tuple([str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
                     + list(san.get_values_for_type(x509.DNSName)))
    except x509.ExtensionNotFound:
        sans = ()
    return CertInfo(common_name=str(cns[0].value) if cns else "", role=_role_of(cert.subject),
                    fingerprint=fingerprint(der), not_after=cert.not_valid_after_utc, sans=sans)


def _gnutls_dn(name: x509.Name) -> str:
    """The DN as GnuTLS's ``gnutls_x509_crt_get_dn`` writes it, which QEMU's TLS authz compares:
    RFC 4514 escaping but in the certificate's own order (``O=vmshift,OU=vmshift-host,CN=host-1``),
    not RFC 4514's reversed one (checked on QEMU 10.0.2 with GnuTLS 3.8)."""
    return ",".join(rdn.rfc4514_string() for rdn in name.rdns)


def subject_dn(cert_pem: bytes) -> str:
    """The subject as QEMU's ``authz-simple`` identity expects it (see :func:`_gnutls_dn`)."""
    return _gnutls_dn(_load_cert(cert_pem).subject)


def subject_dn_of(common_name: str, role: Role = Role.HOST) -> str:
    """The subject DN the CA writes into ``role``/``common_name``'s certificate, as
    :func:`subject_dn` reads it (what a migration target's ``authz-simple`` expects of its peer)."""
    return _gnutls_dn(_name(common_name, role))


def check_issued(cert_pem: bytes, key_pem: bytes, ca_pem: bytes, *, common_name: str,
                 role: Role = Role.HOST) -> CertInfo:
    """Check a certificate handed to a host before it serves it: it is for ``key_pem`` (the key the
    host made for its CSR), signed by ``ca_pem`` and names ``role``/``common_name``."""
    cert, ca_cert = _load_cert(cert_pem), _load_cert(ca_pem)
    mine = _load_key(key_pem).public_key().public_bytes(serialization.Encoding.DER,
                                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    theirs = cert.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    if mine != theirs:
        raise InvalidInputError("The certificate is not for the key this host made for its request.",
                                hint="Ask for a new CSR (POST /api/v1/tls/csr) and sign that one.")
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise InvalidInputError("The certificate is not signed by this host's cluster CA.",
                                hint="Sign it with the CA the agent's 'ca_file' holds.") from exc
    got = info(cert_pem)
    if got.role is not role or got.common_name != common_name:
        raise InvalidInputError(f"The certificate names {got.role} {got.common_name!r}, not "
                                f"{role.value} {common_name!r}.",
                                hint="Issue it for this host's name with the host role.")
    return got
