"""Encrypted vMotion's decision (vmshift.migration.encryption) and its pre-migration check."""

from __future__ import annotations

from dataclasses import replace
from itertools import product
from typing import Any

import pytest

from tests.unit.test_migration_checks import DST, SRC, VM
from vmshift.migration.checks import run_checks
from vmshift.migration.encryption import (
    EncryptionDecision,
    EncryptionRefusal,
    HostEncryption,
    decide_encryption,
)
from vmshift.model.enums import MigrationEncryption as E
from vmshift.model.migration import CheckId, CheckSeverity

SETTINGS = list(E)
REQUESTS = [None, *E]


def _hosts(src: E = E.OPPORTUNISTIC, dst: E = E.OPPORTUNISTIC, src_cert: bool = True,
           dst_cert: bool = True) -> tuple[HostEncryption, HostEncryption]:
    return HostEncryption("host-1", src, src_cert), HostEncryption("host-2", dst, dst_cert)


def decide(vm: E, request: E | None = None, **hosts: E | bool) -> EncryptionDecision | EncryptionRefusal:
    return decide_encryption("web-1", vm, request, *_hosts(**hosts))  # type: ignore[arg-type]


# ----- the table, one row per rule ---------------------------------------------------------------
def test_opportunistic_between_two_certified_hosts_is_encrypted_without_a_warning() -> None:
    assert decide(E.OPPORTUNISTIC) == EncryptionDecision(E.OPPORTUNISTIC, encrypt=True)


def test_opportunistic_toward_a_host_without_a_certificate_is_plain_with_a_warning() -> None:
    d = decide(E.OPPORTUNISTIC, dst_cert=False)
    assert isinstance(d, EncryptionDecision) and not d.encrypt and d.setting is E.OPPORTUNISTIC
    assert d.warning == ("The memory stream of VM web-1 will not be encrypted: host host-2 has no "
                         "certificate from the cluster CA.")


def test_a_host_with_encryption_disabled_makes_opportunistic_plain_with_a_warning() -> None:
    d = decide(E.OPPORTUNISTIC, src=E.DISABLED)
    assert isinstance(d, EncryptionDecision) and not d.encrypt
    assert d.warning is not None and "host host-1 has migration encryption disabled" in d.warning


def test_neither_host_able_names_both() -> None:
    d = decide(E.OPPORTUNISTIC, src_cert=False, dst_cert=False)
    assert isinstance(d, EncryptionDecision) and d.warning is not None
    assert "host host-1 has no certificate" in d.warning and "host host-2 has no certificate" in d.warning


def test_disabled_is_plain_without_a_warning_even_between_certified_hosts() -> None:
    assert decide(E.DISABLED) == EncryptionDecision(E.DISABLED, encrypt=False)
    assert decide(E.OPPORTUNISTIC, E.DISABLED) == EncryptionDecision(E.DISABLED, encrypt=False)


def test_a_request_may_ask_for_opportunistic_on_a_vm_that_disables_it() -> None:
    assert decide(E.DISABLED, E.OPPORTUNISTIC) == EncryptionDecision(E.OPPORTUNISTIC, encrypt=True)


@pytest.mark.parametrize(("vm", "request_", "src", "dst"), [
    (E.REQUIRED, None, E.OPPORTUNISTIC, E.OPPORTUNISTIC),
    (E.OPPORTUNISTIC, E.REQUIRED, E.OPPORTUNISTIC, E.OPPORTUNISTIC),
    (E.DISABLED, None, E.REQUIRED, E.OPPORTUNISTIC),  # a host's requirement beats the VM's disabled
    (E.OPPORTUNISTIC, None, E.OPPORTUNISTIC, E.REQUIRED),
])
def test_anything_required_between_certified_hosts_is_encrypted(
        vm: E, request_: E | None, src: E, dst: E) -> None:
    assert decide(vm, request_, src=src, dst=dst) == EncryptionDecision(E.REQUIRED, encrypt=True)


def test_required_toward_a_host_without_a_certificate_is_refused_naming_who_and_why() -> None:
    r = decide(E.REQUIRED, dst_cert=False)
    assert isinstance(r, EncryptionRefusal) and r.setting is E.REQUIRED
    assert r.message == ("VM web-1 requires encryption, but host host-2 has no certificate from the "
                         "cluster CA.")
    assert "--encryption opportunistic" in r.hint


def test_a_host_that_requires_encryption_but_cannot_refuses_every_live_migration() -> None:
    r = decide(E.OPPORTUNISTIC, src=E.REQUIRED, src_cert=False)
    assert isinstance(r, EncryptionRefusal)
    assert r.message.startswith("Host host-1 requires encryption, but host host-1 has no certificate")


def test_required_toward_a_host_with_encryption_disabled_is_refused() -> None:
    r = decide(E.REQUIRED, dst=E.DISABLED)
    assert isinstance(r, EncryptionRefusal) and "host host-2 has migration encryption disabled" in r.message


def test_a_request_cannot_turn_a_requirement_off() -> None:
    r = decide(E.REQUIRED, E.DISABLED)
    assert isinstance(r, EncryptionRefusal)
    assert r.message == "The request asks for an unencrypted migration, but VM web-1 requires encryption."
    r = decide(E.OPPORTUNISTIC, E.DISABLED, dst=E.REQUIRED)
    assert isinstance(r, EncryptionRefusal) and "host host-2 requires encryption" in r.message


# ----- every combination against the rules as the docstring states them --------------------------
def test_every_combination_follows_the_three_rules() -> None:
    for vm, req, src, dst, src_cert, dst_cert in product(SETTINGS, REQUESTS, SETTINGS, SETTINGS,
                                                         [True, False], [True, False]):
        d = decide(vm, req, src=src, dst=dst, src_cert=src_cert, dst_cert=dst_cert)
        both_can = src_cert and dst_cert and E.DISABLED not in (src, dst)
        required = E.REQUIRED in (vm, req, src, dst)
        case = (vm, req, src, dst, src_cert, dst_cert)
        if required:
            refused = req is E.DISABLED or not both_can
            assert isinstance(d, EncryptionRefusal) == refused, case
            assert d.setting is E.REQUIRED, case
            if not refused:
                assert d == EncryptionDecision(E.REQUIRED, encrypt=True), case
            continue
        assert isinstance(d, EncryptionDecision), case
        if (vm if req is None else req) is E.DISABLED:
            assert d == EncryptionDecision(E.DISABLED, encrypt=False), case
        else:
            assert d.encrypt == both_can and (d.warning is None) == both_can, case
        # never encrypted without both hosts able; a sentence always ends with a full stop
        assert not d.encrypt or both_can, case
        assert d.warning is None or d.warning.endswith("."), case


# ----- the check in the live report --------------------------------------------------------------
def _check(request: E | None = None, **kw: Any) -> tuple[CheckSeverity, str]:
    src = replace(SRC, encryption=kw.get("src", E.OPPORTUNISTIC), has_certificate=kw.get("src_cert", False))
    dst = replace(DST, encryption=kw.get("dst", E.OPPORTUNISTIC), has_certificate=kw.get("dst_cert", False))
    report = run_checks(VM, src, dst, reachable=True, requested_encryption=request)
    r = next(x for x in report.results if x.check is CheckId.ENCRYPTION)
    return r.severity, r.message


def test_the_check_warns_when_the_stream_falls_back_to_plain() -> None:
    severity, message = _check()
    assert severity is CheckSeverity.WARNING and "will not be encrypted" in message


def test_the_check_refuses_required_without_certificates_and_passes_with_them() -> None:
    assert _check(request=E.REQUIRED)[0] is CheckSeverity.ERROR
    severity, message = _check(request=E.REQUIRED, src_cert=True, dst_cert=True)
    assert severity is CheckSeverity.OK and "will be encrypted" in message
    assert _check(request=E.DISABLED) == (CheckSeverity.OK, "The memory stream will not be encrypted, as its "
                                                            "setting asks (encryption disabled).")
