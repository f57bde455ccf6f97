"""Does a migration's memory stream go over TLS? (encrypted vMotion; issue 9, item 2). Pure.

Inputs: the VM's setting, the request's override (``MigrationCreate.encryption``), each host's
setting, and whether each host *can* encrypt: it holds a certificate issued by the cluster CA
(``host.cert_fingerprint``) and its own setting is not ``disabled``.

The rules, in order (docs/encrypted-vmotion.md has them as a table):

1. **Anything required wins.** If the VM, the request or either host says ``required``, the stream
   must be encrypted: when both hosts can, it is; when either cannot, the migration is refused before
   anything starts. A request asking for ``disabled`` while something requires encryption is refused
   too (a request may tighten the VM's setting, never quietly lose a requirement).
2. **Otherwise disabled is plain.** The request's ``disabled`` (or, without an override, the VM's)
   makes the stream plain, without a warning: someone asked for it.
3. **Otherwise opportunistic**: encrypted when both hosts can, else plain *with a warning* on the
   migration naming the host and why.

A host's ``disabled`` is not a veto on a migration that requires encryption (rule 1 refuses it, as
that host cannot encrypt); it only makes the opportunistic case plain with a warning.
"""

from __future__ import annotations

from dataclasses import dataclass

from vmshift.model.enums import MigrationEncryption

E = MigrationEncryption


@dataclass(frozen=True, slots=True)
class HostEncryption:
    """One host's side of the decision."""

    name: str
    setting: MigrationEncryption = E.OPPORTUNISTIC
    has_certificate: bool = False  # issued by the cluster CA (host.cert_fingerprint is set)

    @property
    def can_encrypt(self) -> bool:
        return self.has_certificate and self.setting is not E.DISABLED

    @property
    def why_not(self) -> str:
        """Why this host cannot encrypt (only meaningful when ``can_encrypt`` is False)."""
        if self.setting is E.DISABLED:
            return f"host {self.name} has migration encryption disabled"
        return f"host {self.name} has no certificate from the cluster CA"


@dataclass(frozen=True, slots=True)
class EncryptionDecision:
    """The stream goes over TLS (``encrypt``) or not; ``warning`` says why an opportunistic one is plain."""

    setting: MigrationEncryption  # what the VM, the request and the hosts asked for together
    encrypt: bool
    warning: str | None = None


@dataclass(frozen=True, slots=True)
class EncryptionRefusal:
    """The migration cannot run as asked: one sentence and what to do."""

    setting: MigrationEncryption
    message: str
    hint: str


def _requirers(vm_name: str, vm: E, request: E | None, hosts: tuple[HostEncryption, ...]) -> list[str]:
    who = []
    if vm is E.REQUIRED:
        who.append(f"VM {vm_name}")
    if request is E.REQUIRED:
        who.append("this migration")
    who += [f"host {h.name}" for h in hosts if h.setting is E.REQUIRED]
    return who


def _unable(hosts: tuple[HostEncryption, ...]) -> str:
    return " and ".join(h.why_not for h in hosts if not h.can_encrypt)


def decide_encryption(
    vm_name: str, vm: MigrationEncryption, request: MigrationEncryption | None,
    source: HostEncryption, target: HostEncryption,
) -> EncryptionDecision | EncryptionRefusal:
    """Apply the module's three rules (see its docstring)."""
    hosts = (source, target)
    both_can = source.can_encrypt and target.can_encrypt
    requirers = _requirers(vm_name, vm, request, hosts)
    if requirers:
        who = " and ".join(requirers)
        verb = "requires" if len(requirers) == 1 else "require"
        if request is E.DISABLED:
            return EncryptionRefusal(
                E.REQUIRED,
                f"The request asks for an unencrypted migration, but {who} {verb} encryption.",
                hint="Drop '--encryption disabled', or change the setting that requires encryption "
                "('vmshift vm migration-settings' / 'vmshift host migration-settings').",
            )
        if not both_can:
            return EncryptionRefusal(
                E.REQUIRED,
                f"{who[0].upper()}{who[1:]} {verb} encryption, but {_unable(hosts)}.",
                hint="Give both hosts certificates from the cluster CA and encryption not disabled, "
                "or allow a plain stream with '--encryption opportunistic'.",
            )
        return EncryptionDecision(E.REQUIRED, encrypt=True)
    asked = vm if request is None else request
    if asked is E.DISABLED:
        return EncryptionDecision(E.DISABLED, encrypt=False)
    if both_can:
        return EncryptionDecision(E.OPPORTUNISTIC, encrypt=True)
    return EncryptionDecision(
        E.OPPORTUNISTIC, encrypt=False,
        warning=f"The memory stream of VM {vm_name} will not be encrypted: {_unable(hosts)}.",
    )
