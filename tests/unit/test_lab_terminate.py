"""Stopping lab processes: a process that exited counts as stopped, even one another process started.

`vmshift lab down` runs in its own process; an agent or server a test restarted is that test's child,
so once it exits it stays a zombie until the test reaps it. Waiting for such a process to vanish
used the whole timeout twice (TERM, then KILL): 20 s per restarted process, 60 s at the end of the
lab suite.
"""

from __future__ import annotations

import subprocess
import sys
import time

import psutil

from vmshift.lab import processes

# A parent that starts a child, prints its pid and never reaps it: the child's exit leaves a zombie.
NEGLECTFUL_PARENT = """
import subprocess, sys, time
child = subprocess.Popen(["sleep", "60"])
print(child.pid, flush=True)
time.sleep(60)
"""


def test_a_zombie_of_another_process_counts_as_stopped() -> None:
    parent = subprocess.Popen([sys.executable, "-c", NEGLECTFUL_PARENT], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        assert psutil.Process(child).ppid() == parent.pid, "the child is not ours: its parent reaps it"
        began = time.monotonic()
        processes.terminate([child])
        took = time.monotonic() - began
        assert psutil.Process(child).status() == psutil.STATUS_ZOMBIE, "the child did not end"
        assert took < processes.STOP_TIMEOUT_S / 2, f"terminate waited {took:.1f} s for a process that ended"
    finally:
        parent.kill()
        parent.wait()


def test_our_own_children_are_stopped_and_reaped() -> None:
    child = subprocess.Popen(["sleep", "60"])
    began = time.monotonic()
    processes.terminate([child.pid])
    assert time.monotonic() - began < processes.STOP_TIMEOUT_S / 2
    assert not psutil.pid_exists(child.pid), "terminate left a zombie of its own child"
    child.returncode = -15  # reaped above: keep Popen from waiting for it again


def test_a_process_that_ignores_sigterm_is_killed() -> None:
    stubborn = subprocess.Popen([sys.executable, "-c",
                                 "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                                 "print(1, flush=True); time.sleep(60)"], stdout=subprocess.PIPE)
    assert stubborn.stdout is not None
    stubborn.stdout.readline()  # its SIGTERM handler is set
    processes.terminate([stubborn.pid], timeout=0.5)
    assert not psutil.pid_exists(stubborn.pid)
    stubborn.returncode = -9
