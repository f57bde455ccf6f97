"""A working copy of a cluster the engine can move VMs around in, and the objective it minimises.

Objective (lower is better), averaged over the samples of the history window:

    J = w_cpu · Σ_h (c_h - mean c)² + w_mem · Σ_h (m_h - mean m)²  +  rule penalties

where ``c_h`` and ``m_h`` are host h's CPU and memory use divided by its capacity, over the hosts
that can take VMs (connected, not in maintenance). The sum of squares (not the standard deviation)
makes a move's benefit depend only on the two hosts it touches, so the same threshold means the
same thing in a cluster of 8 hosts and of 96. Imbalance, as shown to users, is the weighted standard
deviation of the same loads. Loads are kept per sample as numpy arrays, so a VM's move to every
host is scored at once.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import numpy.typing as npt

from vmshift.placement.capacity import committed_mib
from vmshift.placement.rules import violations
from vmshift.placement.settings import DrsSettings
from vmshift.placement.snapshot import ClusterSnapshot, LoadSample, Rule, RuleStrength, VmState

Array = npt.NDArray[np.float64]


def window_of(snapshot: ClusterSnapshot) -> int:
    return max((len(v.history) for v in snapshot.vms), default=0) or 1


def _padded(vm: VmState, window: int) -> list[LoadSample]:
    """The VM's last ``window`` samples, padded at the old end with its oldest (none: idle)."""
    if not vm.history:
        return [LoadSample(0.0, 0.0)] * window
    samples = list(vm.history[-window:])
    return [samples[0]] * (window - len(samples)) + samples


class ClusterState:
    """Where every VM runs, what each host commits, and the host loads per sample."""

    def __init__(self, snapshot: ClusterSnapshot, settings: DrsSettings) -> None:
        self.snapshot = snapshot
        self.settings = settings
        self.window = window_of(snapshot)
        self.balanced = [h.name for h in snapshot.hosts if h.usable]
        self.index = {name: i for i, name in enumerate(self.balanced)}
        hosts = [snapshot.host(n) for n in self.balanced]
        self.cpu_cap: Array = np.array([max(h.cpus, 1) for h in hosts], float)
        self.mem_cap: Array = np.array([max(h.memory_mib, 1) for h in hosts], float)
        n, w = len(self.balanced), self.window
        self.cpu: Array = np.zeros((n, w))  # normalised load per host and sample
        self.mem: Array = np.zeros((n, w))
        self.host_of: dict[str, str | None] = {}
        self.committed: dict[str, int] = defaultdict(int)
        self.vm_cpu: dict[str, Array] = {}
        self.vm_mem: dict[str, Array] = {}
        self.vm_mean: dict[str, tuple[float, float]] = {}  # CPU and memory use over the window
        self.rules_of: dict[str, list[Rule]] = defaultdict(list)
        for rule in snapshot.rules:
            for v in rule.vms:
                self.rules_of[v].append(rule)
        padded = [_padded(vm, w) for vm in snapshot.vms]
        cpu_use = np.array([[x.cpu for x in p] for p in padded], float).reshape(len(padded), w)
        mem_use = np.array([[x.memory_mib for x in p] for p in padded], float).reshape(len(padded), w)
        cpu_mean, mem_mean = cpu_use.mean(axis=1).tolist(), mem_use.mean(axis=1).tolist()
        # A VM being migrated is judged where it is going: its load and its rules are the target's
        # as soon as the move started (else a pass during a move sees the source still full and the
        # target empty, and sends another VM after it).
        on = np.array([self.index.get(vm.migrating_to or vm.host, -1) for vm in snapshot.vms], int)
        here = on >= 0
        np.add.at(self.cpu, on[here], cpu_use[here] / self.cpu_cap[on[here], None])
        np.add.at(self.mem, on[here], mem_use[here] / self.mem_cap[on[here], None])
        for k, vm in enumerate(snapshot.vms):
            self.host_of[vm.name] = vm.migrating_to or vm.host
            self.committed[vm.host] += committed_mib(vm.memory_mib)
            if vm.migrating_to is not None:
                self.committed[vm.migrating_to] += committed_mib(vm.memory_mib)
            self.vm_cpu[vm.name], self.vm_mem[vm.name] = cpu_use[k], mem_use[k]
            self.vm_mean[vm.name] = (cpu_mean[k], mem_mean[k])

    # -- reading -----------------------------------------------------------------------------------

    def free_mib(self, host: str) -> int:
        return self.snapshot.host(host).memory_mib - self.committed[host]

    def host_load(self) -> Array:
        """Each balanced host's weighted load, averaged over the window (0..1 at full use)."""
        s = self.settings
        total = s.cpu_weight + s.memory_weight
        return np.asarray((s.cpu_weight * self.cpu.mean(axis=1) + s.memory_weight * self.mem.mean(axis=1))
                          / total, float)

    def imbalance(self) -> float:
        """Weighted standard deviation of the normalised host loads, averaged over the window."""
        if not self.balanced:
            return 0.0
        s = self.settings
        total = s.cpu_weight + s.memory_weight
        sd = s.cpu_weight * self.cpu.std(axis=0) + s.memory_weight * self.mem.std(axis=0)
        return float(sd.mean() / total)

    def spread(self) -> float:
        """The load part of the objective (see the module's docstring)."""
        if not self.balanced:
            return 0.0
        s = self.settings
        n = len(self.balanced)
        c = (self.cpu ** 2).sum(axis=0) - self.cpu.sum(axis=0) ** 2 / n
        m = (self.mem ** 2).sum(axis=0) - self.mem.sum(axis=0) ** 2 / n
        return float((s.cpu_weight * c + s.memory_weight * m).mean())

    def penalty(self, rules: list[Rule] | tuple[Rule, ...] | None = None) -> float:
        s = self.settings
        chosen = self.snapshot.rules if rules is None else rules
        return sum(violations(r, self.host_of) * (s.must_penalty if r.strength is RuleStrength.MUST
                                                  else s.should_penalty) for r in chosen)

    def objective(self) -> float:
        return self.spread() + self.penalty()

    # -- scoring a move ----------------------------------------------------------------------------

    def spread_deltas(self, vm: str) -> Array:
        """The change of ``spread()`` if ``vm`` moved to each balanced host (its own host: +inf).

        Per dimension, with host loads ``L`` (hosts x samples), their column sums ``S1``, the VM's
        use ``x`` and capacities ``c``, moving from host ``a`` to host ``b`` changes the sum of squares
        by ``2 L_b·x/c_b + x·x/c_b² - 2 L_a·x/c_a + x·x/c_a²`` and the sum by ``x/c_b - x/c_a``; the
        window mean of the change is computed in closed form, so all targets cost one matrix-vector
        product.
        """
        src = self.host_of[vm]
        a = self.index.get(src) if src is not None else None
        s = self.settings
        n, w = len(self.balanced), self.window
        out = np.zeros(n)
        for weight, loads, cap, x in ((s.cpu_weight, self.cpu, self.cpu_cap, self.vm_cpu[vm]),
                                      (s.memory_weight, self.mem, self.mem_cap, self.vm_mem[vm])):
            if weight == 0:
                continue
            xx = float(x @ x)
            s1x = float(loads.sum(axis=0) @ x)
            inv_b = 1.0 / cap
            inv_a = 1.0 / cap[a] if a is not None else 0.0
            d_s2 = 2 * (loads @ x) * inv_b + xx * inv_b ** 2
            if a is not None:
                d_s2 += -2 * float(loads[a] @ x) * inv_a + xx * inv_a ** 2
            # Σ_t ((S1 + d)² - S1²) with d = x (1/c_b - 1/c_a)
            k = inv_b - inv_a
            d_s1sq = 2 * s1x * k + xx * k ** 2
            out += weight * (d_s2 - d_s1sq / n) / w
        if a is not None:
            out[a] = np.inf
        return out

    def penalty_delta(self, vm: str, host: str) -> float:
        rules = self.rules_of.get(vm)
        if not rules:
            return 0.0
        before = self.penalty(rules)
        old = self.host_of[vm]
        self.host_of[vm] = host
        after = self.penalty(rules)
        self.host_of[vm] = old
        return after - before

    # -- changing ----------------------------------------------------------------------------------

    def move(self, vm: str, host: str | None) -> None:
        """Put ``vm`` on ``host`` (None: take it off the cluster, as evacuation does while planning)."""
        state = self.snapshot.vm(vm)
        old = self.host_of[vm]
        need = committed_mib(state.memory_mib)
        if old is not None:
            self.committed[old] -= need
            if (a := self.index.get(old)) is not None:
                self.cpu[a] -= self.vm_cpu[vm] / self.cpu_cap[a]
                self.mem[a] -= self.vm_mem[vm] / self.mem_cap[a]
        if host is not None:
            self.committed[host] += need
            if (b := self.index.get(host)) is not None:
                self.cpu[b] += self.vm_cpu[vm] / self.cpu_cap[b]
                self.mem[b] += self.vm_mem[vm] / self.mem_cap[b]
        self.host_of[vm] = host
