"""`vmshift vm migrate` and `vmshift migration list|show` against a real server and fake agents."""

from __future__ import annotations

import json

import pytest
from conftest import ServerHarness
from test_migrations_fakes import Pair, migrating_agents_fixture, pair_fixture  # noqa: F401
from typer.testing import CliRunner

from vmshift.cli.main import app
from vmshift.cli.migrate import parse_rate
from vmshift.errors import InvalidInputError


def cli(server: ServerHarness, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, [*server.cli_args(), *args])
    return result.exit_code, result.stdout


def test_migrate_json_check_only_dry_run_and_list(server: ServerHarness, pair: Pair) -> None:
    code, out = cli(server, "vm", "migrate", "vm-1", "--host", "host-2", "--check-only")
    assert code == 0 and "reachability" in out
    code, out = cli(server, "vm", "migrate", "vm-1", "--host", "host-2", "--dry-run", "--json",
                    "--bandwidth-limit", "400mbit")  # fmt: skip
    assert code == 0 and json.loads(out)["prediction"]["bandwidth_bps"] == 50e6

    code, out = cli(server, "vm", "migrate", "vm-1", "--host", "host-2", "--json", "--max-downtime", "700")
    assert code == 0, out
    m = json.loads(out)
    assert m["status"] == "completed" and m["downtime_ms"] == 42 and m["total_ms"] == 1234
    assert m["rounds"] == 3 and m["bytes_sent"] > 0 and m["predicted_total_ms"] is not None
    assert m["predicted_downtime_ms"] is not None and m["actions"][0]["kind"] == "set_downtime_limit"
    assert m["settings"]["max_downtime_ms"] == 700

    code, out = cli(server, "migration", "list", "--json")
    assert code == 0 and [x["id"] for x in json.loads(out)] == [m["id"]]
    code, out = cli(server, "migration", "show", str(m["id"]))
    assert code == 0 and "Actual vs predicted" in out and "set_downtime_limit" in out

    # back to host-1 fails the checks when host-1 is in maintenance: exit 1, nothing started
    server.client.post("/hosts/host-1/maintenance", json={"enter": True})
    code, out = cli(server, "vm", "migrate", "vm-1", "--host", "host-1", "--check-only")
    assert code == 1 and "maintenance" in out
    code, _ = cli(server, "vm", "migrate", "vm-1", "--host", "host-1")
    assert code == 1
    assert len(server.client.get("/migrations").json()) == 1


@pytest.mark.parametrize(
    ("text", "bps"),
    [("1gbit", 125e6), ("300mbit", 37.5e6), ("50MB/s", 50e6), ("1MiB/s", 2**20), ("125000000", 125e6)],
)
def test_parse_rate(text: str, bps: float) -> None:
    assert parse_rate(text) == pytest.approx(bps)


def test_parse_rate_rejects_garbage() -> None:
    with pytest.raises(InvalidInputError, match="not valid"):
        parse_rate("fast")


def test_migration_settings_of_vm_and_host(server: ServerHarness, pair: Pair) -> None:
    code, out = cli(server, "vm", "migration-settings", "vm-1", "--max-downtime", "800", "--allow-postcopy",
                    "--json")  # fmt: skip
    assert code == 0, out
    assert json.loads(out) == {"max_downtime_ms": 800, "allow_postcopy": True, "encryption": "opportunistic"}
    code, out = cli(server, "vm", "migration-settings", "vm-1", "--json")  # no option: show, change nothing
    assert code == 0 and json.loads(out) == {"max_downtime_ms": 800, "allow_postcopy": True,
                                             "encryption": "opportunistic"}

    code, out = cli(server, "host", "migration-settings", "host-1", "--bandwidth-limit", "1gbit",
                    "--limit", "2", "--json")  # fmt: skip
    assert code == 0, out
    host = json.loads(out)
    assert host["bandwidth_limit_bps"] == pytest.approx(125e6) and host["migration_limit"] == 2
    code, out = cli(server, "host", "migration-settings", "host-1", "--bandwidth-limit", "none", "--json")
    cleared = json.loads(out)
    assert code == 0 and cleared["bandwidth_limit_bps"] is None and cleared["migration_limit"] == 2

    # a bad value is refused and changes nothing
    code, _ = cli(server, "vm", "migration-settings", "vm-1", "--max-downtime", "0")
    assert code != 0
    code, out = cli(server, "vm", "migration-settings", "vm-1", "--json")
    assert json.loads(out)["max_downtime_ms"] == 800
