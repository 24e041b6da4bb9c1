"""Storage backends behind one small interface (see base.Store)."""

from __future__ import annotations

from ..config import Config
from .base import (
    Batch,
    Counters,
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

__all__ = ["Batch", "Counters", "EventQuery", "More", "Row", "StoredEvent", "Store", "StoreError",
           "StoreFull", "nothing_more", "open_store"]


def open_store(config: Config) -> Store:
    """Open the backend that config.database_url names."""
    if config.backend == "postgresql":
        # Imported here: psycopg is needed only by those who choose PostgreSQL.
        from .postgresql import PostgresStore

        return PostgresStore(config.database_url)
    max_bytes = config.max_db_mb * 1024 * 1024 if config.max_db_mb else None
    return SQLiteStore(config.sqlite_path, max_bytes)
