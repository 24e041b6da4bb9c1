"""SQLite storage: WAL, synchronous=FULL, one cross-process write lock, group commit."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from functools import cache
from importlib import resources
from itertools import chain

from ..logs import utc_text
from .base import (
    Batch,
    Counters,
    EventPage,
    EventQuery,
    More,
    Row,
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

BUSY_TIMEOUT_MS = 10_000
# A search's test of the payload text (see sql.read_page): a case-sensitive substring.
CONTAINS = "instr(payload, ?) > 0"
# Checkpoint every ~40 MB of WAL rather than SQLite's 4 MB: fewer, larger checkpoints
# rewrite each hot index page less often (+7% end-to-end ingest in bench/ingest.py).
WAL_AUTOCHECKPOINT_PAGES = 10_000
# A write connection's page cache, against SQLite's default of 2 MiB. A group commit of a
# few thousand events inserts into as many pages of the (topic, event_id) index, at
# random, and 2 MiB did not hold the pages it came back to. Measured with two writers
# alternating commits, as the two workers do: 7 batches of 500 a commit cost 5.4 instead
# of 6.0 us per event; 1 batch a commit gained nothing (8.4 against 8.1). Spilling dirty
# pages was not the cost: cache_spill=OFF alone did not help. End to end, ingest rose 6%
# against the in-process ceiling (bench/ingest.py, 4 alternating pairs of 3 runs: ratio
# 1.37-1.42 against 1.28-1.34). It costs up to 16 MiB of RSS per writer (server peak
# 137 MiB, was 128).
WRITER_CACHE_KIB = 16 * 1024
_INSERT = (
    "INSERT OR IGNORE INTO events (topic, event_id, ts, timestamp, source, payload, received_at)"
    " VALUES "
)
_ROW = "(?, ?, ?, ?, ?, ?, ?)"
# The most rows one INSERT takes (a power of two; fewer if SQLite allows fewer parameters).
MAX_ROWS_PER_INSERT = 512
_ADD_COUNTER = "UPDATE counters SET value = value + ? WHERE name = ?"
# A commit's four counters in one statement, and its topics' counts in another: each
# statement is a round trip through the sqlite3 module, which lets the GIL go around it, and
# the write lock is held meanwhile (see bench/RESULTS.md, Ingest).
_ADD_COMMIT_COUNTERS = (
    "UPDATE counters SET value = value + CASE name WHEN 'received' THEN ?"
    " WHEN 'unique_processed' THEN ? WHEN 'duplicate_dropped' THEN ? WHEN 'rejected' THEN ?"
    " END WHERE name IN ('received', 'unique_processed', 'duplicate_dropped', 'rejected')"
)
# The rows a transaction added to each of its topics (a JSON array of their names), counted
# in the (topic, seq) index alone: cheaper than grouping the new rows themselves (7.6 vs
# 12.1 us/event at 500 events a commit). MATERIALIZED: each topic is counted once, where
# the subquery flattened into the outer SELECT was run twice (its column and its WHERE).
_ADD_TOPICS = (
    "WITH added (topic, count) AS MATERIALIZED (SELECT value, (SELECT count(*) FROM events"
    " WHERE events.topic = json_each.value AND seq > ?) FROM json_each(?))"
    " INSERT INTO topic_counts (topic, count, last_stored_at)"
    " SELECT topic, count, ? FROM added WHERE count > 0"
    " ON CONFLICT (topic) DO UPDATE SET count = count + excluded.count,"
    " last_stored_at = excluded.last_stored_at"
)
_WIDEN_BLOCK = (
    "INSERT INTO event_blocks (block, min_ts, max_ts) VALUES (?, ?, ?) ON CONFLICT (block)"
    " DO UPDATE SET min_ts = min(min_ts, excluded.min_ts), max_ts = max(max_ts, excluded.max_ts)"
)
# A row's bounds widen to take the new events; unknown bounds (NULL) stay unknown, as
# SQLite's min() and max() of a NULL are NULL.
_MAP_BUCKETS = (
    f"INSERT INTO event_buckets (bucket, sub, min_ts, max_ts) SELECT ts >> {BUCKET_BITS},"
    f" seq >> {SUB_BITS}, min(ts), max(ts) FROM events WHERE seq > ? GROUP BY 1, 2"
    " ON CONFLICT (bucket, sub) DO UPDATE SET min_ts = min(min_ts, excluded.min_ts),"
    " max_ts = max(max_ts, excluded.max_ts)"
)


def _power_of_two_at_most(n: int) -> int:
    """Return the largest power of two not above n (n >= 1)."""
    return 1 << n.bit_length() - 1


@cache
def _insert_rows(count: int) -> str:
    """Return the INSERT statement for count rows."""
    return _INSERT + ", ".join([_ROW] * count)


# The columns the schema gained after its tables were first made: (table, column, type).
_ADDED_COLUMNS = (
    ("topic_counts", "last_stored_at", "TEXT"),
    ("event_buckets", "min_ts", "INTEGER"),
    ("event_buckets", "max_ts", "INTEGER"),
)


def _add_missing_columns(conn: sqlite3.Connection) -> None:
    """Add to a database from before them the columns the schema has since gained (inside
    the caller's schema transaction)."""
    for table, column, kind in _ADDED_COLUMNS:
        columns = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        if column not in columns:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")


def connect(path: str, *, read_only: bool = False) -> sqlite3.Connection:
    """Open a connection with the settings every connection needs (the only place we connect)."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                           timeout=BUSY_TIMEOUT_MS / 1000)
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_AUTOCHECKPOINT_PAGES}")
    if read_only:
        conn.execute("PRAGMA query_only = ON")
    return conn


def _translate(exc: sqlite3.Error) -> StoreError:
    """Map a sqlite3 error to the StoreError the API turns into a 503."""
    if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
        return StoreFull(f"database is full: {exc}")
    return StoreError(f"database error: {exc}")


@contextmanager
def translated_errors():
    """Re-raise sqlite3 errors as StoreError."""
    try:
        yield
    except sqlite3.Error as exc:
        raise _translate(exc) from exc


class SQLiteWriter(Writer):
    """A write connection plus this writer's handle on the cross-process write lock."""

    def __init__(self, path: str, max_bytes: int | None = None):
        # SQLite's busy handler polls with sleeps of up to 100 ms; an flock wakes the
        # next writer (any process) the moment the current one commits.
        try:
            self._lock_fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StoreError(f"cannot open the write lock {path}.lock: {exc.strerror}") from None
        try:
            self._conn = connect(path)
            self._conn.execute(f"PRAGMA cache_size = -{WRITER_CACHE_KIB}")
            parameters = self._conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
            self._max_rows = min(MAX_ROWS_PER_INSERT,
                                 _power_of_two_at_most(parameters // _ROW.count("?")))
            if max_bytes is not None:
                # A quota, per connection: past it a commit fails with SQLITE_FULL (a 503),
                # before the disk itself fills.
                (page_size,) = self._conn.execute("PRAGMA page_size").fetchone()
                self._conn.execute(f"PRAGMA max_page_count = {max_bytes // page_size}")
        except BaseException:
            os.close(self._lock_fd)
            raise

    def write(self, batches: list[Batch], more: More = nothing_more) -> list[int]:
        """Commit every batch, then more()'s, in one transaction (see Writer.write)."""
        return self._locked(lambda: self._write_locked(batches + more()))

    def expire(self, received_before: str, limit: int) -> int:
        """Delete up to limit of the oldest events received before then (see Writer.expire)."""
        return self._locked(lambda: self._expire_locked(received_before, limit))

    def _locked(self, work):
        """Return work() run under the cross-process write lock, timing the wait and hold."""
        asked = time.perf_counter()
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        got = time.perf_counter()
        try:
            with translated_errors():
                return work()
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            self.lock_wait_s, self.lock_held_s = got - asked, time.perf_counter() - got

    @contextmanager
    def _transaction(self):
        """Yield a cursor in a write transaction: committed at the end, else rolled back."""
        cur = self._conn.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            yield cur
            cur.execute("COMMIT")
        except BaseException:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            raise

    def _expire_locked(self, received_before: str, limit: int) -> int:
        with self._transaction() as cur:
            expired = cur.execute(EXPIRE, (limit, received_before)).rowcount
            if expired:
                cur.execute(_ADD_COUNTER, (expired, "expired"))
        return expired

    def _write_locked(self, batches: list[Batch]) -> list[int]:
        with self._transaction() as cur:
            # Under the write lock, every row with a higher seq is one this transaction adds.
            (last_seq,) = cur.execute("SELECT coalesce(max(seq), 0) FROM events").fetchone()
            stored = [self._insert(cur, batch.rows) for batch in batches]
            received = sum(len(batch.rows) for batch in batches)
            unique = sum(stored)
            cur.execute(_ADD_COMMIT_COUNTERS, (received, unique, received - unique,
                                               sum(batch.rejected for batch in batches)))
            if unique:
                # Every new row has a seq in last_seq+1 .. last_seq+unique; their blocks
                # are widened to the timestamps of every row sent (a superset is safe).
                stamps = [row[2] for batch in batches for row in batch.rows]
                low, high = min(stamps), max(stamps)
                cur.executemany(_WIDEN_BLOCK, [
                    (block, low, high) for block in range((last_seq + 1) >> BLOCK_BITS,
                                                          ((last_seq + unique) >> BLOCK_BITS) + 1)])
                topics = {row[0] for batch in batches for row in batch.rows}
                cur.execute(_ADD_TOPICS, (last_seq, json.dumps(list(topics), ensure_ascii=False),
                                          utc_text(time.time())))
                cur.execute(_MAP_BUCKETS, (last_seq,))
        return stored

    def _insert(self, cur: sqlite3.Cursor, rows: list[Row]) -> int:
        """Insert the rows in order, skipping keys already stored; return how many were new.

        Several rows per statement, in runs of power-of-two sizes (500 rows: 256, 128, 64,
        32, 16, 4), so that a handful of statements serve every batch size and stay in the
        connection's statement cache. Against executemany's one statement per row: 10-20%
        less CPU with the write lock held, and the GIL is let go (around each statement)
        6 times per batch of 500 instead of 500 times; see bench/RESULTS.md, Ingest.
        """
        new, start = 0, 0
        while start < len(rows):
            size = min(self._max_rows, _power_of_two_at_most(len(rows) - start))
            cur.execute(_insert_rows(size), list(chain.from_iterable(rows[start:start + size])))
            new += cur.rowcount
            start += size
        return new

    def close(self) -> None:
        """Close the connection and the lock file; safe to call twice."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
            self._conn.close()


class SQLiteStore(Store):
    """Events and counters in one SQLite file in WAL mode."""

    def __init__(self, path: str, max_bytes: int | None = None):
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        self.path = path
        self.max_bytes = max_bytes
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        schema = resources.files(__package__).joinpath("schema_sqlite.sql").read_text()
        with translated_errors():
            conn = connect(path)
            try:
                # Switching to WAL is persistent and idempotent; it needs no open transaction.
                conn.execute("PRAGMA journal_mode = WAL")
                conn.executescript(f"BEGIN IMMEDIATE; {schema}")
                _add_missing_columns(conn)
                build_missing_summaries(conn)
                conn.execute("COMMIT")
            finally:
                conn.close()

    def writer(self) -> SQLiteWriter:
        """Open a write connection for one writer thread."""
        with translated_errors():
            return SQLiteWriter(self.path, self.max_bytes)

    def _reader(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = connect(self.path, read_only=True)
            self._local.conn = conn
            with self._readers_lock:
                self._readers.append(conn)
        return conn

    def counters(self, largest: int | None = None) -> Counters:
        """Return the counters and per-topic counts (see Store.counters)."""
        with translated_errors():
            conn = self._reader()
            conn.execute("BEGIN")
            try:
                values = dict(conn.execute("SELECT name, value FROM counters"))
                if largest is None:
                    shown = conn.execute(ALL_TOPICS).fetchall()
                    in_all = len(shown)
                else:
                    shown = conn.execute(LARGEST_TOPICS, (largest,)).fetchall()
                    (in_all,) = conn.execute(COUNT_TOPICS).fetchone()
            finally:
                conn.execute("COMMIT")
        return Counters(values["received"], values["unique_processed"],
                        values["duplicate_dropped"], values["rejected"],
                        {topic: count for topic, count, _ in shown}, values["expired"], in_all,
                        {topic: last for topic, _, last in shown})

    def events(self, query: EventQuery) -> EventPage:
        """Return up to query.limit events after the cursor (see sql.read_page)."""
        with translated_errors():
            conn = self._reader()
            # One snapshot for every statement of the page.
            conn.execute("BEGIN")
            try:
                return read_page(conn.execute, query, CONTAINS)
            finally:
                conn.execute("COMMIT")

    def ping(self) -> None:
        """Raise StoreError unless the database answers a read."""
        with translated_errors():
            self._reader().execute("SELECT value FROM counters LIMIT 1").fetchone()

    def close(self) -> None:
        """Close every reader connection; safe to call twice."""
        with self._readers_lock:
            readers, self._readers = self._readers, []
        for conn in readers:
            conn.close()
        self._local = threading.local()
