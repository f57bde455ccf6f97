"""``vmshift-server`` options (server/options.py): the TOML file, flags over it, refusals naming the key."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from vmshift.errors import InvalidInputError
from vmshift.server.options import OPTIONS, parse_settings, read_config_file
from vmshift.server.settings import ServerSettings

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "packaging" / "etc" / "vmshift" / "server.toml"


@pytest.fixture
def tokens(tmp_path: Path) -> tuple[Path, Path]:
    api, other = tmp_path / "token", tmp_path / "other-token"
    api.write_text("api-secret\n")
    other.write_text("other-secret\n")
    return api, other


def _config(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "server.toml"
    path.write_text(body)
    return path


def test_the_file_sets_options_flags_override_it_and_the_rest_are_defaults(
    tmp_path: Path, tokens: tuple[Path, Path]
) -> None:
    api, _ = tokens
    cfg = _config(tmp_path, f'''
listen = "0.0.0.0:8100"
state_dir = "{tmp_path / 'state'}"
token_file = "{api}"
heartbeat_interval_s = 5
event_retention_days = 90
task_retention_days = 0
''')
    s = parse_settings(["--config", str(cfg), "--listen", "10.0.0.1:9000", "--task-retention-days", "7"])
    assert s.listen == "10.0.0.1:9000"  # the flag wins
    assert (s.state_dir, s.token) == (tmp_path / "state", "api-secret")
    assert s.heartbeat_interval_s == 5.0 and s.event_retention_days == 90 and s.task_retention_days == 7
    defaults = ServerSettings(state_dir=Path("/x"), token="t")
    assert s.migration_retention_days == defaults.migration_retention_days == 30
    assert s.db_url is None and s.missed_heartbeats == defaults.missed_heartbeats


def test_flags_alone_still_work_as_before(tmp_path: Path, tokens: tuple[Path, Path]) -> None:
    api, _ = tokens
    s = parse_settings(["--state-dir", str(tmp_path), "--token-file", str(api),
                        "--heartbeat-interval", "0.5", "--db-url", "sqlite:///x.db"])
    assert s.heartbeat_interval_s == 0.5 and s.db_url == "sqlite:///x.db" and s.listen == "127.0.0.1:8100"


def test_a_flag_replaces_a_secret_file_that_is_never_read(tmp_path: Path, tokens: tuple[Path, Path]) -> None:
    api, _ = tokens
    cfg = _config(tmp_path, 'state_dir = "/s"\ntoken_file = "/nonexistent"\n')
    assert parse_settings(["--config", str(cfg), "--token-file", str(api)]).token == "api-secret"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('listen = "1.2.3.4:1"\nheartbeat_intervall_s = 3\n', "has an unknown key 'heartbeat_intervall_s'"),
        ("[retention]\nevent_days = 3\n", "has an unknown key 'retention'"),
        ('heartbeat_interval_s = "soon"\n', "'heartbeat_interval_s' in .* must be a number, not 'soon'"),
        ("heartbeat_interval_s = 0\n", "'heartbeat_interval_s' in .* must be a number of seconds above 0"),
        ("event_retention_days = -1\n", "'event_retention_days' in .* whole number of days, 0 to keep"),
        ("event_retention_days = 1.5\n", "'event_retention_days' in .* must be a whole number"),
        ("missed_heartbeats = true\n", "'missed_heartbeats' in .* must be a whole number"),
        ('listen = "localhost"\n', "'listen' in .* must be HOST:PORT"),
        ("listen = \n", "is not valid TOML"),
    ],
)
def test_a_bad_file_is_refused_naming_the_key(tmp_path: Path, body: str, message: str) -> None:
    cfg = _config(tmp_path, body)
    with pytest.raises(InvalidInputError, match=message):
        parse_settings(["--config", str(cfg)])


def test_bad_flags_and_missing_options_are_refused(tmp_path: Path, tokens: tuple[Path, Path]) -> None:
    api, _ = tokens
    with pytest.raises(InvalidInputError, match="option state_dir is not set") as e:
        parse_settings(["--token-file", str(api)])
    assert e.value.hint is not None and "--state-dir" in e.value.hint
    with pytest.raises(InvalidInputError,
                       match="--retention-batch-rows must be a whole number of at least 1"):
        parse_settings(["--state-dir", "/s", "--token-file", str(api),
                        "--retention-batch-rows", "0"])
    with pytest.raises(InvalidInputError, match="cannot be read"):
        parse_settings(["--config", str(tmp_path / "missing.toml")])
    with pytest.raises(InvalidInputError, match=r"token file .*missing.* cannot be read"):
        parse_settings(["--state-dir", "/s", "--token-file", str(tmp_path / "missing")])


def test_every_setting_has_one_option_and_the_example_config_documents_each() -> None:
    settable = {f.name for f in dataclasses.fields(ServerSettings)}
    fields = [o.field for o in OPTIONS]
    assert sorted(fields) == sorted(settable), "every ServerSettings field needs one Option line"
    assert len({o.flag_name for o in OPTIONS}) == len(OPTIONS)
    assert read_config_file(EXAMPLE)  # only known keys
    text = EXAMPLE.read_text()
    for o in OPTIONS:
        assert re.search(rf"^#? ?{o.key} = ", text, re.M), f"{EXAMPLE} does not show {o.key}"
