"""Input rules of the server's API (docs/api.md): names matched whole, unknown fields refused, sizes,
rates and ids bounded. Every refusal is a 4xx with one sentence and a hint, and nothing changes: the
inventory as the API lists it, the database's rows and the fake agents' mutations are compared
before and after each bad request. Also: POST /hosts by hand (it is left out of the fuzzing), 405
with Allow, and what the OpenAPI document says about every route and field.
"""

from __future__ import annotations

import socket
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from conftest import AgentFactory, ServerHarness, wait_for
from vmshift_fake_agent import FakeAgent

POOL = {"cidr": "10.213.2.0/24", "first": "10.213.2.100", "last": "10.213.2.101"}
LISTS = ("/vms", "/hosts", "/tasks", "/events", "/datacenters", "/clusters", "/networks", "/datastores",
         "/schedules", "/migrations")  # fmt: skip
VOLATILE = {"last_heartbeat", "stats"}  # the heartbeat refreshes these on its own
HOST_SETTINGS, VM_SETTINGS = "/hosts/host-1/migration-settings", "/vms/vm-1/migration-settings"


def vm_body(name: str = "vm-2", **kw: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"name": name, "host": "host-1", "datastore": "shared-1", "memory_mib": 256,
                            "networks": ["VM Network"], "disks_mib": [64]}  # fmt: skip
    body.update(kw)
    return body


def _stable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    return value


def snapshot(server: ServerHarness, agents: tuple[FakeAgent, ...]) -> dict[str, Any]:
    """Everything a bad request could have changed: each list of the API, the rows, the agents."""
    out: dict[str, Any] = {path: _stable(server.client.get(path).json()) for path in LISTS}
    out["rows"] = server.counts()
    out["agents"] = [list(a.mutations) for a in agents]
    return out


@pytest.fixture
def inventory(server: ServerHarness, agents: AgentFactory) -> tuple[FakeAgent, FakeAgent]:
    """Two hosts sharing shared-1, an IP pool, VM vm-1 (powered off) on host-1."""
    ag1, t1 = agents("host-1")
    ag2, t2 = agents("host-2")
    server.add_host(t1)
    server.add_host(t2)
    assert server.client.put("/networks/VM Network/ip-pool", json=POOL).status_code == 200
    r = server.client.post("/vms", json=vm_body("vm-1"))
    assert r.status_code == 202, r.text
    assert server.wait_task(r.json()["id"])["state"] == "success"

    def both_polled() -> bool:  # these agents do not stream: the event of each is written in the background
        events = server.client.get("/events", params={"limit": 100}).json()
        return {e["target"] for e in events if e["kind"] == "host.polled"} >= {"host-1", "host-2"}

    wait_for(both_polled, 30, "the server polling both hosts")  # else it could land between two snapshots
    return ag1, ag2


def _future() -> str:
    return (datetime.now(UTC) + timedelta(hours=1)).isoformat()


BAD = [
    # names are matched whole, in bodies and in paths
    ("name with a newline", "POST", "/vms", vm_body("web-1\n"), "Field 'name' is invalid"),
    ("name with a slash", "POST", "/vms", vm_body("a/b"), "Field 'name' is invalid"),
    ("empty name", "POST", "/vms", vm_body(""), "Field 'name' is invalid"),
    ("200-char name", "POST", "/vms", vm_body("x" * 200), "Field 'name' is invalid"),
    ("name starting with a dash", "POST", "/vms", vm_body("-vm"), "Field 'name' is invalid"),
    ("host name with a newline", "POST", "/vms", vm_body(host="host-1\n"), "Field 'host' is invalid"),
    ("datastore with a newline", "POST", "/vms", vm_body(datastore="shared-1\n"), "'datastore' is invalid"),
    ("network with a newline", "POST", "/vms", vm_body(networks=["VM Network\n"]), "'networks.0' is invalid"),
    ("image path", "POST", "/vms", vm_body(image="../../etc/passwd"), "Field 'image' is invalid"),
    ("cpu model with a newline", "POST", "/vms", vm_body(cpu_model="host\n"), "'cpu_model' is invalid"),
    ("cluster name", "POST", "/clusters", {"name": "web-1\n"}, "Field 'name' is invalid"),
    ("datacenter name", "POST", "/datacenters", {"name": "a/b"}, "Field 'name' is invalid"),
    ("cluster's datacenter", "POST", "/clusters", {"name": "c", "datacenter": "D\n"}, "'datacenter'"),
    ("migrate target", "POST", "/vms/vm-1/migrate", {"host": "host-2\n"}, "Field 'host' is invalid"),
    ("schedule VM", "POST", "/schedules", {"vm": "vm-1\n", "at": _future(), "migrate": {"host": "host-2"}},
     "Field 'vm' is invalid"),
    ("schedule name", "POST", "/schedules",
     {"vm": "vm-1", "name": "s\n", "at": _future(), "migrate": {"host": "host-2"}}, "'name' is invalid"),
    ("VM in a path", "GET", "/vms/vm-1%0A", None, "path parameter 'name' is invalid"),
    ("VM to delete", "DELETE", "/vms/vm-1%0A", None, "path parameter 'name' is invalid"),
    ("VM to power", "POST", "/vms/vm-1%0A/power", {"action": "start"}, "path parameter 'name'"),
    ("host to remove", "DELETE", "/hosts/host-1%0A", None, "path parameter 'name' is invalid"),
    ("network in a path", "PUT", "/networks/VM%20Network%0A/ip-pool", POOL, "path parameter 'name'"),
    ("schedule in a path", "DELETE", "/schedules/s%0A", None, "path parameter 'name' is invalid"),
    ("VM filter", "GET", "/migrations?vm=vm-1%0A", None, "query parameter 'vm' is invalid"),
    # unknown fields are refused by name
    ("unknown VM field", "POST", "/vms", vm_body(cpu=2), "Field 'cpu' is not a field of this request"),
    ("unknown migrate field", "POST", "/vms/vm-1/migrate", {"host": "host-2", "max_downtime": 100},
     "Field 'max_downtime' is not a field"),
    ("unknown nested field", "POST", "/schedules", {"vm": "vm-1", "at": _future(),
     "migrate": {"host": "host-2", "hots": "x"}}, "Field 'migrate.hots' is not a field"),
    ("unknown VM setting", "PATCH", VM_SETTINGS, {"max_downtime": 5}, "'max_downtime'"),
    ("unknown host setting", "PATCH", HOST_SETTINGS, {"bandwidth": 5}, "'bandwidth'"),
    ("unknown power field", "POST", "/vms/vm-1/power", {"action": "start", "force": True}, "'force'"),
    ("unknown maintenance field", "POST", "/hosts/host-1/maintenance", {"enter": True, "now": 1}, "'now'"),
    ("unknown pool field", "PUT", "/networks/VM Network/ip-pool", {**POOL, "gw": "10.0.0.1"}, "'gw'"),
    ("unknown cluster field", "POST", "/clusters", {"name": "Gold", "ha": True}, "Field 'ha' is not a field"),
    # sizes, counts, rates, durations and ids are bounded
    ("too many CPUs", "POST", "/vms", vm_body(cpus=65), "Field 'cpus' is invalid"),
    ("a petabyte of RAM", "POST", "/vms", vm_body(memory_mib=1 << 30), "Field 'memory_mib' is invalid"),
    ("empty disk", "POST", "/vms", vm_body(disks_mib=[0]), "Field 'disks_mib.0' is invalid"),
    ("huge disk", "POST", "/vms", vm_body(disks_mib=[1 << 30]), "Field 'disks_mib.0' is invalid"),
    ("17 disks", "POST", "/vms", vm_body(disks_mib=[64] * 17), "Field 'disks_mib' is invalid"),
    ("9 NICs", "POST", "/vms", vm_body(networks=["VM Network"] * 9), "Field 'networks' is invalid"),
    ("long kernel args", "POST", "/vms", vm_body(kernel_args="a" * 3000), "'kernel_args' is invalid"),
    ("kernel args with a newline", "POST", "/vms", vm_body(kernel_args="a\ninit=/bin/sh"), "kernel_args"),
    ("downtime of an hour", "POST", "/vms/vm-1/migrate", {"host": "host-2", "max_downtime_ms": 3_600_000},
     "Field 'max_downtime_ms' is invalid"),
    ("rate beyond any link", "POST", "/vms/vm-1/migrate", {"host": "host-2", "bandwidth_limit_bps": 1e13},
     "Field 'bandwidth_limit_bps' is invalid"),
    ("post-copy after a year", "POST", "/vms/vm-1/migrate",
     {"host": "host-2", "allow_postcopy": True, "postcopy_after_s": 3e7}, "'postcopy_after_s' is invalid"),
    ("negative link rate", "PATCH", HOST_SETTINGS, {"link_rate_bps": -1}, "'link_rate_bps'"),
    ("migration limit", "PATCH", HOST_SETTINGS, {"migration_limit": 65}, "'migration_limit'"),
    ("VM downtime setting", "PATCH", VM_SETTINGS, {"max_downtime_ms": 0}, "'max_downtime_ms'"),
    ("long cron", "POST", "/schedules", {"vm": "vm-1", "cron": "0 " * 60, "migrate": {"host": "host-2"}},
     "Field 'cron' is invalid"),
    ("migration id beyond int4", "GET", "/migrations/99999999999999", None, "'migration_id' is invalid"),
    ("task id 0", "GET", "/tasks/0", None, "path parameter 'task_id' is invalid"),
    ("cancel beyond int4", "POST", "/tasks/2147483648/cancel", None, "'task_id' is invalid"),
    ("finalize id -1", "POST", "/migrations/-1/finalize", None, "'migration_id' is invalid"),
    ("list limit 0", "GET", "/events?limit=0", None, "query parameter 'limit' is invalid"),
    ("long event target", "GET", "/events?target=" + "x" * 200, None, "query parameter 'target' is invalid"),
]


@pytest.mark.parametrize(("case", "method", "path", "body", "text"), BAD, ids=[c[0] for c in BAD])
def test_bad_input_is_a_4xx_and_changes_nothing(
    server: ServerHarness, inventory: tuple[FakeAgent, FakeAgent], case: str, method: str, path: str,
    body: Any, text: str,
) -> None:  # fmt: skip
    before = snapshot(server, inventory)
    r = server.client.request(method, path, json=body)
    assert r.status_code == 422, (case, r.status_code, r.text)
    err = r.json()["error"]
    assert text in err["message"], err
    assert err["code"] == "invalid_input" and err["message"].endswith(".") and err["hint"]
    assert ". " not in err["message"], err  # one sentence
    assert snapshot(server, inventory) == before


def test_good_names_and_bounds_still_work(
    server: ServerHarness, inventory: tuple[FakeAgent, FakeAgent]
) -> None:
    """The limits refuse only what they should: the longest name, a dotted name, the maximum CPUs."""
    name = "v" * 62 + "9"
    r = server.client.post("/vms", json=vm_body(name, cpus=1, disks_mib=[64, 1], kernel_args="quiet a=b"))
    assert r.status_code == 202, r.text
    assert server.wait_task(r.json()["id"])["state"] == "success"
    assert server.client.get(f"/vms/{name}").json()["name"] == name
    r = server.client.patch("/hosts/host-1/migration-settings", json={"migration_limit": 64})
    assert r.status_code == 200 and r.json()["migration_limit"] == 64
    r = server.client.post("/clusters", json={"name": "gold.eu-1_a"})
    assert r.status_code == 201, r.text


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port  # closed again: nothing listens there


@pytest.mark.parametrize(
    "address",
    ["no-port", "127.0.0.1", "127.0.0.1:0", "127.0.0.1:65536", "127.0.0.1:8101\n", "exec:rm -rf /",
     "http://127.0.0.1:8101", "127.0.0.1:81/x", "a b:80", ":8101", "", "x" * 300 + ":80", "127.0.0.1:-1"],
)  # fmt: skip
def test_add_host_refuses_bad_addresses(
    server: ServerHarness, inventory: tuple[FakeAgent, FakeAgent], address: str
) -> None:
    before = snapshot(server, inventory)
    r = server.client.post("/hosts", json={"address": address})
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert "'address'" in err["message"] and err["hint"]
    assert snapshot(server, inventory) == before


def test_add_host_refuses_unknown_fields_and_clusters_and_closed_ports(
    server: ServerHarness, inventory: tuple[FakeAgent, FakeAgent]
) -> None:
    before = snapshot(server, inventory)
    port = _closed_port()
    for body, status, text in (
        ({"address": f"127.0.0.1:{port}", "token": "x"}, 422, "Field 'token' is not a field"),
        ({"address": f"127.0.0.1:{port}", "cluster": "Nope"}, 404, "Cluster 'Nope' does not exist"),
        ({"address": f"127.0.0.1:{port}", "cluster": "C\n"}, 422, "Field 'cluster' is invalid"),
        ({"address": f"127.0.0.1:{port}"}, 502, "cannot be reached"),
    ):
        r = server.client.post("/hosts", json=body)
        assert r.status_code == status, r.text
        assert text in r.json()["error"]["message"] and r.json()["error"]["hint"]
        assert snapshot(server, inventory) == before


def test_wrong_method_is_405_with_allow(server: ServerHarness) -> None:
    for method, path, allow in (("DELETE", "/vms", "GET, POST"), ("PUT", "/vms/vm-1", "DELETE, GET"),
                                ("GET", "/vms/vm-1/migrate", "POST"), ("POST", "/about", "GET")):  # fmt: skip
        r = server.client.request(method, path)
        assert r.status_code == 405, (method, path)
        assert r.headers["allow"] == allow
        err = r.json()["error"]
        assert err["code"] == "method_not_allowed" and err["message"].endswith(".") and allow in err["hint"]


def _schemas_of_request_bodies(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    components = spec["components"]["schemas"]
    seen: dict[str, dict[str, Any]] = {}

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str):
                name = ref.rsplit("/", 1)[1]
                if name not in seen:
                    seen[name] = components[name]
                    visit(components[name])
            for v in node.values():
                visit(v)
        elif isinstance(node, list):
            for v in node:
                visit(v)

    for ops in spec["paths"].values():
        for op in ops.values():
            visit(op.get("requestBody"))
    return seen


def _unbounded(prop: dict[str, Any]) -> bool:
    """A scalar property a client could send any value of (no pattern, enum, format or range)."""
    options = prop.get("anyOf", [prop])
    for p in options:
        kind = p.get("type")
        if kind == "string" and not ({"pattern", "enum", "format", "maxLength", "const"} & set(p)):
            return True
        if kind in ("integer", "number") and not (
            {"minimum", "exclusiveMinimum"} & set(p) and {"maximum", "exclusiveMaximum"} & set(p)
        ):
            return True
        if kind == "array" and "$ref" not in p.get("items", {}) and _unbounded(p.get("items", {})):
            return True
    return False


def test_openapi_documents_every_status_and_constraint(server: ServerHarness) -> None:
    spec = httpx.get(str(server.client.base_url).rstrip("/") + "/openapi.json", verify=server.tls()).json()
    assert spec["components"]["securitySchemes"]["HTTPBearer"] == {
        "type": "http", "scheme": "bearer",
        "description": "the API's token (the content of the server's token_file)",
    }  # fmt: skip
    error_schemas = {"#/components/schemas/ErrorBody", "#/components/schemas/CheckFailedBody",
                     "#/components/schemas/FingerprintBody"}
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            where = f"{method.upper()} {path}"
            assert op.get("security") == [{"HTTPBearer": []}], where
            responses = op["responses"]
            assert "401" in responses, where
            if op.get("parameters") or op.get("requestBody"):
                assert "422" in responses, where
            if op.get("requestBody"):
                assert "400" in responses, where
            for status, answer in responses.items():
                if status.startswith(("4", "5")):
                    schema = answer["content"]["application/json"]["schema"]
                    assert schema.get("$ref") in error_schemas, (where, status, schema)
            for param in op.get("parameters", []):
                assert not _unbounded(param["schema"]), (where, param)
    for name, schema in _schemas_of_request_bodies(spec).items():
        if "properties" not in schema:
            continue
        assert schema.get("additionalProperties") is False, name
        for field, prop in schema["properties"].items():
            assert not _unbounded(prop), f"{name}.{field} documents no constraint: {prop}"
