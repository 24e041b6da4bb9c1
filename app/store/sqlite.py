"""SQLite storage: WAL, synchronous=FULL, one cross-process write lock, group commit."""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import threading
from contextlib import contextmanager
from dataclasses import replace
from importlib import resources

from .base import Batch, Counters, EventQuery, Store, StoredEvent, StoreError, StoreFull, Writer

log = logging.getLogger(__name__)

BUSY_TIMEOUT_MS = 10_000
# Checkpoint every ~40 MB of WAL rather than SQLite's 4 MB: fewer, larger checkpoints
# rewrite each hot index page less often (+7% end-to-end ingest in bench/ingest.py).
WAL_AUTOCHECKPOINT_PAGES = 10_000
_INSERT = (
    "INSERT OR IGNORE INTO events (topic, event_id, ts, timestamp, source, payload, received_at)"
    " VALUES (?, ?, ?, ?, ?, ?, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))"
)
_ADD_COUNTER = "UPDATE counters SET value = value + ? WHERE name = ?"
# The rows a transaction added to one topic, counted in the (topic, seq) index alone:
# cheaper than grouping the new rows themselves (7.6 vs 12.1 us/event at 500 events a commit).
_NEW_IN_TOPIC = "SELECT count(*) FROM events WHERE topic = ? AND seq > ?"
_ADD_TOPICS = (
    "INSERT INTO topic_counts (topic, count) VALUES (?, ?)"
    " ON CONFLICT (topic) DO UPDATE SET count = count + excluded.count"
)
_COLUMNS = "seq, topic, event_id, timestamp, source, payload, received_at"
# event_blocks: a block holds the sequence numbers seq >> BLOCK_BITS.
BLOCK_BITS = 12
_WIDEN_BLOCK = (
    "INSERT INTO event_blocks (block, min_ts, max_ts) VALUES (?, ?, ?) ON CONFLICT (block)"
    " DO UPDATE SET min_ts = min(min_ts, excluded.min_ts), max_ts = max(max_ts, excluded.max_ts)"
)
_SUMMARISE_BLOCKS = (
    f"INSERT INTO event_blocks (block, min_ts, max_ts) SELECT seq >> {BLOCK_BITS}, min(ts), max(ts)"
    " FROM events WHERE seq > ? GROUP BY 1"
)
# event_buckets: an event is in time bucket ts >> BUCKET_BITS and sub-block seq >> SUB_BITS.
BUCKET_BITS = 32
SUB_BITS = 6
_MAP_BUCKETS = (
    f"INSERT OR IGNORE INTO event_buckets (bucket, sub) SELECT DISTINCT ts >> {BUCKET_BITS},"
    f" seq >> {SUB_BITS} FROM events WHERE seq > ?"
)
# A time-range page reads at most this many overlapping blocks in order before it turns to
# event_buckets for the rest: dense ranges fill a page within a block or two.
BLOCK_BUDGET = 4
_TS_INF = 2**63 - 1


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


def _runs(blocks: list[int], descending: bool):
    """Yield (lowest, highest) of each run of consecutive blocks, in the order given."""
    step = -1 if descending else 1
    run = None
    for block in blocks:
        if run is not None and block == run[1] + step:
            run[1] = block
            continue
        if run is not None:
            yield min(run), max(run)
        run = [block, block]
    if run is not None:
        yield min(run), max(run)


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
            if max_bytes is not None:
                # A quota, per connection: past it a commit fails with SQLITE_FULL (a 503),
                # before the disk itself fills.
                (page_size,) = self._conn.execute("PRAGMA page_size").fetchone()
                self._conn.execute(f"PRAGMA max_page_count = {max_bytes // page_size}")
        except BaseException:
            os.close(self._lock_fd)
            raise

    def write(self, batches: list[Batch]) -> list[int]:
        """Commit every batch in one transaction; return each batch's newly stored count."""
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            with translated_errors():
                return self._write_locked(batches)
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _write_locked(self, batches: list[Batch]) -> list[int]:
        cur = self._conn.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            # Under the write lock, every row with a higher seq is one this transaction adds.
            (last_seq,) = cur.execute("SELECT coalesce(max(seq), 0) FROM events").fetchone()
            stored = []
            for batch in batches:
                cur.executemany(_INSERT, batch.rows)
                stored.append(cur.rowcount)
            received = sum(len(batch.rows) for batch in batches)
            unique = sum(stored)
            cur.executemany(_ADD_COUNTER, [
                (received, "received"), (unique, "unique_processed"),
                (received - unique, "duplicate_dropped"),
                (sum(batch.rejected for batch in batches), "rejected")])
            if unique:
                # Every new row has a seq in last_seq+1 .. last_seq+unique; their blocks
                # are widened to the timestamps of every row sent (a superset is safe).
                stamps = [row[2] for batch in batches for row in batch.rows]
                low, high = min(stamps), max(stamps)
                cur.executemany(_WIDEN_BLOCK, [
                    (block, low, high) for block in range((last_seq + 1) >> BLOCK_BITS,
                                                          ((last_seq + unique) >> BLOCK_BITS) + 1)])
                topics = {row[0] for batch in batches for row in batch.rows}
                added = [(topic, cur.execute(_NEW_IN_TOPIC, (topic, last_seq)).fetchone()[0])
                         for topic in topics]
                cur.executemany(_ADD_TOPICS, [item for item in added if item[1]])
                cur.execute(_MAP_BUCKETS, (last_seq,))
            cur.execute("COMMIT")
        except BaseException:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            raise
        return stored

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
                # A database from before a summary table gets that summary built, once.
                for table, build in (("event_blocks", _SUMMARISE_BLOCKS),
                                     ("event_buckets", _MAP_BUCKETS)):
                    (older,) = conn.execute(f"SELECT NOT EXISTS (SELECT 1 FROM {table})"
                                            " AND EXISTS (SELECT 1 FROM events)").fetchone()
                    if older:
                        conn.execute(build, (0,))
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

    def counters(self) -> Counters:
        """Return the counters and per-topic counts (constant time in the number of events)."""
        with translated_errors():
            conn = self._reader()
            conn.execute("BEGIN")
            try:
                values = dict(conn.execute("SELECT name, value FROM counters"))
                topics = dict(conn.execute("SELECT topic, count FROM topic_counts ORDER BY topic"))
            finally:
                conn.execute("COMMIT")
        return Counters(values["received"], values["unique_processed"],
                        values["duplicate_dropped"], values["rejected"], topics)

    def events(self, query: EventQuery) -> list[StoredEvent]:
        """Return up to query.limit events after the cursor, oldest or newest first.

        A page reads rows in sequence order from the cursor on: through the (topic, seq) or
        (source, seq) index for those filters, and for a time range only within the blocks
        of event_blocks whose timestamps overlap it. So a page costs about its own size at
        any depth, unless the filters match few of the rows they leave to read (see
        README, Performance, for the cases measured).
        """
        with translated_errors():
            conn = self._reader()
            if query.since is None and query.until is None:
                return self._select(conn, query)
            low = -_TS_INF if query.since is None else query.since
            high = _TS_INF if query.until is None else query.until
            # One snapshot for the block list and every block read after it.
            conn.execute("BEGIN")
            try:
                return self._by_range(conn, query, low, high)
            finally:
                conn.execute("COMMIT")

    def _by_range(self, conn: sqlite3.Connection, query: EventQuery, low: int,
                  high: int) -> list[StoredEvent]:
        """Read the events of [low, high) in order: first the few blocks of event_blocks
        that overlap it, then, if the page is not full, the sub-blocks event_buckets names."""
        order, bound = ("DESC", "block <= ?") if query.descending else ("ASC", "block >= ?")
        params = [high, low]
        if query.after is None:
            bound = "1"
        else:
            params.append(query.after >> BLOCK_BITS)
        blocks = [block for (block,) in conn.execute(
            f"SELECT block FROM event_blocks WHERE min_ts < ? AND max_ts >= ? AND {bound}"
            f" ORDER BY block {order} LIMIT {BLOCK_BUDGET + 1}", params)]
        found = self._read_spans(conn, query, blocks[:BLOCK_BUDGET], BLOCK_BITS)
        if len(found) == query.limit or len(blocks) <= BLOCK_BUDGET:
            return found
        # The range is sparse in the blocks it overlaps (late replays widen their bounds):
        # go on after the last block read, through the sub-blocks that hold its buckets.
        last = blocks[BLOCK_BUDGET - 1]
        after = last << BLOCK_BITS if query.descending else ((last + 1) << BLOCK_BITS) - 1
        rest = replace(query, after=after, limit=query.limit - len(found))
        sub_bound = "sub <= ?" if query.descending else "sub >= ?"
        while len(found) < query.limit:
            first_sub = (rest.after - 1 if query.descending else rest.after + 1) >> SUB_BITS
            want = max(64, 2 * rest.limit)
            subs = [sub for (sub,) in conn.execute(
                f"SELECT DISTINCT sub FROM event_buckets WHERE bucket BETWEEN ? AND ?"
                f" AND {sub_bound} ORDER BY sub {order} LIMIT ?",
                (low >> BUCKET_BITS, (high - 1) >> BUCKET_BITS, first_sub, want))]
            page = self._read_spans(conn, rest, subs, SUB_BITS)
            found += page
            if len(subs) < want:
                break
            last = subs[-1]
            after = last << SUB_BITS if query.descending else ((last + 1) << SUB_BITS) - 1
            rest = replace(rest, after=after, limit=query.limit - len(found))
        return found

    def _read_spans(self, conn: sqlite3.Connection, query: EventQuery, spans: list[int],
                    bits: int) -> list[StoredEvent]:
        """Read the spans of 2**bits sequence numbers given, in order, until the page is full."""
        found: list[StoredEvent] = []
        for start, end in _runs(spans, query.descending):
            seqs = (start << bits, ((end + 1) << bits) - 1)
            found += self._select(conn, query, seqs=seqs, limit=query.limit - len(found))
            if len(found) == query.limit:
                break
        return found

    def _select(self, conn: sqlite3.Connection, query: EventQuery, *,
                seqs: tuple[int, int] | None = None, limit: int | None = None
                ) -> list[StoredEvent]:
        where, params = [], []
        for column, op, value in (("topic", "=", query.topic), ("source", "=", query.source),
                                  ("ts", ">=", query.since), ("ts", "<", query.until),
                                  ("seq", "<" if query.descending else ">", query.after)):
            if value is not None:
                where.append(f"{column} {op} ?")
                params.append(value)
        if seqs is not None:
            where.append("seq BETWEEN ? AND ?")
            params += seqs
        sql = f"SELECT {_COLUMNS} FROM events"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += f" ORDER BY seq {'DESC' if query.descending else 'ASC'} LIMIT ?"
        params.append(query.limit if limit is None else limit)
        return [StoredEvent(*row) for row in conn.execute(sql, params)]

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
