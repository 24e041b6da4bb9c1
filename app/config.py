"""Read and validate the aggregator's settings, once, at start-up."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

MIB = 1024 * 1024


class ConfigError(ValueError):
    """A setting is missing or malformed; the message names the variable."""


@dataclass(frozen=True)
class Config:
    """Every setting the aggregator and its gunicorn config use."""

    # Not in repr: a postgresql:// URL may hold a password.
    database_url: str = field(default="sqlite:///data/dedup.db", repr=False)
    api_token: str | None = field(default=None, repr=False)
    read_token: str | None = field(default=None, repr=False)
    max_batch: int = 10_000
    max_body: int = 16 * MIB
    max_payload: int = 64 * 1024
    max_page_bytes: int = 4 * MIB
    search_scan: int = 10_000
    search_time: float = 0.25
    search_concurrency: int = 2
    body_budget: int = 32 * MIB
    max_db_mb: int | None = None
    retention: float | None = None
    queue_size: int = 64
    writers: int = 1
    commit_timeout: float = 30.0
    body_timeout: float = 60.0
    header_timeout: float = 10.0
    send_timeout: float = 60.0
    start_timeout: float = 30.0
    web_concurrency: int = 2
    threads: int = 16
    bind: str = "0.0.0.0:8080"
    graceful_timeout: int = 30
    metrics_dir: str | None = None
    metrics_topics: int = 100
    trusted_proxies: int = 0

    def __post_init__(self):
        if self.max_db_mb is not None and self.backend != "sqlite":
            raise ConfigError("AGGREGATOR_MAX_DB_MB is a quota for SQLite only; PostgreSQL "
                              "has its own (tablespace, disk) limits")

    @property
    def backend(self) -> str:
        """Return "sqlite" or "postgresql", from the scheme of database_url."""
        return "sqlite" if urlsplit(self.database_url).scheme == "sqlite" else "postgresql"

    def summary(self) -> str:
        """Return the settings that shape the server as one line for the start-up log (less
        gunicorn's own, which flags can change): tokens only as set or not, a URL without
        its credentials."""
        retention = "none"
        if self.retention is not None:
            size, unit = next(((size, unit) for size, unit in ((86400, "days"), (3600, "hours"))
                               if self.retention >= size), (1, "s"))
            retention = f"{self.retention / size:g} {unit}"
        quota = "" if self.max_db_mb is None else f" (quota {self.max_db_mb} MB)"
        return (f"database {self.database_shown}{quota}; {self.writers} "
                f"writer{'s' if self.writers > 1 else ''} and a queue of {self.queue_size} "
                "batches per worker; "
                f"max batch {self.max_batch} events, max body {self.max_body} bytes; "
                f"retention {retention}; publish token {_set(self.api_token)}, read token "
                f"{_set(self.read_token)}")

    @property
    def database_shown(self) -> str:
        """Return database_url without its credentials, to show."""
        return _without_credentials(self.database_url)

    @property
    def sqlite_path(self) -> str:
        """Return the database file path of a sqlite:/// URL."""
        return sqlite_path(self.database_url)


# Environment variable -> (Config field, parser). The parsers raise ValueError
# with a short reason; from_env() turns it into a ConfigError naming the variable.
# No setting needs more; AGGREGATOR_SEARCH_SCAN past 64 bits made every search by topic
# or source a 500 (its OFFSET).
MAX_INT = 2**31 - 1


def _positive_int(text: str) -> int:
    value = int(text) if text.isdigit() else 0
    if not 1 <= value <= MAX_INT:
        raise ValueError(f"must be a positive integer, at most {MAX_INT}")
    return value


MAX_COUNT = 1_000_000  # a count past SQL's 64-bit LIMIT made /metrics a 500


def _count(text: str) -> int:
    if not text.isdigit() or int(text) > MAX_COUNT:
        raise ValueError(f"must be a whole number, 0 to {MAX_COUNT}")
    return int(text)


def _float(text: str) -> float:
    """Return text as a float, NaN (which no bound admits) when it is not a number."""
    try:
        return float(text)
    except ValueError:
        return float("nan")


# A time limit past this was taken, then broke at run time: 1e30 seconds overflowed the
# waits for a commit (every /publish a 500), the deadlines' clock and SO_SNDTIMEO.
MAX_TIMEOUT = 86400.0


def _positive_float(text: str) -> float:
    value = _float(text)
    if not 0 < value <= MAX_TIMEOUT:
        raise ValueError(f"must be a positive number of seconds, at most {MAX_TIMEOUT:g} "
                         "(a day)")
    return value


def _seconds(text: str) -> float:
    value = _float(text)
    if not 0 <= value < float("inf"):
        raise ValueError("must be a number of seconds, 0 or more")
    return value


_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd]?)")
UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration(text: str) -> float:
    match = _DURATION.fullmatch(text.strip())
    if not match or not 0 < float(match[1]) < math.inf:
        raise ValueError("must be a duration such as 30d, 12h, 90m or 3600s")
    return float(match[1]) * UNIT_SECONDS[match[2]]


def _token(text: str) -> str | None:
    """One token, or several separated by commas (all accepted: a token is rotated by
    adding the new one, moving the clients to it, then removing the old one)."""
    if text and (text != text.strip() or any(ord(c) < 33 for c in text)):
        raise ValueError("must not contain spaces or control characters")
    if text and "" in text.split(","):
        raise ValueError("must be one token, or several separated by single commas")
    return text or None


def tokens(value: str | None) -> tuple[str, ...]:
    """Return the tokens a token setting accepts (none when it is unset)."""
    return () if value is None else tuple(value.split(","))


def _database_url(text: str) -> str:
    parts = urlsplit(text)
    if parts.scheme == "sqlite":
        sqlite_path(text)
    elif parts.scheme in ("postgresql", "postgres"):
        if not parts.hostname and "host=" not in text:
            raise ValueError("must name a host: postgresql://user:password@host:port/dbname")
    else:
        raise ValueError("must be a sqlite:/// or postgresql:// URL")
    return text


def _bind(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("must be HOST:PORT")
    return text


_VARIABLES = {
    "DATABASE_URL": ("database_url", _database_url),
    "AGGREGATOR_API_TOKEN": ("api_token", _token),
    "AGGREGATOR_READ_TOKEN": ("read_token", _token),
    "AGGREGATOR_MAX_BATCH": ("max_batch", _positive_int),
    "AGGREGATOR_MAX_BODY": ("max_body", _positive_int),
    "AGGREGATOR_MAX_PAYLOAD": ("max_payload", _positive_int),
    "AGGREGATOR_MAX_PAGE_BYTES": ("max_page_bytes", _positive_int),
    "AGGREGATOR_SEARCH_SCAN": ("search_scan", _positive_int),
    "AGGREGATOR_SEARCH_TIME": ("search_time", _seconds),
    "AGGREGATOR_SEARCH_CONCURRENCY": ("search_concurrency", _positive_int),
    "AGGREGATOR_BODY_BUDGET": ("body_budget", _positive_int),
    "AGGREGATOR_MAX_DB_MB": ("max_db_mb", _positive_int),
    "AGGREGATOR_RETENTION": ("retention", _duration),
    "AGGREGATOR_QUEUE_SIZE": ("queue_size", _positive_int),
    "AGGREGATOR_WRITERS": ("writers", _positive_int),
    "AGGREGATOR_COMMIT_TIMEOUT": ("commit_timeout", _positive_float),
    "AGGREGATOR_BODY_TIMEOUT": ("body_timeout", _positive_float),
    "AGGREGATOR_HEADER_TIMEOUT": ("header_timeout", _positive_float),
    "AGGREGATOR_SEND_TIMEOUT": ("send_timeout", _positive_float),
    "AGGREGATOR_START_TIMEOUT": ("start_timeout", _positive_float),
    "WEB_CONCURRENCY": ("web_concurrency", _positive_int),
    "AGGREGATOR_THREADS": ("threads", _positive_int),
    "AGGREGATOR_BIND": ("bind", _bind),
    "AGGREGATOR_GRACEFUL_TIMEOUT": ("graceful_timeout", _positive_int),
    "AGGREGATOR_TRUSTED_PROXIES": ("trusted_proxies", _count),
    "AGGREGATOR_METRICS_TOPICS": ("metrics_topics", _count),
    # prometheus-client's own variable: where workers share their samples.
    "PROMETHEUS_MULTIPROC_DIR": ("metrics_dir", str),
}
# Settings that hold secrets may be read from a file instead, NAME_FILE=path, as Docker and
# Kubernetes mount secrets (the convention of the postgres image): the secret is then in no
# process's environment, which `docker inspect` and /proc/PID/environ show.
_FROM_FILE = ("DATABASE_URL", "AGGREGATOR_API_TOKEN", "AGGREGATOR_READ_TOKEN")
_MAX_FILE = 65536


def sqlite_path(url: str) -> str:
    """Return the file path of sqlite:///relative or sqlite:////absolute."""
    prefix = "sqlite:///"
    if not url.startswith(prefix) or len(url) == len(prefix):
        raise ValueError("must be sqlite:///relative/path or sqlite:////absolute/path")
    path = url[len(prefix):]
    if path == ":memory:" or "?" in path:
        raise ValueError("must name a database file (no :memory:, no query string)")
    return path


def from_env(environ: Mapping[str, str] | None = None) -> Config:
    """Build a Config from environment variables, naming the first bad one."""
    environ = os.environ if environ is None else environ
    values = {}
    for name, (attr, parse) in _VARIABLES.items():
        raw, path = _raw(environ, name)
        is_token = parse is _token
        if raw is None or (raw.strip() == "" and not is_token):
            continue
        try:
            values[attr] = parse(raw if is_token else raw.strip())
        except ValueError as exc:
            # What a secret's file holds is not repeated at all.
            setting = (f"{name}={_shown(raw, parse)}" if path is None
                       else f"{name}_FILE={path!r}: the content")
            raise ConfigError(f"{setting} {exc}") from None
    return Config(**values)


# The settings the gunicorn master read, inherited by the workers it forks (see in_force).
_kept: Config | None = None


def keep(config: Config) -> None:
    """Make config the settings in force in this process and the workers it forks."""
    global _kept
    _kept = config


def kept() -> Config | None:
    """Return the settings kept by keep(), or None when nothing kept any."""
    return _kept


def in_force() -> Config:
    """Return the settings the gunicorn master keeps, which its workers inherit, or, in a
    process that keeps none, those of the environment now.

    A worker does not read the environment itself: a secret's file (NAME_FILE) may have
    changed since the master read it. After a reload (SIGHUP) the master keeps the new
    settings if they are valid, and the ones before if not; either way each worker runs
    with settings the master checked.
    """
    return _kept if _kept is not None else from_env()


def _raw(environ: Mapping[str, str], name: str) -> tuple[str | None, str | None]:
    """Return a setting's text, and the path of the file it was read from if it came from
    NAME_FILE (one line: its line ending is not part of the value)."""
    path = environ.get(name + "_FILE", "") if name in _FROM_FILE else ""
    if not path:
        return environ.get(name), None
    if environ.get(name):
        raise ConfigError(f"{name} and {name}_FILE are both set: set one of them")
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read(_MAX_FILE + 1)
    except OSError as exc:
        raise ConfigError(f"{name}_FILE={path!r} cannot be read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{name}_FILE={path!r} is not UTF-8 text") from None
    if len(text) > _MAX_FILE:
        raise ConfigError(f"{name}_FILE={path!r} is longer than {_MAX_FILE} characters")
    text = text.rstrip("\r\n")
    if not text:
        raise ConfigError(f"{name}_FILE={path!r} is empty")
    return text, path


def _shown(raw: str, parse) -> str:
    """The bad value as an error may repeat it: never a token, never a URL's credentials."""
    if parse is _token:
        return "(not shown)"
    if parse is _database_url:
        raw = _without_credentials(raw)
    return repr(raw)


def _without_credentials(url: str) -> str:
    """Return a database URL with its user, password and password= parameter masked."""
    if "@" in url:
        head, _, host = url.rpartition("@")
        scheme = head.partition("://")[0] + "://" if "://" in head else ""
        url = f"{scheme}***@{host}"
    return re.sub(r"(password=)[^&\s]*", r"\1***", url)


def _set(setting: str | None) -> str:
    count = len(tokens(setting))
    return {0: "unset", 1: "set"}.get(count, f"set ({count} tokens)")


def with_overrides(config: Config, overrides: Mapping[str, object]) -> Config:
    """Return a copy of config with the given fields replaced (for tests)."""
    unknown = set(overrides) - set(Config.__dataclass_fields__)
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(sorted(unknown))}")
    return Config(**{**config.__dict__, **overrides})
