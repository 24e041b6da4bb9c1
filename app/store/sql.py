"""What the SQL backends share: the summaries' layout, the retention and topic statements,
and the plan that reads a page.

Both backends keep the same tables (see schema_sqlite.sql and schema_postgresql.sql) and
read a page with the same statements, written with ? placeholders.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import closing
from dataclasses import replace

from .base import EventPage, EventQuery, StoredEvent, utf8_length

# event_blocks: a block holds the sequence numbers seq >> BLOCK_BITS.
BLOCK_BITS = 12
# event_buckets: an event is in time bucket ts >> BUCKET_BITS and sub-block seq >> SUB_BITS.
BUCKET_BITS = 32
SUB_BITS = 6
# A time-range page reads at most this many overlapping blocks in order before it turns to
# event_buckets for the rest: dense ranges fill a page within a block or two.
BLOCK_BUDGET = 4
# The most sub-blocks a page takes from event_buckets in one statement.
MAX_SUBS_PER_ASK = 1 << 16
COLUMNS = "seq, topic, event_id, timestamp, source, payload, received_at"
_TS_INF = 2**63 - 1
_SEQ_MAX = 2**63 - 1
# The lowest and highest sequence numbers stored, as two subqueries: SQLite reads min() and
# max() from the rowid's ends one at a time, but min(seq), max(seq) in one query scan a
# whole index.
STORED_SEQS = "SELECT (SELECT min(seq) FROM events), (SELECT max(seq) FROM events)"

# For a database from before a summary table (or restored without it): the statement that
# builds it from the events, run once when the store is opened (see build_missing_summaries).
SUMMARIES = {
    "event_blocks": f"INSERT INTO event_blocks (block, min_ts, max_ts)"
                    f" SELECT seq >> {BLOCK_BITS}, min(ts), max(ts) FROM events GROUP BY 1",
    "event_buckets": f"INSERT INTO event_buckets (bucket, sub, min_ts, max_ts) SELECT"
                     f" ts >> {BUCKET_BITS}, seq >> {SUB_BITS}, min(ts), max(ts) FROM events"
                     f" GROUP BY 1, 2",
}

# Retention (Writer.expire): the oldest events received before a time, but never the
# newest: its seq is where the next events' continue from (SQLite would hand it out again).
EXPIRE = (
    "DELETE FROM events WHERE seq IN (SELECT seq FROM events"
    " WHERE seq < (SELECT max(seq) FROM events) ORDER BY seq LIMIT ?) AND received_at < ?"
)

# Counters.topics: every topic by name, or the largest (by count, then name) up to a limit.
ALL_TOPICS = "SELECT topic, count, last_stored_at FROM topic_counts ORDER BY topic"
LARGEST_TOPICS = ("SELECT topic, count, last_stored_at FROM topic_counts"
                  " ORDER BY count DESC, topic LIMIT ?")
COUNT_TOPICS = "SELECT count(*) FROM topic_counts"

# Runs a statement (? placeholders) in the page's read snapshot and returns its rows, as
# they are read (a page stops reading once it is full, and then closes them).
Run = Callable[[str, list], Iterable[tuple]]


def build_missing_summaries(conn) -> None:
    """Build each summary table that is empty while events are not, on a connection of
    either backend (conn.execute(sql).fetchone()), inside the caller's schema lock."""
    for table, build in SUMMARIES.items():
        (missing,) = conn.execute(f"SELECT NOT EXISTS (SELECT 1 FROM {table})"
                                  " AND EXISTS (SELECT 1 FROM events)").fetchone()
        if missing:
            conn.execute(build)


class _Page:
    """The events read so far, whether the page is full (see EventQuery), and how far a
    search (EventQuery.contains) may still read."""

    def __init__(self, query: EventQuery, contains_sql: str):
        self.events: list[StoredEvent] = []
        self.query = query
        self.size = 0
        self.contains_sql = contains_sql
        # A search reads no sequence number past bound (in the order read), and at most
        # budget of them in the spans of a time range; searched_to is where it stopped.
        self.bound: int | None = None
        self.budget: int | None = None
        self.searched_to: int | None = None
        # The lowest and highest sequence numbers stored, which the budget counts within.
        self.stored = (0, _SEQ_MAX)

    @property
    def room(self) -> int:
        return self.query.limit - len(self.events)

    @property
    def full(self) -> bool:
        return self.room == 0 or self._over_size()

    @property
    def done(self) -> bool:
        return self.full or self.searched_to is not None

    def _over_size(self) -> bool:
        return self.query.over_size(len(self.events), self.size)

    def add(self, rows: Iterable[tuple]) -> None:
        """Add rows until they end (the statement's LIMIT is the room left) or the page is
        over max_bytes: then the rest are not read (closing the rows cancels them)."""
        with closing(rows):
            for row in rows:
                event = StoredEvent(*row)
                self.events.append(event)
                self.size += utf8_length(event.payload)
                if self._over_size():
                    break

    def clip(self, query: EventQuery, low: int, high: int) -> tuple[int, int]:
        """Return the part of the sequence numbers [low, high] past query's cursor that a
        search may still read (empty when low > high), and note where it stopped if that
        cut them short."""
        if query.after is not None:
            if query.descending:
                high = min(high, query.after - 1)
            else:
                low = max(low, query.after + 1)
        if low > high:
            return low, high
        cut = False
        if self.bound is not None:
            if query.descending and low < self.bound:
                low, cut = self.bound, True
            elif not query.descending and high > self.bound:
                high, cut = self.bound, True
        if self.budget is not None:
            low, high = max(low, self.stored[0]), min(high, self.stored[1])
            if low <= high and high - low + 1 > self.budget:
                cut = True
                if query.descending:
                    low = high - self.budget + 1
                else:
                    high = low + self.budget - 1
            self.budget -= max(0, high - low + 1)
        if cut:
            self.searched_to = low if query.descending else high
        return low, high


def read_page(run: Run, query: EventQuery, contains_sql: str) -> EventPage:
    """Return up to query.limit events after the cursor, oldest or newest first (fewer
    when their payloads are over query.max_bytes, or a search read its scan first).

    A page reads rows in sequence order from the cursor on: through the (topic, seq) or
    (source, seq) index for those filters, and for a time range only within the blocks of
    event_blocks whose timestamps overlap it, then the sub-blocks event_buckets names. So a
    page costs about its own size at any depth (see bench/RESULTS.md, Growth, for the cases
    measured). An event_id is looked up through the (topic, event_id) key: in the topic
    given, or in each topic of topic_counts (topics are few), so its page holds at most
    one event per topic. Every statement must see one snapshot.

    A search (query.searching; contains_sql is the backend's SQL test of the payload for
    query.contains, with one ? placeholder) reads the payloads of up to query.scan events
    past the cursor: the next query.scan events of the topic or source asked (found
    through its index), else that many sequence numbers, counted in the spans of a time
    range when one is asked.
    It then stops, and the page says where (EventPage.searched_to).
    """
    page = _Page(query, contains_sql)
    ranged = query.since is not None or query.until is not None
    stored: tuple[int, int] | None = None  # read once, when a search or read_to needs it
    if query.searching and query.scan is not None:
        if query.topic is not None or query.source is not None:
            page.bound = _index_bound(run, query)
        elif ranged:
            page.budget, page.stored = query.scan, (stored := _stored(run))
        else:
            page.bound = _seq_bound(query, stored := _stored(run))
    if query.event_id is not None or not ranged:
        if page.bound is None:
            _select(run, query, page)
        else:
            _read_seqs(run, query, page, 0, _SEQ_MAX)
    else:
        low = -_TS_INF if query.since is None else query.since
        high = _TS_INF if query.until is None else query.until
        _by_range(run, query, page, low, high)
    if page.full:
        return EventPage(page.events)
    if page.searched_to is not None or query.descending:
        return EventPage(page.events, page.searched_to)
    first, last = stored or _stored(run)
    return EventPage(page.events, read_to=last if first <= last else None)


def _index_bound(run: Run, query: EventQuery) -> int | None:
    """Return the sequence number of the query.scan-th event past the cursor of the topic
    (or else the source) asked, through its index; None when fewer are left."""
    column, value = ("topic", query.topic) if query.topic is not None else ("source",
                                                                           query.source)
    if query.descending:
        op, order, after = "<", "DESC", _SEQ_MAX if query.after is None else query.after
    else:
        op, order, after = ">", "ASC", -1 if query.after is None else query.after
    rows = list(run(f"SELECT seq FROM events WHERE {column} = ? AND seq {op} ?"
                    f" ORDER BY seq {order} LIMIT 1 OFFSET ?", [value, after, query.scan - 1]))
    return rows[0][0] if rows else None


def _stored(run: Run) -> tuple[int, int]:
    """Return the lowest and highest sequence numbers stored ((1, 0) when none is)."""
    ((first, last),) = list(run(STORED_SEQS, []))
    return (1, 0) if first is None else (first, last)


def _seq_bound(query: EventQuery, stored: tuple[int, int]) -> int | None:
    """Return the sequence number query.scan past the cursor (or the first event), in the
    order read; None when no stored event lies beyond it."""
    first, last = stored
    if first > last:
        return None
    if query.descending:
        bound = (last + 1 if query.after is None else query.after) - query.scan
        return bound if bound > first else None
    bound = (first - 1 if query.after is None else query.after) + query.scan
    return bound if bound < last else None


def _by_range(run: Run, query: EventQuery, page: _Page, low: int, high: int) -> None:
    """Read the events of [low, high) in order: first the few blocks of event_blocks that
    overlap it, then, if the page is not full, the sub-blocks event_buckets names."""
    order, bound = ("DESC", "block <= ?") if query.descending else ("ASC", "block >= ?")
    params = [high, low]
    if query.after is None:
        bound = "TRUE"
    else:
        params.append(query.after >> BLOCK_BITS)
    blocks = [block for (block,) in run(
        f"SELECT block FROM event_blocks WHERE min_ts < ? AND max_ts >= ? AND {bound}"
        f" ORDER BY block {order} LIMIT {BLOCK_BUDGET + 1}", params)]
    _read_spans(run, query, page, blocks[:BLOCK_BUDGET], BLOCK_BITS)
    if page.done or len(blocks) <= BLOCK_BUDGET:
        return
    # The range is sparse in the blocks it overlaps (late replays widen their bounds):
    # go on after the last block read, through the sub-blocks that hold its buckets.
    last = blocks[BLOCK_BUDGET - 1]
    after = last << BLOCK_BITS if query.descending else ((last + 1) << BLOCK_BITS) - 1
    sub_bound = "sub <= ?" if query.descending else "sub >= ?"
    # Each ask reads and sorts every row of the range's buckets past the bound, whatever its
    # LIMIT, so asks that go on take twice as many sub-blocks as the one before: a page that
    # passes over thousands of them (rows from before the map kept bounds, of a bucket the
    # range only grazes) asks a dozen times, not a hundred.
    want = max(64, 2 * page.room)
    while not page.done:
        rest = replace(query, after=after)
        first_sub = (after - 1 if query.descending else after + 1) >> SUB_BITS
        # Only the sub-blocks whose events of those buckets can lie in the range (bounds
        # unknown: maybe).
        subs = [sub for (sub,) in run(
            f"SELECT DISTINCT sub FROM event_buckets WHERE bucket BETWEEN ? AND ?"
            f" AND {sub_bound} AND (min_ts IS NULL OR min_ts < ? AND max_ts >= ?)"
            f" ORDER BY sub {order} LIMIT ?",
            [low >> BUCKET_BITS, (high - 1) >> BUCKET_BITS, first_sub, high, low, want])]
        _read_spans(run, rest, page, subs, SUB_BITS)
        if len(subs) < want:
            break
        last = subs[-1]
        after = last << SUB_BITS if query.descending else ((last + 1) << SUB_BITS) - 1
        want = min(2 * want, MAX_SUBS_PER_ASK)


def _read_spans(run: Run, query: EventQuery, page: _Page, spans: list[int],
                bits: int) -> None:
    """Read the spans of 2**bits sequence numbers given, in order, until the page is full
    (or a search has read its scan)."""
    for start, end in _runs(spans, query.descending):
        _read_seqs(run, query, page, start << bits, ((end + 1) << bits) - 1)
        if page.done:
            break


def _read_seqs(run: Run, query: EventQuery, page: _Page, low: int, high: int) -> None:
    """Read the events of sequence numbers [low, high], in order, as far as a search may."""
    low, high = page.clip(query, low, high)
    if low <= high:
        _select(run, query, page, seqs=(low, high))


def _select(run: Run, query: EventQuery, page: _Page, *,
            seqs: tuple[int, int] | None = None) -> None:
    where, params = [], []
    for column, op, value in (("topic", "=", query.topic), ("event_id", "=", query.event_id),
                              ("source", "=", query.source),
                              ("ts", ">=", query.since), ("ts", "<", query.until),
                              ("seq", "<" if query.descending else ">", query.after)):
        if value is not None:
            where.append(f"{column} {op} ?")
            params.append(value)
    if query.event_id is not None and query.topic is None:
        # No index on event_id alone: one lookup of the key in each topic instead.
        where.insert(0, "topic IN (SELECT topic FROM topic_counts)")
    if query.contains is not None:
        where.append(page.contains_sql)
        params.append(query.contains)
    if seqs is not None:
        where.append("seq BETWEEN ? AND ?")
        params += seqs
    sql = f"SELECT {COLUMNS} FROM events"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += f" ORDER BY seq {'DESC' if query.descending else 'ASC'} LIMIT ?"
    params.append(page.room)
    page.add(run(sql, params))


def _runs(blocks: list[int], descending: bool) -> Iterator[tuple[int, int]]:
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
