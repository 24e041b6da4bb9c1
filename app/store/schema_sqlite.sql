-- seq aliases the rowid, so the ingestion order used by cursors survives VACUUM.
-- (topic, event_id) is the dedup key: a rowid table with a unique key is how
-- SQLite stores PRIMARY KEY (topic, event_id) anyway, and it was faster than
-- WITHOUT ROWID for random keys.
CREATE TABLE IF NOT EXISTS events (
    seq         INTEGER PRIMARY KEY,
    topic       TEXT NOT NULL,
    event_id    TEXT NOT NULL,
    ts          INTEGER NOT NULL,
    timestamp   TEXT NOT NULL,
    source      TEXT NOT NULL,
    payload     TEXT NOT NULL,
    received_at TEXT NOT NULL,
    UNIQUE (topic, event_id)
);
CREATE INDEX IF NOT EXISTS events_topic_seq ON events (topic, seq);

CREATE TABLE IF NOT EXISTS counters (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT OR IGNORE INTO counters (name, value) VALUES
    ('received', 0), ('unique_processed', 0), ('duplicate_dropped', 0), ('rejected', 0),
    ('expired', 0);

-- last_stored_at: when the newest event of the topic was stored (its commit, the text of a
-- received_at); NULL for a topic counted before the column was added, until its next event.
CREATE TABLE IF NOT EXISTS topic_counts (
    topic          TEXT PRIMARY KEY,
    count          INTEGER NOT NULL,
    last_stored_at TEXT
);

-- For GET /events?source=...: the events of one source in ingestion order.
CREATE INDEX IF NOT EXISTS events_source_seq ON events (source, seq);

-- A block-range summary, like PostgreSQL's BRIN: the bounds of the event timestamps of
-- each block of 4096 sequence numbers. A time range is read block by block, skipping
-- every block whose bounds miss it. (An index on ts would also serve ranges whose events
-- are scattered over the whole store, but it cost 3.3 us of the 10.2 us an event takes to
-- insert with timestamps out of order; see bench/RESULTS.md, Growth.)
CREATE TABLE IF NOT EXISTS event_blocks (
    block  INTEGER PRIMARY KEY,
    min_ts INTEGER NOT NULL,
    max_ts INTEGER NOT NULL
);

-- Which (time bucket, sub-block) pairs hold events: a bucket is 2**32 us (71.6 minutes) of
-- event time, a sub-block 64 sequence numbers. Late replays widen the bounds of every block
-- above, so a narrow time range whose events are few and scattered (replays only) would
-- make a page read most blocks; this map names the few sub-blocks that can hold them.
-- About 1 row per 64 in-order events plus 1 per late event, filled from the stored rows.
-- min_ts, max_ts: the bounds of the timestamps of the pair's events, so that a range that
-- only grazes a bucket passes over its other sub-blocks unread; NULL (unknown: read the
-- sub-block) in a row written before the columns were added.
CREATE TABLE IF NOT EXISTS event_buckets (
    bucket INTEGER NOT NULL,
    sub    INTEGER NOT NULL,
    min_ts INTEGER,
    max_ts INTEGER,
    PRIMARY KEY (bucket, sub)
) WITHOUT ROWID;
