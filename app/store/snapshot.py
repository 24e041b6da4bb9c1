"""A consistent copy of a SQLite store, taken while the aggregator goes on writing."""

from __future__ import annotations

import errno
import os
from contextlib import closing
from dataclasses import dataclass

from .sqlite import connect, translated_errors


@dataclass(frozen=True)
class Snapshot:
    """What a snapshot holds."""

    path: str
    size: int  # bytes
    events: int  # stored (unique_processed less expired)


def snapshot(path: str, dest: str) -> Snapshot:
    """Copy the database at path to the new file dest, as of one commit, while writers go
    on; raise FileExistsError if dest exists, FileNotFoundError if path or dest's
    directory does not, and StoreError for the database's own trouble.

    SQLite's backup API copies every page in one step, so within one read transaction: in
    WAL mode that blocks no writer, and no commit made meanwhile is half in the copy (a
    step-by-step copy would start over after each one). The copy is written beside dest,
    synced, and linked into place: dest is whole or absent, and never replaced.
    """
    if os.path.lexists(dest):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dest)
    for needed in (path, os.path.dirname(os.path.abspath(dest))):
        if not os.path.exists(needed):  # connecting to path would create an empty database
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), needed)
    partial = f"{dest}.partial-{os.getpid()}"
    try:
        with translated_errors(), closing(connect(path, read_only=True)) as source, \
                closing(connect(partial)) as target:
            source.backup(target)
            (events,) = target.execute(
                "SELECT sum(CASE name WHEN 'expired' THEN -value ELSE value END)"
                " FROM counters WHERE name IN ('unique_processed', 'expired')").fetchone()
        _sync(partial)
        os.link(partial, dest)  # fails, rather than replace, if dest appeared meanwhile
        _sync(os.path.dirname(os.path.abspath(dest)))
    finally:
        if os.path.lexists(partial):
            os.unlink(partial)
    return Snapshot(dest, os.path.getsize(dest), events)


def _sync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
