"""iSCSI datastores registered at run time (agent/iscsi_registry.py): the folder, marker and token
that an add makes and a remove takes away, and the portal check's refusal."""

from __future__ import annotations

import asyncio
import json
import socket
import stat
from pathlib import Path

import pytest

from vmshift.agent.datastores import read_datastore
from vmshift.agent.iscsi_registry import IscsiRegistry, check_target
from vmshift.errors import ConflictError, InvalidInputError
from vmshift.model.enums import DatastoreKind
from vmshift.model.iscsi import AgentIscsiDatastore

REQ = AgentIscsiDatastore(name="iscsi-2", uuid="0b7c5a4e-1f2d-4c3b-9a8e-7d6c5b4a3f21",
                          portal="10.0.3.2:3260", target="iqn.2026-12.io.example:ds.iscsi-2",
                          storage_role="http://10.0.3.2:8102", token="secret")


def test_add_makes_a_datastore_that_survives_a_restart_and_remove_takes_it_away(tmp_path: Path) -> None:
    reg = IscsiRegistry(tmp_path / "registered")
    folder = reg.add(REQ)
    ds = read_datastore(folder)
    assert ds is not None and ds.kind is DatastoreKind.ISCSI and ds.uuid == REQ.uuid
    assert ds.iscsi is not None and ds.iscsi.portal == REQ.portal and ds.iscsi.target == REQ.target
    token = reg.token_file("iscsi-2")
    assert token.read_text().strip() == "secret" and stat.S_IMODE(token.stat().st_mode) == 0o600
    again = IscsiRegistry(tmp_path / "registered")  # the agent restarted
    assert again.paths() == [folder] and again.token_files() == {"iscsi-2": token}
    with pytest.raises(ConflictError):
        again.add(REQ)
    (folder / "web-1").mkdir()
    (folder / "web-1" / "vm.json").write_text("{}")
    with pytest.raises(ConflictError, match="still holds VM web-1"):
        again.remove("iscsi-2")
    (folder / "web-1" / "vm.json").unlink()
    again.remove("iscsi-2")
    assert not folder.exists() and not token.exists() and again.names() == []
    assert json.loads((tmp_path / "registered" / "registered.json").read_text()) == []


def test_a_portal_that_does_not_answer_is_refused_with_the_host_named() -> None:
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    req = REQ.model_copy(update={"portal": f"127.0.0.1:{port}"})
    with pytest.raises(InvalidInputError, match=f"portal 127.0.0.1:{port} does not answer from host host-1"):
        asyncio.run(check_target("host-1", req))
