"""Every plan of Store.events (topic/source index, block summary and bucket map for time
ranges) returns exactly what a plain filter over every stored event returns, page after
page, on SQLite and on PostgreSQL."""

from __future__ import annotations

import contextlib
import random
import sqlite3
from dataclasses import replace

import pytest

from app.check import OUTSIDE_BUCKETS
from app.store import Batch, EventQuery, SQLiteStore
from app.store.sql import BLOCK_BITS, BUCKET_BITS, STORED_SEQS, read_page

HOUR = 3600 * 10**6
EVENTS = 30_000


def open_store(request, tmp_path_factory, name: str):
    """A new, empty store of the fixture's backend: (store, opener of another instance on the
    same data, opener of a plain DB-API connection to it)."""
    if request.param == "sqlite":
        path = str(tmp_path_factory.mktemp(name) / f"{name}.db")
        return SQLiteStore(path), lambda: SQLiteStore(path), lambda: sqlite3.connect(path)
    import psycopg

    from app.store.postgresql import PostgresStore

    url = request.getfixturevalue("postgres").fresh_url()
    return (PostgresStore(url), lambda: PostgresStore(url),
            lambda: psycopg.connect(url, autocommit=True))


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def store(request, tmp_path_factory):
    """A store of EVENTS events: the first half in time order, the rest replayed at random
    times, a rare topic and source, and duplicates that must not widen anything."""
    rng = random.Random(5)
    rows = []
    for i in range(EVENTS):
        ts = i * 10**6 if i < EVENTS // 2 else rng.randrange(0, EVENTS * 10**6)
        topic = "rare" if i % 997 == 0 else f"t{i % 3}"
        source = "lonely" if i == EVENTS - 5 else f"s{i % 5}"
        tag = "needle" if i % 101 == 0 else "rarest" if i in (4, EVENTS - 9) else "hay"
        rows.append((topic, f"e{i}", ts, f"text-{ts}", source, f'{{"n":{i},"tag":"{tag}"}}',
                     "r"))
    store, reopen, connect = open_store(request, tmp_path_factory, "plans")
    writer = store.writer()
    for start in range(0, EVENTS, 1000):
        batch = rows[start:start + 1000]
        writer.write([Batch(batch + rng.sample(batch, 50))])  # re-sends: duplicates
    writer.close()
    store.reopen, store.connect = reopen, connect
    yield store, rows
    store.close()


def contains_sql(sqlite: bool) -> str:
    """The backend's SQL test of a search (for read_page)."""
    if sqlite:
        from app.store.sqlite import CONTAINS
    else:
        from app.store.postgresql import CONTAINS
    return CONTAINS


def reference(rows, query: EventQuery) -> list[str]:
    """Every matching event_id, in the order the query asks for (seq = position + 1)."""
    found = [row[1] for row in rows
             if (query.topic is None or row[0] == query.topic)
             and (query.event_id is None or row[1] == query.event_id)
             and (query.source is None or row[4] == query.source)
             and (query.since is None or row[2] >= query.since)
             and (query.until is None or row[2] < query.until)
             and (query.contains is None or query.contains in row[5])]
    return found[::-1] if query.descending else found


def read_all(store, query: EventQuery, pages: list | None = None) -> list[str]:
    """Page through the query with the cursor, as a client would (a search's page that
    read its scan goes on from where it stopped); pages, if given, gets each page."""
    ids, after = [], None
    while True:
        page = store.events(replace(query, after=after))
        if pages is not None:
            pages.append((after, page))
        ids += [event.event_id for event in page.events]
        if page.searched_to is not None:
            assert len(page.events) < query.limit
            after = page.searched_to
        elif len(page.events) < query.limit:
            return ids
        else:
            after = page.events[-1].seq


QUERIES = [
    {},
    {"topic": "rare"},
    {"source": "lonely"},
    {"topic": "t1", "source": "s2"},
    {"since": 100 * 10**6, "until": 130 * 10**6},  # few events, in early blocks and replays
    {"since": 0, "until": EVENTS * 10**6 // 2},  # many events
    {"since": EVENTS * 10**6 // 4},
    {"until": EVENTS * 10**6 // 3, "topic": "t0"},
    {"since": 20_000 * 10**6, "until": 21_000 * 10**6},  # replays only: a few in every block
    {"since": 20_000 * 10**6, "until": 20_050 * 10**6},  # a few replays, in a busy bucket
    {"since": 10**18},  # nothing
    {"since": 5000 * 10**6, "until": 5000 * 10**6 + 1, "source": "s0"},
    {"topic": "t1", "event_id": "e1"},  # one event, by its key
    {"topic": "t0", "event_id": "e1"},  # that id under another topic: none
    {"topic": "rare", "event_id": "e997", "since": 997 * 10**6, "until": 998 * 10**6},
    {"topic": "rare", "event_id": "e997", "since": 998 * 10**6},  # its key, not its time
    {"event_id": "e997"},  # looked up in every topic
    {"event_id": "e997", "source": "s2", "until": 998 * 10**6},
    {"event_id": "nowhere"},
]


@pytest.mark.parametrize("descending", [False, True])
@pytest.mark.parametrize("limit", [1000, 97])
@pytest.mark.parametrize("filters", QUERIES)
def test_every_page_matches_a_plain_filter(store, filters, limit, descending):
    store, rows = store
    query = EventQuery(**filters, limit=limit, descending=descending)
    if limit == 97 and len(reference(rows, query)) > 5000:
        pytest.skip("paged at 1000 already; 97 adds nothing but time")
    assert read_all(store, query) == reference(rows, query)


SEARCHES = [
    {"contains": '"tag":"needle"'},
    {"contains": "rarest"},  # two events at the two ends: many pages of nothing between
    {"contains": "Needle"},  # case-sensitive: none
    {"contains": "needle", "topic": "t1"},
    {"contains": "needle", "source": "s2", "topic": "t2"},
    {"contains": "rarest", "source": "s4"},
    {"contains": "needle", "since": 100 * 10**6, "until": 5000 * 10**6},
    {"contains": "needle", "since": 20_000 * 10**6, "until": 21_000 * 10**6},  # replays only
    {"contains": "rarest", "since": 0},
    {"contains": "needle", "until": EVENTS * 10**6 // 3, "topic": "t0"},
    {"contains": "needle", "event_id": "e101"},  # one event, by its key, then its payload
    {"contains": "hay", "event_id": "e101"},  # that event, but another text: none
]


@pytest.mark.parametrize("descending", [False, True])
@pytest.mark.parametrize("scan", [None, 1500])
@pytest.mark.parametrize("filters", SEARCHES)
def test_every_search_matches_a_plain_filter_and_each_page_reads_its_scan(store, filters, scan,
                                                                          descending):
    """A search returns every event whose payload holds the text, page after page, on
    every plan; a page that stops at its scan read exactly that many events of its topic
    or source (else that many sequence numbers, or in a time range's spans that many, so at
    most that many of its events), and says where it stopped, even when it found none."""
    store, rows = store
    query = EventQuery(**filters, limit=50, scan=scan, descending=descending)
    pages = []
    assert read_all(store, query, pages) == reference(rows, query)
    with contextlib.closing(store.connect()) as conn:
        stored = list(conn.execute("SELECT seq, topic, source, ts FROM events ORDER BY seq"))
    ranged = "since" in filters or "until" in filters
    stops = [(after, page.searched_to) for after, page in pages if page.searched_to is not None]
    if scan is None or "event_id" in filters:
        assert not stops
        return
    assert len(stops) >= len(pages) - 1 and stops, "a page of nothing but a scan ends it"
    for after, stop in stops:
        start = after if after is not None else (
            stored[-1][0] + 1 if descending else stored[0][0] - 1)
        low, high = (stop, start - 1) if descending else (start + 1, stop)
        assert low <= high, "each page reads on"
        window = [row for row in stored if low <= row[0] <= high]
        if "topic" in filters or "source" in filters:
            column, value = (1, filters["topic"]) if "topic" in filters else (2, filters["source"])
            assert sum(row[column] == value for row in window) == scan
        elif ranged:
            since, until = filters.get("since", -2**63), filters.get("until", 2**63)
            # Spans are counted (blocks whose bounds overlap the range): fewer of its events.
            assert sum(since <= row[3] < until for row in window) <= scan
        else:
            assert high - low + 1 == scan


def test_an_event_id_is_read_through_the_key_alone(store):
    """Whatever else is filtered, an event_id is looked up in the dedup key: in its topic
    or in each topic, not by a walk of the events in sequence order."""
    store, _ = store
    plans, ends = [], []
    with contextlib.closing(store.connect()) as conn:
        sqlite = isinstance(conn, sqlite3.Connection)
        explain = "EXPLAIN QUERY PLAN " if sqlite else "EXPLAIN "
        contains = contains_sql(sqlite)
        if not sqlite:  # the statistics autovacuum gathers as commits update the tables
            conn.execute("ANALYZE events")
            conn.execute("ANALYZE topic_counts")

        def run(sql, params):
            if not sqlite:
                sql = sql.replace("?", "%s")
            plan = "\n".join(str(row[-1]) for row in conn.execute(explain + sql, params))
            # Oldest first, a page that reads to the end reads the ends of seq (its
            # end_cursor), not the events in between.
            (ends if sql == STORED_SEQS else plans).append(plan)
            return conn.execute(sql, params)

        for filters in ({"topic": "t1", "event_id": "e1"},
                        {"topic": "t1", "event_id": "e1", "source": "s1", "since": 0},
                        {"event_id": "e1"}, {"event_id": "e1", "until": 10**18}):
            for descending in (False, True):
                query = EventQuery(**filters, limit=101, descending=descending)
                assert [e.event_id for e in read_page(run, query, contains).events] == ["e1"]
    key = "sqlite_autoindex_events_1 (topic=? AND event_id=?)" if sqlite else (
        "events_topic_event_id_key")
    assert len(plans) == 8 and len(ends) == 4
    for plan in ends:  # each end a search of the key, or the first row of its index
        assert "SCAN events" not in plan and "Seq Scan" not in plan, plan
        assert plan.count("SEARCH events") == 2 or plan.count("Limit") == 2, plan
    for plan in plans:
        assert key in plan and "SCAN events" not in plan and "Seq Scan on events" not in plan, (
            plan)


def stored_seqs(store) -> list[int]:
    with contextlib.closing(store.connect()) as conn:
        return [seq for (seq,) in conn.execute("SELECT seq FROM events ORDER BY seq")]


def test_a_cursor_deep_in_the_store_starts_right_after_it(store):
    store, rows = store
    seqs = stored_seqs(store)  # PostgreSQL's have gaps: a conflicting row uses up its number
    assert len(seqs) == EVENTS
    at = EVENTS - 1234
    query = EventQuery(since=0, until=EVENTS * 10**6, after=seqs[at], limit=50)
    assert [e.seq for e in store.events(query).events] == seqs[at + 1:at + 51]
    backwards = store.events(EventQuery(since=0, after=seqs[at], limit=50, descending=True))
    assert [e.seq for e in backwards.events] == seqs[at - 50:at][::-1]


def test_an_older_database_gets_its_summaries_on_open(store):
    """A database from before the summaries (emptied here) gets them built on open: each
    block's exact timestamp bounds (the writer's own may be wider: a commit's bounds), and
    the same bucket map the writer made commit by commit."""
    store, rows = store
    blocks_sql = "SELECT block, min_ts, max_ts FROM event_blocks ORDER BY block"
    buckets_sql = "SELECT bucket, sub FROM event_buckets ORDER BY bucket, sub"
    with contextlib.closing(store.connect()) as conn:
        written = conn.execute(blocks_sql).fetchall()
        buckets = conn.execute(buckets_sql).fetchall()
        exact = {}
        for seq, ts in conn.execute("SELECT seq, ts FROM events"):
            low, high = exact.get(seq >> BLOCK_BITS, (ts, ts))
            exact[seq >> BLOCK_BITS] = (min(low, ts), max(high, ts))
        conn.execute("DELETE FROM event_blocks")
        conn.execute("DELETE FROM event_buckets")
        conn.commit()
    assert [block for block, _, _ in written] == sorted(exact)
    assert all(low <= exact[block][0] and high >= exact[block][1]
               for block, low, high in written)
    older = store.reopen()
    try:
        with contextlib.closing(store.connect()) as conn:
            assert conn.execute(blocks_sql).fetchall() == [
                (block, *bounds) for block, bounds in sorted(exact.items())]
            assert conn.execute(buckets_sql).fetchall() == buckets
        for filters in (QUERIES[5], QUERIES[8]):
            query = EventQuery(**filters, limit=1000)
            assert read_all(older, query) == reference(rows, query)
    finally:
        older.close()


STREAM = 120_000


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def stream(request, tmp_path_factory):
    """STREAM events one second apart, 1 in 20 a replay from up to STREAM seconds before the
    stream began: a time range before it holds a few replays scattered over every block."""
    rng = random.Random(9)
    rows = [(f"t{i % 3}", f"s{i}", ts, f"text-{ts}", f"s{i % 5}", "{}", "r")
            for i in range(STREAM)
            for ts in [rng.randrange(-STREAM, i) * 10**6 if i % 20 == 0 else i * 10**6]]
    store, _, _ = open_store(request, tmp_path_factory, "stream")
    writer = store.writer()
    for start in range(0, STREAM, 5000):
        writer.write([Batch(rows[start:start + 5000])])
    writer.close()
    yield store, rows
    store.close()


@pytest.mark.parametrize("descending", [False, True])
@pytest.mark.parametrize("limit", [10, 97])
@pytest.mark.parametrize("filters", [
    {"since": -50_000 * 10**6, "until": -49_000 * 10**6},  # replays only, ~33 of them
    {"since": -50_000 * 10**6, "until": -49_990 * 10**6},  # replays only, nearly none
    {"since": -50_000 * 10**6, "until": -40_000 * 10**6, "topic": "t1"},
    {"since": 60_000 * 10**6, "until": 63_600 * 10**6},  # an hour in the middle: in order
    {"until": 0},  # every replay from before the stream
])
def test_sparse_ranges_page_through_the_bucket_map(stream, filters, limit, descending):
    store, rows = stream
    query = EventQuery(**filters, limit=limit, descending=descending)
    expected = reference(rows, query)
    assert read_all(store, query) == expected


DENSE = 90_000


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def dense(request, tmp_path_factory):
    """DENSE events 0.1 s apart, 1 in 50 a replay from up to 30 days before: a 71.6-minute
    bucket of event_buckets holds 42,950 events in order, 671 sub-blocks."""
    rng = random.Random(13)
    rows = [(f"t{i % 3}", f"d{i}", ts, f"text-{ts}", "s", "{}", "r")
            for i in range(DENSE)
            for ts in [i * 10**5 - rng.randrange(30 * 86_400 * 10**6) if i % 50 == 0
                       else i * 10**5]]
    store, reopen, connect = open_store(request, tmp_path_factory, "dense")
    writer = store.writer()
    for start in range(0, DENSE, 5000):
        writer.write([Batch(rows[start:start + 5000])])
    writer.close()
    store.reopen, store.connect = reopen, connect
    yield store, rows
    store.close()


def grazing_page(store, rows) -> tuple[list[int], int]:
    """Read the first page, newest first, of an hour that ends a second into a bucket;
    return the sizes of its asks of the map and how many rows its other statements read."""
    edge = 1 << BUCKET_BITS
    query = EventQuery(since=edge - HOUR, until=edge + 10**6, limit=10, descending=True)
    asks, read = [], 0
    with contextlib.closing(store.connect()) as conn:
        sqlite = isinstance(conn, sqlite3.Connection)

        def run(sql, params):
            nonlocal read
            if "event_buckets" in sql:
                asks.append(params[-1])
            elif "seq BETWEEN" in sql:
                read += params[-2] - params[-3] + 1
            return conn.execute(sql if sqlite else sql.replace("?", "%s"), params)

        page = read_page(run, query, contains_sql(sqlite))
    assert [event.event_id for event in page.events] == reference(rows, query)[:10]
    assert read_all(store, query) == reference(rows, query)
    return asks, read


def test_a_range_that_grazes_a_bucket_reads_none_of_its_other_sub_blocks(dense):
    """Newest first, an hour that ends a second into a bucket holds none of the bucket's
    in-order events, about 480 sub-blocks above the blocks the page reads first (replays
    widen those blocks' bounds to overlap any earlier range). The map's timestamp bounds
    leave them out: one ask, and only the sub-blocks with events in the hour are read.
    The bounds hold every event, those of a sub-block two commits share included."""
    with contextlib.closing(dense[0].connect()) as conn:
        assert conn.execute(OUTSIDE_BUCKETS).fetchone() == (0,)
    asks, read = grazing_page(*dense)
    assert asks == [64], asks
    assert read <= 4 * 4096 + 64 * 64, read  # the 4 blocks read first, then 64 sub-blocks


def test_a_bucket_map_without_bounds_is_read_in_asks_that_double(dense):
    """Rows of the map from before its bounds (NULL) may hold any time of their bucket, so
    the page reads those 480 sub-blocks, asking for twice as many each time (each ask
    reads all the range's rows of the map): 4 asks, where asks of 64 each took 8."""
    store, rows = dense
    with contextlib.closing(store.connect()) as conn:
        conn.execute("UPDATE event_buckets SET min_ts = NULL, max_ts = NULL")
        conn.commit()
    try:
        asks, read = grazing_page(store, rows)
        assert asks == [64, 128, 256, 512], asks
        assert read > 480 * 64, read
    finally:
        with contextlib.closing(store.connect()) as conn:
            conn.execute("DELETE FROM event_buckets")  # built again, bounds included, on open
            conn.commit()
        store.reopen().close()
    assert grazing_page(store, rows)[0] == [64]


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_store(request, tmp_path_factory):
    store, _, _ = open_store(request, tmp_path_factory, "expiry")
    yield store
    store.close()


def test_expiry_deletes_the_oldest_in_chunks_and_every_plan_reads_what_is_left(empty_store):
    """Writer.expire looks at the oldest events only, deletes those received before the
    time given (not one received later, even among them), and the pages, by every plan,
    are exactly the events left."""
    rng = random.Random(3)
    rows = [(f"t{i % 3}", f"x{i}", ts, f"text-{ts}", f"s{i % 5}", "{}", f"r{i:05}")
            for i in range(6000)
            for ts in [rng.randrange(-6000, i) * 10**6 if i % 20 == 0 else i * 10**6]]
    rows[5] = rows[5][:6] + ("r05999",)  # received late: stored early, expires late
    writer = empty_store.writer()
    for start in range(0, len(rows), 500):
        writer.write([Batch(rows[start:start + 500])])
    assert [writer.expire("r01000", 400) for _ in range(4)] == [399, 399, 201, 0]
    left = [rows[5]] + rows[1000:]
    for filters in ({}, {"topic": "t1"}, {"source": "s3"}, {"until": 0},
                    {"since": 1500 * 10**6, "until": 1600 * 10**6},
                    {"since": -3000 * 10**6, "until": 500 * 10**6, "topic": "t0"}):
        for descending in (False, True):
            query = EventQuery(**filters, limit=97, descending=descending)
            assert read_all(empty_store, query) == reference(left, query), filters
    assert writer.expire("r99999", 10**6) == len(left) - 1  # all but the newest
    writer.close()
    counters = empty_store.counters()
    assert (counters.unique_processed, counters.expired) == (6000, 5999)
    assert read_all(empty_store, EventQuery(limit=10)) == ["x5999"]


@pytest.fixture(params=["sqlite", "postgresql"])
def reopened(request, tmp_path_factory):
    store, reopen, connect = open_store(request, tmp_path_factory, "columns")
    yield store, reopen, connect
    store.close()


def row(topic: str, event_id: str) -> tuple:
    return (topic, event_id, 0, "t", "s", "{}", "r")


def test_an_older_database_gets_the_bucket_maps_bounds_on_open(reopened):
    """A database from before event_buckets' timestamp bounds (dropped here) gets the
    columns when it is opened: its rows' bounds are unknown (NULL) and stay so, its new
    rows have them, and every range still reads what a plain filter finds."""
    store, reopen, connect = reopened
    day = 86_400 * 10**6
    # The last 10 share their bucket and sub-block with 10 of the first: rows whose bounds
    # are unknown, which must stay so (their older events are not within the new ones').
    rows = [("a", f"o{i}", (i % 30) * day // 7 + i // 30, "t", "s", "{}", "r")
            for i in range(40)] + [("a", "late", 8 * day, "t", "s", "{}", "r")]  # a new pair
    writer = store.writer()
    writer.write([Batch(rows[:30])])
    writer.close()
    with contextlib.closing(connect()) as conn:
        for column in ("min_ts", "max_ts"):
            conn.execute(f"ALTER TABLE event_buckets DROP COLUMN {column}")
        conn.commit()
    older = reopen()
    try:
        writer = older.writer()
        writer.write([Batch(rows[30:] + rows[:3])])  # 3 duplicates
        writer.close()
        with contextlib.closing(connect()) as conn:
            bounds = conn.execute("SELECT sub, min_ts, max_ts FROM event_buckets"
                                  " ORDER BY bucket, sub").fetchall()
        assert sum(low is None for _, low, _ in bounds) == 30
        assert [b for b in bounds if b[1] is not None] == [(0, 8 * day, 8 * day)]
        with contextlib.closing(connect()) as conn:
            assert conn.execute(OUTSIDE_BUCKETS).fetchone() == (0,)
        for since in range(0, 7 * day, day // 2):
            for descending in (False, True):
                query = EventQuery(since=since, until=since + day, limit=3,
                                   descending=descending)
                assert read_all(older, query) == reference(rows, query)
    finally:
        older.close()


def test_an_older_database_gets_the_topics_last_stored_column_on_open(reopened):
    """A database from before topic_counts.last_stored_at (dropped here) gets the column
    when it is opened: its topics say None until their next event is stored."""
    store, reopen, connect = reopened
    writer = store.writer()
    writer.write([Batch([row("a", "1"), row("b", "1")])])
    writer.close()
    assert set(store.counters().last_stored) == {"a", "b"}
    with contextlib.closing(connect()) as conn:
        conn.execute("ALTER TABLE topic_counts DROP COLUMN last_stored_at")
        conn.commit()
    older = reopen()
    try:
        assert older.counters().last_stored == {"a": None, "b": None}
        writer = older.writer()
        writer.write([Batch([row("a", "2"), row("b", "1")])])  # b's is a duplicate
        writer.close()
        counters = older.counters()
        assert counters.topics == {"a": 2, "b": 1} and counters.last_stored["b"] is None
        assert counters.last_stored["a"].endswith("Z")
        assert older.counters(largest=1).last_stored == {"a": counters.last_stored["a"]}
    finally:
        older.close()
