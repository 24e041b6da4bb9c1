"""The ingest pipeline: a bounded queue drained by writer threads that group-commit."""

from __future__ import annotations

import atexit
import json
import logging
import os
import queue
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import suppress
from dataclasses import dataclass
from functools import partial

from .logs import utc_text
from .metrics import Metrics
from .store import Batch, More, Store, StoreError, nothing_more

log = logging.getLogger(__name__)

# A group commit stops taking more queued batches once it holds this many events.
MAX_COMMIT_EVENTS = 20_000
_POLL_SECONDS = 0.2
# How often dead writer threads are looked for and replaced.
SUPERVISE_SECONDS = 0.5
# Readiness reports a failed commit for this long unless a commit succeeds first: long
# enough for a load balancer to see it, short enough that an idle server that has
# recovered (space freed, lock released) is offered traffic again.
FAILURE_MEMORY_SECONDS = 5.0
# Retention: each writer deletes expired events in chunks of this many (one short
# transaction each), looking every EXPIRE_EVERY_SECONDS (or a quarter of the retention, if
# shorter), and again at once while it finds full chunks.
EXPIRE_CHUNK = 5000
EXPIRE_EVERY_SECONDS = 10.0


def _name_os_thread(name: str) -> None:
    """Give the calling thread its name in the kernel too, where ps -L, top -H and the
    per-thread /proc files show it (Linux; elsewhere, or if refused, nothing happens)."""
    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/comm", "w") as comm:
            comm.write(name[:15])  # the kernel keeps 15 bytes
    except OSError:
        pass


class CommitHealth:
    """The last failed commit of any worker process of this server, until a commit succeeds
    or FAILURE_MEMORY_SECONDS pass.

    With a directory that the workers share (gunicorn's, app/gunicorn.conf.py), the failure
    is kept in a file there, so that a readiness probe gets the same answer whichever worker
    takes it, and any worker's successful commit clears it. Without one (a single process),
    or when the file cannot be written (its disk full too), it is kept in memory.
    """

    FILE_NAME = "last-commit-failure.json"

    def __init__(self, shared_dir: str | None = None):
        self._path = os.path.join(shared_dir, self.FILE_NAME) if shared_dir else None
        self._memory: tuple[float, str] | None = None

    @classmethod
    def reset(cls, shared_dir: str) -> None:
        """Forget a failure recorded by an earlier run (call before workers start)."""
        _remove(os.path.join(shared_dir, cls.FILE_NAME))

    def failed(self, error: StoreError) -> None:
        """Record a failed commit."""
        # The monotonic clock is the machine's (Linux, macOS): workers read each other's.
        failure = (time.monotonic(), str(error))
        if self._path is not None:
            # Written aside, then renamed: a reader sees the whole record or none.
            partial_path = f"{self._path}.{os.getpid()}.{threading.get_native_id()}"
            try:
                with open(partial_path, "w") as out:
                    json.dump(failure, out)
                os.replace(partial_path, self._path)
                self._memory = None  # an older failure kept here is superseded
                return
            except OSError:
                _remove(partial_path)
        self._memory = failure

    def succeeded(self) -> None:
        """Record a successful commit: the database takes commits again."""
        self._memory = None
        if self._path is not None:
            _remove(self._path)

    @property
    def last_error(self) -> str | None:
        """Return why the last commit failed, if it did in the last few seconds."""
        failure = self._memory
        if self._path is not None:
            try:
                with open(self._path) as record:
                    failure = tuple(json.load(record))
            except (OSError, ValueError):
                pass
        if failure is None or time.monotonic() - failure[0] > FAILURE_MEMORY_SECONDS:
            return None
        return failure[1]


def _remove(path: str) -> None:
    """Remove the file if it is there; never raise (a commit's outcome must still be told)."""
    with suppress(OSError):
        os.unlink(path)


class QueueFull(Exception):
    """The ingest queue is full: the client should retry later (429)."""


class ShuttingDown(Exception):
    """The server is stopping and takes no new work (503)."""


class CommitTimeout(Exception):
    """The commit did not finish in time; the batch may or may not be stored (503)."""


@dataclass(frozen=True)
class Outcome:
    """What happened to one request's events."""

    received: int
    unique_processed: int
    rejected: int

    @property
    def duplicate_dropped(self) -> int:
        """Return how many valid events were already stored (or repeated in the batch)."""
        return self.received - self.unique_processed


@dataclass
class _Item:
    batch: Batch
    future: Future


class Ingestor:
    """Hand batches to writer threads and wait for their durable commit."""

    def __init__(self, store: Store, *, queue_size: int, writers: int, commit_timeout: float,
                 metrics: Metrics | None = None, shared_dir: str | None = None,
                 retention: float | None = None):
        """retention: delete events received longer ago than this many seconds."""
        self._store = store
        self._retention = retention
        self._metrics = metrics
        self._health = CommitHealth(shared_dir)
        self._writer_error: str | None = None
        self._queue: queue.Queue[_Item] = queue.Queue(maxsize=queue_size)
        self._commit_timeout = commit_timeout
        self._stopping = threading.Event()
        self._submit_lock = threading.Lock()
        # Daemon threads plus an atexit hook, not a ThreadPoolExecutor: the interpreter
        # joins an executor's threads before atexit runs, so a process that never called
        # close() (a script, the Flask dev server) would wait forever on the writer loop.
        self._writers = [self._start_writer(n) for n in range(writers)]
        self._supervisor = threading.Thread(target=self._supervise, name="writer-supervisor",
                                            daemon=True)
        self._supervisor.start()
        atexit.register(self.close)

    @property
    def depth(self) -> int:
        """Return how many batches wait in this process's queue."""
        return self._queue.qsize()

    @property
    def saturated(self) -> bool:
        """Return whether the queue is full (the next batch would get a 429)."""
        return self._queue.full()

    @property
    def writers_problem(self) -> str | None:
        """Return why writers are not all running, or None when they are."""
        if self._stopping.is_set():
            return "stopped"
        dead = sum(not w.is_alive() for w in self._writers)
        if dead:
            return f"{dead} of {len(self._writers)} dead ({self._writer_error}); replacing"
        return None

    @property
    def last_error(self) -> str | None:
        """Return why a commit of any worker failed in the last few seconds, if no commit
        has succeeded since."""
        return self._health.last_error

    def submit(self, batch: Batch) -> Outcome:
        """Queue the batch and block until it is committed; return its exact counts."""
        received = len(batch.rows)
        if received == 0 and batch.rejected == 0:
            return Outcome(0, 0, 0)
        item = _Item(batch, Future())
        with self._submit_lock:
            if self._stopping.is_set():
                raise ShuttingDown
            if not any(w.is_alive() for w in self._writers):
                # Fail now rather than after commit_timeout: nothing would drain the queue.
                raise StoreError(f"no writer is running: {self._writer_error}")
            try:
                self._queue.put_nowait(item)
            except queue.Full:
                raise QueueFull from None
            self._track_depth()
        try:
            unique = item.future.result(timeout=self._commit_timeout)
        except FutureTimeout:
            raise CommitTimeout from None
        return Outcome(received, unique, batch.rejected)

    def close(self) -> None:
        """Refuse new batches, commit every queued one, and stop the writers; safe twice."""
        with self._submit_lock:
            self._stopping.set()
        # The supervisor first, so that it replaces no writer while they are joined.
        if self._supervisor.is_alive() and self._supervisor is not threading.current_thread():
            self._supervisor.join()
        for thread in self._writers:
            thread.join()
        atexit.unregister(self.close)

    def _start_writer(self, number: int) -> threading.Thread:
        thread = threading.Thread(target=self._run, name=f"writer-{number}", daemon=True)
        thread.start()
        return thread

    def _supervise(self) -> None:
        """Replace writer threads that died (their connection could not be opened)."""
        while not self._stopping.wait(SUPERVISE_SECONDS):
            for number, thread in enumerate(self._writers):
                if not thread.is_alive():
                    log.warning("writer-%d is dead (%s); starting a new one", number,
                                self._writer_error)
                    self._writers[number] = self._start_writer(number)

    def _run(self) -> None:
        _name_os_thread(threading.current_thread().name)
        try:
            writer = self._store.writer()
        except Exception as exc:
            # The thread ends; the supervisor replaces it, and readiness says why meanwhile.
            self._writer_error = f"cannot open a write connection: {exc}"
            log.error("%s", self._writer_error)
            return
        self._writer_error = None
        next_expiry = time.monotonic()
        try:
            while True:
                if self._retention is not None and time.monotonic() >= next_expiry:
                    next_expiry = time.monotonic() + self._expire(writer)
                # Read the flag before polling: once it is set no batch can be queued,
                # so an empty queue seen afterwards means the work is done.
                stopping = self._stopping.is_set()
                try:
                    first = self._queue.get(timeout=_POLL_SECONDS)
                except queue.Empty:
                    if stopping:
                        return
                    continue
                group = [first]
                self._commit(writer, group, partial(self._drain, group))
        finally:
            writer.close()

    def _expire(self, writer) -> float:
        """Delete one chunk of the events past the retention; return the seconds until the
        next look (none while chunks come back full)."""
        # A retention past 1970 (AGGREGATOR_RETENTION=1000000d) keeps every event, which
        # were all received since: before year 1, the cutoff stopped every writer.
        before = utc_text(max(time.time() - self._retention, 0.0))
        try:
            expired = writer.expire(before, EXPIRE_CHUNK)
        except StoreError as exc:
            log.error("expiring the events received before %s failed: %s", before, exc)
            expired = 0
        if expired:
            log.info("expired %d events received before %s", expired, before)
        return 0.0 if expired == EXPIRE_CHUNK else min(EXPIRE_EVERY_SECONDS, self._retention / 4)

    def _drain(self, group: list[_Item]) -> list[Batch]:
        """Move queued items into the group, up to MAX_COMMIT_EVENTS; return their batches.

        Called once the writer holds the write lock, so the group also takes every batch
        queued while it waited for its turn.
        """
        events, added = sum(len(item.batch.rows) for item in group), []
        while events < MAX_COMMIT_EVENTS:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            added.append(item)
            events += len(item.batch.rows)
        group += added
        self._track_depth()
        return [item.batch for item in added]

    def _track_depth(self) -> None:
        if self._metrics is not None:
            self._metrics.queue_depth.set(self._queue.qsize())

    def _commit(self, writer, group: list[_Item], more: More = nothing_more) -> None:
        """Commit the group's batches and those more() adds to it, and settle every item's
        future: with its count, or with the error when the commit fails."""
        self._track_depth()
        started = time.perf_counter()
        try:
            stored = writer.write([item.batch for item in group], more)
        except StoreError as exc:
            # The database's own trouble (full, locked, gone): every batch shares it.
            log.error("group commit of %d batches failed: %s", len(group), exc)
            self._fail(writer, group, started, exc)
        except Exception as exc:
            if len(group) > 1:
                # Something in one batch broke the transaction: commit each batch alone,
                # so that only the batch at fault fails and the others are stored.
                log.warning("group commit of %d batches failed (%s); committing them one by "
                            "one", len(group), exc)
                for item in group:
                    self._commit(writer, [item])
                return
            log.exception("commit of one batch failed")
            self._fail(writer, group, started, StoreError(f"commit failed: {exc}"))
        else:
            self._health.succeeded()
            self._observe(writer, group, started, ok=True)
            for item, new in zip(group, stored, strict=True):
                item.future.set_result(new)

    def _fail(self, writer, group: list[_Item], started: float, error: StoreError) -> None:
        self._health.failed(error)
        self._observe(writer, group, started, ok=False)
        for item in group:
            item.future.set_exception(error)

    def _observe(self, writer, group: list[_Item], started: float, *, ok: bool) -> None:
        if self._metrics is not None:
            self._metrics.observe_commit(sum(len(i.batch.rows) for i in group), started, ok,
                                         writer.lock_wait_s, writer.lock_held_s)
