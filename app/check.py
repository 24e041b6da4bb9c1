"""python -m app.check: check, in one read snapshot of the store that DATABASE_URL names,
that its counts agree with the events it holds (see README, Checking the counts).

It only reads, and can run while the aggregator ingests: the counters are updated in the
same transaction as the events they count, so every snapshot must satisfy every check.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field

from .config import ConfigError, from_env
from .store.sql import BLOCK_BITS, BUCKET_BITS, SUB_BITS

# Each returns one number: how many topics or stored events break the rule.
_STORED_PER_TOPIC = "SELECT topic, count(*) AS n FROM events GROUP BY topic"
_TOPICS_UNCOUNTED = (  # topics of stored events that have no count
    f"SELECT count(*) FROM ({_STORED_PER_TOPIC}) AS s"
    f" WHERE NOT EXISTS (SELECT 1 FROM topic_counts AS t WHERE t.topic = s.topic)")
_TOPICS_UNEQUAL = (  # counts that are not the number of their topic's events stored
    f"SELECT count(*) FROM topic_counts AS t LEFT JOIN ({_STORED_PER_TOPIC}) AS s"
    f" ON s.topic = t.topic WHERE coalesce(s.n, 0) <> t.count")
_TOPICS_OVER = (  # counts below the number of their topic's events stored
    f"SELECT count(*) FROM topic_counts AS t JOIN ({_STORED_PER_TOPIC}) AS s"
    f" ON s.topic = t.topic WHERE s.n > t.count")
_OUTSIDE_BLOCKS = (
    f"SELECT count(*) FROM events AS e LEFT JOIN event_blocks AS b"
    f" ON b.block = e.seq >> {BLOCK_BITS}"
    f" WHERE b.block IS NULL OR e.ts < b.min_ts OR e.ts > b.max_ts")
OUTSIDE_BUCKETS = (
    f"SELECT count(*) FROM events AS e WHERE NOT EXISTS (SELECT 1 FROM event_buckets AS k"
    f" WHERE k.bucket = e.ts >> {BUCKET_BITS} AND k.sub = e.seq >> {SUB_BITS}"
    f" AND (k.min_ts IS NULL OR e.ts BETWEEN k.min_ts AND k.max_ts))")


@dataclass
class Report:
    """What one snapshot holds, and each check: {"rule": what it says, "ok": whether it
    holds}."""

    database: str
    counters: dict[str, int] = field(default_factory=dict)
    stored: int = 0
    topics: int = 0
    checks: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return all(check["ok"] for check in self.checks)

    def say(self, rule: str, ok: bool) -> None:
        self.checks.append({"rule": rule, "ok": ok})


def check(conn, report: Report) -> None:
    """Run every check on a connection of either backend (conn.execute(sql) returns rows),
    inside the caller's read snapshot."""

    def one(sql: str) -> int:
        return conn.execute(sql).fetchone()[0]

    report.counters = c = _counters(conn.execute("SELECT name, value FROM counters"))
    report.stored = stored = one("SELECT count(*) FROM events")
    report.topics = one("SELECT count(*) FROM topic_counts")
    counted = one("SELECT coalesce(sum(count), 0) FROM topic_counts")
    report.say(f"received {c['received']:,} = unique_processed {c['unique_processed']:,}"
               f" + duplicate_dropped {c['duplicate_dropped']:,}",
               c["received"] == c["unique_processed"] + c["duplicate_dropped"])
    report.say(f"unique_processed {c['unique_processed']:,} = events stored {stored:,}"
               f" + expired {c['expired']:,}", c["unique_processed"] == stored + c["expired"])
    report.say(f"the topics' counts sum to unique_processed ({counted:,})",
               counted == c["unique_processed"])
    uncounted = one(_TOPICS_UNCOUNTED)
    if c["expired"] == 0:
        wrong = uncounted + one(_TOPICS_UNEQUAL)
        report.say("each topic's count is the number of its events stored"
                   + (f" (not for {wrong:,} topics)" if wrong else ""), wrong == 0)
    else:  # retention deleted some: a topic's count is a running total
        wrong = uncounted + one(_TOPICS_OVER)
        report.say("no topic stores more events than it counted"
                   + (f" ({wrong:,} topics do)" if wrong else ""), wrong == 0)
    for what, sql in (("blocks", _OUTSIDE_BLOCKS), ("buckets", OUTSIDE_BUCKETS)):
        outside = one(sql)
        report.say(f"the time summaries ({what}) cover every event"
                   + (f" ({outside:,} outside)" if outside else ""), outside == 0)


def _sqlite(path: str, report: Report, full: bool) -> None:
    import sqlite3

    from .store.sqlite import connect

    if not os.path.isfile(path):  # connecting would create it
        raise FileNotFoundError(f"no database file at {path}")
    conn = connect(path, read_only=True)
    try:
        conn.execute("BEGIN")  # one read snapshot for every statement
        try:
            # First: the counts of a damaged file mean nothing, and reading them could
            # return anything.
            pragma = "integrity_check" if full else "quick_check"
            answer = [row[0] for row in conn.execute(f"PRAGMA {pragma}")]
            if answer == ["ok"]:
                check(conn, report)
            said = "; ".join(line for message in answer for line in message.splitlines())
            report.say(f"PRAGMA {pragma}: {said[:500]}", answer == ["ok"])
        finally:
            conn.execute("COMMIT")
    except sqlite3.Error as exc:
        raise _Failed(f"database error: {exc}") from None
    finally:
        conn.close()


def _postgresql(url: str, report: Report) -> None:
    import psycopg

    from .store.postgresql import connect

    try:
        with connect(url, autocommit=True) as conn:
            conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            check(conn, report)
            conn.execute("COMMIT")
    except psycopg.Error as exc:
        raise _Failed(f"database error: {' '.join(str(exc).split())}") from None


class _Failed(Exception):
    """The database could not be read; the message is one line."""


COUNTERS = ("received", "unique_processed", "duplicate_dropped", "rejected", "expired")


def _counters(rows) -> dict[str, int]:
    """Return the counters table as a dict, or raise _Failed when one is missing (a
    database the aggregator has not opened since it had that counter)."""
    counters = dict(rows)
    missing = [name for name in COUNTERS if name not in counters]
    if missing:
        raise _Failed(f"the counters table has no {', '.join(missing)}: is this the "
                      "aggregator's database, opened by this version?")
    wrong = [name for name in COUNTERS if type(counters[name]) is not int]
    if wrong:
        raise _Failed(f"the counters table holds a value that is not a count for "
                      f"{', '.join(wrong)}")
    return {name: counters[name] for name in COUNTERS}


def main(argv: list[str] | None = None) -> int:
    """Check; return 0 when every check holds, 1 when one does not or the database failed,
    2 for a bad argument or setting."""
    parser = argparse.ArgumentParser(
        prog="python -m app.check",
        description="Check, in one read snapshot, that the counters of the store that "
                    "DATABASE_URL names agree with the events it holds. It only reads, and "
                    "can run while the aggregator ingests. Exit status: 0 every check holds, "
                    "1 one does not (or the database failed), 2 bad arguments or settings.")
    parser.add_argument("--full", action="store_true",
                        help="SQLite: PRAGMA integrity_check instead of quick_check (slower: "
                             "it also checks that every index matches its table)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    try:
        config = from_env()
    except ConfigError as exc:
        return _error(f"bad configuration: {exc}", 2)
    report = Report(config.database_shown)
    started = time.monotonic()
    try:
        if config.backend == "sqlite":
            _sqlite(config.sqlite_path, report, args.full)
        else:
            _postgresql(config.database_url, report)
    except FileNotFoundError as exc:
        return _error(str(exc), 2)
    except _Failed as exc:
        return _error(str(exc), 1)
    report.seconds = round(time.monotonic() - started, 3)
    if args.json:
        print(json.dumps(asdict(report) | {"ok": report.ok}))
    else:
        held = (f"{report.stored:,} events stored, topics {report.topics:,}"
                if report.counters else "damaged, its counts not read")
        print(f"check: {report.database}: {held}, read in {report.seconds:.2f} s")
        for each in report.checks:
            print(f"  {'ok  ' if each['ok'] else 'FAIL'} {each['rule']}")
    return 0 if report.ok else 1


def _error(message: str, status: int) -> int:
    print(f"check: error: {message}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
