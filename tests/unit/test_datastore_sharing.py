"""The sharing proof of directory datastores: what each agent writes and reads
(agent/share_proof.py) and the server's rule over two reports (model/datastore_sharing.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

from vmshift.agent.datastores import Datastores
from vmshift.agent.share_proof import ShareProof
from vmshift.model.datastore_sharing import shares_with_linked
from vmshift.model.host import DatastoreProof


def marker(path: Path, uuid: str = "11111111-0000-4000-8000-000000000001") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / ".vmshift-datastore.json").write_text(f'{{"uuid": "{uuid}", "name": "shared-1"}}')
    return path


def test_a_really_shared_directory_is_proven_whichever_host_reports_first(tmp_path: Path) -> None:
    shared = marker(tmp_path / "shared")
    a, b = Datastores([shared], "host-1"), Datastores([shared], "host-2")
    first_a = a.infos()[0].proof  # host-1 wrote before host-2 came: it sees nobody yet
    first_b = b.infos()[0].proof  # host-2 writes, then reads host-1's token
    assert first_a is not None and first_b is not None and first_a.peers == {}
    assert first_b.peers == {"host-1": first_a.token}
    assert shares_with_linked("host-2", first_b, {"host-1": first_a})  # host-1 reported first
    assert shares_with_linked("host-1", first_a, {"host-2": first_b})  # host-2 reported first
    assert a.opens_direct(a.all()[0]) and b.opens_direct(b.all()[0])


def test_a_copied_folder_proves_nothing_once_its_writer_rotated(tmp_path: Path) -> None:
    original = marker(tmp_path / "original")
    a = Datastores([original], "host-1")
    a.infos()
    shutil.copytree(original, tmp_path / "copy")  # marker and host-1's file, copied by hand
    c = Datastores([tmp_path / "copy"], "host-3")
    seen_by_c = c.infos()[0].proof
    assert seen_by_c is not None
    # host-1 rotates (twice: the previous token counts too); the copy keeps the old one
    proof = ShareProof("host-1", rotate_s=0)
    proof.refresh(original)
    now = proof.refresh(original)
    assert now is not None
    assert not shares_with_linked("host-3", seen_by_c, {"host-1": now})


def test_a_copied_marker_alone_is_not_shared_and_opens_no_disk_directly(tmp_path: Path) -> None:
    a = Datastores([marker(tmp_path / "a")], "host-1")
    c = Datastores([marker(tmp_path / "c")], "host-3")
    pa, pc = a.infos()[0].proof, c.infos()[0].proof
    assert pa is not None and pc is not None
    assert not shares_with_linked("host-3", pc, {"host-1": pa})
    assert not c.opens_direct(c.all()[0])


def test_the_rule_trusts_what_cannot_prove() -> None:
    mine = DatastoreProof(token="t2", peers={})
    assert shares_with_linked("host-2", None, {"host-1": mine})  # an older agent, an iSCSI datastore
    assert shares_with_linked("host-2", mine, {})  # the first host of a datastore
    assert shares_with_linked("host-2", mine, {"host-1": None})  # linked to an older agent
    # the previous token counts (the two reports crossed a rotation), an empty one never does
    old = DatastoreProof(token="t1-new", previous="t1-old", peers={})
    crossed = DatastoreProof(token="t2", peers={"host-1": "t1-old"})
    assert shares_with_linked("host-2", crossed, {"host-1": old})
    assert not shares_with_linked("host-2", DatastoreProof(token="t2", peers={"host-1": ""}),
                                  {"host-1": DatastoreProof(token="t1")})


def test_an_unwritable_directory_is_reported_without_proof(tmp_path: Path) -> None:
    ds = marker(tmp_path / "ro")
    (ds / ".vmshift-hosts").write_text("not a folder")  # mkdir fails: nothing can be written
    info = Datastores([ds], "host-1").infos()[0]
    assert info.proof is None and info.name == "shared-1"


def test_a_restarted_agent_keeps_its_token(tmp_path: Path) -> None:
    """What the other hosts read before the restart still proves the sharing after it."""
    ds = marker(tmp_path / "shared")
    first = Datastores([ds], "host-1", tmp_path / "share-proof.json").infos()[0].proof
    again = Datastores([ds], "host-1", tmp_path / "share-proof.json").infos()[0].proof
    assert first is not None and again is not None and again.token == first.token
