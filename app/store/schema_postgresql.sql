-- The same tables as schema_sqlite.sql. Run under an advisory lock, so that replicas
-- starting at once do not race on CREATE ... IF NOT EXISTS.
-- seq is handed out under the writers' advisory lock (see postgresql.py), so it grows in
-- commit order and a reader's cursor never skips a row committed after it read.
CREATE TABLE IF NOT EXISTS events (
    seq         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    topic       TEXT NOT NULL,
    event_id    TEXT NOT NULL,
    ts          BIGINT NOT NULL,
    timestamp   TEXT NOT NULL,
    source      TEXT NOT NULL,
    payload     TEXT NOT NULL,
    received_at TEXT NOT NULL,
    UNIQUE (topic, event_id)
);
CREATE INDEX IF NOT EXISTS events_topic_seq ON events (topic, seq);
CREATE INDEX IF NOT EXISTS events_source_seq ON events (source, seq);

CREATE TABLE IF NOT EXISTS counters (
    name  TEXT PRIMARY KEY,
    value BIGINT NOT NULL
);
INSERT INTO counters (name, value) VALUES
    ('received', 0), ('unique_processed', 0), ('duplicate_dropped', 0), ('rejected', 0),
    ('expired', 0)
    ON CONFLICT (name) DO NOTHING;

CREATE TABLE IF NOT EXISTS topic_counts (
    topic          TEXT PRIMARY KEY,
    count          BIGINT NOT NULL,
    last_stored_at TEXT
);
-- A database from before the column (see schema_sqlite.sql).
ALTER TABLE topic_counts ADD COLUMN IF NOT EXISTS last_stored_at TEXT;

CREATE TABLE IF NOT EXISTS event_blocks (
    block  BIGINT PRIMARY KEY,
    min_ts BIGINT NOT NULL,
    max_ts BIGINT NOT NULL
);

CREATE TABLE IF NOT EXISTS event_buckets (
    bucket BIGINT NOT NULL,
    sub    BIGINT NOT NULL,
    min_ts BIGINT,
    max_ts BIGINT,
    PRIMARY KEY (bucket, sub)
);
-- A database from before the bounds (see schema_sqlite.sql): its rows' bounds stay NULL.
ALTER TABLE event_buckets ADD COLUMN IF NOT EXISTS min_ts BIGINT;
ALTER TABLE event_buckets ADD COLUMN IF NOT EXISTS max_ts BIGINT;
