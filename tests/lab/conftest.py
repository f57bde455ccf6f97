"""One real lab per test session: network namespaces, a server, agents, QEMU guests.

These tests need root, QEMU and iproute2. They run in CI too: a missing dependency fails them.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.lab.helpers import (
    BIN,
    LabHandle,
    lab_processes,
    mounts_of,
    namespaces_of,
    root_links,
    vmshift,
)
from vmshift.client import VmshiftClient
from vmshift.lab.image import build_image
from vmshift.lab.layout import load_record


def _lab(tmp_path_factory: pytest.TempPathFactory, name: str, *up_args: str) -> Iterator[LabHandle]:
    """A lab brought up with `vmshift lab up --name NAME UP_ARGS`, taken down and checked clean."""
    if os.geteuid() != 0:
        pytest.fail("The lab tests need root (network namespaces, taps, QEMU): run them as root.")
    config_dir = tmp_path_factory.mktemp("vmshift-config")
    env = {**os.environ, "VMSHIFT_CONFIG_DIR": str(config_dir)}
    links_before = root_links()
    up = subprocess.run(
        [str(BIN / "vmshift"), "lab", "up", "--name", name, "--hosts", "2", *up_args],
        env=env, capture_output=True, text=True, timeout=900,
    )
    try:
        assert up.returncode == 0, f"lab up failed:\n{up.stdout}\n{up.stderr}"
        out = subprocess.run(
            [str(BIN / "vmshift"), "lab", "env", "--name", name],
            env=env, capture_output=True, text=True, check=True,
        ).stdout
        values = dict(
            line.removeprefix("export ").split("=", 1) for line in out.split() if "=" in line
        )
        server = values["VMSHIFT_SERVER"].strip("'\"")
        token = values["VMSHIFT_TOKEN"].strip("'\"")
        ca_file = values["VMSHIFT_CA_FILE"].strip("'\"")
        handle = LabHandle(name=name, server=server, token=token, ca_file=ca_file, env={
            **env, "VMSHIFT_SERVER": server, "VMSHIFT_TOKEN": token, "VMSHIFT_CA_FILE": ca_file,
        })
        yield handle
    finally:
        record = load_record(name)
        own_leg = record.layout.root_veth if record is not None else ""
        down = subprocess.run(
            [str(BIN / "vmshift"), "lab", "down", "--name", name],
            env=env, capture_output=True, text=True, timeout=300,
        )
        assert down.returncode == 0, f"lab down failed:\n{down.stdout}\n{down.stderr}"
        # lab down leaves nothing behind
        assert namespaces_of(name) == [], "namespaces left behind"
        # other labs (other sessions on this machine) bring their root legs up and down meanwhile
        def ours(links: set[str]) -> set[str]:
            return {link for link in links if link == own_leg or not re.fullmatch(r"vmslab\d+-mgmt", link)}

        assert ours(root_links()) == ours(links_before), "links left behind in the root namespace"
        assert mounts_of(name) == [], "mounts left behind"
        assert lab_processes(name) == [], "processes left behind"
        assert not Path(f"/var/lib/vmshift/labs/{name}").exists(), "lab state left behind"


@pytest.fixture(scope="session")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabHandle]:
    yield from _lab(tmp_path_factory, f"t{secrets.token_hex(3)}")


@pytest.fixture(scope="module")
def iscsi_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabHandle]:
    """A lab with a storage box (tgtd, the storage role) and the datastore iscsi-1."""
    yield from _lab(tmp_path_factory, f"i{secrets.token_hex(3)}", "--iscsi")


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
