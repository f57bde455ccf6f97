"""``vmshift drs simulate``: what DRS would do without a host or with one more VM (nothing stored,
nothing moved)."""

from __future__ import annotations

import re

from vmshift.errors import InvalidInputError
from vmshift.placement.simulate import WhatIf
from vmshift.placement.snapshot import LoadSample, VmState
from vmshift.server.drs.views import DrsMoveView, WhatIfView

_SPEC = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]{0,63}):(?P<cpus>\d{1,3}):(?P<mem>\d{1,7})"
                   r"(?::(?P<load>\d+(?:\.\d+)?))?$")
SPEC_HELP = "NAME:CPUS:MEMORY_MIB[:CORES_BUSY], e.g. web-9:2:1024:1.5"


def parse_vm_spec(spec: str) -> VmState:
    """``--add-vm``'s SPEC as a VM to place; its load (cores busy) defaults to initial placement's guess."""
    m = _SPEC.match(spec)
    if m is None or int(m["cpus"]) < 1 or int(m["mem"]) < 1:
        raise InvalidInputError(f"--add-vm {spec!r} is not a VM spec.", hint=f"Give {SPEC_HELP}.")
    cpus, mem = int(m["cpus"]), int(m["mem"])
    history = (LoadSample(float(m["load"]), float(mem)),) if m["load"] is not None else ()
    return VmState(m["name"], "", cpus, mem, history=history)


def what_if_view(cluster: str, answer: WhatIf) -> WhatIfView:
    after = answer.after
    moves = [] if after is None else [
        DrsMoveView(vm=r.vm, source_host=r.source, target_host=r.target, reason=r.reason, why=r.why,
                    benefit=r.benefit, cost=r.cost, predicted_s=r.predicted_s, downtime_ms=r.downtime_ms)
        for r in after.recommendations]
    return WhatIfView(
        cluster=cluster, placed=dict(answer.placed), refused=answer.refused, recommendations=moves,
        imbalance_before=None if after is None else after.imbalance_before,
        imbalance_after=None if after is None else after.imbalance_after,
        notes=[] if after is None else list(after.notes))
