"""Latency against offered load: /publish p50/p99 for batches of 100 at fractions of peak.

First the peak: closed-loop clients send as fast as answers come back. Then open-loop
clients offer a fixed rate (25%, 50%, 75%, 100% of that peak): each request has a
scheduled send time, and its latency is counted from that time, so a server that falls
behind is charged for the queue it builds (no coordinated omission). One server serves
every level; each level sends fresh events (25% re-sends).

Prints a table, writes bench/results/latency.json and bench/figures/latency.png.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import tempfile
import time
from pathlib import Path

from bench.common import (
    ROOT,
    Poster,
    Server,
    make_bodies,
    make_events,
    median,
    percentile,
    save_plot,
)


def _client(port: int, bodies: list[bytes], interval: float | None, start: float, out) -> None:
    """Send bodies: back to back (interval None) or each at start + n * interval."""
    poster = Poster(port)
    latencies = []
    while time.time() < start:
        time.sleep(0.001)
    for n, body in enumerate(bodies):
        if interval is None:
            scheduled = time.perf_counter()
        else:
            due = start + n * interval
            wait = due - time.time()
            if wait > 0:
                time.sleep(wait)
            # Charged from when it was due, even if this client is running late.
            scheduled = time.perf_counter() - max(0.0, time.time() - due)
        poster.post(body)
        latencies.append(time.perf_counter() - scheduled)
    poster.close()
    out.put(latencies)


def level(port: int, bodies: list[bytes], clients: int, rate_rps: float | None) -> dict:
    """Run one load level; return achieved requests/s and latency percentiles in ms."""
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    start = time.time() + 0.5
    interval = None if rate_rps is None else clients / rate_rps
    procs = [ctx.Process(target=_client, args=(
        port, bodies[i::clients], interval, start + (0 if interval is None else i * interval /
                                                     clients), out)) for i in range(clients)]
    for proc in procs:
        proc.start()
    latencies = [lat for _ in procs for lat in out.get()]
    elapsed = time.time() - start
    for proc in procs:
        proc.join()
    return {"achieved_rps": len(bodies) / elapsed,
            "p50_ms": median(latencies) * 1000, "p99_ms": percentile(latencies, 0.99) * 1000}


def plot(rows: list[dict], path: Path, batch: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    offered = [r["offered_events_per_s"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(offered, [r["p50_ms"] for r in rows], marker="o", label="p50")
    ax.plot(offered, [r["p99_ms"] for r in rows], marker="o", label="p99")
    ax.axhline(50, linestyle="--", color="grey", label="50 ms")
    ax.set_xlabel("offered load (events/s)")
    ax.set_ylabel("/publish latency (ms)")
    ax.set_yscale("log")
    ax.legend()
    save_plot(fig, ax, path, f"Latency against offered load (batches of {batch}, 2 cores)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=6, help="length of each open level")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--levels", default="0.1,0.25,0.5,0.75,1.0",
                        help="fractions of the measured peak to offer")
    parser.add_argument("--json", type=Path, default=ROOT / "bench/results/latency.json")
    parser.add_argument("--plot", type=Path, default=ROOT / "bench/figures/latency.png")
    args = parser.parse_args()
    seed = iter(range(1000, 2000))

    def bodies_for(requests: int) -> list[bytes]:
        unique = round(requests * args.batch_size * 0.75)
        return make_bodies(make_events(unique, 1 / 3, seed=next(seed)), args.batch_size)

    with tempfile.TemporaryDirectory() as tmp:
        server = Server(Path(tmp) / "latency.db")
        try:
            peaks = [level(server.port, bodies_for(1200), args.clients, None) for _ in range(3)]
            peak_rps = median([p["achieved_rps"] for p in peaks])
            print(f"peak (closed loop, {args.clients} clients, batches of {args.batch_size}): "
                  f"{peak_rps * args.batch_size:,.0f} events/s, runs "
                  f"{[round(p['achieved_rps'] * args.batch_size) for p in peaks]}", flush=True)
            rows = []
            print(f"{'offered':>8} {'offered ev/s':>13} {'achieved ev/s':>14} {'p50 ms':>8} "
                  f"{'p99 ms':>8}")
            for fraction in map(float, args.levels.split(",")):
                rate = peak_rps * fraction
                result = level(server.port, bodies_for(max(50, round(rate * args.seconds))),
                               args.clients, rate)
                row = {"fraction": fraction, "offered_events_per_s": rate * args.batch_size,
                       "achieved_events_per_s": result["achieved_rps"] * args.batch_size,
                       "p50_ms": result["p50_ms"], "p99_ms": result["p99_ms"]}
                rows.append(row)
                print(f"{fraction:>8.0%} {row['offered_events_per_s']:>13,.0f} "
                      f"{row['achieved_events_per_s']:>14,.0f} {row['p50_ms']:>8.1f} "
                      f"{row['p99_ms']:>8.1f}", flush=True)
        finally:
            server.stop()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                     "peak_events_per_s": peak_rps * args.batch_size,
                                     "levels": rows}, indent=2))
    plot(rows, args.plot, args.batch_size)
    print(f"wrote {args.json} and {args.plot}")


if __name__ == "__main__":
    main()
