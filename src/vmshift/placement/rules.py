"""Affinity rules: how many members a rule finds out of place, and what a host means for a VM.

A VM's position is looked up in a mapping (VM -> host, or None while it is being placed or
evacuated), so the same code judges the cluster as it is and as it would be after a move.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

from vmshift.model.migration import CheckId, CheckResult
from vmshift.placement.host_checks import ERR, OK, WARN, result
from vmshift.placement.snapshot import Rule, RuleKind, RuleStrength


def violations(rule: Rule, host_of: Mapping[str, str | None]) -> int:
    """Members out of place (0 = the rule holds). Members that are not placed do not count."""
    placed = [h for v in rule.vms if (h := host_of.get(v)) is not None]
    if rule.kind is RuleKind.VM_AFFINITY:
        if not placed:
            return 0
        return len(placed) - Counter(placed).most_common(1)[0][1]
    if rule.kind is RuleKind.VM_ANTI_AFFINITY:
        return len(placed) - len(set(placed))
    if rule.kind is RuleKind.VM_HOST_AFFINITY:
        return sum(h not in rule.hosts for h in placed)
    return sum(h in rule.hosts for h in placed)


def breaks(rule: Rule, vm: str, host: str, host_of: Mapping[str, str | None]) -> bool:
    """Whether ``vm`` on ``host`` is out of place under ``rule``, given where the others are."""
    others = [h for v in rule.vms if v != vm and (h := host_of.get(v)) is not None]
    if rule.kind is RuleKind.VM_AFFINITY:
        return bool(others) and host not in others
    if rule.kind is RuleKind.VM_ANTI_AFFINITY:
        return host in others
    if rule.kind is RuleKind.VM_HOST_AFFINITY:
        return host not in rule.hosts
    return host in rule.hosts


def rules_check(vm: str, host: str, rules: list[Rule], host_of: Mapping[str, str | None]) -> CheckResult:
    """ERROR when a must rule forbids the host, WARNING when only should rules do."""
    broken = [r for r in rules if breaks(r, vm, host, host_of)]
    must = [r.name for r in broken if r.strength is RuleStrength.MUST]
    if must:
        return result(CheckId.RULES, ERR, f"Must rule {', '.join(must)} keeps VM '{vm}' off {host}.",
                      "Choose a host the rule allows, or change the rule.")
    if broken:
        names = ", ".join(r.name for r in broken)
        return result(CheckId.RULES, WARN, f"VM '{vm}' on {host} breaks should rule {names}.",
                      "Another host would keep the rule, if one has room.")
    return result(CheckId.RULES, OK, f"The rules allow VM '{vm}' on {host}.")
