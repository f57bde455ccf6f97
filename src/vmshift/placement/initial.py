"""Initial placement: which host a new VM should be created on (``vmshift vm create`` without
``--host``)."""

from __future__ import annotations

from dataclasses import replace

from vmshift.errors import CapacityError
from vmshift.placement.choose import Choice, choose_host
from vmshift.placement.filters import Filters
from vmshift.placement.settings import DrsSettings
from vmshift.placement.snapshot import ClusterSnapshot, LoadSample, VmState
from vmshift.placement.state import ClusterState, window_of

#: A new VM has no load history; it is assumed to use this share of its vCPUs and all its memory.
NEW_VM_CPU_SHARE = 0.25


def place(snapshot: ClusterSnapshot, vm: VmState, settings: DrsSettings | None = None) -> Choice:
    """Choose a host for ``vm`` (its ``host`` is ignored). ``Choice.refused`` says why none fits."""
    if snapshot.has_vm(vm.name):
        raise CapacityError(f"A VM named '{vm.name}' is already in the cluster.",
                            hint="Choose another name.")
    guess = LoadSample(vm.cpus * NEW_VM_CPU_SHARE, float(vm.memory_mib))
    history = vm.history or (guess,) * window_of(snapshot)
    new = replace(vm, host="", history=history)
    state = ClusterState(replace(snapshot, vms=(*snapshot.vms, new)), settings or DrsSettings())
    state.move(vm.name, None)
    return choose_host(Filters(state), new)


def place_or_raise(snapshot: ClusterSnapshot, vm: VmState, settings: DrsSettings | None = None) -> Choice:
    choice = place(snapshot, vm, settings)
    if choice.refused is not None:
        raise CapacityError(choice.refused, hint="Free memory on a host, add a host, or change the rules.")
    return choice
