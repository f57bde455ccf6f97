"""`vmshift vm import-ova` and `vmshift vm import-libvirt`: make the VM an OVA or a libvirt domain
describes (docs/images.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from vmshift.cli import context
from vmshift.cli.hosts import JsonOpt
from vmshift.cli.output import emit_json, wait_with_progress
from vmshift.errors import InvalidInputError
from vmshift.model.images import MAX_DOMAIN_XML, VmImportSource

HostOpt = Annotated[str, typer.Option(help="Host to create the VM on (it reads the files).")]
DatastoreOpt = Annotated[str, typer.Option(help="Datastore for the VM and its imported disk images.")]
NetworkMapOpt = Annotated[list[str] | None, typer.Option(
    "--network-map", help="SRC=DST: the descriptor's network SRC is vmshift's network DST (repeatable; a "
    "network of the same name needs none).")]
NameOpt = Annotated[str | None, typer.Option(help="VM name (default: the descriptor's).")]
StartOpt = Annotated[bool, typer.Option("--start", help="Power on after importing.")]
NoWaitOpt = Annotated[bool, typer.Option("--no-wait", help="Return the task id at once.")]


def parse_network_map(pairs: list[str]) -> dict[str, str]:
    """['VM Network=lan', ...] -> {'VM Network': 'lan'}; each source once."""
    out: dict[str, str] = {}
    for pair in pairs:
        src, sep, dst = pair.partition("=")
        if not sep or not src.strip() or not dst.strip():
            raise InvalidInputError(f"--network-map {pair!r} is not SRC=DST.",
                                    hint="Give the descriptor's network, '=', and a vmshift network: "
                                    "--network-map 'VM Network=lan'.")
        if src.strip() in out:
            raise InvalidInputError(f"--network-map maps {src.strip()!r} twice.",
                                    hint="Map each network once.")
        out[src.strip()] = dst.strip()
    return out


def _run(body: dict[str, Any], no_wait: bool, json_: bool) -> None:
    with context.client() as c:
        task = c.import_vm(body)
        if no_wait:
            if json_:
                emit_json(task)
            else:
                typer.echo(f"Task {task['id']} queued; follow it with 'vmshift task watch {task['id']}'.")
            return
        final = wait_with_progress(c, task, quiet=json_)
    if json_:
        emit_json(final)
        return
    r = final.get("result") or {}
    disks, nets = ", ".join(r.get("images") or []), ", ".join(r.get("networks") or [])
    typer.echo(f"VM {r.get('vm')} imported on {r.get('host')}: {r.get('cpus')} vCPU, {r.get('memory_mib')} "
               f"MiB, disks {disks}, networks {nets} ({r.get('power_state')}).")
    if r.get("ignored"):
        typer.echo(f"Not carried over: {', '.join(r['ignored'])}.")


def vm_import_ova(
    file: Annotated[Path, typer.Argument(help="The OVA (a tar of an OVF descriptor and VMDK disks), a path "
                                         "the host can read.")],
    host: HostOpt,
    datastore: DatastoreOpt,
    network_map: NetworkMapOpt = None,
    name: NameOpt = None,
    start: StartOpt = False,
    no_wait: NoWaitOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Create the VM an OVA's OVF describes (CPUs, memory, disks, NICs), its disks imported as images."""
    path = file.expanduser().resolve()
    if not path.is_file():
        raise InvalidInputError(f"The file {file} does not exist.", hint="Give the path of an .ova file.")
    _run({"source": VmImportSource.OVA.value, "file": str(path), "host": host, "datastore": datastore,
          "network_map": parse_network_map(network_map or []), "name": name, "start": start}, no_wait, json_)


def vm_import_libvirt(
    domain_xml: Annotated[Path, typer.Argument(help="The domain's XML ('virsh dumpxml VM'); its disks are "
                                               "files the host can read.")],
    host: HostOpt,
    datastore: DatastoreOpt,
    network_map: NetworkMapOpt = None,
    name: NameOpt = None,
    start: StartOpt = False,
    no_wait: NoWaitOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Create the VM a libvirt domain describes (disks, MACs, CPUs, memory, machine type); what cannot be
    mapped is refused, all of it listed."""
    try:
        text = domain_xml.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidInputError(f"Cannot read {domain_xml}: {e}.", hint="Give a domain XML file.") from None
    if len(text) > MAX_DOMAIN_XML:
        raise InvalidInputError(f"{domain_xml} is larger than a domain XML ({len(text)} characters).",
                                hint="Give the output of 'virsh dumpxml VM'.")
    _run({"source": VmImportSource.LIBVIRT.value, "domain_xml": text, "host": host, "datastore": datastore,
          "network_map": parse_network_map(network_map or []), "name": name, "start": start}, no_wait, json_)
