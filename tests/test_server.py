"""The aggregator under a real gunicorn: concurrency, restarts, crashes, start-up checks."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from app.config import _VARIABLES as config_variables
from app.config import from_env
from tests.helpers import (
    ROOT,
    GunicornServer,
    assert_counters_match_the_table,
    assert_each_key_once_with_exact_counts,
    event,
    free_port,
    probe_every_worker,
    publish_overlapping,
    query,
    table_keys,
    wait_for,
)
from tests.postgres import PostgresServer, pg_bin


def stats(url: str) -> dict:
    return requests.get(url + "/stats", timeout=10).json()


def load(url: str, worker: int, size: int, stop: threading.Event, acknowledged: list) -> None:
    """Publish fresh batches until stopped or the server goes; record what got a 200."""
    with requests.Session() as session:
        for n in range(10_000):
            if stop.is_set():
                return
            batch = [event(f"{worker}-{n}-{i}") for i in range(size)]
            try:
                response = session.post(url + "/publish", json=batch, timeout=10)
            except requests.RequestException:
                return
            if response.status_code == 200:
                acknowledged.extend((e["topic"], e["event_id"]) for e in batch)


def test_concurrent_overlapping_publishers_store_each_key_once(gunicorn, db):
    server = gunicorn(workers=2, writers=2)
    sent, results, errors = publish_overlapping(
        [server.url], [f"id-{i}" for i in range(400)], batches=15, max_size=40,
        topics=("a", "b"))
    assert errors == []
    assert_each_key_once_with_exact_counts(db, [server.url], sent, results)


def test_sigterm_and_restart_keep_events_and_counters(gunicorn, db):
    server = gunicorn()
    batch = [event(str(i), topic=f"t{i % 3}") for i in range(300)]
    assert requests.post(server.url + "/publish", json=batch, timeout=10).status_code == 200
    before = stats(server.url)
    assert any(server.tmpdir.iterdir()), "the server made its metrics directory elsewhere"
    assert server.terminate() == 0
    # A server that made its own metrics directory removes it when it stops.
    assert list(server.tmpdir.iterdir()) == []
    restarted = gunicorn()
    after = stats(restarted.url)
    for key in ("received", "unique_processed", "duplicate_dropped", "rejected", "topics"):
        assert after[key] == before[key]
    again = requests.post(restarted.url + "/publish", json=batch, timeout=10).json()
    assert again["unique_processed"] == 0 and again["duplicate_dropped"] == 300
    assert len(table_keys(db)) == 300
    assert stats(restarted.url)["received"] == 600


@contextlib.contextmanager
def publishing(url: str, clients: int, size: int):
    """Publish from `clients` threads while the block runs (each stops when the server goes);
    yield the list of keys that got a 200, which fills meanwhile."""
    acknowledged, stop = [], threading.Event()
    threads = [threading.Thread(target=load, args=(url, w, size, stop, acknowledged))
               for w in range(clients)]
    for thread in threads:
        thread.start()
    try:
        yield acknowledged
    finally:
        stop.set()
        for thread in threads:
            thread.join()


def assert_every_acknowledged_key_stored(db, acknowledged: list) -> None:
    """Some events were acknowledged, each is stored, and the counters match the table."""
    assert acknowledged
    assert set(acknowledged) <= set(table_keys(db))
    assert_counters_match_the_table(db)


def test_sigterm_commits_requests_in_flight_and_exits_zero(gunicorn, db):
    server = gunicorn()
    with publishing(server.url, clients=4, size=50) as acknowledged:
        time.sleep(1.5)
        started = time.monotonic()
        assert server.terminate() == 0
        assert time.monotonic() - started < 30, "SIGTERM must finish within graceful_timeout"
    assert_every_acknowledged_key_stored(db, acknowledged)


def test_ctrl_c_stops_every_worker_through_its_exit_hook(gunicorn, db):
    """Ctrl-C in a terminal sends SIGINT to the whole foreground process group: the master
    and every worker at once. Each worker must still leave through its exit hook, which
    commits what is queued: under gunicorn's own SIGINT, most workers skipped it."""
    server = gunicorn(workers=2)
    with publishing(server.url, clients=8, size=200) as acknowledged:
        time.sleep(1.5)
        os.killpg(server.proc.pid, signal.SIGINT)
        assert server.proc.wait(40) == 0
    exited = {record["pid"] for record in server.log_records()
              if record.get("message", "").startswith("Worker exiting")}
    assert len(exited) == 2, "a worker stopped without running its exit hook"
    assert_every_acknowledged_key_stored(db, acknowledged)


def test_sigkill_mid_load_loses_no_acknowledged_event(gunicorn, db):
    server = gunicorn(workers=2, writers=2)
    with publishing(server.url, clients=8, size=100) as acknowledged:
        time.sleep(2.0)
        os.killpg(server.proc.pid, signal.SIGKILL)
    server.proc.wait(10)
    assert len(acknowledged) >= 1000
    restarted = gunicorn()
    keys = table_keys(db)
    assert len(keys) == len(set(keys))
    assert set(acknowledged) <= set(keys)
    now = stats(restarted.url)
    assert now["unique_processed"] == len(keys)
    assert now["received"] == now["unique_processed"] + now["duplicate_dropped"]
    assert now["topics"] == {"orders": len(keys)}


@pytest.mark.parametrize("variable,value", [
    ("AGGREGATOR_MAX_BATCH", "many"), ("AGGREGATOR_WRITERS", "0"),
    ("DATABASE_URL", "mysql://x"), ("AGGREGATOR_COMMIT_TIMEOUT", "-1"),
    ("AGGREGATOR_TRUSTED_PROXIES", "-1"), ("AGGREGATOR_RETENTION", "forever"),
    ("AGGREGATOR_RETENTION", "0d"), ("AGGREGATOR_RETENTION", "9" * 400 + "d"),
    ("AGGREGATOR_MAX_PAGE_BYTES", "0"),
    ("AGGREGATOR_BODY_BUDGET", "-1"), ("AGGREGATOR_BODY_TIMEOUT", "0"),
    ("AGGREGATOR_HEADER_TIMEOUT", "soon"), ("AGGREGATOR_SEND_TIMEOUT", "0"),
    ("AGGREGATOR_METRICS_TOPICS", "-1"),
    # Past what the run-time waits and LIMITs take (a 500 for every /publish or /metrics).
    ("AGGREGATOR_COMMIT_TIMEOUT", "1e30"), ("AGGREGATOR_HEADER_TIMEOUT", "86401"),
    ("AGGREGATOR_SEND_TIMEOUT", "1e30"), ("AGGREGATOR_METRICS_TOPICS", "9" * 20),
    ("AGGREGATOR_SEARCH_SCAN", "9" * 20), ("AGGREGATOR_MAX_BODY", str(2**31)),
    # Secrets: the line names the variable but does not repeat them.
    ("DATABASE_URL", "postgresql://user:s3cret@/dbname"),
    ("DATABASE_URL", "mysql://host/db?password=s3cret"),
    ("DATABASE_URL", "user:s3cret@host/db"),
    ("AGGREGATOR_API_TOKEN", "s3cret with spaces"),
])
def test_bad_setting_stops_startup_with_one_line_naming_it(tmp_path, variable, value):
    result = gunicorn_that_exits(tmp_path, "127.0.0.1:1", **{variable: value})
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and variable in lines[0] and "Traceback" not in result.stderr
    assert "s3cret" not in result.stderr


@pytest.mark.parametrize("variable,content,why", [
    ("AGGREGATOR_API_TOKEN", None, "cannot be read: No such file or directory"),
    ("AGGREGATOR_READ_TOKEN", "", "is empty"),
    ("AGGREGATOR_READ_TOKEN", "\n", "is empty"),
    ("AGGREGATOR_API_TOKEN", "s3cret one\n", "the content must not contain spaces"),
    ("AGGREGATOR_API_TOKEN", "s3cret\nsecond line\n", "the content must not contain"),
    ("AGGREGATOR_API_TOKEN", "s3cret,,other", "the content must be one token, or several"),
    ("AGGREGATOR_API_TOKEN", b"\xffs3cret", "is not UTF-8 text"),
    ("AGGREGATOR_API_TOKEN", "s3cret" * 20000, "is longer than 65536 characters"),
    ("DATABASE_URL", "mysql://u:s3cret@h/db\n", "the content must be a sqlite:/// or"),
    ("DATABASE_URL", "both", "DATABASE_URL and DATABASE_URL_FILE are both set"),
])
def test_a_bad_setting_file_stops_startup_with_one_line_naming_it(tmp_path, variable, content,
                                                                  why):
    secret = tmp_path / "secret"
    if isinstance(content, bytes):
        secret.write_bytes(content)
    elif content is not None and content != "both":
        secret.write_text(content)
    env = {f"{variable}_FILE": str(secret)}
    if content == "both":
        secret.write_text(f"sqlite:///{tmp_path}/d.db")  # set in the environment as well
    else:
        env["DATABASE_URL"] = ""
    result = gunicorn_that_exits(tmp_path, "127.0.0.1:1", **env)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{variable}_FILE" in lines[0] and why in lines[0], lines
    assert "Traceback" not in result.stderr and "s3cret" not in result.stderr


@pytest.mark.backends("sqlite")
def test_sighup_moves_to_a_database_that_opens_and_keeps_the_one_in_force_otherwise(
        gunicorn, tmp_path):
    """A DATABASE_URL_FILE that names another database (a rotated password, a move) is
    taken on SIGHUP if that database opens; one that does not open keeps the server up on
    the database in force, where a worker that cannot open it would stop gunicorn."""
    url_file, first, second = tmp_path / "url", tmp_path / "first.db", tmp_path / "second.db"
    url_file.write_text(f"sqlite:///{first}\n")
    server = gunicorn(workers=2, env={"DATABASE_URL": "", "DATABASE_URL_FILE": str(url_file)})

    def publish(event_id: str) -> None:
        response = requests.post(server.url + "/publish", json=[event(event_id)], timeout=10)
        assert response.status_code == 200

    publish("a")
    url_file.write_text(f"sqlite:///{first}/x.db\n")  # under a file: cannot be made
    server.reload(workers_before=2)
    assert server.proc.poll() is None
    assert server.messages("aggregator: database unavailable on reload, the settings in "
                           "force are kept: ")
    publish("b")
    url_file.write_text(f"sqlite:///{second}\n")
    server.reload(workers_before=2)
    publish("c")
    assert server.terminate() == 0
    assert [key[1] for key in table_keys(first)] == ["a", "b"]
    assert [key[1] for key in table_keys(second)] == ["c"]


@pytest.mark.backends("sqlite")
def test_start_up_logs_the_settings_in_force_and_no_secret(gunicorn, db):
    """One line in the master's log says what the server runs with, gunicorn's flags
    included (--workers beats WEB_CONCURRENCY), and never a token."""
    server = gunicorn(workers=2, env={"AGGREGATOR_API_TOKEN": "w-SECRET-77",
                                      "AGGREGATOR_RETENTION": "30d", "AGGREGATOR_WRITERS": "2",
                                      "GUNICORN_CMD_ARGS": "--workers 3"})
    lines = server.messages("aggregator 0.1.0: ")
    assert lines == [f"aggregator 0.1.0: 3 workers of 8 threads; database sqlite:///{db}; 2 "
                     "writers and a queue of 64 batches per worker; max batch 10000 events, "
                     "max body 16777216 bytes; retention 30 days; publish token set, read "
                     "token unset"]
    assert "SECRET" not in server.log_path.read_text()


def test_the_settings_line_masks_a_database_urls_credentials():
    for url in ("postgresql://app:s3cret@db:5432/events",
                "postgresql://db/events?password=s3cret&sslmode=require"):
        line = from_env({"DATABASE_URL": url, "AGGREGATOR_READ_TOKEN": "r-s3cret"}).summary()
        assert "s3cret" not in line and "read token set" in line and "db" in line


def test_every_setting_is_in_the_readme_configuration_table():
    readme = (ROOT / "README.md").read_text()
    table = readme.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `([A-Z_]+)` \|", table, re.MULTILINE))
    assert sorted(set(config_variables) - documented) == []


def test_start_waits_for_a_postgresql_that_comes_up_later(tmp_path):
    if pg_bin() is None:
        pytest.skip("no PostgreSQL server binaries")
    later = PostgresServer(free_port())
    starting = threading.Timer(1.0, later.start)
    server = GunicornServer(later.url(), tmp_path / "gunicorn.log")
    try:
        starting.start()
        server.start(wait=90)
        assert requests.post(server.url + "/publish", json=[event("a")], timeout=10).ok
        waits = [r for r in server.log_records() if r["level"] == "warning"
                 and r["message"].startswith("waiting for the database")]
        assert waits, "the server did not wait: PostgreSQL was already up"
    finally:
        server.kill()
        starting.join()
        later.stop()


def test_start_gives_up_on_a_database_that_never_answers_with_one_line(tmp_path):
    started = time.monotonic()
    result = gunicorn_that_exits(tmp_path, f"127.0.0.1:{free_port()}",
                                 DATABASE_URL=f"postgresql://u@127.0.0.1:{free_port()}/db",
                                 AGGREGATOR_START_TIMEOUT="2")
    assert time.monotonic() - started < 20
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("aggregator: database unavailable: ")
    assert "Connection refused" in lines[0]
    assert "waiting for the database" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_gunicorns_own_tls_is_refused_at_start_with_one_line(tmp_path):
    """The worker's limits on slow clients act on the plain socket, which gunicorn wraps in
    TLS later: with --certfile, 2 clients stalled in their headers held both threads and
    /health waited 30 s and more, with AGGREGATOR_HEADER_TIMEOUT=2."""
    result = gunicorn_that_exits(
        tmp_path, f"127.0.0.1:{free_port()}",
        GUNICORN_CMD_ARGS=f"--certfile {tmp_path}/cert.pem --keyfile {tmp_path}/key.pem")
    lines = result.stderr.strip().splitlines()
    assert lines == ["aggregator: gunicorn's own TLS (--certfile, --keyfile) is not supported: "
                     "the limits on slow clients work on plain connections only; terminate "
                     "TLS in a reverse proxy in front"], result.stderr[-2000:]
    assert "Traceback" not in result.stdout + result.stderr


def test_port_in_use_stops_startup_and_leaves_no_temporary_files(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        host, port = taken.getsockname()
        result = gunicorn_that_exits(tmp_path, f"{host}:{port}")
    assert "Address already in use" in result.stdout


def gunicorn_that_exits(tmp_path, bind: str, **env: str) -> subprocess.CompletedProcess:
    """Run gunicorn, expecting it to stop start-up; check it removed its metrics directory."""
    own_tmp = tmp_path / "tmp"
    own_tmp.mkdir()
    env = {**os.environ, "DATABASE_URL": f"sqlite:///{tmp_path}/d.db", "TMPDIR": str(own_tmp),
           **env}
    result = subprocess.run(
        [sys.executable, "-m", "gunicorn", "--config", "app/gunicorn.conf.py",
         "--bind", bind, "app:create_app()"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert list(own_tmp.iterdir()) == [], "the metrics directory it made is left behind"
    return result


def hold_write_lock(db_path):
    """Take SQLite's write lock from outside the server, so its writers stall."""
    conn = sqlite3.connect(db_path, isolation_level=None)
    conn.execute("BEGIN EXCLUSIVE")
    return conn


def post_in_threads(url: str, batches: list[list[dict]]) -> list[requests.Response]:
    responses: list = [None] * len(batches)

    def post(i: int) -> None:
        responses[i] = requests.post(url + "/publish", json=batches[i], timeout=60)

    threads = [threading.Thread(target=post, args=(i,)) for i in range(len(batches))]
    for thread in threads:
        thread.start()
        time.sleep(0.05)
    return threads, responses


@pytest.mark.backends("sqlite")  # holds the SQLite write lock / reads the file
def test_full_queue_answers_429_with_retry_after_and_stores_nothing_of_it(gunicorn, db_path):
    server = gunicorn(workers=1, env={"AGGREGATOR_QUEUE_SIZE": "1"})
    lock = hold_write_lock(db_path)
    threads, responses = post_in_threads(server.url, [[event(f"q{i}")] for i in range(6)])
    time.sleep(1.0)
    lock.execute("ROLLBACK")
    lock.close()
    for thread in threads:
        thread.join()
    refused = [i for i, r in enumerate(responses) if r.status_code == 429]
    accepted = [i for i, r in enumerate(responses) if r.status_code == 200]
    assert refused and accepted and len(refused) + len(accepted) == 6
    assert all(responses[i].headers["Retry-After"] == "1" for i in refused)
    assert all(responses[i].json()["error"] == "queue_full" for i in refused)
    assert sorted(table_keys(db_path)) == sorted(("orders", f"q{i}") for i in accepted)
    assert stats(server.url)["received"] == len(accepted)
    # Recovered: the refused batches go through on retry, and nothing acknowledged is lost.
    for i in refused:
        assert requests.post(server.url + "/publish", json=[event(f"q{i}")],
                             timeout=10).status_code == 200
    assert sorted(table_keys(db_path)) == sorted(("orders", f"q{i}") for i in range(6))
    now = stats(server.url)
    assert (now["received"], now["unique_processed"], now["duplicate_dropped"]) == (6, 6, 0)


@pytest.mark.backends("sqlite")  # holds the SQLite write lock / reads the file
def test_no_room_in_the_body_budget_answers_429_busy_and_stores_nothing_of_it(gunicorn,
                                                                             db_path):
    """A request holds its body's bytes of AGGREGATOR_BODY_BUDGET until its commit is
    answered; the ones that find no room for 5 s get a 429, their bodies unread."""
    batches = [[event(f"b{i}-{n}") for n in range(4)] for i in range(3)]
    size = len(json.dumps(batches[0]).encode())
    server = gunicorn(workers=1, env={"AGGREGATOR_BODY_BUDGET": str(size)})
    lock = hold_write_lock(db_path)
    threads, responses = post_in_threads(server.url, batches)
    time.sleep(5.5)
    assert [r if r is None else r.status_code for r in responses] == [None, 429, 429]
    lock.execute("ROLLBACK")
    lock.close()
    for thread in threads:
        thread.join()
    assert responses[0].status_code == 200
    for refused in responses[1:]:
        assert refused.headers["Retry-After"] == "1"
        assert refused.json()["error"] == "busy"
        assert "AGGREGATOR_BODY_BUDGET" in refused.json()["message"]
    assert sorted(table_keys(db_path)) == sorted(("orders", e["event_id"]) for e in batches[0])
    assert stats(server.url)["received"] == 4
    for batch in batches[1:]:  # with room again, a retry goes through
        assert requests.post(server.url + "/publish", json=batch, timeout=10).status_code == 200
    assert stats(server.url)["unique_processed"] == 12


@pytest.mark.backends("sqlite")  # holds the SQLite write lock / reads the file
def test_commit_that_takes_too_long_is_503_and_a_retry_is_safe(gunicorn, db_path):
    server = gunicorn(workers=1, env={"AGGREGATOR_COMMIT_TIMEOUT": "1"})
    lock = hold_write_lock(db_path)
    slow = requests.post(server.url + "/publish", json=[event("slow")], timeout=30)
    lock.execute("ROLLBACK")
    lock.close()
    assert slow.status_code == 503 and slow.json()["error"] == "commit_timeout"
    assert slow.headers["Retry-After"]
    retry = requests.post(server.url + "/publish", json=[event("slow")], timeout=30).json()
    assert retry["received"] == 1
    assert table_keys(db_path) == [("orders", "slow")]
    now = stats(server.url)
    assert now["unique_processed"] == 1
    assert now["received"] == now["unique_processed"] + now["duplicate_dropped"]


def poll_stats(url: str, until, seconds: float = 15) -> dict:
    """Poll /stats until until(stats) holds, within the seconds given; return the stats."""
    return wait_for(lambda: until(current := stats(url)) and current, seconds,
                    "/stats to match", interval=0.1)


def test_events_received_longer_ago_than_the_retention_expire(gunicorn, db):
    """AGGREGATOR_RETENTION deletes the events received longer ago and counts them in
    expired; topic counts stay totals. Within the retention a re-send is a duplicate, past
    it the event is stored again."""
    server = gunicorn(env={"AGGREGATOR_RETENTION": "5s"})
    old = [event(f"old-{n}", topic="old") for n in range(3)]
    new = [event(f"new-{n}", topic="new") for n in range(2)]
    assert requests.post(server.url + "/publish", json=old, timeout=10).status_code == 200
    time.sleep(5.5)
    assert requests.post(server.url + "/publish", json=new, timeout=10).status_code == 200
    after = poll_stats(server.url, lambda s: s["expired"] == 3)  # looks every 1.25 s
    assert (after["received"], after["unique_processed"], after["topics"]) == (
        5, 5, {"new": 2, "old": 3})
    assert table_keys(db) == [("new", "new-0"), ("new", "new-1")]
    page = requests.get(server.url + "/events", timeout=10).json()["events"]
    assert [e["event_id"] for e in page] == ["new-0", "new-1"]
    again = requests.post(server.url + "/publish", json=[old[0], new[0]], timeout=10).json()
    assert (again["unique_processed"], again["duplicate_dropped"]) == (1, 1)
    assert table_keys(db) == [("new", "new-0"), ("new", "new-1"), ("old", "old-0")]
    assert_counters_match_the_table(db)
    metrics = requests.get(server.url + "/metrics", timeout=10).text
    assert "aggregator_events_expired_total 3.0" in metrics
    html = requests.get(server.url + "/events", headers={"Accept": "text/html"}, timeout=10).text
    assert "<dt>Expired</dt><dd>3</dd>" in html


def test_a_retention_longer_than_the_calendar_keeps_every_event(gunicorn, db):
    """1,000,000 days reach back before year 1: that cutoff stopped every writer."""
    server = gunicorn(env={"AGGREGATOR_RETENTION": "1000000d"})
    batch = [event("a"), event("b")]
    assert requests.post(server.url + "/publish", json=batch, timeout=10).status_code == 200
    time.sleep(1.5)  # the writers look for expired events at once, then every 10 s
    assert requests.get(server.url + "/health", timeout=10).status_code == 200
    assert (stats(server.url)["expired"], table_keys(db)) == (0, [("orders", "a"),
                                                                   ("orders", "b")])


def test_retention_never_deletes_the_newest_event_so_seq_goes_on(gunicorn, db):
    """SQLite hands out max(seq) + 1: were the last event deleted, seq would start again at
    1 and readers holding a cursor would skip the next events."""
    server = gunicorn(env={"AGGREGATOR_RETENTION": "1s"})
    first = [event("a"), event("b")]
    assert requests.post(server.url + "/publish", json=first, timeout=10).status_code == 200
    poll_stats(server.url, lambda s: s["expired"] == 1)
    time.sleep(1.5)  # b is past the retention too, and was looked at several times
    assert stats(server.url)["expired"] == 1 and table_keys(db) == [("orders", "b")]
    assert requests.post(server.url + "/publish", json=[event("c")],
                         timeout=10).status_code == 200
    poll_stats(server.url, lambda s: s["expired"] == 2)
    assert query(db, "SELECT seq, event_id FROM events") == [(3, "c")]
    assert_counters_match_the_table(db)


@pytest.mark.backends("sqlite")  # holds the SQLite write lock / reads the file
def test_database_is_wal_with_the_dedup_key(gunicorn, db_path):
    gunicorn(workers=1)
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        conn.execute("INSERT INTO events (topic, event_id, ts, timestamp, source, payload,"
                     " received_at) VALUES ('t', 'e', 0, 'x', 's', '{}', 'r')")
        with pytest.raises(sqlite3.IntegrityError):
            conn.execute("INSERT INTO events (topic, event_id, ts, timestamp, source, payload,"
                         " received_at) VALUES ('t', 'e', 1, 'y', 's', '{}', 'r')")
        conn.rollback()


def test_a_keep_alive_publisher_loads_every_worker(gunicorn):
    """A publisher's connections stay open between requests, and each stays with the worker
    that accepted it. Each is closed after KEEPALIVE_REQUESTS requests, so its client
    reconnects and the new connection goes to whichever worker accepts first: the requests
    of a publisher with several connections reach every worker.

    (One connection used by one request at a time cannot show it: with no other work, the
    same worker won all 50 reconnections of 1000 requests in about one run of four.)"""
    connections, requests_each = 4, 100
    server = gunicorn(workers=2)
    probe_every_worker(server)  # both workers are up and accepting

    def connection(number: int) -> int:
        closes = 0
        with requests.Session() as session:
            for n in range(requests_each):
                answer = session.post(server.url + "/publish", timeout=10, json=[
                    event(f"c{number}-{n}-{i}") for i in range(50)])
                assert answer.status_code == 200
                closes += answer.headers.get("Connection", "").lower() == "close"
        return closes

    with ThreadPoolExecutor(connections) as pool:
        closes = list(pool.map(connection, range(connections)))
    assert closes == [requests_each // 20] * connections  # KEEPALIVE_REQUESTS
    pids = Counter(entry["pid"] for entry in server.log_records()
                   if entry.get("path") == "/publish")
    assert sum(pids.values()) == connections * requests_each and len(pids) == 2, pids


def test_writer_threads_are_named_in_the_kernel(gunicorn):
    """ps -L, top -H and /proc/PID/task/TID show each worker's writer threads by name."""
    server = gunicorn(workers=2, writers=2)
    deadline = time.monotonic() + 15
    while True:  # /health answers once one worker is up; the other may still be booting
        workers = [int(entry) for entry in os.listdir("/proc") if entry.isdigit()
                   and _parent_pid(int(entry)) == server.proc.pid]
        names = [Counter(_thread_names(pid)) for pid in workers]
        if len(workers) == 2 and all(n["writer-0"] == n["writer-1"] == 1 for n in names):
            break
        assert time.monotonic() < deadline, (workers, names)
        time.sleep(0.1)


def _parent_pid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return int(stat.read().rsplit(")", 1)[1].split()[1])
    except OSError:
        return None


def _thread_names(pid: int) -> list[str]:
    names = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as comm:
                names.append(comm.read().strip())
        except OSError:  # the thread ended meanwhile
            pass
    return names


def test_a_workers_first_request_does_not_import_the_idna_codec(tmp_path):
    """werkzeug's routing encodes the host with the idna codec: the app loads it, so that a
    worker's first request does not (3-4 ms of it; bench/RESULTS.md, Growth)."""
    script = ("import sys\n"
              "from app import create_app\n"
              "client = create_app().test_client()\n"
              "before = set(sys.modules)\n"
              "assert client.get('/stats', base_url='http://127.0.0.1:8080').status_code == 200\n"
              "print(sorted({'encodings.idna', 'stringprep'} & (set(sys.modules) - before)))\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                            text=True, timeout=60,
                            env={**os.environ, "DATABASE_URL": f"sqlite:///{tmp_path}/e.db"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"
