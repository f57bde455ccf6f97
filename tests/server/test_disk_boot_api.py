"""VMs created from a disk image (issue 10) against fake agents: the spec the agent gets, and bad
input refused with a 4xx and nothing changed."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import AgentFactory, ServerHarness
from vmshift_fake_agent import FakeAgent

from vmshift.model.enums import BootKind

POOL = {"cidr": "10.213.3.0/24", "first": "10.213.3.10", "last": "10.213.3.20"}
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIServerTestKey000000000000000000000000 me@laptop"


def body(name: str = "dvm-1", **kw: Any) -> dict[str, Any]:
    b: dict[str, Any] = {"name": name, "host": "host-1", "datastore": "shared-1", "memory_mib": 256,
                         "networks": ["VM Network"], "disk_image": "lab-disk", "ssh_keys": [KEY]}
    b.update(kw)
    return b


@pytest.fixture
def cluster(server: ServerHarness, agents: AgentFactory) -> FakeAgent:
    ag1, t1 = agents("host-1")
    server.add_host(t1)
    assert server.client.put("/networks/VM Network/ip-pool", json=POOL).status_code == 200
    return ag1


def create(server: ServerHarness, b: dict[str, Any]) -> dict[str, Any]:
    r = server.client.post("/vms", json=b)
    assert r.status_code == 202, r.text
    done: dict[str, Any] = server.wait_task(r.json()["id"])
    assert done["state"] == "success", done
    return done


def test_linked_clone_gets_an_overlay_and_a_seed(server: ServerHarness, cluster: FakeAgent) -> None:
    create(server, body(disks_mib=[8, 32]))
    spec = cluster.specs["dvm-1"]
    assert spec.boot.kind is BootKind.DISK and spec.boot.image == "lab-disk" and spec.boot.cmdline == ""
    first, second = spec.disks
    # the first disk is the image's overlay, at least the image's 20 MiB; the second is empty
    assert (first.backing_image, first.clone_of, first.size_mib) == ("lab-disk", None, 20)
    assert (second.backing_image, second.clone_of, second.size_mib) == (None, None, 32)
    vm = server.client.get("/vms/dvm-1").json()
    assert spec.seed is not None
    assert spec.seed.address == f"{vm['ip']}/24" and spec.seed.mac == vm["nics"][0]["mac"]
    assert spec.seed.hostname == "dvm-1" and spec.seed.instance_id == spec.uuid
    assert spec.seed.ssh_keys == [KEY]


def test_full_clone_copies_the_image(server: ServerHarness, cluster: FakeAgent) -> None:
    create(server, body(clone="full", disks_mib=[100], ssh_keys=[]))
    disk = cluster.specs["dvm-1"].disks[0]
    assert (disk.backing_image, disk.clone_of, disk.size_mib) == (None, "lab-disk", 100)


def _bad() -> list[tuple[str, dict[str, Any], int, str]]:
    return [
        ("unknown disk image", body(disk_image="debian-12"), 404, "Disk image 'debian-12' is not on"),
        ("kernel image as disk image", body(disk_image="lab-guest"), 404, "Disk image 'lab-guest'"),
        ("kernel args with a disk image", body(kernel_args="quiet"), 400, "kernel_args apply to kernel boot"),
        ("ssh key without disk image", body(disk_image=None), 400, "SSH keys go into a cloud-init seed"),
        ("clone without disk image", body(disk_image=None, ssh_keys=[], clone="full"), 400,
         "clone applies to a VM made from a disk image"),
        ("private key sent", body(ssh_keys=["-----BEGIN OPENSSH PRIVATE KEY-----"]), 422,
         "Field 'ssh_keys.0' is invalid"),
        ("unknown clone mode", body(clone="thin"), 422, "Field 'clone' is invalid"),
    ]


@pytest.mark.parametrize(("case", "b", "status", "text"), _bad(), ids=[c[0] for c in _bad()])
def test_bad_disk_boot_create_changes_nothing(
    server: ServerHarness, cluster: FakeAgent, case: str, b: dict[str, Any], status: int, text: str
) -> None:
    before, mutations = server.counts(), list(cluster.mutations)
    r = server.client.post("/vms", json=b)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert text in err["message"], err
    assert err["hint"]
    assert server.counts() == before and cluster.mutations == mutations


# ----- image import ------------------------------------------------------------------------------

def test_import_runs_as_a_task_and_the_image_is_bootable_at_once(
    server: ServerHarness, cluster: FakeAgent
) -> None:
    r = server.client.post("/images/import", json={"file": "/srv/in/web.vmdk", "name": "web",
                                                   "datastore": "shared-1"})
    assert r.status_code == 202, r.text
    task = server.wait_task(r.json()["id"])
    assert task["state"] == "success" and task["kind"] == "image.import", task
    assert task["result"]["image"] == "web" and task["result"]["host"] == "host-1"
    create(server, body("from-import", disk_image="web"))  # the facts were refreshed by the task
    assert cluster.specs["from-import"].disks[0].backing_image == "web"


@pytest.mark.parametrize(("req", "status", "text"), [
    ({"file": "/srv/in/corrupt.qcow2", "name": "c", "datastore": "shared-1"}, 400, "is corrupt"),
    ({"file": "/srv/in/x.qcow2", "name": "c", "datastore": "nope"}, 404, "Datastore 'nope' does not exist"),
    ({"file": "/srv/in/x.qcow2", "name": "lab-disk", "datastore": "shared-1"}, 409, "already has an image"),
    ({"file": "relative.qcow2", "name": "c", "datastore": "shared-1"}, 422, "Field 'file' is invalid"),
    ({"file": "/srv/in/x.img", "name": "c", "datastore": "shared-1", "format": "iso"}, 422,
     "Field 'format' is invalid"),
])
def test_bad_import_is_refused_without_a_task(
    server: ServerHarness, cluster: FakeAgent, req: dict[str, Any], status: int, text: str
) -> None:
    before = server.counts()
    r = server.client.post("/images/import", json=req)
    assert r.status_code == status, r.text
    assert text in r.json()["error"]["message"]
    assert server.counts() == before
