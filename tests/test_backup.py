"""python -m app.backup: a consistent copy of a SQLite store, taken while it is written to."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import threading
from contextlib import closing

import pytest
import requests

from tests.helpers import (
    ROOT,
    assert_counters_match_the_table,
    db_counters,
    event,
    table_keys,
    wait_for,
)

pytestmark = pytest.mark.backends("sqlite")


def backup(db, dest, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "app.backup", str(dest)], cwd=ROOT,
                          env={**os.environ, "DATABASE_URL": f"sqlite:///{db}", **env},
                          capture_output=True, text=True, timeout=120)


def publish_until(url: str, stop: threading.Event, sent: list[int], batches: int = 2000):
    """Post batches of 200 (a quarter of them re-sent) until stop is set, or batches are sent."""
    with requests.Session() as session:
        for n in range(batches):
            if stop.is_set():
                return
            batch = [event(f"b{n}-{i}") for i in range(150)] + [event(f"b{n // 2}-{i}")
                                                                for i in range(50)]
            assert session.post(url + "/publish", json=batch, timeout=30).status_code == 200
            sent.append(n)


def test_a_backup_taken_under_load_is_one_commit_whole_and_serves_as_a_store(
        gunicorn, db, tmp_path):
    server = gunicorn(workers=2)
    stop, sent = threading.Event(), []
    load = [threading.Thread(target=publish_until, args=(server.url, stop, sent))
            for _ in range(2)]
    for thread in load:
        thread.start()
    try:
        wait_for(lambda: len(sent) >= 10, 60, "the first batches", interval=0.05)
        (tmp_path / "backups").mkdir()
        result = backup(db, tmp_path / "backups" / "snapshot.db")
        still_loading = all(thread.is_alive() for thread in load)
    finally:
        stop.set()
        for thread in load:
            thread.join()
    assert result.returncode == 0, result.stderr
    assert still_loading  # else this proves nothing about a backup under load
    snapshot = tmp_path / "backups" / "snapshot.db"
    assert [p.name for p in snapshot.parent.iterdir()] == ["snapshot.db"]  # nothing left aside
    with closing(sqlite3.connect(snapshot)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert_counters_match_the_table(snapshot)
    copied, live = table_keys(snapshot), table_keys(db)
    assert 0 < len(copied) < len(live)
    assert copied == live[:len(copied)]  # every commit before the copy, none after
    assert f"{len(copied)} events" in result.stderr
    # Restored as the store of a new server: the same counts, and it takes new events.
    restored = tmp_path / "restored" / "dedup.db"
    restored.parent.mkdir()
    shutil.copy(snapshot, restored)
    again = gunicorn(db=restored)
    stats = requests.get(again.url + "/stats", timeout=10).json()
    assert {name: stats[name] for name in db_counters(snapshot)} == db_counters(snapshot)
    answer = requests.post(again.url + "/publish", json=[event("b0-0"), event("new")],
                           timeout=10).json()
    assert (answer["unique_processed"], answer["duplicate_dropped"]) == (1, 1)


def test_a_backup_never_replaces_a_file_and_names_what_is_wrong(db, tmp_path):
    with closing(sqlite3.connect(db)) as conn:
        conn.execute("CREATE TABLE precious (x)")
    kept = tmp_path / "kept.db"
    kept.write_bytes(b"not to be lost")
    for dest, env, wanted in (
            (kept, {}, f"File exists: {kept}"),
            ("", {}, "the destination is empty: name the new file"),
            (tmp_path / "no" / "x.db", {}, f"No such file or directory: {tmp_path / 'no'}"),
            (tmp_path / "x.db", {"DATABASE_URL": f"sqlite:///{tmp_path / 'missing.db'}"},
             f"No such file or directory: {tmp_path / 'missing.db'}"),
            (tmp_path / "x.db", {"DATABASE_URL": "postgresql://db.example/events"}, "pg_dump"),
            (tmp_path / "x.db", {"AGGREGATOR_WRITERS": "none"}, "AGGREGATOR_WRITERS")):
        result = backup(db, dest, **env)
        assert result.returncode == 2, (dest, env, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("backup: error: ") and wanted in lines[0]
    assert kept.read_bytes() == b"not to be lost"
    assert not (tmp_path / "missing.db").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([db.name, "kept.db"])
