"""`schedule add -- vm migrate ...`: the words after -- become the migrate request vm migrate would send."""

from __future__ import annotations

import pytest

from vmshift.cli.schedules import migrate_request
from vmshift.errors import InvalidInputError
from vmshift.model.enums import DiskFormat


def test_every_option_of_vm_migrate_maps_to_the_request() -> None:
    line = ("vm migrate web-3 --host host-2 --datastore local-host-2 --disk-format raw --max-downtime 300 "
            "--no-postcopy --postcopy-after 5 --bandwidth-limit 1gbit")  # fmt: skip
    words = migrate_request(line.split())
    body = words.body
    assert words.vm == "web-3" and not words.json
    assert (body.host, body.datastore, body.disk_format) == ("host-2", "local-host-2", DiskFormat.RAW)
    assert (body.max_downtime_ms, body.allow_postcopy, body.postcopy_after_s) == (300, False, 5.0)
    assert body.bandwidth_limit_bps == 125e6 and not body.check_only and not body.dry_run


def test_unset_options_stay_unset() -> None:
    words = migrate_request(["vm", "migrate", "web-3", "--datastore", "ds-2", "--json"])
    assert words.body.model_dump(exclude_defaults=True) == {"datastore": "ds-2"}
    assert words.json  # --json at the end is schedule add's own


@pytest.mark.parametrize(
    ("words", "expected"),
    [
        ("vm migrate web-3 --host h --check-only", "--check-only has no meaning"),
        ("vm migrate web-3 --host h --no-wait", "--no-wait has no meaning"),
        ("vm migrate web-3 --host h --max-downtime soon", "Invalid value for '--max-downtime'"),
        ("vm migrate web-3 --host h --bandwidth-limit fast", "Bandwidth 'fast' is not valid"),
        ("vm migrate --host h", "not valid"),
        ("migrate web-3 --host h", "runs 'vm migrate'"),
        ("", "is 'nothing'"),
    ],
)
def test_what_a_schedule_cannot_run_is_refused_with_a_hint(words: str, expected: str) -> None:
    with pytest.raises(InvalidInputError) as e:
        migrate_request(words.split())
    assert expected in e.value.message and e.value.hint
