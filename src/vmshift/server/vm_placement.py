"""Initial placement: the host ``vmshift vm create`` uses when the request names none (issue 11).

The new VM is described to the placement engine as it would run: its vCPUs, memory, home datastore,
networks, the cluster's CPU baseline (or the model asked for) and the machine type the cluster's
hosts would pin. ``placement.initial`` filters the cluster's hosts (connected, not in maintenance,
memory committed including incoming migrations, datastores, networks, rules) and picks the one that
keeps the cluster most balanced.
"""

from __future__ import annotations

from collections import Counter

from sqlalchemy import select
from sqlalchemy.orm import Session

from vmshift.errors import InvalidInputError
from vmshift.model.api import VmCreate
from vmshift.model.baseline import choose_baseline, resolve_machine_type
from vmshift.model.enums import ConnectionState
from vmshift.placement.initial import place_or_raise
from vmshift.placement.snapshot import VmState
from vmshift.server.db.schema import ClusterRow, DatastoreRow, HostRow
from vmshift.server.inventory import get_cluster, get_host, host_facts
from vmshift.server.placement_inputs import cluster_snapshot


def _cluster_for(s: Session, req: VmCreate) -> ClusterRow:
    if req.cluster is not None:
        return get_cluster(s, req.cluster)
    ds = s.scalar(select(DatastoreRow).where(DatastoreRow.name == req.datastore))
    seen = {link.host.cluster_id for link in ds.hosts} if ds is not None else set()
    clusters = list(s.scalars(select(ClusterRow).where(ClusterRow.id.in_(seen)).order_by(ClusterRow.name)))
    if len(clusters) == 1:
        return clusters[0]
    if not clusters:
        raise InvalidInputError(f"No host sees datastore {req.datastore!r}, so VM {req.name} has nowhere "
                                "to go.",
                                hint="Choose a datastore a host sees, or name a host with --host.")
    raise InvalidInputError(f"Hosts of clusters {', '.join(c.name for c in clusters)} see datastore "
                            f"{req.datastore!r}; which cluster should VM {req.name} go to?",
                            hint="Name one with --cluster (or a host with --host).")


def new_vm_state(req: VmCreate, cluster: ClusterRow) -> VmState:
    connected = [h for h in cluster.hosts if h.connection_state is ConnectionState.CONNECTED]
    facts = [host_facts(h) for h in connected]
    if not facts:
        raise InvalidInputError(f"Cluster {cluster.name} has no connected host for VM {req.name}.",
                                hint="Wait until a host's agent answers, or add a host.")
    cpu_model = req.cpu_model or choose_baseline([f.cpu_models for f in facts], [f.cpu_vendor for f in facts])
    machines = Counter(resolve_machine_type(req.machine_type, f.machine_types, f.default_machine_type)
                       for f in facts)
    accelerators = Counter(f.accelerator for f in facts)
    return VmState(
        name=req.name, host="", cpus=req.cpus, memory_mib=req.memory_mib,
        datastores=frozenset([req.datastore]), networks=frozenset(req.networks), cpu_model=cpu_model,
        machine_type=machines.most_common(1)[0][0], accelerator=accelerators.most_common(1)[0][0],
    )  # fmt: skip


def place_new_vm(s: Session, req: VmCreate) -> tuple[HostRow, str | None]:
    """The host for ``req`` (which names none), and a warning when a should rule had to be broken.
    Raises CapacityError (422) with every host's reason when none fits."""
    cluster = _cluster_for(s, req)
    if not cluster.hosts:
        raise InvalidInputError(f"Cluster {cluster.name} has no host.",
                                hint="Add one with 'vmshift host add'.")
    choice = place_or_raise(cluster_snapshot(s, cluster), new_vm_state(req, cluster))
    assert choice.host is not None
    return get_host(s, choice.host), choice.warning


__all__ = ["new_vm_state", "place_new_vm"]
