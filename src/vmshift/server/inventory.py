"""Hosts, datastores and networks in the inventory, kept in step with what agents report."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any, TypeVar

from sqlalchemy import Select, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from vmshift.errors import ConflictError, NotFoundError
from vmshift.model.api import EventKind
from vmshift.model.baseline import choose_baseline
from vmshift.model.datastore_sharing import shares_with_linked
from vmshift.model.enums import ConnectionState, EventSeverity
from vmshift.model.host import DatastoreInfo, DatastoreProof, HostFacts
from vmshift.server.db.schema import (
    ClusterRow,
    DatacenterRow,
    DatastoreRow,
    HostDatastoreRow,
    HostNetworkRow,
    HostRow,
    NetworkRow,
    VmRow,
    utcnow,
)
from vmshift.server.events import record_event


def names_hint(what: str, names: list[str]) -> str:
    if not names:
        return f"There are no {what} yet."
    return f"Known {what}: {', '.join(sorted(names))}."


_Named = TypeVar("_Named", HostRow, ClusterRow, DatacenterRow, VmRow, NetworkRow)
_Row = TypeVar("_Row", DatastoreRow, NetworkRow)


def _by_name(s: Session, row_type: type[_Named], name: str, what: str, plural: str) -> _Named:
    """The row called `name`, or NotFoundError listing the names that do exist."""
    row = s.scalar(select(row_type).where(row_type.name == name))
    if row is None:
        raise _not_found(s, row_type, name, what, plural)
    return row


def _not_found(s: Session, row_type: type[_Named], name: str, what: str, plural: str) -> NotFoundError:
    known = list(s.scalars(select(row_type.name)))
    return NotFoundError(f"{what} {name!r} does not exist.", hint=names_hint(plural, known))


def get_host(s: Session, name: str) -> HostRow:
    return _by_name(s, HostRow, name, "Host", "hosts")


def get_cluster(s: Session, name: str) -> ClusterRow:
    return _by_name(s, ClusterRow, name, "Cluster", "clusters")


def get_datacenter(s: Session, name: str) -> DatacenterRow:
    return _by_name(s, DatacenterRow, name, "Datacenter", "datacenters")


def get_vm(s: Session, name: str) -> VmRow:
    return _by_name(s, VmRow, name, "VM", "VMs")


def vm_not_found(s: Session, name: str) -> NotFoundError:
    """The error of ``get_vm`` for a caller that looked the VM up by other means."""
    return _not_found(s, VmRow, name, "VM", "VMs")


def get_network(s: Session, name: str) -> NetworkRow:
    return _by_name(s, NetworkRow, name, "Network", "networks")


def host_facts(host: HostRow) -> HostFacts:
    return HostFacts.model_validate(host.facts)


def add_host(s: Session, address: str, cluster: ClusterRow, facts: HostFacts) -> HostRow:
    """Insert a host with its datastores and networks; 409 if its name or address is taken."""
    if s.scalar(select(HostRow).where(HostRow.name == facts.name)) is not None:
        raise ConflictError(
            f"A host named {facts.name!r} is already in the inventory.",
            hint="Remove it first, or give the agent another name.",
        )
    if s.scalar(select(HostRow).where(HostRow.address == address)) is not None:
        raise ConflictError(
            f"A host with address {address} is already in the inventory.", hint="Each agent is added once."
        )
    for ds in facts.datastores:
        other = s.scalar(
            select(DatastoreRow).where(DatastoreRow.name == ds.name, DatastoreRow.uuid != ds.uuid)
        )
        if other is not None:
            raise ConflictError(
                f"Datastore name {ds.name!r} is already used by another datastore ({other.uuid}).",
                hint="Give the datastore a unique name in its .vmshift-datastore.json marker.",
            )
    host = HostRow(
        name=facts.name,
        address=address,
        cluster=cluster,
        connection_state=ConnectionState.CONNECTED,
        maintenance=False,
        last_heartbeat=utcnow(),
        facts=facts.model_dump(mode="json"),
    )
    s.add(host)
    s.flush()
    record_event(
        s, EventKind.HOST_ADDED, host.name, f"Host {host.name} ({address}) added to cluster {cluster.name}."
    )
    apply_facts(s, host, facts)
    return host


def _proof_in(facts: dict[str, Any] | None, uuid: str) -> DatastoreProof | None:
    """The sharing proof a host's stored facts hold for datastore ``uuid`` (read from the JSON:
    parsing a whole host's facts for one field would cost more than the check)."""
    for entry in (facts or {}).get("datastores") or []:
        if entry.get("uuid") == uuid:
            proof = entry.get("proof")
            return DatastoreProof.model_validate(proof) if proof else None
    return None


def _sharing_checked(s: Session, host: HostRow, facts: HostFacts) -> HostFacts:
    """The facts with the datastores whose sharing is not proven moved to ``unproven_datastores``
    (model/datastore_sharing.py): the same marker UUID as other hosts' datastore, but not the same
    directory. A warning event when one first is."""
    before = {d.get("uuid") for d in (host.facts or {}).get("unproven_datastores") or []}
    kept, refused = [], []
    for ds in facts.datastores:
        row = None if ds.proof is None else s.scalar(select(DatastoreRow).where(DatastoreRow.uuid == ds.uuid))
        links = [] if row is None else s.scalars(select(HostDatastoreRow).where(  # a query: sees new links
            HostDatastoreRow.datastore_id == row.id, HostDatastoreRow.host_id != host.id)).all()
        linked = {link.host.name: _proof_in(link.host.facts, ds.uuid) for link in links}
        if shares_with_linked(facts.name, ds.proof, linked):
            kept.append(ds)
            continue
        refused.append(ds)
        if ds.uuid not in before:
            record_event(
                s, EventKind.DATASTORE_NOT_SHARED, ds.name,
                f"Host {facts.name} has datastore {ds.name} ({ds.uuid}) as {', '.join(sorted(linked))} "
                f"do, but neither side reads the file the other writes in it: {ds.path} on {facts.name} "
                "is another directory with a copy of the marker. It is ignored on that host until the "
                "directory is really shared, or gets a marker of its own (a new UUID and name).",
                EventSeverity.WARNING,
            )
    if not refused and not facts.unproven_datastores:
        return facts
    return facts.model_copy(update={"datastores": kept, "unproven_datastores": refused})


def unproven_hosts(s: Session) -> dict[str, list[str]]:
    """Datastore UUID -> the hosts whose copy of it is not proven (``_sharing_checked``)."""
    found: dict[str, list[str]] = {}
    for name, facts in s.execute(select(HostRow.name, HostRow.facts)).all():
        for entry in (facts or {}).get("unproven_datastores") or []:
            found.setdefault(str(entry.get("uuid")), []).append(name)
    return found


def _recheck_unproven(s: Session, host: HostRow, uuids: set[str]) -> None:
    """Check again the other hosts whose copy of a datastore in ``uuids`` was not proven: this
    host's new proof (a new token, new peers) may be what they read. Without this, a host refused
    because its report crossed another's token rotation would wait for its own next report."""
    for other in s.scalars(select(HostRow).where(HostRow.id != host.id)):
        waiting = (other.facts or {}).get("unproven_datastores") or []
        if any(entry.get("uuid") in uuids for entry in waiting):
            stored = HostFacts.model_validate(other.facts)
            whole = stored.model_copy(update={"datastores": [*stored.datastores,
                                                             *stored.unproven_datastores]})
            apply_facts(s, other, whole, recheck_others=False)


def apply_facts(
    s: Session, host: HostRow, facts: HostFacts, *, recheck_others: bool = True, frozen: Collection[str] = ()
) -> None:
    """Refresh a host's facts, datastores (by marker UUID; shared when seen by several hosts and
    proven so, see ``_sharing_checked``) and networks. The datastores named in ``frozen`` are left
    as they are, whatever ``facts`` say (server/withheld_datastores.py): their links are neither
    made nor deleted here, and the stored facts keep their entries."""
    before = host.facts
    stored: list[DatastoreInfo] = []
    if frozen:
        had = HostFacts.model_validate(before).datastores if before else []
        stored = [d for d in had if d.name in frozen]
        facts = facts.model_copy(update={"datastores": [d for d in facts.datastores if d.name not in frozen]})
    facts = _sharing_checked(s, host, facts)
    kept = facts.model_copy(update={"datastores": facts.datastores + stored}) if stored else facts
    host.facts = kept.model_dump(mode="json")
    changed = {ds.uuid for ds in facts.datastores
               if recheck_others and ds.proof is not None and _proof_in(before, ds.uuid) != ds.proof}
    seen_ds: set[int] = set()
    for ds in facts.datastores:
        by_uuid = select(DatastoreRow).where(DatastoreRow.uuid == ds.uuid)
        row = s.scalar(by_uuid)
        if row is None:
            # read by name: another transaction may have inserted this very datastore since the read
            # by UUID (each statement sees the latest commits), and then it is this one, not a clash
            named = s.scalar(select(DatastoreRow).where(DatastoreRow.name == ds.name))
            if named is not None and named.uuid != ds.uuid:
                continue  # name taken by another UUID: add_host refuses this; a refresh skips it
            row = named
        if row is None:
            row, created = _insert_once(s, DatastoreRow(uuid=ds.uuid, name=ds.name), by_uuid)
            if row is None:
                continue  # its name was taken meanwhile by another UUID: as above
            if created:
                record_event(
                    s, EventKind.DATASTORE_ADDED, ds.name, f"Datastore {ds.name} ({ds.uuid}) discovered."
                )
        row.capacity_mib, row.free_mib, row.kind = ds.capacity_mib, ds.free_mib, ds.kind
        seen_ds.add(row.id)
        link = s.get(HostDatastoreRow, (host.id, row.id))
        if link is None:
            s.add(
                HostDatastoreRow(host_id=host.id, datastore_id=row.id, path=ds.path, images=list(ds.images))
            )
        else:
            link.path, link.images = ds.path, list(ds.images)
    for link in list(host.datastores):
        # a frozen datastore's link is read as it is now (read committed: it may be newer than
        # ``before``), never deleted from a report
        if link.datastore_id not in seen_ds and not (frozen and link.datastore.name in frozen):
            s.delete(link)
    seen_net: set[int] = set()
    for label, bridge in facts.networks.items():
        by_name = select(NetworkRow).where(NetworkRow.name == label)
        net = s.scalar(by_name)
        if net is None:
            net, created = _insert_once(s, NetworkRow(name=label), by_name)
            if net is None:
                continue
            if created:
                record_event(
                    s, EventKind.NETWORK_ADDED, label, f"Network {label} discovered on host {host.name}."
                )
        seen_net.add(net.id)
        nlink = s.get(HostNetworkRow, (host.id, net.id))
        if nlink is None:
            s.add(HostNetworkRow(host_id=host.id, network_id=net.id, bridge=bridge))
        else:
            nlink.bridge = bridge
    for nlink in list(host.networks):
        if nlink.network_id not in seen_net:
            s.delete(nlink)
    if changed:
        s.flush()
        _recheck_unproven(s, host, changed)


def _insert_once(s: Session, row: _Row, existing: Select[_Row]) -> tuple[_Row | None, bool]:
    """Insert a row several hosts may discover at once (a shared datastore, a network): when another
    transaction inserted it meanwhile (two hosts added together, or their facts applied in the
    heartbeat's threads), take that one instead of failing. (row or None, whether this one inserted it)."""
    try:
        with s.begin_nested():
            s.add(row)
            s.flush()
    except IntegrityError:
        return s.scalar(existing), False
    return row, True


def cluster_baseline(s: Session, cluster: ClusterRow) -> str | None:
    """The cluster's CPU baseline over its connected hosts (None when there is none)."""
    hosts = [h for h in cluster.hosts if h.connection_state is ConnectionState.CONNECTED]
    if not hosts:
        return None
    facts = [host_facts(h) for h in hosts]
    try:
        return choose_baseline([f.cpu_models for f in facts], [f.cpu_vendor for f in facts])
    except Exception:
        return None
