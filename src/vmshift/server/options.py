"""Every ``vmshift-server`` option, in one table: a key of the TOML config file and a command-line flag.

``vmshift-server --config /etc/vmshift/server.toml [--FLAG VALUE ...]`` reads the file first; flags
given on the command line override it; what neither sets takes its default from ``ServerSettings``
(the one home of the defaults). A field without a default there is required. A key the table does not
know is refused with its name, so a typo never silently leaves a default in place.

To add an option: add its field to ``ServerSettings`` and one ``Option`` line to ``OPTIONS``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmshift.errors import InvalidInputError
from vmshift.server.settings import ServerSettings, read_token

EXAMPLE_CONFIG = "/etc/vmshift/server.toml"
DOCS = "docs/deploy.md"


class OptionValueError(ValueError):
    """A value does not fit its option; the message says what it must be (``must be ...``)."""


Parse = Callable[[object], object]
"""Turns a TOML value or a flag's string into the settings value, or raises ``OptionValueError``."""


def text(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise OptionValueError("must be a non-empty string")
    return value.strip()


def path(value: object) -> Path:
    return Path(text(value))


def listen_address(value: object) -> str:
    host, sep, port = text(value).rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise OptionValueError("must be HOST:PORT, e.g. 127.0.0.1:8100")
    return f"{host or '127.0.0.1'}:{port}"


def _number(value: object) -> float:
    if isinstance(value, bool):
        raise OptionValueError("must be a number")
    if isinstance(value, int | float):
        return float(value)
    try:
        return float(text(value))
    except ValueError:
        raise OptionValueError("must be a number") from None


def _whole(value: object) -> int:
    if isinstance(value, bool):
        raise OptionValueError("must be a whole number")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    raise OptionValueError("must be a whole number")


def seconds(value: object) -> float:
    s = _number(value)
    if not math.isfinite(s) or s <= 0:
        raise OptionValueError("must be a number of seconds above 0")
    return s


def seconds_or_off(value: object) -> float:
    s = _number(value)
    if not math.isfinite(s) or s < 0:
        raise OptionValueError("must be a number of seconds, 0 or more")
    return s


def count(value: object) -> int:
    n = _whole(value)
    if n < 1:
        raise OptionValueError("must be a whole number of at least 1")
    return n


def days(value: object) -> int:
    n = _whole(value)
    if n < 0:
        raise OptionValueError("must be a whole number of days, 0 to keep forever")
    return n


def secret_file(what: str) -> Parse:
    """The option names a file; the setting is the secret inside (never the secret on a command line)."""

    def parse(value: object) -> str:
        return read_token(path(value), what)

    return parse


@dataclass(frozen=True)
class Option:
    key: str  # the TOML key; the flag is --KEY with dashes unless ``flag`` names another
    field: str  # the ServerSettings field it sets
    parse: Parse
    help: str
    flag: str | None = None

    @property
    def flag_name(self) -> str:
        return self.flag or "--" + self.key.replace("_", "-")

    @property
    def dest(self) -> str:
        return "opt_" + self.key


OPTIONS: tuple[Option, ...] = (
    Option("listen", "listen", listen_address, "HOST:PORT to serve the REST API on"),
    Option("state_dir", "state_dir", path, "the server's state directory (SQLite database by default)"),
    Option("db_url", "db_url", text,
           "SQLAlchemy URL of the database (unset: $VMSHIFT_DB_URL, else sqlite:///STATE_DIR/vmshift.db)"),
    Option("token_file", "token", secret_file("token"), "file holding the API bearer token"),
    Option("heartbeat_interval_s", "heartbeat_interval_s", seconds,
           "seconds between two polls of an agent that cannot stream, and between two safety-net reconciles",
           flag="--heartbeat-interval"),
    Option("missed_heartbeats", "missed_heartbeats", count,
           "missed stream keepalives (1 s each) or polls until a host is disconnected"),
    Option("agent_timeout_s", "agent_timeout_s", seconds, "seconds one call to an agent may take"),
    Option("migration_poll_interval_s", "migration_poll_interval_s", seconds,
           "seconds between two reads of a live migration's progress"),
    Option("migration_agent_grace_s", "migration_agent_grace_s", seconds,
           "seconds an unreachable source agent of a migration is waited for before it fails"),
    Option("tls_cert", "tls_cert", path,
           "PEM certificate to serve the API with (unset: STATE_DIR/tls/server.pem, made on first start)"),
    Option("tls_key", "tls_key", path, "the private key of tls_cert"),
    Option("ca_file", "ca_file", path,
           "the CA that issued tls_cert, which 'ca show' prints (unset: STATE_DIR/tls/ca.pem)"),
    Option("event_retention_days", "event_retention_days", days, "days events are kept (0: forever)"),
    Option("task_retention_days", "task_retention_days", days, "days finished tasks are kept (0: forever)"),
    Option("migration_retention_days", "migration_retention_days", days,
           "days finished migrations are kept (0: forever)"),
    Option("retention_interval_s", "retention_interval_s", seconds, "seconds between two retention purges"),
    Option("retention_batch_rows", "retention_batch_rows", count, "rows one purge transaction deletes"),
    Option("api_db_threads", "api_db_threads", count, "threads that run the API routes' database work"),
    Option("db_pool_spare", "db_pool_spare", count,
           "database connections kept beyond api_db_threads for the event loop's own work"),
    Option("drs_interval_s", "drs_interval_s", seconds_or_off,
           "seconds between two DRS passes over every cluster (0: only 'vmshift drs run')"),
    Option("load_step_s", "load_step_s", seconds, "seconds between two samples of the hosts' load"),
    Option("load_window_s", "load_window_s", seconds, "seconds of load history a DRS pass averages over"),
)
BY_KEY = {o.key: o for o in OPTIONS}
_FIELDS = {f.name: f for f in dataclasses.fields(ServerSettings)}


def _default(option: Option) -> object:
    f = _FIELDS[option.field]
    return None if f.default is dataclasses.MISSING else f.default


def _required(option: Option) -> bool:
    f = _FIELDS[option.field]
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config`` and one flag per option; a flag left out is None (the file or the default decides)."""
    parser.add_argument("--config", type=Path, default=None, metavar="FILE",
                        help=f"TOML file with any of the options below (e.g. {EXAMPLE_CONFIG})")
    for o in OPTIONS:
        default = _default(o)
        note = " (required)" if _required(o) else (f" (default {default})" if default is not None else "")
        parser.add_argument(o.flag_name, dest=o.dest, default=None, metavar=o.key.upper(), help=o.help + note)


def read_config_file(file: Path) -> dict[str, Any]:
    try:
        raw = file.read_bytes()
    except OSError as e:
        raise InvalidInputError(f"The server config {file} cannot be read: {e.strerror}.",
                                hint=f"Pass an existing file with --config (see {DOCS}).") from e
    try:
        data = tomllib.loads(raw.decode())
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise InvalidInputError(f"The server config {file} is not valid TOML: {e}.",
                                hint="Write KEY = VALUE lines, strings in double quotes.") from e
    unknown = [k for k in data if k not in BY_KEY]
    if unknown:
        raise InvalidInputError(
            f"The server config {file} has an unknown key {unknown[0]!r}.",
            hint=f"Known keys: {', '.join(BY_KEY)} (see {DOCS}).",
        )
    return data


def settings_from(file_values: dict[str, Any], flag_values: dict[str, object],
                  source: str = "the server config") -> ServerSettings:
    """Merge (flags over file), parse each value once, and fill the rest from the defaults."""
    fields: dict[str, Any] = {}
    for o in OPTIONS:
        if flag_values.get(o.key) is not None:
            raw, where = flag_values[o.key], o.flag_name
        elif o.key in file_values:
            raw, where = file_values[o.key], f"{o.key!r} in {source}"
        else:
            continue
        try:
            fields[o.field] = o.parse(raw)
        except OptionValueError as e:
            raise InvalidInputError(f"{where} {e}, not {raw!r}.",
                                    hint=f"See {DOCS} for every server option.") from None
    for o in OPTIONS:
        if o.field not in fields and _required(o):
            raise InvalidInputError(f"The server option {o.key} is not set.",
                                    hint=f"Pass {o.flag_name} or set {o.key} in {EXAMPLE_CONFIG}.")
    return ServerSettings(**fields)


def load_settings(args: argparse.Namespace) -> ServerSettings:
    config: Path | None = args.config
    file_values = read_config_file(config) if config is not None else {}
    flags = {o.key: getattr(args, o.dest) for o in OPTIONS}
    return settings_from(file_values, flags, str(config) if config is not None else "the server config")


def parse_settings(argv: Sequence[str] | None = None) -> ServerSettings:
    parser = argparse.ArgumentParser(prog="vmshift-server",
                                     description="vmshift control plane (inventory, tasks, API over HTTPS)",
                                     epilog="'vmshift-server ca show --state-dir DIR' (or --config FILE) "
                                     "prints the CA clients trust (docs/tls.md).")
    add_arguments(parser)
    return load_settings(parser.parse_args(argv))
