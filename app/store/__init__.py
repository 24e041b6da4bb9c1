"""Storage backends behind one small interface (see base.Store)."""

from __future__ import annotations

import time
from collections.abc import Callable

from ..config import Config
from .base import (
    Batch,
    Counters,
    EventPage,
    EventQuery,
    More,
    Row,
    Store,
    StoredEvent,
    StoreError,
    StoreFull,
    nothing_more,
)
from .sqlite import SQLiteStore

__all__ = ["Batch", "Counters", "EventPage", "EventQuery", "More", "Row", "StoredEvent", "Store",
           "StoreError", "StoreFull", "nothing_more", "open_store", "wait_for_database"]


def open_store(config: Config) -> Store:
    """Open the backend that config.database_url names."""
    if config.backend == "postgresql":
        # Imported here: psycopg is needed only by those who choose PostgreSQL.
        from .postgresql import PostgresStore

        return PostgresStore(config.database_url)
    max_bytes = config.max_db_mb * 1024 * 1024 if config.max_db_mb else None
    return SQLiteStore(config.sqlite_path, max_bytes)


def wait_for_database(config: Config, waiting: Callable[[str], None]) -> None:
    """Open the store once and close it again (creating the tables if missing), before the
    workers start. A PostgreSQL server that does not answer yet is tried again, with
    waiting(reason) called before each wait, until config.start_timeout seconds have
    passed; then, and at once for SQLite (a file: nothing to wait for), the last
    StoreError or OSError is raised."""
    deadline = time.monotonic() + (config.start_timeout if config.backend == "postgresql" else 0)
    delay = 0.25
    while True:
        try:
            open_store(config).close()
            return
        except (StoreError, OSError) as exc:
            left = deadline - time.monotonic()
            if left <= 0:
                raise
            waiting(" ".join(str(exc).split()))  # one line
            time.sleep(min(delay, left))
            delay = min(2 * delay, 2.0)
