"""One real lab per test session: network namespaces, a server, agents, QEMU guests.

These tests need root, QEMU and iproute2. They run in CI too: a missing dependency fails them.
"""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.lab.helpers import LabHandle, running_lab, vmshift
from vmshift.client import VmshiftClient
from vmshift.lab.image import build_image


@pytest.fixture(scope="session")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabHandle]:
    with running_lab(f"t{secrets.token_hex(3)}", 2, tmp_path_factory.mktemp("vmshift-config")) as handle:
        yield handle


@pytest.fixture(scope="session")
def lab3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabHandle]:
    """Three hosts and a storage box (tgtd, the storage role, the datastore iscsi-1), booted once for
    the DRS, iSCSI and maintenance-mode modules; each of them leaves it as it found it (its VMs and
    rules deleted, DRS back to its defaults, no host in maintenance)."""
    config_dir = tmp_path_factory.mktemp("vmshift-config3")
    with running_lab(f"i{secrets.token_hex(3)}", 3, config_dir, "--iscsi") as handle:
        yield handle


@pytest.fixture(scope="session")
def api3(lab3: LabHandle) -> Iterator[VmshiftClient]:
    with VmshiftClient(lab3.server, lab3.token, ca_file=lab3.ca_file) as c:
        yield c


@pytest.fixture(scope="session")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The lab guest image, built once per session into a temporary folder (the guest image and disk
    writer tests boot it under plain QEMU)."""
    return build_image(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="session")
def api(lab: LabHandle) -> Iterator[VmshiftClient]:
    with VmshiftClient(lab.server, lab.token, ca_file=lab.ca_file) as c:
        yield c


@pytest.fixture(scope="session")
def cli(lab: LabHandle):  # type: ignore[no-untyped-def]
    def run(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return vmshift(lab, *args, check=check, timeout=timeout)

    return run
