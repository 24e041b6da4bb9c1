"""Real faults under a real gunicorn: a full database, a full disk, writers that cannot start,
and a batch that breaks its group commit."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import threading
import time

import pytest
import requests

from app.ingest import FAILURE_MEMORY_SECONDS, CommitHealth, Ingestor
from app.store import Batch, SQLiteStore, StoreError
from tests.helpers import (
    assert_counters_match_the_table,
    db_counters,
    event,
    probe_every_worker,
    table_keys,
)

# Quotas, full disks and file locks of SQLite (PostgreSQL's are the server's business).
pytestmark = pytest.mark.backends("sqlite")


def publish(url: str, batch: list[dict]) -> requests.Response:
    return requests.post(url + "/publish", json=batch, timeout=30)


def bulky(prefix: str, n: int) -> list[dict]:
    """Return n events of about 2 KB each."""
    return [event(f"{prefix}-{i}", payload={"blob": f"{prefix}{i}" + "x" * 2000})
            for i in range(n)]


def fill_until_refused(url: str, prefix: str, limit: int = 400) -> tuple[list[str], list]:
    """Publish bulky batches until one is refused; return the acknowledged ids and the refusal."""
    acknowledged = []
    for n in range(limit):
        batch = bulky(f"{prefix}{n}", 50)
        response = publish(url, batch)
        if response.status_code != 200:
            return acknowledged, (batch, response)
        acknowledged += [e["event_id"] for e in batch]
    raise AssertionError(f"the database never filled up after {limit} batches")


def wait_for_status(url: str, status: int, timeout: float = 15.0) -> requests.Response:
    deadline = time.monotonic() + timeout
    while True:
        response = requests.get(url, timeout=5)
        if response.status_code == status or time.monotonic() > deadline:
            return response
        time.sleep(0.2)


def test_database_over_its_quota_answers_503_stays_up_and_recovers_when_lifted(
        gunicorn, db_path):
    # AGGREGATOR_MAX_DB_MB sets PRAGMA max_page_count on every write connection:
    # past it SQLite itself refuses the commit with SQLITE_FULL.
    server = gunicorn(workers=1, env={"AGGREGATOR_MAX_DB_MB": "1"})
    acknowledged, (refused_batch, refused) = fill_until_refused(server.url, "q")
    assert acknowledged
    assert refused.status_code == 503 and refused.headers["Retry-After"]
    assert refused.json() == {"error": "database_full",
                              "message": "The database is full; nothing of this request "
                                         "was stored."}
    assert requests.get(server.url + "/health/live", timeout=5).status_code == 200
    ready = requests.get(server.url + "/health/ready", timeout=5)
    assert ready.status_code == 503 and "full" in ready.json()["checks"]["last_commit"]
    assert requests.get(server.url + "/stats", timeout=5).json()["unique_processed"] == len(
        acknowledged)
    stored = {event_id for _, event_id in table_keys(db_path)}
    assert set(acknowledged) <= stored
    assert not stored & {e["event_id"] for e in refused_batch}
    assert_counters_match_the_table(db_path)

    assert server.terminate() == 0
    lifted = gunicorn(workers=2)
    retried = publish(lifted.url, refused_batch)
    assert retried.status_code == 200 and retried.json()["unique_processed"] == 50
    assert requests.get(lifted.url + "/health/ready", timeout=5).status_code == 200
    assert len(table_keys(db_path)) == len(acknowledged) + 50
    assert_counters_match_the_table(db_path)


@pytest.fixture
def small_disk(tmp_path):
    """Mount a 4 MiB tmpfs: a real file system that really runs out of space."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        if os.environ.get("CI"):
            pytest.fail(f"CI runs as root and can mount a tmpfs: {result.stderr}")
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_answers_503_and_recovers_live_when_space_is_freed(gunicorn, small_disk):
    db_path = small_disk / "dedup.db"
    server = gunicorn(workers=1, db=db_path)
    assert publish(server.url, bulky("before", 20)).status_code == 200
    # Leave about 300 KB free: a few batches fit, then writes meet ENOSPC.
    ballast = small_disk / "ballast"
    free = shutil.disk_usage(small_disk).free
    ballast.write_bytes(b"\0" * max(0, free - 300_000))
    acknowledged, (refused_batch, refused) = fill_until_refused(server.url, "d")
    assert refused.status_code == 503 and refused.json()["error"] == "database_full"
    assert requests.get(server.url + "/health/live", timeout=5).status_code == 200
    ready = requests.get(server.url + "/health/ready", timeout=5)
    assert ready.status_code == 503 and "full" in ready.json()["checks"]["last_commit"]
    assert requests.get(server.url + "/events?limit=5", timeout=5).status_code == 200

    ballast.unlink()
    retried = publish(server.url, refused_batch)
    assert retried.status_code == 200 and retried.json()["unique_processed"] == 50
    assert wait_for_status(server.url + "/health/ready", 200).status_code == 200
    stored = {event_id for _, event_id in table_keys(db_path)}
    assert set(acknowledged) | {e["event_id"] for e in refused_batch} <= stored
    assert_counters_match_the_table(db_path)


def refused_on_a_full_disk(gunicorn, small_disk, workers: int, prefix: str):
    """Start a server on the small disk, leave it 100 KB, and publish until a batch is
    refused; return the server, the ballast file and the refused batch and answer."""
    server = gunicorn(workers=workers, db=small_disk / "dedup.db")
    ballast = small_disk / "ballast"
    ballast.write_bytes(b"\0" * max(0, shutil.disk_usage(small_disk).free - 100_000))
    _, refusal = fill_until_refused(server.url, prefix)
    return server, ballast, refusal


def test_idle_server_is_ready_again_a_few_seconds_after_a_failed_commit(gunicorn, small_disk):
    server, ballast, (_, refused) = refused_on_a_full_disk(gunicorn, small_disk, 1, "i")
    assert refused.status_code == 503
    assert requests.get(server.url + "/health/ready", timeout=5).status_code == 503
    ballast.unlink()
    # No traffic comes to clear the error: readiness must not stay 503 for ever, or a
    # load balancer would never send the request that proves the disk has room again.
    assert wait_for_status(server.url + "/health/ready", 200).status_code == 200


def test_readiness_is_the_servers_whichever_worker_committed(gunicorn, small_disk):
    # Two workers: a commit that one of them fails is reported by both, and a commit that
    # either of them then makes clears it for both, well before the failure is forgotten.
    server, ballast, (refused_batch, refused) = refused_on_a_full_disk(gunicorn, small_disk,
                                                                      2, "s")
    failed_at = time.monotonic()
    assert refused.status_code == 503
    answers = probe_every_worker(server)
    assert {answer.status_code for answer in answers} == {503}
    assert all("full" in answer.json()["checks"]["last_commit"] for answer in answers)

    ballast.unlink()
    assert publish(server.url, refused_batch).status_code == 200
    answers = probe_every_worker(server)
    assert {answer.status_code for answer in answers} == {200}
    assert time.monotonic() - failed_at < FAILURE_MEMORY_SECONDS, "too slow to prove anything"


def test_a_failed_commit_left_by_an_earlier_run_is_forgotten_at_start(gunicorn, tmp_path):
    # A server SIGKILLed just after a failed commit, started again at once on the same
    # shared directory: its record is fresh, but it is not this run's.
    shared = tmp_path / "shared"
    shared.mkdir()
    CommitHealth(str(shared)).failed(StoreError("database is full"))
    server = gunicorn(workers=2, env={"PROMETHEUS_MULTIPROC_DIR": str(shared)})
    assert requests.get(server.url + "/health/ready", timeout=5).status_code == 200


def test_a_failure_that_cannot_be_shared_is_kept_in_memory(tmp_path):
    health = CommitHealth(str(tmp_path / "not-there"))
    health.failed(StoreError("database is full"))
    assert health.last_error == "database is full"
    health.succeeded()
    assert health.last_error is None


def test_a_failure_kept_in_memory_gives_way_to_a_later_shared_one(tmp_path):
    # The first failure cannot be written (a directory stands where the record goes), the
    # second can; then another worker commits and removes the record. The first failure is
    # history by then: it must not come back from this worker's memory.
    health, other_worker = CommitHealth(str(tmp_path)), CommitHealth(str(tmp_path))
    record = tmp_path / CommitHealth.FILE_NAME
    record.mkdir()
    (record / "in-the-way").touch()
    health.failed(StoreError("no space left on device"))
    assert health.last_error == "no space left on device"
    (record / "in-the-way").unlink()
    record.rmdir()
    health.failed(StoreError("database is full"))
    assert other_worker.last_error == "database is full"
    other_worker.succeeded()
    assert health.last_error is None
    assert other_worker.last_error is None


def test_writers_that_cannot_start_are_reported_and_replaced(gunicorn, db_path):
    # A directory where the write lock file belongs: every write connection fails to open,
    # as on a volume that is not writable yet.
    lock = db_path.parent / (db_path.name + ".lock")
    db_path.parent.mkdir(parents=True, exist_ok=True)
    lock.mkdir()
    server = gunicorn(workers=1, writers=2, wait_path="/health/live")
    ready = requests.get(server.url + "/health/ready", timeout=5)
    assert ready.status_code == 503
    assert "dead" in ready.json()["checks"]["writers"]
    assert "write lock" in ready.json()["checks"]["writers"]
    assert requests.get(server.url + "/health", timeout=5).status_code == 503
    start = time.monotonic()
    refused = publish(server.url, [event("early")])
    assert refused.status_code == 503 and refused.json()["error"] == "database_unavailable"
    assert time.monotonic() - start < 5, "with no writer running, a publish must not hang"

    lock.rmdir()
    assert wait_for_status(server.url + "/health/ready", 200).status_code == 200
    assert publish(server.url, [event("late")]).status_code == 200
    assert table_keys(db_path) == [("orders", "late")]
    assert "starting a new one" in server.log_path.read_text()


def test_a_batch_that_breaks_its_group_commit_fails_alone(tmp_path):
    # A hand-made batch whose row SQLite cannot bind (the API refuses such text earlier):
    # the writer must not fail the other batches of its group with it.
    store = SQLiteStore(str(tmp_path / "g.db"))
    ingestor = Ingestor(store, queue_size=8, writers=1, commit_timeout=30)
    row = ("t", "{}", 0, "2025-01-01T00:00:00Z", "s", "{}", "2025-01-01T00:00:01.000Z")
    good_first = Batch([("t", "a", *row[2:])])
    poison = Batch([("t", "b", *row[2:]), ("t", "\ud800", *row[2:])])
    good_after = Batch([("t", "c", *row[2:])])
    outcomes: dict[str, object] = {}

    def submit(name: str, batch: Batch) -> None:
        try:
            outcomes[name] = ingestor.submit(batch).unique_processed
        except StoreError as exc:
            outcomes[name] = exc

    blocker = sqlite3.connect(tmp_path / "g.db", isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    threads = [threading.Thread(target=submit, args=args) for args in
               (("first", good_first), ("poison", poison), ("after", good_after))]
    try:
        for thread in threads:
            thread.start()
            time.sleep(0.3)  # the first is taken by the writer; the other two queue together
        blocker.execute("ROLLBACK")
        for thread in threads:
            thread.join()
    finally:
        blocker.close()
        ingestor.close()
        store.close()
    assert outcomes["first"] == 1 and outcomes["after"] == 1
    assert isinstance(outcomes["poison"], StoreError)
    assert sorted(table_keys(tmp_path / "g.db")) == [("t", "a"), ("t", "c")]
    assert db_counters(tmp_path / "g.db")["received"] == 2
