"""The name patterns and bounds of model/inputs.py, and the request base class of model/base.py."""

from __future__ import annotations

from typing import Annotated

import pytest
from pydantic import BaseModel, Field, TypeAdapter, ValidationError

from vmshift.model.api import HostAdd, IpPool, VmCreate
from vmshift.model.base import RequestModel
from vmshift.model.inputs import (
    ADDRESS_PATTERN,
    LABEL_PATTERN,
    NAME_PATTERN,
    check_label,
    check_name,
    shown,
)
from vmshift.model.migration import MigrationCreate

GOOD_NAMES = ["web-1", "a", "vm.prod_2", "9", "x" * 63, "Opteron_G2-v1", "pc-q35-10.0"]
BAD_NAMES = ["web-1\n", "\nweb-1", "a/b", "", "x" * 64, "x" * 200, "-a", ".a", "_a", "a b", "a\x00",
             "web-1\r", "ü", "a:b", "../etc"]  # fmt: skip
GOOD_LABELS = ["VM Network", "Migration", "net-1", "a b c", "x" * 63]
BAD_LABELS = ["VM Network\n", " VM", "VM ", "VM\tNetwork", "", "x" * 64, "a/b"]


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_good_names(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_names_are_refused_whole(name: str) -> None:
    with pytest.raises(ValueError, match="is not valid: use 1-63 letters"):
        check_name(name)


@pytest.mark.parametrize("label", GOOD_LABELS)
def test_good_labels(label: str) -> None:
    assert check_label(label) == label


@pytest.mark.parametrize("label", BAD_LABELS)
def test_bad_labels(label: str) -> None:
    with pytest.raises(ValueError, match="Network name"):
        check_label(label)


@pytest.mark.parametrize(
    ("pattern", "good", "bad"),
    [(NAME_PATTERN, GOOD_NAMES, BAD_NAMES), (LABEL_PATTERN, GOOD_LABELS, BAD_LABELS),
     (ADDRESS_PATTERN, ["127.0.0.1:8101", "host-1.lab:1", "[::1]:65535"],
      ["127.0.0.1:0", "h:65536", "h:80\n", "h", "exec:x", "a b:1", "h:08x"])],
)  # fmt: skip
def test_published_pattern_accepts_what_the_server_accepts(
    pattern: str, good: list[str], bad: list[str]
) -> None:
    """The OpenAPI pattern (checked here by pydantic's regex engine, whose `$` is the end of the text
    like JSON Schema's) agrees with the server's whole-string check on every example."""
    adapter = TypeAdapter(Annotated[str, Field(pattern=pattern)])
    for value in good:
        assert adapter.validate_python(value) == value
    for value in bad:
        with pytest.raises(ValidationError):
            adapter.validate_python(value)


def test_messages_quote_at_most_40_characters() -> None:
    assert shown("short") == "'short'"
    long = shown("x" * 200)
    assert len(long) == 40 and long.endswith("...'")
    with pytest.raises(ValueError) as e:
        check_name("y" * 500, "Host")
    assert len(str(e.value)) < 160 and str(e.value).startswith("Host name 'yyy")


@pytest.mark.parametrize("model", [VmCreate, MigrationCreate, HostAdd, IpPool])
def test_request_bodies_refuse_unknown_fields(model: type[BaseModel]) -> None:
    assert issubclass(model, RequestModel)
    with pytest.raises(ValidationError) as e:
        model.model_validate({"no_such_field": 1})
    errors = e.value.errors()
    assert any(err["type"] == "extra_forbidden" and err["loc"] == ("no_such_field",) for err in errors)


def test_bounds_refuse_what_no_host_has() -> None:
    base = {"name": "vm-1", "host": "host-1", "datastore": "shared-1"}
    assert VmCreate.model_validate(base).memory_mib == 256
    for extra in ({"cpus": 65}, {"memory_mib": 1 << 30}, {"disks_mib": [0]}, {"disks_mib": [64] * 17},
                  {"networks": ["VM Network"] * 9}, {"kernel_args": "a\nb"}, {"image": "../x"}):  # fmt: skip
        with pytest.raises(ValidationError):
            VmCreate.model_validate({**base, **extra})
    for extra in ({"max_downtime_ms": 60_001}, {"bandwidth_limit_bps": 2e12}, {"postcopy_after_s": 1e6}):
        with pytest.raises(ValidationError):
            MigrationCreate.model_validate({"host": "host-2", **extra})


def test_request_bodies_refuse_booleans_for_numbers() -> None:
    """Found by the API fuzzer: ``{"threshold": true}`` was DRS threshold 1."""
    from vmshift.server.drs.views import ClusterDrsUpdate

    vm = {"name": "vm-1", "host": "host-1", "datastore": "d"}
    for model, body in ((ClusterDrsUpdate, {"threshold": True}), (VmCreate, {**vm, "disks_mib": [64, True]}),
                        (MigrationCreate, {"host": "h", "max_downtime_ms": False}),
                        (MigrationCreate, {"host": "h", "bandwidth_limit_bps": True})):  # fmt: skip
        with pytest.raises(ValidationError, match="must be a number, not true or false"):
            model.model_validate(body)
    assert ClusterDrsUpdate.model_validate({"threshold": 4}).threshold == 4
    assert MigrationCreate.model_validate({"host": "h", "bandwidth_limit_bps": 5}).bandwidth_limit_bps == 5.0
