"""The CLI prints certificate fingerprints as they are: ':CD:' and ':AB:' are Rich emoji codes."""

from __future__ import annotations

from vmshift.cli import output

FINGERPRINT = "SHA256:2A:86:CD:A3:AB:69"


def test_fingerprints_are_not_turned_into_emoji() -> None:
    for console in (output.console, output.err_console):
        with console.capture() as captured:
            console.print(f"Confirm {FINGERPRINT}")
        assert FINGERPRINT in captured.get()
