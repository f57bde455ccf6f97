"""Prometheus text exposition of migration metrics, computed from the database at each scrape.

Counting from the stored records (instead of in-process counters) keeps the numbers across server
restarts and identical for every server sharing one database.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from sqlalchemy import select
from sqlalchemy.orm import Session

from vmshift.model.migration import MigrationMetrics, MigrationStatus
from vmshift.server.db.schema import MigrationRow

TOTAL_BUCKETS_S = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600)
DOWNTIME_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 1, 2, 5)


def _fmt(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def _histogram(name: str, help_: str, buckets: Iterable[float], values: list[float]) -> list[str]:
    lines = [f"# HELP {name} {help_}", f"# TYPE {name} histogram"]
    for b in buckets:
        lines.append(f'{name}_bucket{{le="{_fmt(b)}"}} {sum(1 for v in values if v <= b)}')
    lines.append(f'{name}_bucket{{le="+Inf"}} {len(values)}')
    lines.append(f"{name}_sum {_fmt(sum(values))}")
    lines.append(f"{name}_count {len(values)}")
    return lines


def render_metrics(s: Session) -> str:
    by_status: Counter[MigrationStatus] = Counter()
    totals: list[float] = []
    downtimes: list[float] = []
    bytes_sent = 0
    for status, raw in s.execute(select(MigrationRow.status, MigrationRow.metrics)):
        by_status[status] += 1
        m = MigrationMetrics.model_validate(raw or {})
        bytes_sent += m.bytes_sent
        if status is MigrationStatus.COMPLETED:
            if m.total_ms is not None:
                totals.append(m.total_ms / 1000)
            if m.downtime_ms is not None:
                downtimes.append(m.downtime_ms / 1000)
    lines = [
        "# HELP vmshift_migrations Live migrations recorded, by status (finished ones only grow).",
        "# TYPE vmshift_migrations gauge",
        *(f'vmshift_migrations{{status="{st.value}"}} {by_status[st]}' for st in MigrationStatus),
        *_histogram(
            "vmshift_migration_total_seconds",
            "Total time of completed migrations (QEMU's total-time).",
            TOTAL_BUCKETS_S,
            totals,
        ),
        *_histogram(
            "vmshift_migration_downtime_seconds",
            "Downtime of completed migrations as QEMU reports it.",
            DOWNTIME_BUCKETS_S,
            downtimes,
        ),
        "# HELP vmshift_migration_sent_bytes_total Bytes sent by all migrations.",
        "# TYPE vmshift_migration_sent_bytes_total counter",
        f"vmshift_migration_sent_bytes_total {bytes_sent}",
    ]
    return "\n".join(lines) + "\n"
