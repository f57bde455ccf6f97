"""`vmshift vm ...`"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

import typer

from vmshift.cli import context
from vmshift.cli.hosts import JsonOpt
from vmshift.cli.migrate import vm_migrate
from vmshift.cli.migration_settings import vm_migration_settings
from vmshift.cli.output import emit_json, fields, table, wait_with_progress
from vmshift.cli.vm_import import vm_import_libvirt, vm_import_ova
from vmshift.errors import InvalidInputError
from vmshift.model.enums import CloneMode, PowerAction, PowerState
from vmshift.model.inputs import SSH_KEY_PATTERN

vm_app = typer.Typer(help="Virtual machines.", no_args_is_help=True)
vm_app.command("migrate")(vm_migrate)
vm_app.command("migration-settings")(vm_migration_settings)
vm_app.command("import-ova")(vm_import_ova)
vm_app.command("import-libvirt")(vm_import_libvirt)

NoWait = Annotated[bool, typer.Option("--no-wait", help="Return the task id at once.")]
_SIZE = re.compile(r"^(\d+)\s*([MGmg]i?[Bb]?)?$")


def parse_size_mib(text: str) -> int:
    """'64M', '1G', '512' (MiB) -> MiB."""
    m = _SIZE.match(text.strip())
    if not m or int(m.group(1)) <= 0:
        raise InvalidInputError(
            f"Disk size {text!r} is not valid.", hint="Use a positive size like 64M or 2G."
        )
    n = int(m.group(1))
    return n * 1024 if (m.group(2) or "M")[0] in "Gg" else n


_SSH_KEY = re.compile(SSH_KEY_PATTERN)


def read_ssh_keys(path: Path) -> list[str]:
    """The public keys in an OpenSSH public key file (one a line; blank lines and # comments skipped)."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"Cannot read the SSH key file {path}: {exc}.",
                                hint="Give a public key file such as ~/.ssh/id_ed25519.pub.") from exc
    keys = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    bad = next((k for k in keys if not _SSH_KEY.fullmatch(k)), "")
    if bad or not keys:
        what = f"has a line that is not a public key ({bad[:24]}...)" if bad else "holds no public key"
        raise InvalidInputError(f"The SSH key file {path} {what}.",
                                hint="Give the .pub file, never the private key: ~/.ssh/id_ed25519.pub.")
    return keys


_POWER_WORDS = {"on": PowerState.POWERED_ON, "off": PowerState.POWERED_OFF}


def parse_power_state(text: str) -> PowerState:
    """'on', 'off', or a PowerState value in any case ('poweredOn', 'paused')."""
    word = text.strip().lower()
    by_value = {s.value.lower(): s for s in PowerState}
    state = _POWER_WORDS.get(word) or by_value.get(word)
    if state is None:
        choices = ", ".join(["on", "off", *(s.value for s in PowerState)])
        raise InvalidInputError(f"Power state {text!r} is not known.", hint=f"Use one of: {choices}.")
    return state


def _finish(c: Any, task: dict[str, Any], *, no_wait: bool, json_: bool, vm: str | None) -> None:
    if no_wait:
        if json_:
            emit_json(task)
        else:
            tid = task["id"]
            typer.echo(f"Task {tid} queued ({task['kind']}); follow it with 'vmshift task watch {tid}'.")
        return
    final = wait_with_progress(c, task, quiet=json_)
    if json_:
        emit_json(c.get_vm(vm) if vm and final["kind"] != "vm.delete" else final)
    else:
        typer.echo(f"{final['kind']} {final.get('target')}: {final['state']}")


def vm_summary(v: dict[str, Any]) -> list[Any]:
    return [v["name"], v.get("host"), v.get("power_state"), v.get("ip"), v.get("cpus"),
            v.get("memory_mib"), v.get("datastore"), v.get("cpu_model")]


@vm_app.command("create")
def vm_create(
    name: str,
    datastore: Annotated[str, typer.Option(help="Home datastore: the VM's files go to DATASTORE/NAME/.")],
    host: Annotated[str | None, typer.Option(
        help="Host to place the VM on (default: initial placement chooses one).")] = None,
    cluster: Annotated[str | None, typer.Option(
        help="Without --host: the cluster to place it in (default: the one whose hosts see the datastore).",
    )] = None,
    cpus: Annotated[int, typer.Option(help="Virtual CPUs.")] = 1,
    memory: Annotated[int, typer.Option(help="Memory in MiB.")] = 256,
    network: Annotated[list[str] | None, typer.Option(help="Network label for a NIC (repeatable).")] = None,
    disk: Annotated[list[str] | None, typer.Option(help="Disk size, e.g. 64M (repeatable).")] = None,
    image: Annotated[str, typer.Option(help="Kernel image on the datastore to boot.")] = "lab-guest",
    disk_image: Annotated[str | None, typer.Option(
        help="Boot from this disk image on the datastore instead (BIOS; the VM gets a cloud-init seed).",
    )] = None,
    clone: Annotated[CloneMode, typer.Option(
        help="With --disk-image: the first disk is an overlay of the image (linked) or a whole copy (full).",
    )] = CloneMode.LINKED,
    ssh_key: Annotated[list[Path] | None, typer.Option(
        help="With --disk-image: a public key file for the guest's default user (repeatable).",
    )] = None,
    kernel_args: Annotated[str, typer.Option(help="Extra kernel command line (kernel boot only).")] = "",
    cpu_model: Annotated[str | None, typer.Option(help="QEMU CPU model (default: cluster baseline).")] = None,
    machine_type: Annotated[str | None, typer.Option(help="Machine type (default: host's, pinned).")] = None,
    start: Annotated[bool, typer.Option("--start", help="Power on after creating.")] = False,
    no_wait: NoWait = False,
    json_: JsonOpt = False,
) -> None:
    """Create a VM (and start it with --start): it boots a kernel image, or a disk image with --disk-image."""
    keys = [key for path in ssh_key or [] for key in read_ssh_keys(path)]
    body: dict[str, Any] = {
        "name": name, "host": host, "cluster": cluster, "cpus": cpus, "memory_mib": memory,
        "datastore": datastore,
        "networks": network or [], "disks_mib": [parse_size_mib(d) for d in disk or []],
        "image": image, "kernel_args": kernel_args, "cpu_model": cpu_model,
        "machine_type": machine_type, "start": start,
    }
    if disk_image is not None or keys or clone is not CloneMode.LINKED:
        body.update({"disk_image": disk_image, "clone": clone.value, "ssh_keys": keys})
    with context.client() as c:
        task = c.create_vm(body)
        _finish(c, task, no_wait=no_wait, json_=json_, vm=name)
        if host is None and not (no_wait or json_):
            typer.echo(f"Initial placement chose host {c.get_vm(name)['host']}.")


@vm_app.command("list")
def vm_list(
    host: Annotated[str | None, typer.Option(help="Only VMs on this host.")] = None,
    cluster: Annotated[str | None, typer.Option(help="Only VMs on the hosts of this cluster.")] = None,
    power_state: Annotated[str | None, typer.Option(
        help="Only VMs in this power state: on, off, or a state as the API names it (paused, suspended...).",
    )] = None,
    name_prefix: Annotated[str | None, typer.Option(help="Only VMs whose name starts with this.")] = None,
    json_: JsonOpt = False,
) -> None:
    """List VMs (all that match, fetched page by page)."""
    with context.client() as c:
        state = parse_power_state(power_state) if power_state is not None else None
        vms = c.list_vms(host=host, cluster=cluster, power_state=state, name_prefix=name_prefix)
    if json_:
        emit_json(vms)
    else:
        table("VMs", ["name", "host", "power", "ip", "cpus", "MiB", "datastore", "cpu model"],
              (vm_summary(v) for v in vms))


@vm_app.command("show")
def vm_show(name: str, json_: JsonOpt = False) -> None:
    """Show a VM's configuration and runtime state."""
    with context.client() as c:
        v = c.get_vm(name)
    if json_:
        emit_json(v)
    else:
        fields(f"VM {name}", v)


def _power(name: str, action: PowerAction, no_wait: bool, json_: bool) -> None:
    with context.client() as c:
        task = c.power_vm(name, action)
        _finish(c, task, no_wait=no_wait, json_=json_, vm=name)


@vm_app.command("suspend")
def vm_suspend(name: str, no_wait: NoWait = False, json_: JsonOpt = False) -> None:
    """Suspend a running VM: save its memory and device state to its folder and stop it. 'vm resume'
    (or 'vm start') continues it where it stopped; 'vm stop' discards the saved state."""
    with context.client() as c:
        task = c.suspend_vm(name)
        if no_wait:
            _finish(c, task, no_wait=True, json_=json_, vm=name)
            return
        result = wait_with_progress(c, task, quiet=json_).get("result") or {}
        if json_:
            emit_json({**c.get_vm(name), "suspend": result})
            return
    mib, rate = (result.get("written_bytes") or 0) / 2**20, (result.get("write_bps") or 0) / 2**20
    typer.echo(f"VM {name} suspended: {mib:.0f} MiB written in {result.get('save_s')} s ({rate:.0f} MiB/s) "
               f"to {result.get('state_file')}.")


@vm_app.command("resume")
def vm_resume(
    name: str,
    force: Annotated[bool, typer.Option(
        "--force",
        help="For a VM a migration left paused: resume the source although the target host cannot be "
        "reached. Only when that host is down for good and its QEMU gone.")] = False,
    no_wait: NoWait = False,
    json_: JsonOpt = False,
) -> None:
    """Resume a paused or suspended VM (a suspended one continues from its saved state, which is then
    removed). One that a migration left paused on both hosts is resumed on its source only when the
    target proves it never ran it (else use 'vmshift migration finalize')."""
    with context.client() as c:
        task = c.resume_vm(name, force=force)
        _finish(c, task, no_wait=no_wait, json_=json_, vm=name)


@vm_app.command("start")
def vm_start(name: str, no_wait: NoWait = False, json_: JsonOpt = False) -> None:
    """Power a VM on (a suspended VM resumes from its saved state, as in vSphere)."""
    _power(name, PowerAction.START, no_wait, json_)


@vm_app.command("stop")
def vm_stop(name: str, no_wait: NoWait = False, json_: JsonOpt = False) -> None:
    """Power a VM off at once (like pulling the plug); a suspended VM's saved state is discarded."""
    _power(name, PowerAction.STOP, no_wait, json_)


@vm_app.command("shutdown")
def vm_shutdown(name: str, no_wait: NoWait = False, json_: JsonOpt = False) -> None:
    """Ask the guest to shut down (ACPI); power off hard after a timeout."""
    _power(name, PowerAction.SHUTDOWN, no_wait, json_)


@vm_app.command("reset")
def vm_reset(name: str, no_wait: NoWait = False, json_: JsonOpt = False) -> None:
    """Reset a running VM (hard reboot)."""
    _power(name, PowerAction.RESET, no_wait, json_)


@vm_app.command("delete")
def vm_delete(name: str, no_wait: NoWait = False, json_: JsonOpt = False) -> None:
    """Delete a powered-off VM and its files."""
    with context.client() as c:
        task = c.delete_vm(name)
        _finish(c, task, no_wait=no_wait, json_=json_, vm=name)
