"""iSCSI datastores: the one-writer rule, tgtadm's output, QEMU's iscsi blockdev, the storage role
(over HTTP, with a tgtadm that records its calls instead of driving a tgtd)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from vmshift.agent.config import config_from_dict
from vmshift.agent.datastores import Datastores, read_datastore
from vmshift.agent.storage_role import StorageRoleConfig, create_app
from vmshift.agent.tgt import Tgtadm, parse_show
from vmshift.agent.vmfiles import VmFiles
from vmshift.errors import ConflictError, InvalidInputError
from vmshift.model import iscsi
from vmshift.model.enums import Accelerator, BootKind, DatastoreKind
from vmshift.model.iscsi import Attachment, AttachRequest, IscsiLun, LunInfo
from vmshift.model.vm import BootSpec, DiskSpec, VmSpec
from vmshift.qemu.cmdline import VmPaths, build_qemu_argv

UUID = "9cdcce6d-029d-4853-9868-05020a23e402"
SHOW = """Target 1: iqn.2026-12.io.vmshift:ds.lab.iscsi-1
    System information:
        Driver: iscsi
    LUN information:
        LUN: 0
            Type: controller
        LUN: 1
            Type: disk
        LUN: 3
            Type: disk
    Account information:
    ACL information:
        iqn.2026-12.io.vmshift:host.host-1
        iqn.2026-12.io.vmshift:host.host-2
"""


def lun(*holders: tuple[str, int | None]) -> LunInfo:
    return LunInfo(key=f"{UUID}/disk0.qcow2", lun=1, size_mib=64,
                   attachments=[Attachment(host=h, initiator=iscsi.initiator_name(h), migration_id=m)
                                for h, m in holders])


def req(host: str, migration_id: int | None = None) -> AttachRequest:
    return AttachRequest(host=host, initiator=iscsi.initiator_name(host), migration_id=migration_id)


def test_one_host_holds_a_lun_outside_a_migration() -> None:
    assert [a.host for a in iscsi.attach(lun(), req("host-1"))] == ["host-1"]
    assert [a.host for a in iscsi.attach(lun(("host-1", None)), req("host-1"))] == ["host-1"]
    with pytest.raises(ConflictError, match="attached read-write on host-1: host-2 may not attach it too"):
        iscsi.attach(lun(("host-1", None)), req("host-2"))


def test_a_migration_target_joins_its_source_and_no_third_host() -> None:
    both = iscsi.attach(lun(("host-1", None)), req("host-2", migration_id=7))
    assert [(a.host, a.migration_id) for a in both] == [("host-1", None), ("host-2", 7)]
    with pytest.raises(ConflictError, match="already held by 2 hosts"):
        iscsi.attach(lun(("host-1", None), ("host-2", 7)), req("host-3", migration_id=8))
    # the source's QEMU ends: the target is the one holder, no longer in a handover
    during = lun().model_copy(update={"attachments": both})
    assert [(a.host, a.migration_id) for a in iscsi.detach(during, "host-1")] == [("host-2", None)]


def test_names() -> None:
    assert iscsi.valid_iqn(iscsi.initiator_name("host-1"))
    assert iscsi.valid_iqn(iscsi.datastore_target("iscsi-1", "lab"))
    assert not iscsi.valid_iqn("iscsi-1")
    assert iscsi.next_lun(set()) == 1 and iscsi.next_lun({1, 2, 4}) == 3


def test_parse_show() -> None:
    target, luns, acl = parse_show(SHOW)
    assert target == "iqn.2026-12.io.vmshift:ds.lab.iscsi-1"
    assert luns == {1, 3}
    assert acl == {iscsi.initiator_name("host-1"), iscsi.initiator_name("host-2")}
    assert parse_show("") == (None, set(), set())


def test_qemu_opens_a_lun_with_the_iscsi_driver(tmp_path: Path) -> None:
    spec = VmSpec(name="v", uuid=UUID, cpus=1, memory_mib=128, datastore="iscsi-1", cpu_model="qemu64",
                  machine_type="pc-q35-10.0", boot=BootSpec(kind=BootKind.DISK),
                  disks=[DiskSpec(datastore="iscsi-1", file="disk0.qcow2", size_mib=64),
                         DiskSpec(datastore="local", file="disk1.qcow2", size_mib=64)])
    the_lun = IscsiLun(portal="10.0.0.2:3260", target="iqn.2026-12.io.vmshift:ds.x", lun=1,
                       initiator=iscsi.initiator_name("host-1"))
    paths = VmPaths(vm_dir=tmp_path, run_dir=tmp_path, disks=[tmp_path / "disk0.qcow2", tmp_path / "d1"],
                    luns={0: the_lun})
    argv = build_qemu_argv(spec, paths, accelerator=Accelerator.TCG, taps=[])
    blockdevs = [json.loads(argv[i + 1]) for i, a in enumerate(argv) if a == "-blockdev"]
    devices = [json.loads(argv[i + 1]) for i, a in enumerate(argv) if a == "-device"]
    assert blockdevs[0] == {"driver": "iscsi", "node-name": "file-disk0", "transport": "tcp",
                            "portal": "10.0.0.2:3260", "target": "iqn.2026-12.io.vmshift:ds.x", "lun": 1,
                            "initiator-name": "iqn.2026-12.io.vmshift:host.host-1", "timeout": 10,
                            "cache": {"direct": True}}
    assert blockdevs[1]["driver"] == "qcow2" and blockdevs[1]["file"] == "file-disk0"
    assert blockdevs[2]["driver"] == "file"
    assert devices[0]["werror"] == "stop" and devices[0]["rerror"] == "stop"
    assert "werror" not in devices[1]


def test_an_iscsi_marker(tmp_path: Path) -> None:
    (tmp_path / ".vmshift-datastore.json").write_text(json.dumps({
        "uuid": UUID, "name": "iscsi-1", "type": "iscsi", "portal": "10.0.0.2:3260",
        "target": "iqn.2026-12.io.vmshift:ds.x", "storage_role": "http://10.0.0.2:8102"}))
    ds = read_datastore(tmp_path)
    assert ds is not None and ds.kind is DatastoreKind.ISCSI and ds.iscsi is not None
    info = ds.info()
    assert info.kind is DatastoreKind.ISCSI and info.portal == "10.0.0.2:3260"


class RecordingTgtadm(Tgtadm):
    """tgtadm's calls recorded, answered as a tgtd with one target would."""

    def __init__(self) -> None:
        super().__init__(0)
        self.calls: list[tuple[str, ...]] = []
        self.target: str | None = None
        self.luns: set[int] = set()

    async def _run(self, *args: str, ok_exists: bool = False) -> str:
        self.calls.append(args)
        op = args[1]
        if op == "show":
            lun_lines = "".join(f"        LUN: {n}\n" for n in sorted({0} | self.luns))
            return f"Target 1: {self.target}\n    LUN information:\n{lun_lines}" if self.target else ""
        if op == "new" and args[3] == "target":
            self.target = args[-1]
        elif op == "new":
            self.luns.add(int(args[args.index("--lun") + 1]))
        elif op == "delete":
            self.luns.discard(int(args[args.index("--lun") + 1]))
        return ""


@pytest.fixture
def role(tmp_path: Path) -> tuple[TestClient, RecordingTgtadm, Path]:
    (tmp_path / "token").write_text("secret")
    config = StorageRoleConfig(listen="127.0.0.1:0", portal="10.0.0.2:3260",
                               target="iqn.2026-12.io.vmshift:ds.x", state_dir=tmp_path / "state",
                               token_file=tmp_path / "token")
    config.state_dir.mkdir()
    tgt = RecordingTgtadm()
    client = TestClient(create_app(config, tgt), headers={"Authorization": "Bearer secret"})
    return client, tgt, config.state_dir


def test_storage_role_makes_attaches_and_removes_luns(role: tuple[TestClient, RecordingTgtadm, Path]) -> None:
    client, tgt, state = role
    with client:
        assert client.get("/api/v1/target").json()["luns"] == []
        body = {"key": f"{UUID}/disk0.raw", "size_mib": 8, "format": "raw"}
        made = client.post("/api/v1/luns", json=body).json()
        assert made["lun"] == 1 and (state / "luns" / "lun1.img").stat().st_size == 8 << 20
        assert client.post("/api/v1/luns", json=body).json()["lun"] == 1, "the same key: the same LUN"
        assert tgt.luns == {1}
        host1 = {"host": "host-1", "initiator": iscsi.initiator_name("host-1")}
        host2 = {"host": "host-2", "initiator": iscsi.initiator_name("host-2")}
        assert client.post(f"/api/v1/luns/{UUID}/disk0.raw/attach", json=host1).status_code == 200
        assert tgt.calls[-1][:2] == ("--op", "bind") and iscsi.initiator_name("host-1") in tgt.calls[-1]
        refused = client.post(f"/api/v1/luns/{UUID}/disk0.raw/attach", json=host2)
        assert refused.status_code == 409 and "outside a migration" in refused.json()["error"]["message"]
        kept = client.delete(f"/api/v1/luns/{UUID}/disk0.raw", params={"host": "host-2"})
        assert kept.status_code == 409 and tgt.luns == {1}, "a LUN another host holds stays"
        detached = client.post(f"/api/v1/luns/{UUID}/disk0.raw/detach", json={"host": "host-1"})
        assert detached.status_code == 200 and detached.json()["attachments"] == []
        assert client.delete(f"/api/v1/luns/{UUID}/disk0.raw", params={"host": "host-2"}).status_code == 200
        assert tgt.luns == set() and not (state / "luns" / "lun1.img").exists()
        assert client.get("/api/v1/target").json()["luns"] == []
        assert client.get("/api/v1/target", headers={"Authorization": "Bearer wrong"}).status_code == 401


def test_storage_role_replays_its_record_into_a_new_tgtd(
    role: tuple[TestClient, RecordingTgtadm, Path], tmp_path: Path
) -> None:
    client, _, _ = role
    with client:
        client.post("/api/v1/luns", json={"key": f"{UUID}/disk0.raw", "size_mib": 4})
    fresh = RecordingTgtadm()
    config = StorageRoleConfig(listen="127.0.0.1:0", portal="10.0.0.2:3260",
                               target="iqn.2026-12.io.vmshift:ds.x", state_dir=tmp_path / "state",
                               token_file=tmp_path / "token")
    with TestClient(create_app(config, fresh)):
        assert fresh.target == "iqn.2026-12.io.vmshift:ds.x" and fresh.luns == {1}


def test_agent_config_names_storage_role_tokens(tmp_path: Path) -> None:
    base = {"name": "host-1", "listen": "127.0.0.1:8101", "state_dir": str(tmp_path), "ca_file": "/ca.pem"}
    cfg = config_from_dict({**base, "storage_role_tokens": {"iscsi-1": "/run/token"}})
    assert cfg.storage_role_tokens == {"iscsi-1": Path("/run/token")}
    with pytest.raises(InvalidInputError, match="storage_role_tokens"):
        config_from_dict({**base, "storage_role_tokens": ["/run/token"]})


def test_moves_that_copy_disk_files_refuse_luns(tmp_path: Path) -> None:
    folder = tmp_path / "iscsi-1"
    folder.mkdir()
    (folder / ".vmshift-datastore.json").write_text(json.dumps({
        "uuid": UUID, "name": "iscsi-1", "type": "iscsi", "portal": "10.0.0.2:3260",
        "target": "iqn.2026-12.io.vmshift:ds.x", "storage_role": "http://10.0.0.2:8102"}))
    files = VmFiles(Datastores([folder]), tmp_path / "state")
    spec = VmSpec(name="v", uuid=UUID, cpus=1, memory_mib=128, datastore="iscsi-1", cpu_model="qemu64",
                  machine_type="pc-q35-10.0", boot=BootSpec(kind=BootKind.DISK),
                  disks=[DiskSpec(datastore="iscsi-1", file="disk0.qcow2", size_mib=64)])
    with pytest.raises(InvalidInputError, match="keeps disks as LUNs"):
        files.require_file_disks(spec, "A disk move")
    assert files.missing_disks(spec) == [], "a LUN's note is made on define: never missing"
