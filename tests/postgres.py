"""A real PostgreSQL server for the tests, from the machine's own binaries.

initdb and pg_ctl in a temporary directory, listening on a loopback port only. As root
(CI), the server runs as the postgres user, which PostgreSQL requires.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

BIN_DIRS = [Path("/usr/lib/postgresql/15/bin"), *sorted(Path("/usr/lib/postgresql").glob("*/bin"))]


def pg_bin() -> Path | None:
    """Return the directory of initdb and pg_ctl, or None when PostgreSQL is not installed."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    return next((d for d in BIN_DIRS if (d / "initdb").exists()), None)


class PostgresServer:
    """One PostgreSQL cluster in a new temporary directory, stopped by its postmaster PID."""

    def __init__(self, port: int):
        self.bin = pg_bin()
        if self.bin is None:
            raise RuntimeError("PostgreSQL server binaries not found (apt-get install postgresql)")
        # Not under pytest's tmp_path: its parents are private to root, and as root the
        # server runs as postgres.
        self.dir = Path(tempfile.mkdtemp(prefix="aggregator-pg-"))
        self.data = self.dir / "data"
        self.port = port
        self.pid: int | None = None
        self._schemas = itertools.count(1)

    def _run(self, *args: str) -> None:
        """Run a PostgreSQL program, as the postgres user when we are root."""
        command = [str(self.bin / args[0]), *args[1:]]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=120)

    def start(self) -> PostgresServer:
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.dir, user.pw_uid, user.pw_gid)
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
                  "--locale=C", "--no-sync")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.dir / "server.log"), "-w",
                  "-t", "60", "-o",
                  f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.dir} "
                  "-c max_connections=200 -c shared_buffers=128MB", "start")
        self.pid = int((self.data / "postmaster.pid").read_text().split()[0])
        self._psql("CREATE DATABASE aggregator")
        return self

    def _psql(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(sql)

    def url(self, database: str = "aggregator", schema: str | None = None) -> str:
        """Return a postgresql:// URL; with schema, every table lives in that schema."""
        url = f"postgresql://postgres@127.0.0.1:{self.port}/{database}"
        if schema:
            url += "?options=" + quote(f"-csearch_path={schema}")
        return url

    def fresh_url(self) -> str:
        """Return the URL of a new, empty schema: a database of its own for one test."""
        schema = f"t{os.getpid()}_{next(self._schemas)}"
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {schema}")
        return self.url(schema=schema)

    def stop(self) -> None:
        """Stop the postmaster by its PID (fast shutdown), then make sure it is gone."""
        if self.pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGINT)
        for _ in range(100):
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        self.pid = None
        shutil.rmtree(self.dir, ignore_errors=True)
