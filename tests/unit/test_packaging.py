"""The systemd units and example configs in packaging/ (docs/deploy.md installs them).

``systemd-analyze verify`` checks the units offline (no systemd as PID 1 needed); it also checks that
ExecStart's program exists, so the test points ExecStart at this checkout's installed console scripts,
in place of the venv path /opt/vmshift/venv that docs/deploy.md uses.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vmshift.agent.config import AgentConfig, load_config

REPO = Path(__file__).resolve().parents[2]
UNITS = REPO / "packaging" / "systemd"
ETC = REPO / "packaging" / "etc" / "vmshift"
DEPLOY_BIN = "/opt/vmshift/venv/bin/"
ANALYZE = shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze"
needs_analyze = pytest.mark.skipif(not Path(ANALYZE).exists(), reason="systemd-analyze is not installed")


def _installed(tmp_path: Path, unit: str) -> Path:
    text = (UNITS / unit).read_text()
    assert f"ExecStart={DEPLOY_BIN}" in text, "ExecStart must use the venv of docs/deploy.md"
    bin_dir = Path(sys.executable).parent
    out = tmp_path / unit
    out.write_text(text.replace(DEPLOY_BIN, f"{bin_dir}/"))
    program = re.search(r"^ExecStart=(\S+)", out.read_text(), re.M)
    assert program is not None and Path(program.group(1)).exists(), "install vmshift first (make venv)"
    return out


def _directives(unit: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in (UNITS / unit).read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


@needs_analyze
@pytest.mark.parametrize("unit", ["vmshift-server.service", "vmshift-agent.service"])
def test_systemd_analyze_verify_finds_nothing_in_the_unit(tmp_path: Path, unit: str) -> None:
    path = _installed(tmp_path, unit)
    r = subprocess.run([ANALYZE, "verify", str(path)], capture_output=True, text=True, timeout=60,
                       cwd=tmp_path)
    # systemd-analyze also loads the machine's other units and may complain about those: only
    # complaints about this unit count (an unknown key is a warning with exit code 0)
    ours = [line for line in (r.stdout + r.stderr).splitlines() if unit in line]
    assert r.returncode == 0 and ours == [], r.stdout + r.stderr


@needs_analyze
def test_the_server_unit_is_confined(tmp_path: Path) -> None:
    path = _installed(tmp_path, "vmshift-server.service")
    r = subprocess.run([ANALYZE, "security", "--offline=yes", "--threshold=20", str(path)],
                       capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr  # exposure at most 2.0 (threshold in tenths)
    d = _directives("vmshift-server.service")
    assert d["User"] == ["vmshift"] and d["NoNewPrivileges"] == ["yes"] and d["CapabilityBoundingSet"] == [""]
    assert d["ExecStart"][0].endswith("vmshift-server --config /etc/vmshift/server.toml")


def test_the_agent_unit_keeps_vms_running_across_restarts() -> None:
    d = _directives("vmshift-agent.service")
    assert "User" not in d  # root: taps, QEMU, datastores
    assert d["KillMode"] == ["process"]  # systemctl stop/restart signals the agent only, never QEMU
    assert "MemoryDenyWriteExecute" not in d and "PrivateDevices" not in d  # QEMU (TCG, /dev/kvm) inherits
    assert d["ExecStart"][0].endswith("vmshift-agent --config /etc/vmshift/agent.json")


def test_the_example_agent_config_loads_and_docs_describe_every_key() -> None:
    example = ETC / "agent.json"
    config = load_config(example)
    assert config.state_dir == Path("/var/lib/vmshift/agent")  # the unit's StateDirectory
    keys = set(json.loads(example.read_text()))
    fields = {f.name for f in dataclasses.fields(AgentConfig)}
    assert keys == fields, f"the example shows {sorted(keys)}, AgentConfig has {sorted(fields)}"
    doc = (REPO / "docs" / "agent.md").read_text()
    for key in sorted(fields):
        assert f"`{key}`" in doc, f"docs/agent.md does not describe {key}"
