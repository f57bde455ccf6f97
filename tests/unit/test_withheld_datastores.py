"""Which reports leave a datastore's entry alone while `datastore add` or `remove` owns it."""

from __future__ import annotations

import time

from vmshift.server.withheld_datastores import WithheldDatastores


def test_a_hold_covers_reports_read_before_it_ended_and_only_its_hosts() -> None:
    held = WithheldDatastores()
    before = time.monotonic()
    with held.holding("iscsi-2", ["host-1"]):
        during = time.monotonic()
        assert held.frozen_for("host-1", before) == {"iscsi-2"}, "read before the hold, written during it"
        assert held.frozen_for("host-1", during) == {"iscsi-2"}
        assert held.frozen_for("host-2", during) == set(), "not held for host-2"
    after = time.monotonic()
    assert held.frozen_for("host-1", during) == {"iscsi-2"}, "read during the hold, written after it: stale"
    assert held.frozen_for("host-1", after + 0.001) == set(), "read after the hold: current"


def test_a_hold_of_every_host() -> None:
    held = WithheldDatastores()
    with held.holding("iscsi-3"):
        assert held.frozen_for("host-7", time.monotonic()) == {"iscsi-3"}
