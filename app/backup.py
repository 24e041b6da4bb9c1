"""python -m app.backup DEST: copy the SQLite store that DATABASE_URL names to DEST while
the aggregator runs (see README, Backups)."""

from __future__ import annotations

import argparse
import sys
import time

from .config import ConfigError, from_env
from .store import StoreError
from .store.snapshot import snapshot


def main(argv: list[str] | None = None) -> int:
    """Take the snapshot; return 0 when written, 2 for a bad argument or setting, else 1."""
    parser = argparse.ArgumentParser(
        prog="python -m app.backup",
        description="Copy the SQLite database that DATABASE_URL names, as of one commit, to "
                    "a new file, while the aggregator goes on. Exit status: 0 written, 1 the "
                    "database failed, 2 bad arguments or settings.")
    parser.add_argument("dest", help="the new file (it must not exist)")
    args = parser.parse_args(argv)
    if not args.dest:  # `"$DEST"` unset: else a copy was made, then refused under a temp name
        return _error("the destination is empty: name the new file", 2)
    try:
        config = from_env()
    except ConfigError as exc:
        return _error(f"bad configuration: {exc}", 2)
    if config.backend != "sqlite":
        return _error("DATABASE_URL names PostgreSQL, which has its own backups (pg_dump)", 2)
    started = time.monotonic()
    try:
        taken = snapshot(config.sqlite_path, args.dest)
    except (FileExistsError, FileNotFoundError, IsADirectoryError) as exc:
        return _error(f"{exc.strerror}: {exc.filename}", 2)
    except (OSError, StoreError) as exc:
        return _error(str(exc), 1)
    print(f"backup: {config.sqlite_path} -> {taken.path}: {taken.events} events, "
          f"{taken.size} bytes, in {time.monotonic() - started:.1f} s", file=sys.stderr)
    return 0


def _error(message: str, status: int) -> int:
    print(f"backup: error: {message}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
