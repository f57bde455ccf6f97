"""The benchmark's markdown report and plots, from latest.json alone (so a report can be redrawn).

.venv/bin/python -m bench.suite.report bench/results/latest.json   # rewrites latest.md and the PNGs
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

Json = dict[str, Any]
SIDES = ("vmshift", "qemu-defaults", "libvirt", "libvirt-documented", "nova", "proxmox")
BUDGET_MS = 500  # vmshift's default downtime budget (MigrationSettings.max_downtime_ms)


def _f(v: Any, scale: float = 1.0, digits: int = 0, unit: str = "") -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    x = float(v) / scale
    return f"{x:.{digits}f}{unit}"


def _side_label(name: str, r: Json) -> str:
    return str(r.get("label") or name)


def rows(sc: Json) -> list[list[str]]:
    out = []
    limit = sc.get("limit_ms")
    for name in SIDES:
        r = (sc.get("results") or {}).get(name)
        if r is None:
            continue
        total = r.get("total_ms") if r.get("converged") else None
        ratio = f"{total / limit:.2f}×" if total and limit else "–"
        outcome = (
            "converged"
            if r.get("converged")
            else (r.get("abort") or r.get("error") or r.get("status") or "no")
        )
        guest = r.get("guest") or {}
        out.append(
            [
                _side_label(name, r),
                str(outcome)[:60],
                _f(total, 1000, 1),
                ratio,
                _f(r.get("downtime_ms")),
                _f(r.get("max_gap_ms"), digits=0),
                _f(r.get("tcp_kept")),
                _f(r.get("bytes_sent"), 1e9, 2),
                _f(r.get("slowdown"), 0.01, 0, "%") if r.get("slowdown") is not None else "–",
                (
                    f"{_f(r.get('http_failed'))}/{_f(r.get('http_requests'))}, "
                    f"{_f(r.get('http_worst_ms'))} ms"
                    if r.get("http_requests") is not None
                    else "–"
                ),
                (
                    f"{_f(r.get('predicted_total_ms'), 1000, 1)} s / {_f(r.get('predicted_downtime_ms'))} ms"
                    if name == "vmshift"
                    else ""
                ),
                "ok" if guest.get("verified") else f"**{guest.get('memtest') or guest.get('error')}**",
            ]
        )
    return out


HEAD = [
    "side",
    "outcome",
    "total s",
    "× limit",
    "downtime ms",
    "UDP gap ms",
    "TCP kept",
    "GB sent",
    "slowdown",
    "HTTP failed/req, worst",
    "predicted",
    "guest",
]


def table(sc: Json) -> str:
    lines = ["| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
    lines += ["| " + " | ".join(r) + " |" for r in rows(sc)]
    return "\n".join(lines)


def targets(doc: Json) -> list[str]:
    """Each of issue 7's targets against this run."""
    out: list[str] = []
    scs = [s for s in doc.get("scenarios", []) if s.get("results")]
    misses = []
    for sc in scs:
        res = sc["results"]
        v = res.get("vmshift") or {}
        others = [n for n, r in res.items() if n != "vmshift" and r.get("converged")]
        if others and not v.get("converged"):
            misses.append(f"{sc['name']} (converged: {', '.join(others)})")
        if v.get("converged") and (v.get("downtime_ms") or 0) > BUDGET_MS:
            misses.append(f"{sc['name']} (downtime {v['downtime_ms']} ms > {BUDGET_MS})")
    out.append(
        "- **Converges wherever a peer does, within 500 ms**: "
        + ("met." if not misses else "missed in " + "; ".join(misses) + ".")
    )
    for sc in scs:
        v = sc["results"].get("vmshift") or {}
        limit = sc.get("limit_ms")
        if not (v.get("converged") and limit):
            continue
        ratio = v["total_ms"] / limit
        light = sc["name"] in ("idle-1g", "idle-1g-unshaped", "dirty-25", "http", "http-unshaped")
        goal = 1.2 if light else (1.5 if sc["name"] == "dirty-max" else None)
        lim = sc.get("physical_limit") or {}
        if sc["name"] == "dirty-max" and lim.get("link_bytes_per_s"):
            full_ms = sc["scenario"]["memory_mib"] * 2**20 / lim["link_bytes_per_s"] * 1000
            parts_full = (
                f"; against all of its memory over the link ({full_ms / 1000:.1f} s, the issue's reading) "
            )
            parts_full += f"{v['total_ms'] / full_ms:.2f}×"
        else:
            parts_full = ""
        gap = v.get("max_gap_ms")
        parts = [
            f"total {ratio:.2f}× the limit"
            + (f" (target ≤ {goal}×: {'met' if ratio <= goal else 'missed'})" if goal else "")
        ]
        parts[0] += parts_full
        if gap is not None:
            gap_goal = 100 if light else (1000 if sc["name"] == "dirty-max" else None)
            parts.append(
                f"longest UDP gap {gap:.0f} ms"
                + (f" (target ≤ {gap_goal} ms: {'met' if gap <= gap_goal else 'missed'})" if gap_goal else "")
            )
        pt, pd = v.get("predicted_total_ms"), v.get("predicted_downtime_ms")
        if pt and v.get("total_ms"):
            e = pt / v["total_ms"] - 1
            parts.append(f"predicted total {e:+.0%} ({'within' if abs(e) <= 0.2 else 'outside'} 20%)")
        if pd is not None and v.get("downtime_ms"):
            e = pd / v["downtime_ms"] - 1
            parts.append(
                f"predicted downtime {pd} vs {v['downtime_ms']} ms ({e:+.0%}, "
                f"{'within' if abs(e) <= 0.2 else 'outside'} 20%)"
            )
        if v.get("slowdown") is not None:
            parts.append(f"guest slowdown {v['slowdown']:.0%}")
        out.append(f"- {sc['name']}: " + "; ".join(parts) + ".")
    return out


def markdown(doc: Json, plots: bool = False) -> str:
    m = doc.get("machine") or {}
    lv = doc.get("libvirt") or {}
    parts = [
        "# vmshift benchmark: vmshift beside its peers",
        "",
        f"Run {doc.get('started_at')}, {doc.get('duration_s')} s, commit {m.get('commit')}, "
        f"{m.get('cpus')} cores, "
        f"{m.get('accelerator')}, {m.get('qemu')}. Command: `{doc.get('command')}`.",
        "",
        "libvirt: "
        + (
            "real libvirt daemons, one per lab host."
            if lv.get("available")
            else f"not run ({lv.get('why') or 'left out'})."
        ),
        "",
        "`× limit` is total time over the physical limit (the first pass's data bytes over the link's rate). "
        "The emulated peers follow the defaults of the files named in docs/performance.md. A peer still "
        "migrating at the scenario's limit is cancelled (the guest stays on its source) and shows as not "
        "converged.",
        "",
        "## Targets",
        "",
        *targets(doc),
        "",
    ]
    for sc in doc.get("scenarios", []):
        lim = sc.get("physical_limit") or {}
        parts += [
            f"## {sc['name']}: {sc.get('title')}",
            "",
            f"Link {sc.get('link')}; physical limit {_f(sc.get('limit_ms'), 1000, 1)} s"
            + (
                f" ({_f(lim.get('bytes'), 2**20)} MiB at {_f(lim.get('link_bytes_per_s'), 2**20)} MiB/s, "
                f"{lim.get('rate_from')})"
                if lim.get("bytes")
                else ""
            )
            + (
                f"; machine load {sc['loadavg_1m_at_start']:.1f} at the start"
                if sc.get("loadavg_1m_at_start") is not None
                else ""
            ),
            "",
        ]
        if sc.get("results"):
            parts += [table(sc), ""]
        for e in sc.get("errors") or []:
            parts += [f"- error: `{str(e).strip().splitlines()[-1]}`"]
        parts.append("")
    if plots:
        parts += [
            "## Plots",
            "",
            "![total time](latest-total.png)",
            "",
            "![downtime and gap](latest-gap.png)",
            "",
            "![prediction](latest-prediction.png)",
            "",
        ]
    return "\n".join(parts)


def plots(doc: Json, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scs = [s for s in doc.get("scenarios", []) if s.get("results")]
    if not scs:
        return
    names = [s["name"] for s in scs]
    sides = [n for n in SIDES if any(n in s["results"] for s in scs)]
    width = 0.8 / (len(sides) + 1)

    def bars(ax: Any, key: str, ylabel: str, with_limit: bool) -> None:
        for i, side in enumerate(sides):
            vals = []
            for s in scs:
                r = s["results"].get(side) or {}
                v = r.get(key) if r.get("converged") else None
                vals.append((v or 0) / (1000 if key == "total_ms" else 1))
            xs = [j + i * width for j in range(len(scs))]
            ax.bar(xs, vals, width, label=side)
            for x, s in zip(xs, scs, strict=True):
                if not (s["results"].get(side) or {}).get("converged") and side in s["results"]:
                    ax.text(x, 0, "×", ha="center", va="bottom", color="red", fontsize=9)
        if with_limit:
            xs = [j + len(sides) * width for j in range(len(scs))]
            ax.bar(
                xs,
                [(s.get("limit_ms") or 0) / 1000 for s in scs],
                width,
                label="physical limit",
                color="black",
            )
        ax.set_xticks([j + width * len(sides) / 2 for j in range(len(scs))], names, rotation=30, ha="right")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)

    fig, ax = plt.subplots(figsize=(12, 5))
    bars(ax, "total_ms", "total time, s (× = not converged)", True)
    ax.set_title("Total migration time")
    fig.tight_layout()
    fig.savefig(out / "latest-total.png", dpi=90)
    plt.close(fig)

    fig, axes = plt.subplots(2, 1, figsize=(12, 8))
    bars(axes[0], "downtime_ms", "QEMU downtime, ms", False)
    bars(axes[1], "max_gap_ms", "longest UDP gap, ms", False)
    axes[0].set_title("Downtime (QEMU) and the client's longest gap")
    fig.tight_layout()
    fig.savefig(out / "latest-gap.png", dpi=90)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    for ax, (pk, ak, unit) in zip(
        axes,
        (
            ("predicted_total_ms", "total_ms", "total, ms"),
            ("predicted_downtime_ms", "downtime_ms", "downtime, ms"),
        ),
        strict=True,
    ):
        pts = [
            ((s["results"]["vmshift"].get(pk) or 0), s["results"]["vmshift"].get(ak) or 0, s["name"])
            for s in scs
            if (s["results"].get("vmshift") or {}).get("converged")
        ]
        for p, a, n in pts:
            ax.scatter(a, p)
            ax.annotate(n, (a, p), fontsize=7)
        top = max([max(p, a) for p, a, _ in pts] or [1])
        ax.plot([0, top], [0, top], "k--", lw=0.8)
        ax.plot([0, top], [0, top * 1.2], ":", color="gray", lw=0.8)
        ax.plot([0, top], [0, top * 0.8], ":", color="gray", lw=0.8)
        ax.set_xlabel(f"actual {unit}")
        ax.set_ylabel(f"predicted {unit}")
    axes[0].set_title("vmshift: predicted vs actual (dotted: ±20%)")
    fig.tight_layout()
    fig.savefig(out / "latest-prediction.png", dpi=90)
    plt.close(fig)


def main(argv: list[str]) -> int:
    path = Path(argv[0]) if argv else Path("bench/results/latest.json")
    doc = json.loads(path.read_text())
    (path.parent / "latest.md").write_text(markdown(doc, plots=True))
    plots(doc, path.parent)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
