"""The `vmshift` command: noun-verb like govc (`vmshift vm create ...`)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from vmshift.cli import context
from vmshift.cli.drs import cluster_app, drs_app, vm_set
from vmshift.cli.hosts import datastore_app, host_app, network_app
from vmshift.cli.image import image_app
from vmshift.cli.migrate import migration_app
from vmshift.cli.migration_settings import host_migration_settings
from vmshift.cli.output import show_error
from vmshift.cli.rules import rule_app
from vmshift.cli.schedules import schedule_app
from vmshift.cli.tasks import event_app, task_app
from vmshift.cli.vms import vm_app
from vmshift.errors import VmshiftError

app = typer.Typer(
    help="vmshift: live migration and cluster management for QEMU/KVM.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
host_app.command("migration-settings")(host_migration_settings)
vm_app.command("set")(vm_set)
app.add_typer(host_app, name="host")
app.add_typer(datastore_app, name="datastore")
app.add_typer(network_app, name="network")
app.add_typer(vm_app, name="vm")
app.add_typer(migration_app, name="migration")
app.add_typer(schedule_app, name="schedule")
app.add_typer(rule_app, name="rule")
app.add_typer(task_app, name="task")
app.add_typer(event_app, name="event")
app.add_typer(image_app, name="image")
app.add_typer(cluster_app, name="cluster")
app.add_typer(drs_app, name="drs")


def _add_lab() -> None:
    try:
        from vmshift.cli.lab import lab_app
    except ImportError:  # pragma: no cover - only while the lab module is being written
        return
    app.add_typer(lab_app, name="lab")


_add_lab()


@app.callback()
def main(
    server: Annotated[
        str | None, typer.Option(help="Server URL, https://HOST:PORT (or VMSHIFT_SERVER).")
    ] = None,
    token: Annotated[str | None, typer.Option(help="API token (or VMSHIFT_TOKEN).")] = None,
    ca_file: Annotated[
        Path | None,
        typer.Option(help="CA certificate to verify the server with (or VMSHIFT_CA_FILE; "
                     "print it with 'vmshift-server ca show')."),
    ] = None,
) -> None:
    context.settings.server = server
    context.settings.token = token
    context.settings.ca_file = ca_file


def run() -> None:
    try:
        app()
    except VmshiftError as exc:
        show_error(exc)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
