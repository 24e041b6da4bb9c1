"""Test helpers: event factories, direct database reads, and a real gunicorn process."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent


def event(event_id: str, topic: str = "orders", **fields) -> dict:
    """Return a valid event; keyword arguments override or add fields."""
    base = {"topic": topic, "event_id": event_id, "timestamp": "2025-10-18T03:00:00Z",
            "source": "test", "payload": {"n": event_id}}
    base.update(fields)
    return base


def database_url(db: Path | str) -> str:
    """Return the DATABASE_URL of a test database: a SQLite file path or a postgresql:// URL."""
    return db if isinstance(db, str) else f"sqlite:///{db}"


def query(db: Path | str, sql: str) -> list[tuple]:
    """Run one read straight on the database, bypassing the aggregator."""
    if isinstance(db, str):
        import psycopg

        with psycopg.connect(db) as conn:
            return conn.execute(sql).fetchall()
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return conn.execute(sql).fetchall()


def wait_for(predicate, timeout: float, what: str, interval: float = 1.0):
    """Return predicate()'s first true value, polling every interval seconds; fail with
    `what` once timeout seconds have passed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


def every_event(url: str) -> list[dict]:
    """Return every event the aggregator at url holds, in its order, read page by page."""
    events, cursor = [], None
    while True:
        params = {"limit": 1000, **({"after": cursor} if cursor else {})}
        page = requests.get(url + "/events", params=params, timeout=10).json()
        events += page["events"]
        cursor = page["next_cursor"]
        if cursor is None:
            return events


def table_keys(db: Path | str) -> list[tuple[str, str]]:
    """Return every stored (topic, event_id) in ingestion order, read straight from the database."""
    return query(db, "SELECT topic, event_id FROM events ORDER BY seq")


def db_counters(db: Path | str) -> dict[str, int]:
    """Return the persisted counters, read straight from the database."""
    return dict(query(db, "SELECT name, value FROM counters"))


def assert_counters_match_the_table(db: Path | str) -> None:
    """Assert both invariants, per-topic counts and no key stored twice, from the database
    (events deleted by retention count in expired, and still in their topics' totals)."""
    counters = db_counters(db)
    [(rows,)] = query(db, "SELECT count(*) FROM events")
    [(distinct,)] = query(db, "SELECT count(*) FROM (SELECT DISTINCT topic, event_id FROM events)"
                              " AS keys")
    topics = dict(query(db, "SELECT topic, count FROM topic_counts WHERE count > 0"))
    actual = dict(query(db, "SELECT topic, count(*) FROM events GROUP BY topic"))
    assert rows == distinct
    assert counters["received"] == counters["unique_processed"] + counters["duplicate_dropped"]
    assert counters["unique_processed"] == rows + counters["expired"]
    assert sum(topics.values()) == counters["unique_processed"]
    if counters["expired"] == 0:
        assert topics == actual
    else:
        assert all(topics.get(topic, 0) >= count for topic, count in actual.items())


def publish_overlapping(urls: list[str], ids: list[str], *, batches: int, max_size: int,
                        topics: tuple[str, ...]) -> tuple[Counter, list[dict], list[str]]:
    """Have 16 threads post `batches` random batches each, drawn from ids, taking the urls in
    turn; return every (topic, event_id) sent with its count, the answers, and the errors."""
    sent, results, errors = Counter(), [], []
    lock = threading.Lock()

    def publisher(seed: int) -> None:
        rng = random.Random(seed)
        sessions = [requests.Session() for _ in urls]
        for n in range(batches):
            server = (seed + n) % len(urls)  # every thread uses every server
            batch = [event(rng.choice(ids), topic=rng.choice(topics))
                     for _ in range(rng.randint(1, max_size))]
            response = sessions[server].post(urls[server] + "/publish", json=batch, timeout=30)
            with lock:
                if response.status_code != 200:
                    errors.append(response.text)
                results.append(response.json())
                sent.update((e["topic"], e["event_id"]) for e in batch)
        for session in sessions:
            session.close()

    threads = [threading.Thread(target=publisher, args=(seed,)) for seed in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sent, results, errors


def assert_each_key_once_with_exact_counts(db: Path | str, urls: list[str], sent: Counter,
                                           results: list[dict]) -> None:
    """Assert the table holds each key sent once, and the answers and every server's /stats
    count exactly what was sent."""
    keys = table_keys(db)
    assert len(keys) == len(set(keys)) == len(sent)
    total = sum(sent.values())
    assert total > len(sent)  # there were duplicates
    assert sum(r["received"] for r in results) == total
    assert sum(r["unique_processed"] for r in results) == len(sent)
    assert sum(r["duplicate_dropped"] for r in results) == total - len(sent)
    for url in urls:
        stats = requests.get(url + "/stats", timeout=10).json()
        assert (stats["received"], stats["unique_processed"], stats["duplicate_dropped"]) == (
            total, len(sent), total - len(sent))
        assert stats["topics"] == dict(Counter(topic for topic, _ in sent))


@contextlib.contextmanager
def write_lock_held_outside(db):
    """Hold the writers' lock from outside the server: the flock on <db>.lock for SQLite,
    the advisory lock on the database for PostgreSQL."""
    if isinstance(db, str):
        import psycopg

        from app.store.postgresql import WRITE_LOCK

        with psycopg.connect(db, autocommit=True) as conn:
            conn.execute("SELECT pg_advisory_lock(%s)", (WRITE_LOCK,))
            yield
            conn.execute("SELECT pg_advisory_unlock(%s)", (WRITE_LOCK,))
        return
    with open(f"{db}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
        fcntl.flock(lock, fcntl.LOCK_UN)


def publish_large_events(url: str, count: int, size: int = 16_000) -> None:
    """Store count events whose payloads take size bytes each (a 16 MB /events page for
    1000 of the default size), in batches of 250."""
    for start in range(0, count, 250):
        batch = [event(f"big-{n}", payload={"x": "y" * size})
                 for n in range(start, min(start + 250, count))]
        answer = requests.post(url + "/publish", json=batch, timeout=120)
        assert answer.status_code == 200, answer.text


def raw_get(port: int, target: str, receive_buffer: int = 4096) -> socket.socket:
    """Send GET target from a socket with a small receive buffer on 127.0.0.1:port, and
    return it: the caller reads the answer at its own pace, or not at all."""
    sock = socket.socket()
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        sock.settimeout(30)
        sock.connect(("127.0.0.1", port))
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    except OSError:
        sock.close()
        raise
    return sock


def free_port() -> int:
    """Return a loopback port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class GunicornServer:
    """A real gunicorn process group serving the aggregator on a loopback port."""

    def __init__(self, db: Path | str, log_path: Path, *, workers: int = 2, writers: int = 1,
                 threads: int = 8, env: dict | None = None):
        self.db = db
        self.log_path = log_path
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # The server's own temporary files (its metrics directory) go in the test's
        # directory: one killed with SIGKILL cannot remove them, and /tmp would keep them.
        self.tmpdir = log_path.with_suffix(".tmp")
        self.tmpdir.mkdir(exist_ok=True)
        self.env = {**os.environ, "DATABASE_URL": database_url(db), "TMPDIR": str(self.tmpdir),
                    "WEB_CONCURRENCY": str(workers), "AGGREGATOR_WRITERS": str(writers),
                    "AGGREGATOR_THREADS": str(threads), **(env or {})}
        self.proc: subprocess.Popen | None = None

    def start(self, wait: float = 20.0, path: str = "/health") -> GunicornServer:
        """Start gunicorn in its own process group and wait until path answers 200."""
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gunicorn", "--config", "app/gunicorn.conf.py",
                 "--bind", f"127.0.0.1:{self.port}", "app:create_app()"],
                cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited with {self.proc.returncode}: "
                                   f"{self.log_path.read_text()[-2000:]}")
            try:
                if requests.get(self.url + path, timeout=1).status_code == 200:
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"gunicorn did not become healthy: {self.log_path.read_text()[-2000:]}")

    def log_records(self) -> list[dict]:
        """Return the server's JSON log lines so far, parsed (other lines are skipped)."""
        return [json.loads(line) for line in self.log_path.read_text().splitlines()
                if line.startswith("{")]

    def messages(self, prefix: str = "") -> list[str]:
        """Return the messages of the server's log records that start with prefix."""
        return [r["message"] for r in self.log_records() if r["message"].startswith(prefix)]

    def reload(self, workers_before: int) -> None:
        """Send SIGHUP to the master; return once its new workers have booted and the
        workers_before it had have exited."""
        booted, exited = len(self.messages("Booting worker")), len(self.messages("Worker exiting"))
        self.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: len(self.messages("Booting worker")) >= booted + workers_before
                 and len(self.messages("Worker exiting")) >= exited + workers_before, 40,
                 "the reload's new workers", interval=0.2)

    def terminate(self, timeout: float = 40.0) -> int:
        """Send SIGTERM to the master and return its exit code."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        """SIGKILL the whole process group (master and workers), if still there."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)


def probe_every_worker(server, workers: int = 2) -> list[requests.Response]:
    """Probe readiness on new connections, 8 at a time, until every worker has answered;
    return the answers (a load balancer's probe lands on whichever worker accepts it)."""
    def probe(_):
        return requests.get(server.url + "/health/ready", timeout=5)

    answers, pids, seen = [], set(), len(server.log_records())
    with ThreadPoolExecutor(8) as pool:
        for _ in range(10):
            answers += pool.map(probe, range(40))
            pids = {record["pid"] for record in server.log_records()[seen:]
                    if record.get("path") == "/health/ready"}
            if len(pids) == workers:
                return answers
    raise AssertionError(f"400 probes reached only workers {pids}: the check proves nothing")
