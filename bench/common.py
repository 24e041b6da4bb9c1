"""Shared bench helpers: workloads, a real gunicorn server, process sampling."""

from __future__ import annotations

import http.client
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOPICS = ["orders", "payments", "auth", "shipping"]
LEVELS = ["debug", "info", "warning", "error"]


# How the benches name events: "sequential" ids (evt-<seed>-<n>) share a prefix per workload
# and sort in the order they were made, as time-ordered ids (ULID, UUIDv7, a counter) do;
# "uuid" ids are random (UUIDv4), so each new one lands at a random place in the
# (topic, event_id) index.
ID_KINDS = ("sequential", "uuid")


def event_id(kind: str, seed: int, i: int, rng: random.Random) -> str:
    """Return the i-th event id of a workload (reproducible from rng's seed)."""
    if kind == "uuid":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    return f"evt-{seed}-{i:09d}"


def make_events(unique: int, duplicate_rate: float, seed: int = 7,
                ids: str = "sequential") -> list[dict]:
    """Return unique events plus round(unique * rate) re-sends, shuffled."""
    rng = random.Random(seed)
    id_rng = random.Random(f"events-{seed}")
    events = [{
        "topic": TOPICS[i % len(TOPICS)], "event_id": event_id(ids, seed, i, id_rng),
        "timestamp": f"2025-10-18T{i // 3600 % 24:02d}:{i // 60 % 60:02d}:{i % 60:02d}"
                     f".{i % 1000:03d}Z",
        "source": f"svc-{i % 17}",
        "payload": {"level": LEVELS[i % 4], "msg": f"request {i} handled", "user": i % 9973,
                    "latency_ms": round(rng.random() * 250, 3), "ok": i % 5 != 0},
    } for i in range(unique)]
    events += rng.choices(events, k=round(unique * duplicate_rate))
    rng.shuffle(events)
    return events


def make_bodies(events: list[dict], batch_size: int) -> list[bytes]:
    """Encode the events as JSON array bodies of batch_size events."""
    return [json.dumps(events[i:i + batch_size]).encode()
            for i in range(0, len(events), batch_size)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


class Server:
    """The aggregator under gunicorn, as in production, on a loopback port."""

    def __init__(self, db_path: Path, env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "DATABASE_URL": f"sqlite:///{db_path}", **(env or {})}
        self.log = open(db_path.with_suffix(".log"), "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "--config", "app/gunicorn.conf.py",
             "--bind", f"127.0.0.1:{self.port}", "app:create_app()"],
            cwd=ROOT, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True)
        self._wait_healthy()

    def _wait_healthy(self, timeout: float = 30) -> None:
        """Wait for /health and for every worker process to have booted."""
        from app.config import Config

        workers = int(self.env.get("WEB_CONCURRENCY", Config().web_concurrency))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/health")
                healthy = conn.getresponse().status == 200
                conn.close()
                if healthy and len(self.worker_pids()) >= workers:
                    time.sleep(0.5)  # let the last worker finish importing the app
                    return
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("server did not become healthy")

    def pids(self) -> list[int]:
        """Return the master and worker pids."""
        out = subprocess.run(["pgrep", "-g", str(self.proc.pid)], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    def worker_pids(self) -> list[int]:
        return [p for p in self.pids() if p != self.proc.pid]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


def rss_kib(pid: int) -> int:
    """Return a process's resident set size in KiB (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def threads_scheduled(pid: int, name: str) -> tuple[float, float]:
    """Return the seconds a process's threads called name (writer-0 is "writer") have spent
    running, and runnable but not running, from the kernel's schedstat ((0, 0) if it is gone)."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0, 0.0
    ran = waited = 0
    for tid in tids:
        try:  # each thread on its own: one that has ended is skipped, not the rest
            with open(f"/proc/{pid}/task/{tid}/comm") as comm:
                if not comm.read().startswith(name):
                    continue
            with open(f"/proc/{pid}/task/{tid}/schedstat") as schedstat:
                fields = schedstat.read().split()
            ran, waited = ran + int(fields[0]), waited + int(fields[1])
        except OSError:
            pass
    return ran / 1e9, waited / 1e9


def cpu_seconds(pid: int, children: bool = False) -> float:
    """Return a process's user + system CPU seconds so far (0 if it is gone); with children,
    plus those of its children that have exited."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        ticks = sum(int(f) for f in fields[11:15 if children else 13])
        return ticks / os.sysconf("SC_CLK_TCK")
    except OSError:
        return 0.0


class Poster:
    """One keep-alive connection that POSTs each body to /publish until it gets a 200.

    A connection error reconnects, a refusal (429, 503) waits its Retry-After; both count
    as retries, and every status answered is tallied.
    """

    HEADERS = {"Content-Type": "application/json"}

    def __init__(self, port: int):
        self.port, self.retries, self.statuses = port, 0, {}
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def post(self, body: bytes) -> float:
        """Send body until it is accepted; return the seconds the accepted attempt took."""
        while True:
            start = time.perf_counter()
            try:
                self.conn.request("POST", "/publish", body, self.HEADERS)
                response = self.conn.getresponse()
                response.read()
            except (http.client.HTTPException, OSError):
                self.conn.close()
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
                self.retries += 1
                continue
            self.statuses[response.status] = self.statuses.get(response.status, 0) + 1
            if response.status == 200:
                return time.perf_counter() - start
            self.retries += 1
            time.sleep(float(response.getheader("Retry-After") or 0.05))

    def close(self) -> None:
        self.conn.close()


class PeakRss:
    """Sample the summed RSS of a server's processes every 50 ms until stopped; in MiB.

    The processes are listed once, at the start (a run does not replace workers): listing
    them with pgrep at every sample cost the measured machine 4 ms of CPU each time.
    """

    def __init__(self, server: Server):
        self.pids, self.peak_kib = server.pids(), 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self.peak_kib = max(self.peak_kib, sum(rss_kib(pid) for pid in self.pids))

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak_kib / 1024


def save_plot(fig, ax, path: Path, title: str) -> None:
    """Finish a matplotlib figure the same way for every bench plot, and write it."""
    import matplotlib.pyplot as plt

    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
