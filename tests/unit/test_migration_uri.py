"""The migration URI rule (vmshift.migration.uri): tcp: to the target's migration address, nothing else."""

from __future__ import annotations

import pytest

from vmshift.migration.uri import (
    MigrationUriError,
    check_migration_uri,
    check_nbd_uri,
    parse_tcp_uri,
    tcp_uri,
)

TARGET = "10.0.1.2"


@pytest.mark.parametrize(
    "uri",
    [
        "exec:touch /tmp/owned",
        "exec:sh -c 'nc 10.0.1.2 4444'",
        "file:/var/lib/vmshift/vm.state",
        "file:/tmp/x,offset=0",
        "unix:/run/qemu.sock",
        "fd:3",
        "rdma:10.0.1.2:4444",
        "tcp:target-2:4444",  # a host name: could resolve to anything
        "tcp:localhost:4444",
        "TCP:10.0.1.2:4444",
        "tcp://10.0.1.2:4444",
        "tcp:10.0.1.2:0",
        "tcp:10.0.1.2:70000",
        "tcp:10.0.1.2:",
        "tcp:10.0.1.2",
        "tcp:10.0.1.2:4444\n",
        "tcp:10.0.1.2:4444 ",
        " tcp:10.0.1.2:4444",
        "tcp:10.0.1.2:4444,exec:id",
        "tcp:10.0.1.2:4444;exec:id",
        "tcp:10.0.1.256:4444",
        "tcp:010.0.1.2:4444",
        "tcp:[10.0.1.2]:4444",  # IPv4 in brackets
        "tcp:fd00::2:4444",  # IPv6 without brackets
        "tcp:[fe80::1%eth0]:4444",  # a zone
        "",
    ],
)
def test_anything_but_tcp_to_an_ip_address_and_a_port_is_refused(uri: str) -> None:
    with pytest.raises(MigrationUriError) as refused:
        check_migration_uri(uri, TARGET)
    assert refused.value.status == 400
    assert repr(uri) in refused.value.message and refused.value.hint


def test_tcp_to_the_targets_migration_address_is_accepted() -> None:
    assert check_migration_uri("tcp:10.0.1.2:49152", TARGET) == 49152
    assert check_migration_uri("tcp:10.0.1.2:1", TARGET) == 1
    assert check_migration_uri("tcp:10.0.1.2:65535", TARGET) == 65535


def test_tcp_to_another_address_is_refused_naming_both() -> None:
    with pytest.raises(MigrationUriError, match=r"points to 10\.0\.1\.9, not to .* 10\.0\.1\.2"):
        check_migration_uri("tcp:10.0.1.9:49152", TARGET)
    with pytest.raises(MigrationUriError, match="names no migration address"):
        check_migration_uri("tcp:10.0.1.2:49152", "")


def test_ipv6_in_brackets_is_compared_as_an_address() -> None:
    assert check_migration_uri("tcp:[fd00::2]:4444", "fd00:0::2") == 4444
    assert check_migration_uri("tcp:[FD00:0:0::2]:4444", "fd00::2") == 4444
    with pytest.raises(MigrationUriError, match="points to fd00::3"):
        check_migration_uri("tcp:[fd00::3]:4444", "fd00::2")
    # the same host as an IPv4-mapped address is still another address
    with pytest.raises(MigrationUriError):
        check_migration_uri("tcp:[::ffff:10.0.1.2]:4444", TARGET)


def test_the_server_builds_what_the_check_accepts() -> None:
    assert tcp_uri("10.0.1.2", 4444) == "tcp:10.0.1.2:4444"
    assert tcp_uri("fd00:0::2", 4444) == "tcp:[fd00::2]:4444"
    for address in ("10.0.1.2", "fd00::2"):
        uri = tcp_uri(address, 61000)
        assert parse_tcp_uri(uri)[1] == 61000 and check_migration_uri(uri, address) == 61000


@pytest.mark.parametrize(("address", "port"), [("target-2", 4444), ("", 4444), ("10.0.1.2", 0),
                                               ("10.0.1.2", 70000)])
def test_the_server_builds_no_uri_from_a_host_name_or_a_bad_port(address: str, port: int) -> None:
    with pytest.raises(MigrationUriError):
        tcp_uri(address, port)


def test_a_relocates_disk_exports_must_be_nbd_on_the_targets_migration_address() -> None:
    check_nbd_uri("nbd://10.0.1.2:10809/vmshift-7-disk0", TARGET)
    check_nbd_uri("nbd://[fd00::2]:10809/disk0", "fd00::2")
    for uri in ("nbd://10.0.1.9:10809/disk0", "nbd+unix:///disk0?socket=/run/x.sock",
                "nbd://host-2:10809/d", "nbd://10.0.1.2:0/disk0", "nbd://10.0.1.2:10809/disk0\n",
                "nbd://10.0.1.2:10809/../x y", "exec:true"):
        with pytest.raises(MigrationUriError, match=r"disk export .* is refused"):
            check_nbd_uri(uri, TARGET)
