"""The storage benchmark's figures (each with its baseline, ratio and target) and its Markdown page.

.venv/bin/python -m bench.storage_report bench/results/storage-latest.json   # redraws the .md beside it
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

Json = dict[str, Any]
MIB = 1 << 20


def _fig(
    fid: str,
    title: str,
    value: float | None,
    unit: str,
    baseline: str,
    baseline_value: float | None,
    ratio: float | None,
    target: str,
    met: bool | None,
    note: str = "",
) -> Json:
    return {
        "id": fid,
        "title": title,
        "value": value,
        "unit": unit,
        "baseline": baseline,
        "baseline_value": baseline_value,
        "ratio": None if ratio is None else round(ratio, 3),
        "target": target,
        "met": met,
        "note": note,
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _mibps(bps: float | None) -> float | None:
    return None if bps is None else round(bps / MIB, 1)


def figures(doc: Json) -> list[Json]:
    s = doc.get("sections") or {}
    out: list[Json] = []
    if m := s.get("mirror"):
        for key, what, note in (
            ("convert_fsync_bps", "qemu-img convert -n -W -m 16, then fsync of the copy",
             "the same durability: the mirror flushes its target before READY"),
            ("convert_bps", "qemu-img convert -n -W -m 16 as written (cache unsafe: no flush)",
             "the copy may still be in the page cache when qemu-img returns"),
        ):  # fmt: skip
            r = _ratio(m.get("mirror_bps"), m.get(key))
            out.append(
                _fig(f"mirror-{key.removesuffix('_bps')}", "Storage vMotion mirror throughput",
                     _mibps(m.get("mirror_bps")), "MiB/s", what, _mibps(m.get(key)), r, "≥ 0.90",
                     None if r is None else r >= 0.90,
                     f"medians; mirror time = the migration record's total_ms (prepare to old files "
                     f"removed); {note}")
            )  # fmt: skip
        if m.get("mirror_copy_s"):
            copy_bps = m["bytes"] / m["mirror_copy_s"]
            r = _ratio(copy_bps, m.get("convert_fsync_bps"))
            out.append(
                _fig("mirror-copy-phase", "Mirror's copy phase alone (diagnostic, not the issue's figure)",
                     _mibps(copy_bps), "MiB/s", "qemu-img convert -n -W -m 16, then fsync of the copy",
                     _mibps(m.get("convert_fsync_bps")), r, "–", None,
                     f"the source agent's phases (median s, each to within its 0.1 s poll): prepare "
                     f"{_cell(m.get('mirror_prepare_s'))}, copy to every disk READY "
                     f"{_cell(m.get('mirror_copy_s'))}, pivot + finish "
                     f"{_cell(m.get('mirror_after_ready_s'))}; "
                     f"{m.get('mirror_write_blocking_moves')} of the mirrors turned write-blocking")
            )  # fmt: skip
    if p := s.get("pivot"):
        v = p.get("worst_p99_ms")
        out.append(
            _fig("pivot", "Guest's worst disk-log write per same-host Storage vMotion, p99", v, "ms",
                 "the same guest's worst write in the quiet window before each move, p99",
                 p.get("quiet_p99_ms"), _ratio(v, p.get("quiet_p99_ms")), "≤ 50 ms",
                 None if v is None else v <= 50.0,
                 f"max {p.get('worst_max_ms')} ms over {len(p.get('moves') or [])} moves (quiet windows: "
                 f"max {p.get('quiet_max_ms')} ms); {p.get('raised_by_move')} moves wrote slower than their "
                 f"quiet window; agent pivot_ms p99 {p.get('pivot_p99_ms')}, max {p.get('pivot_max_ms')}")
        )  # fmt: skip
    if c := s.get("sparse"):
        for key, label in (("same", "same host"), ("nbd", "other host, NBD")):
            sp, full = c.get(f"sparse_{key}_ms"), c.get(f"full_{key}_ms")
            r = _ratio(sp, full)
            out.append(
                _fig(
                    f"sparse-{key}",
                    f"Cold move of a 4 GiB disk holding 256 MiB ({label})",
                    sp,
                    "ms",
                    "the same move of a 256 MiB disk written full",
                    full,
                    r,
                    "≤ 2.0",
                    None if r is None else r <= 2.0,
                    "medians of the migration records' total_ms; both VMs also carry a 64 MiB log disk",
                )
            )
    if u := s.get("suspend"):
        r = _ratio(u.get("suspend_bps"), u.get("dd_bps"))
        out.append(
            _fig(
                "suspend-rate",
                "Suspend: state written per second (QEMU's save time)",
                _mibps(u.get("suspend_bps")),
                "MiB/s",
                "dd if=/dev/zero bs=1M oflag=direct, same folder",
                _mibps(u.get("dd_bps")),
                r,
                "≥ 0.80",
                None if r is None else r >= 0.80,
            )
        )
        fb, mb = u.get("file_bytes"), u.get("memory_bytes")
        r2 = _ratio(fb, mb)
        out.append(
            _fig(
                "suspend-size",
                "Suspend: state file's apparent size",
                None if fb is None else round(fb / MIB, 1),
                "MiB",
                "the VM's RAM",
                None if mb is None else round(mb / MIB, 1),
                r2,
                "≤ 1.01",
                None if r2 is None else r2 <= 1.01,
                f"allocated {_cell(_mib(u.get('allocated_bytes')))} MiB (zero pages are holes)",
            )
        )
    return out


def _cell(x: Any) -> str:
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "**yes**" if x else "**NO**"
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 10 else f"{x:.0f}"
    return str(x)


def markdown(doc: Json) -> str:
    mach = doc.get("machine") or {}
    lines = ["# Storage benchmark (issue 8)", ""]
    if doc.get("quick") or doc.get("label"):
        what = "fewer repetitions" if doc.get("quick") else "the full repetitions"
        lines += [
            f"> **{doc.get('label') or 'Smoke run (--quick)'}** ({what}): not a result to quote. "
            "`make bench-storage` on an idle machine gives those.",
            "",
        ]
    lines += [
        f"Command: `{doc.get('command')}` — started {doc.get('started_at')}, {doc.get('duration_s')} s.",
        f"Machine: {mach.get('cpus')} CPUs, {mach.get('accelerator')}, {mach.get('qemu')}, commit "
        f"{mach.get('commit')}, load average at start {_load(mach.get('loadavg_at_start'))}.",
        "",
        "| figure | value | baseline | baseline value | ratio | target | met |",
        "|---|---|---|---|---|---|---|",
    ]
    for f in doc.get("figures") or []:
        lines.append(
            f"| {f['title']} | {_cell(f['value'])} {f['unit']} | {f['baseline']} | "
            f"{_cell(f['baseline_value'])} | {_ratio_cell(f['ratio'])} | {f['target']} | {_cell(f['met'])} |"
        )
    lines += [""]
    for f in doc.get("figures") or []:
        if f.get("note"):
            lines.append(f"- {f['title']}: {f['note']}.")
    fails = doc.get("failures") or []
    lines += ["", f"Guest checks failed: **{len(fails)}**" + (":" if fails else " (every move verified).")]
    lines += [f"- {x}" for x in fails]
    for name, err in (doc.get("errors") or {}).items():
        lines += ["", f"Section {name} failed:", "```", str(err).strip()[-1500:], "```"]
    lines += ["", "## Samples", ""]
    lines += _samples(doc.get("sections") or {})
    return "\n".join(lines) + "\n"


def _split(x: Json) -> str:
    if x.get("method") != "mirror":
        return "–"
    wb = " (write-blocking)" if x.get("write_blocking") else ""
    return " / ".join(_cell(x.get(k)) for k in ("prepare_s", "copy_s", "after_ready_s")) + wb


def _ratio_cell(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"


def _load(x: Any) -> str:
    return ", ".join(f"{v:.2f}" for v in x) if isinstance(x, list | tuple) else _cell(x)


def _samples(s: Json) -> list[str]:
    out: list[str] = []
    if m := s.get("mirror"):
        out += [
            f"Mirror vs convert ({m['bytes'] / MIB:.0f} MiB of disks, {m['data_mib']} MiB written; "
            f"`{m['convert_command']}`, the VM running):",
            "",
            "| method | path | ms | MiB/s | ms with fsync | MiB/s with fsync | prepare / copy / after READY s"
            " | guest ok |",
            "|---|---|---|---|---|---|---|---|",
        ]
        out += [
            f"| {x['method']} | {x['path']} | {_cell(x['ms'])} | {_cell(_mibps(x.get('throughput_bps')))} | "
            f"{_cell(x.get('ms_fsync'))} | {_cell(_mibps(x.get('throughput_fsync_bps')))} | "
            f"{_split(x)} | {_cell(x.get('guest_ok'))} |"
            for x in m["samples"]
        ]
        out += [""]
    if p := s.get("pivot"):
        out += [
            f"Pivot moves (disk log {p['disklog_rate_per_s']} writes/s, window {p['window_s']} s):",
            "",
            "| # | path | pivot_ms | total_ms | worst write ms | quiet window max ms | writes"
            " | window covers move | guest ok |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        out += [
            f"| {x['n']} | {x['path']} | {_cell(x['pivot_ms'])} | {_cell(x['total_ms'])} | "
            f"{_cell(x['worst_write_ms'])} | {_cell(x.get('quiet_max_ms'))} | "
            f"{_cell(x['window'].get('samples'))} | {_cell(x['window_covers_move'])} | "
            f"{_cell(x['guest_ok'])} |"
            for x in p["moves"]
        ]
        out += [""]
    if c := s.get("sparse"):
        out += [
            "Cold moves:",
            "",
            "| disk | path | from | to | ms | bytes counted | guest ok |",
            "|---|---|---|---|---|---|---|",
        ]
        out += [
            f"| {x['disk']} | {x['path']} | {x['from']} | {x['to']} | {_cell(x['ms'])} | "
            f"{_cell(x['bytes_sent'])} | {_cell(x['guest_ok'])} |"
            for x in c["samples"]
        ]
        out += [""]
    if u := s.get("suspend"):
        out += [
            f"Suspend (1 GiB guest, memtest {u['memtest']}):",
            "",
            "| # | written MiB | save s | MiB/s | dd MiB/s (before, after: mean) | file MiB | allocated MiB"
            " | direct-io | guest ok |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for x in u["samples"]:
            r = x["suspend"]
            d = {"bps": sum(y.get("bps") or 0 for y in x["dd"]) / max(1, len(x["dd"]))}
            out.append(
                f"| {x['rep']} | {_cell(_mib(r.get('written_bytes')))} | {_cell(r.get('save_s'))} | "
                f"{_cell(_mibps(r.get('write_bps')))} | {_cell(_mibps(d.get('bps')))} | "
                f"{_cell(_mib(r.get('file_bytes')))} | {_cell(_mib(r.get('allocated_bytes')))} | "
                f"{_cell(r.get('direct_io'))} | {_cell(x['guest_ok'])} |"
            )
        out += [""]
    return out


def _mib(b: Any) -> float | None:
    return None if b is None else round(float(b) / MIB, 1)


def main(argv: list[str]) -> int:
    src = Path(argv[0]) if argv else Path("bench/results/storage-latest.json")
    doc = json.loads(src.read_text())
    doc["figures"] = figures(doc)
    src.with_suffix(".md").write_text(markdown(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
