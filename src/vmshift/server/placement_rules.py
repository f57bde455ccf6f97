"""The affinity rules' verdict on one VM moving to one host, for the migration checks.

Placement (initial placement, maintenance, DRS) judges rules over a whole ``ClusterSnapshot``; a
single migration asked by hand needs only the rules naming its VM and where their other VMs run.
Both ask the one rule function, ``vmshift.placement.rules.rules_check``.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from vmshift.model.migration import CheckResult
from vmshift.placement.rules import rules_check
from vmshift.server.db.schema import HostRow, RuleRow, VmRow
from vmshift.server.placement_inputs import rule_of


def rules_result(s: Session, vm: VmRow, target: HostRow) -> CheckResult:
    rows = s.scalars(select(RuleRow).where(RuleRow.cluster_id == target.cluster_id)).all()
    rules = [rule_of(r) for r in rows if vm.name in r.vms]
    others = {n for r in rules for n in r.vms} - {vm.name}
    host_of: dict[str, str | None] = dict(
        s.execute(select(VmRow.name, HostRow.name).join(HostRow).where(VmRow.name.in_(others))).all()
    ) if others else {}
    return rules_check(vm.name, target.name, rules, host_of)
