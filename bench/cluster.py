"""Scale-out benchmark: 1 and 3 aggregator replicas on one PostgreSQL, and the SQLite default.

The same workload (batches of 500, 25% re-sends) for each setup, in one run, round-robin
over the runs so that drift hits every setup alike. Prints events/s, CPU seconds of the
aggregator workers, of PostgreSQL's processes and of the load generator, and writes
bench/results/cluster.json. PostgreSQL is started here from the machine's binaries
(tests/postgres.py), on a loopback port, and stopped by its PID.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from bench.common import ROOT, cpu_seconds, make_bodies, make_events, median
from bench.ingest import end_to_end
from tests.helpers import free_port
from tests.postgres import PostgresServer


def postgres_cpu(postmaster: int) -> float:
    """Return the CPU seconds of the postmaster and its children (backends, WAL writer...),
    those that have exited included."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    ppid = int(stat.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == postmaster:
                pids.append(int(entry))
    return cpu_seconds(postmaster, children=True) + sum(cpu_seconds(pid) for pid in pids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000, help="events sent per run")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--json", type=Path, default=ROOT / "bench/results/cluster.json")
    args = parser.parse_args()

    unique = round(args.events * 0.75)
    events = make_events(unique, args.events / unique - 1)
    bodies = make_bodies(events, 500)
    setups = [("sqlite, 1 server", "sqlite", 1), ("postgresql, 1 replica", "postgresql", 1),
              ("postgresql, 3 replicas", "postgresql", 3)]
    print(f"{len(events)} events ({unique} unique) in batches of 500; {args.clients} client "
          f"processes; each replica 2 workers x 16 threads")
    results: dict[str, list[dict]] = {name: [] for name, _, _ in setups}
    postgres = PostgresServer(free_port()).start()
    try:
        for run in range(args.runs):
            for name, backend, replicas in setups:
                with tempfile.TemporaryDirectory() as tmp:
                    env = {}
                    if backend == "postgresql":
                        env["DATABASE_URL"] = postgres.fresh_url()
                    pg_before = postgres_cpu(postgres.pid)
                    result = end_to_end(bodies, len(events), Path(tmp) / "bench.db",
                                        args.clients, env, replicas)
                    result["postgres_cpu_s"] = round(postgres_cpu(postgres.pid) - pg_before, 2)
                assert result["stored"] == unique, result
                results[name].append(result)
                print(f"run {run + 1}: {name:<24} {result['events_per_s']:>9,.0f} ev/s | "
                      f"workers {sum(result['worker_cpu_s']):5.2f} CPU-s | postgres "
                      f"{result['postgres_cpu_s']:5.2f} | clients {result['client_cpu_s']:5.2f}"
                      f" | {result['elapsed_s']:.2f} s", flush=True)
    finally:
        postgres.stop()
    print("\nsetup                      median ev/s   vs sqlite")
    base = median([r["events_per_s"] for r in results[setups[0][0]]])
    summary = {}
    for name, _, _ in setups:
        rate = median([r["events_per_s"] for r in results[name]])
        summary[name] = {"events_per_s": rate, "vs_sqlite": rate / base, "runs": results[name]}
        print(f"{name:<26} {rate:>11,.0f}   {rate / base:8.2f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(summary, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
