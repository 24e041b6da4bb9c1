"""PostgreSQL storage: several aggregator replicas on one database, the same contract.

Writers of every replica take turns under one transaction-level advisory lock, as SQLite's
writers take turns under the file lock: each transaction is a group commit of many
requests, sequence numbers grow in commit order (so a reader's cursor never skips a row
committed after its page was read), and the counters change in the same transaction.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Hashable, Iterable
from contextlib import contextmanager
from importlib import resources

import psycopg
from psycopg import IsolationLevel, errors
from psycopg_pool import ConnectionPool, PoolTimeout

from ..logs import utc_text
from .base import (
    Batch,
    Counters,
    EventPage,
    EventQuery,
    More,
    Store,
    StoreError,
    StoreFull,
    Writer,
    nothing_more,
)
from .sql import (
    ALL_TOPICS,
    BLOCK_BITS,
    BUCKET_BITS,
    COUNT_TOPICS,
    EXPIRE,
    LARGEST_TOPICS,
    SUB_BITS,
    build_missing_summaries,
    read_page,
)

log = logging.getLogger(__name__)

# Advisory lock keys (any two numbers no other application on the database uses).
SCHEMA_LOCK = 0x6C6F_6761_0001
WRITE_LOCK = 0x6C6F_6761_0002
CONNECT_TIMEOUT_S = 5
# Read connections per process. Reads are short, so a few serve many request threads, and
# replicas x workers x (READERS + writers) stays well under max_connections (100).
READERS = 4
POOL_TIMEOUT_S = 5.0
# A search's test of the payload text (see sql.read_page): a case-sensitive substring.
CONTAINS = "strpos(payload, ?) > 0"
# Rows a page's statement receives at a time (libpq's chunked rows mode).
STREAM_ROWS = 100

# One statement per batch: the rows go in as arrays, in the order sent; RETURNING names the
# rows really stored (ON CONFLICT skips the others, in-batch repeats included).
_INSERT = (
    "INSERT INTO events (topic, event_id, ts, timestamp, source, payload, received_at)"
    " SELECT topic, event_id, ts, timestamp, source, payload, received_at"
    " FROM unnest(%s::text[], %s::text[], %s::bigint[], %s::text[], %s::text[], %s::text[],"
    " %s::text[])"
    " WITH ORDINALITY AS r(topic, event_id, ts, timestamp, source, payload, received_at, n)"
    " ORDER BY n"
    " ON CONFLICT (topic, event_id) DO NOTHING RETURNING seq, topic, ts"
)
_ADD_COUNTERS = (
    "UPDATE counters SET value = value + v.delta"
    " FROM unnest(%s::text[], %s::bigint[]) AS v(name, delta) WHERE counters.name = v.name"
)
_ADD_TOPICS = (
    "INSERT INTO topic_counts (topic, count, last_stored_at)"
    " SELECT t.topic, t.count, %s FROM unnest(%s::text[], %s::bigint[]) AS t(topic, count)"
    " ON CONFLICT (topic) DO UPDATE SET count = topic_counts.count + excluded.count,"
    " last_stored_at = excluded.last_stored_at"
)
_WIDEN_BLOCKS = (
    "INSERT INTO event_blocks (block, min_ts, max_ts)"
    " SELECT * FROM unnest(%s::bigint[], %s::bigint[], %s::bigint[]) ON CONFLICT (block)"
    " DO UPDATE SET min_ts = least(event_blocks.min_ts, excluded.min_ts),"
    " max_ts = greatest(event_blocks.max_ts, excluded.max_ts)"
)
_EXPIRE = EXPIRE.replace("?", "%s")
# A row's bounds widen to take the new events; unknown bounds (NULL) stay unknown, which
# least() and greatest() would not keep (they skip NULLs).
_MAP_BUCKETS = (
    "INSERT INTO event_buckets (bucket, sub, min_ts, max_ts)"
    " SELECT * FROM unnest(%s::bigint[], %s::bigint[], %s::bigint[], %s::bigint[])"
    " ON CONFLICT (bucket, sub) DO UPDATE SET"
    " min_ts = CASE WHEN event_buckets.min_ts IS NOT NULL"
    " THEN least(event_buckets.min_ts, excluded.min_ts) END,"
    " max_ts = CASE WHEN event_buckets.max_ts IS NOT NULL"
    " THEN greatest(event_buckets.max_ts, excluded.max_ts) END"
)


def _bounds(keyed: Iterable[tuple[Hashable, int]]) -> dict:
    """Return the lowest and highest timestamp of each key, as [low, high]."""
    bounds: dict = {}
    for key, ts in keyed:
        low_high = bounds.setdefault(key, [ts, ts])
        low_high[0], low_high[1] = min(low_high[0], ts), max(low_high[1], ts)
    return bounds


def _translate(exc: psycopg.Error) -> StoreError:
    if isinstance(exc, errors.DiskFull):
        return StoreFull(f"database is full: {exc}".strip())
    return StoreError(f"database error: {exc}".strip())


@contextmanager
def translated_errors():
    """Re-raise the database's own trouble (connection, disk, server) as StoreError.

    Other psycopg errors (a value the database refuses) stay as they are, so that the
    ingestor commits the batches of a failed group one by one and fails only the culprit.
    """
    try:
        yield
    except PoolTimeout as exc:
        raise StoreError(f"no database connection free: {exc}") from exc
    except (psycopg.OperationalError, psycopg.InterfaceError, psycopg.InternalError) as exc:
        raise _translate(exc) from exc


def connect(url: str, **kwargs) -> psycopg.Connection:
    """Open a connection (the only place we connect, besides the read pool)."""
    return psycopg.connect(url, connect_timeout=CONNECT_TIMEOUT_S, **kwargs)


class PostgresWriter(Writer):
    """A write connection, reopened after the database drops it."""

    def __init__(self, url: str):
        self._url = url
        self._conn: psycopg.Connection | None = connect(url, autocommit=True)

    def write(self, batches: list[Batch], more: More = nothing_more) -> list[int]:
        """Commit every batch, then more()'s, in one transaction (see Writer.write)."""
        return self._locked(lambda cur: self._write_locked(cur, batches + more()))

    def expire(self, received_before: str, limit: int) -> int:
        """Delete up to limit of the oldest events received before then (see Writer.expire)."""
        return self._locked(lambda cur: self._expire_locked(cur, received_before, limit))

    def _locked(self, work):
        """Return work(cursor) run in one transaction under the writers' advisory lock,
        timing the wait and hold."""
        try:
            with translated_errors():
                if self._conn is None or self._conn.closed:
                    self._conn = connect(self._url, autocommit=True)
                self.lock_wait_s, self.lock_held_s, locked_at = 0.0, 0.0, None
                try:
                    with self._conn.transaction():
                        cur = self._conn.cursor()
                        asked = time.perf_counter()
                        cur.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
                        locked_at = time.perf_counter()
                        self.lock_wait_s = locked_at - asked
                        return work(cur)
                finally:
                    # The lock is the transaction's: held until it commits or rolls back.
                    if locked_at is not None:
                        self.lock_held_s = time.perf_counter() - locked_at
        except StoreError:
            # The connection may be broken; the next write opens a new one.
            self.close()
            raise

    @staticmethod
    def _expire_locked(cur: psycopg.Cursor, received_before: str, limit: int) -> int:
        expired = cur.execute(_EXPIRE, (limit, received_before)).rowcount
        if expired:
            cur.execute(_ADD_COUNTERS, (["expired"], [expired]))
        return expired

    def _write_locked(self, cur: psycopg.Cursor, batches: list[Batch]) -> list[int]:
        stored, new = [], []
        for batch in batches:
            rows = []
            if batch.rows:
                columns = [list(column) for column in zip(*batch.rows, strict=True)]
                rows = cur.execute(_INSERT, columns).fetchall()
            stored.append(len(rows))
            new += rows
        received = sum(len(batch.rows) for batch in batches)
        cur.execute(_ADD_COUNTERS, (
            ["received", "unique_processed", "duplicate_dropped", "rejected"],
            [received, len(new), received - len(new), sum(b.rejected for b in batches)]))
        if new:
            topics = Counter(topic for _, topic, _ in new)
            cur.execute(_ADD_TOPICS, (utc_text(time.time()), list(topics),
                                      list(topics.values())))
            blocks = _bounds((seq >> BLOCK_BITS, ts) for seq, _, ts in new)
            cur.execute(_WIDEN_BLOCKS, (list(blocks), [b[0] for b in blocks.values()],
                                        [b[1] for b in blocks.values()]))
            pairs = _bounds(((ts >> BUCKET_BITS, seq >> SUB_BITS), ts) for seq, _, ts in new)
            keys = sorted(pairs)
            cur.execute(_MAP_BUCKETS, ([k[0] for k in keys], [k[1] for k in keys],
                                       [pairs[k][0] for k in keys], [pairs[k][1] for k in keys]))
        return stored

    def close(self) -> None:
        """Close the connection; safe to call twice."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class PostgresStore(Store):
    """Events and counters in one PostgreSQL database, shared by any number of replicas."""

    def __init__(self, url: str):
        self.url = url
        schema = resources.files(__package__).joinpath("schema_postgresql.sql").read_text()
        with translated_errors(), connect(url, autocommit=True) as conn:
            # Session lock: replicas starting at once create the schema one after another.
            conn.execute("SELECT pg_advisory_lock(%s)", (SCHEMA_LOCK,))
            try:
                conn.execute(schema)
                build_missing_summaries(conn)
            finally:
                conn.execute("SELECT pg_advisory_unlock(%s)", (SCHEMA_LOCK,))
        self._pool = ConnectionPool(
            url, min_size=1, max_size=READERS, timeout=POOL_TIMEOUT_S, open=True,
            kwargs={"connect_timeout": CONNECT_TIMEOUT_S}, configure=self._configure,
            name="readers")

    @staticmethod
    def _configure(conn: psycopg.Connection) -> None:
        # Every statement of a page reads one snapshot.
        conn.isolation_level = IsolationLevel.REPEATABLE_READ
        conn.read_only = True

    def writer(self) -> PostgresWriter:
        """Open a write connection for one writer thread."""
        with translated_errors():
            return PostgresWriter(self.url)

    def counters(self, largest: int | None = None) -> Counters:
        """Return the counters and per-topic counts, read in one statement (one snapshot;
        see Store.counters)."""
        shown = ALL_TOPICS if largest is None else LARGEST_TOPICS.replace("?", "%s")
        with translated_errors(), self._pool.connection() as conn:
            values, topics, last, in_all = conn.execute(
                "SELECT (SELECT json_object_agg(name, value) FROM counters), shown.*,"
                f" ({COUNT_TOPICS}) FROM (SELECT"
                " coalesce(json_object_agg(topic, count ORDER BY topic), '{}'),"
                " coalesce(json_object_agg(topic, last_stored_at ORDER BY topic), '{}')"
                f" FROM ({shown}) AS t) AS shown",
                () if largest is None else (largest,)).fetchone()
        return Counters(values["received"], values["unique_processed"],
                        values["duplicate_dropped"], values["rejected"], topics,
                        values["expired"], in_all, last)

    def events(self, query: EventQuery) -> EventPage:
        """Return up to query.limit events after the cursor (see sql.read_page)."""
        with translated_errors(), self._pool.connection() as conn:
            cur = conn.cursor()
            # Rows come STREAM_ROWS at a time, not the whole result at once: a page that is
            # full (max_bytes) cancels the rest of its statement.
            return read_page(lambda sql, params: cur.stream(
                sql.replace("?", "%s"), params, size=STREAM_ROWS), query, CONTAINS)

    def ping(self) -> None:
        """Raise StoreError unless the database answers a read."""
        with translated_errors(), self._pool.connection() as conn:
            conn.execute("SELECT value FROM counters LIMIT 1").fetchone()

    def close(self) -> None:
        """Close the read pool; safe to call twice."""
        self._pool.close()
