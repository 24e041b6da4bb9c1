"""Crash soak: cycles of load + SIGKILL of the whole gunicorn process group + restart.

Afterwards: every event that got a 200 is stored, none is stored twice, and
`python -m app.check` passes (the counters equal the table, per topic too; the time
summaries; quick_check). Prints a line per cycle and a verdict; exits 1 on any violation.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

from bench.common import Server


def load(url: str, worker: int, cycle: int, stop: threading.Event, acked: set, tally: dict,
         lock: threading.Lock) -> None:
    """Publish batches (a quarter of each re-sent from earlier ones) until the server dies."""
    rng = random.Random(cycle * 1000 + worker)
    mine: list[str] = []
    with requests.Session() as session:
        for n in range(100_000):
            if stop.is_set():
                return
            fresh = [f"c{cycle}-w{worker}-{n}-{i}" for i in range(150)]
            again = rng.sample(mine, min(len(mine), 50))
            ids = fresh + again
            batch = [{"topic": ("orders", "auth", "billing")[hash(i) % 3], "event_id": i,
                      "timestamp": "2025-10-18T03:00:00Z", "source": "soak",
                      "payload": {"n": n}} for i in ids]
            try:
                response = session.post(url + "/publish", json=batch, timeout=10)
            except requests.RequestException:
                with lock:
                    tally["unanswered"] += 1
                return
            with lock:
                tally[response.status_code] = tally.get(response.status_code, 0) + 1
                if response.status_code == 200:
                    acked.update((e["topic"], e["event_id"]) for e in batch)
            if response.status_code == 200:
                mine += fresh


def audit(db_path: Path) -> dict:
    """Read the database directly (stored keys, duplicates), and check its counts with
    app.check."""
    with sqlite3.connect(db_path) as conn:
        rows, distinct = conn.execute(
            "SELECT count(*), count(DISTINCT topic || char(0) || event_id) FROM events"
        ).fetchone()
        keys = set(conn.execute("SELECT topic, event_id FROM events"))
    checked = subprocess.run([sys.executable, "-m", "app.check", "--json"], text=True,
                             capture_output=True, cwd=Path(__file__).parent.parent, timeout=600,
                             env={**os.environ, "DATABASE_URL": f"sqlite:///{db_path}"})
    report = json.loads(checked.stdout) if checked.stdout else None
    failed = ([check["rule"] for check in report["checks"] if not check["ok"]] if report
              else [checked.stderr.strip()])
    return {"rows": rows, "stored_twice": rows - distinct, "keys": keys,
            "counters": report and report["counters"], "check": failed or "ok"}


def cycle(db_path: Path, number: int, clients: int, seconds: float, acked: set) -> dict:
    server = Server(db_path, {"WEB_CONCURRENCY": "2"})
    stop, lock = threading.Event(), threading.Lock()
    tally = {"unanswered": 0}
    before = len(acked)
    threads = [threading.Thread(target=load, args=(server.url, w, number, stop, acked, tally,
                                                   lock)) for w in range(clients)]
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    os.killpg(server.proc.pid, signal.SIGKILL)  # master and workers, mid-commit
    server.proc.wait()
    server.log.close()
    stop.set()
    for thread in threads:
        thread.join()
    return {"cycle": number, "acknowledged": len(acked) - before, "answers": tally}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cycles", type=int, default=5)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=4.0, help="load before each kill")
    args = parser.parse_args()
    acked: set[tuple[str, str]] = set()
    with tempfile.TemporaryDirectory() as tmp:
        db_path = Path(tmp) / "soak.db"
        for number in range(1, args.cycles + 1):
            # Vary the moment of the kill so it lands in different phases of a commit.
            result = cycle(db_path, number, args.clients,
                           args.seconds * random.uniform(0.6, 1.4), acked)
            state = audit(db_path)
            lost = len(acked - state["keys"])
            print(f"cycle {number}: acknowledged {result['acknowledged']:>7} events | answers "
                  f"{result['answers']} | stored {state['rows']:>7} | lost {lost} | stored "
                  f"twice {state['stored_twice']} | app.check {state['check']}", flush=True)
        Server(db_path).stop()  # one clean start on the crashed file, then a graceful stop
        state = audit(db_path)
    lost = len(acked - state["keys"])
    ok = lost == 0 and state["stored_twice"] == 0 and state["check"] == "ok"
    print(f"after {args.cycles} SIGKILLs: {len(acked)} events acknowledged, {state['rows']} "
          f"stored, {lost} acknowledged events lost, {state['stored_twice']} stored twice, "
          f"counters {state['counters']}, app.check {state['check']} "
          f"-> {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
