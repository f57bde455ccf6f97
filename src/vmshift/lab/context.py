"""The CLI context file: which server, token and CA the `vmshift` CLI uses when none is given.

`vmshift lab up` points it at the lab it brought up; `vmshift lab down` removes it if it points at
the lab being torn down. The lab subcommands that act on an existing lab use its "lab" when no
`--name` is given (`lab_name`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from vmshift.errors import InvalidInputError


def context_path() -> Path:
    """`$VMSHIFT_CONFIG_DIR/context.json`, else `~/.config/vmshift/context.json`."""
    base = os.environ.get("VMSHIFT_CONFIG_DIR")
    root = Path(base) if base else Path.home() / ".config" / "vmshift"
    return root / "context.json"


def load_context() -> dict[str, str] | None:
    """The saved context, or None when there is none (or it is unreadable)."""
    path = context_path()
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    return {str(k): str(v) for k, v in data.items() if v is not None}


def save_context(server: str, token: str, lab: str, ca_file: str | None = None) -> Path:
    """Write the context (mode 0600: it holds a token) and return its path; ``ca_file`` is the CA
    the server's certificate is verified against."""
    path = context_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"server": server, "token": token, "lab": lab, "ca_file": ca_file}, f)
        f.write("\n")
    tmp.replace(path)
    return path


def clear_context(lab: str) -> bool:
    """Remove the context if it points at `lab`; True when it was removed."""
    ctx = load_context()
    if ctx is None or ctx.get("lab") != lab:
        return False
    context_path().unlink(missing_ok=True)
    return True


def lab_name(name: str | None) -> str:
    """`name` when given, else the lab the context points at.

    Guessing a fixed default would let `lab down` or `lab check` act on some other lab than the one
    the CLI talks to, so without either there is no answer but an error.
    """
    if name:
        return name
    ctx = load_context() or {}
    lab = ctx.get("lab")
    if not lab:
        raise InvalidInputError(
            "No lab was named and the CLI context names none.",
            hint="Pass --name NAME ('vmshift lab list' shows the labs), or bring a lab up with "
            "'sudo vmshift lab up'.",
        )
    return lab
