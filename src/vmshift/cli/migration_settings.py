"""`vmshift vm migration-settings` and `vmshift host migration-settings`: the knobs migrations start from."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from vmshift.cli import context
from vmshift.cli.hosts import JsonOpt
from vmshift.cli.migrate import human_rate, parse_rate
from vmshift.cli.output import emit_json, fields
from vmshift.model.enums import MigrationEncryption

EncryptionOpt = Annotated[
    MigrationEncryption | None,
    typer.Option(help="Encrypted vMotion: disabled, opportunistic (default) or required."),
]
RateOpt = Annotated[
    str | None,
    typer.Option(help="A rate like 1gbit or 50MB/s; 'none' removes it."),
]


def _rate_or_none(text: str) -> float | None:
    return None if text.strip().lower() in ("none", "unlimited", "off") else parse_rate(text)


def vm_migration_settings(
    name: str,
    max_downtime: Annotated[int | None, typer.Option(help="Downtime budget in ms (default 500).")] = None,
    postcopy: Annotated[
        bool | None, typer.Option("--allow-postcopy/--no-postcopy", help="May migrations use post-copy?")
    ] = None,
    encryption: EncryptionOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Show or change a VM's migration settings (no option: show them)."""
    changes: dict[str, Any] = {}
    if encryption is not None:
        changes["encryption"] = encryption.value
    if max_downtime is not None:
        changes["max_downtime_ms"] = max_downtime
    if postcopy is not None:
        changes["allow_postcopy"] = postcopy
    with context.client() as c:
        result = c.set_vm_migration_settings(name, **changes)
    if json_:
        emit_json(result)
    else:
        fields(f"Migration settings of VM {name}", result)


def host_migration_settings(
    name: str,
    bandwidth_limit: RateOpt = None,
    link_rate: RateOpt = None,
    limit: Annotated[int | None, typer.Option(help="Concurrent migrations before they queue.")] = None,
    encryption: EncryptionOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Show or change a host's migration settings (no option: show them)."""
    changes: dict[str, Any] = {}
    if encryption is not None:
        changes["encryption"] = encryption.value
    if bandwidth_limit is not None:
        changes["bandwidth_limit_bps"] = _rate_or_none(bandwidth_limit)
    if link_rate is not None:
        changes["link_rate_bps"] = _rate_or_none(link_rate)
    if limit is not None:
        changes["migration_limit"] = limit
    with context.client() as c:
        result = c.set_host_migration_settings(name, **changes)
    if json_:
        emit_json(result)
        return
    bandwidth, link = result.get("bandwidth_limit_bps"), result.get("link_rate_bps")
    fields(f"Migration settings of host {name}", {
        "bandwidth limit": human_rate(bandwidth) if bandwidth else "unlimited",
        "configured link rate": human_rate(link) if link else "none (measured before each migration)",
        "concurrent migrations": result.get("migration_limit"),
        "encryption": result.get("encryption"),
    })
