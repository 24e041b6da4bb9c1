"""Send batches with bounded concurrency, retrying through the Publisher, and sum the
aggregator's answers into a Summary (python -m publisher's sending half)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from .client import BatchResult, Publisher, PublishError
from .events import Batch

FATAL_STATUSES = {401: "unauthorized: check --token", 403: "forbidden",
                  404: "no /publish here: check --url"}
SHOWN_REJECTS = 5


@dataclass
class Summary:
    """Totals summed from the aggregator's answers."""

    url: str
    sent: int = 0
    acknowledged: int = 0
    unique: int = 0
    duplicates: int = 0
    rejected: int = 0
    failed: int = 0
    batches: int = 0
    elapsed_s: float = 0.0
    events_per_s: float = 0.0
    seed: int | None = None
    # The signal (SIGINT: Ctrl-C, or SIGTERM) that stopped the sending: the batches then in
    # flight were answered and counted, and no more were sent.
    interrupted: str | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Return whether every event was acknowledged (stored or duplicate)."""
        return self.rejected == 0 and self.failed == 0 and self.interrupted is None


class Sender:
    """Send batches with bounded concurrency and tally the answers."""

    def __init__(self, publisher: Publisher, summary: Summary, progress, rejects,
                 rate: float | None = None):
        self.publisher = publisher
        self.summary = summary
        self.progress = progress
        self.rejects = rejects
        self.rate = rate  # events per second at most, or None
        self.fatal: str | None = None

    def stopped(self) -> bool:
        """Return whether nothing more is to be sent: a fatal answer, Ctrl-C or SIGTERM."""
        return self.fatal is not None or self.summary.interrupted is not None

    def run(self, batches: Iterator[Batch | None], concurrency: int) -> None:
        """Send every batch (at most 2 x concurrency in memory) unless a fatal answer comes.

        A None from batches means that none is ready yet (a quiet stream): the answers that
        have come are counted meanwhile, and a stop is seen at once.

        After a Ctrl-C or SIGTERM, send nothing more but wait for the answers to the
        batches in flight, so that the summary counts every batch the aggregator may have
        committed. A batch waiting to be retried is not retried again (it would be, with
        --retries unlimited, for as long as the aggregator is away): it counts as failed.
        """
        with ThreadPoolExecutor(concurrency, thread_name_prefix="sender") as pool:
            pending: set[Future] = set()
            first, paced = None, 0  # when the first batch went; the events sent since
            for batch in batches:
                if batch is not None and self.rate is not None:
                    first = time.monotonic() if first is None else first
                    pending = self._wait_until(first + paced / self.rate, pending)
                    paced += batch.size
                if self.stopped():
                    break
                # Count the answers that have come (a slow stream may yield a batch a
                # minute); when the window is full, wait for one first.
                full = batch is not None and len(pending) >= 2 * concurrency
                pending = self._count_answers(pending, None if full else 0)
                if batch is not None:
                    pending.add(pool.submit(self._send, batch))
                elif self.rejects is not None:
                    self.rejects.flush()  # the stream is quiet: show what was refused
            if self.summary.interrupted is not None:
                for future in pending:
                    future.cancel()  # queued in the pool, not sent yet
            for future in wait(pending).done:
                if not future.cancelled():
                    self._tally_all(future.result())

    def _wait_until(self, due: float, pending: set[Future]) -> set[Future]:
        """Wait until due (time.monotonic()), counting the answers that come meanwhile;
        return the futures still pending. A stop ends the wait at once."""
        while not self.stopped() and (left := due - time.monotonic()) > 0:
            if pending:
                pending = self._count_answers(pending, min(left, 0.1))
            else:
                time.sleep(min(left, 0.1))
        return pending

    def _count_answers(self, pending: set[Future], timeout: float | None) -> set[Future]:
        """Wait up to timeout seconds (None: without end) for an answer, count every
        answer that has come, and return the futures still pending."""
        done, pending = wait(pending, timeout=timeout, return_when=FIRST_COMPLETED)
        for future in done:
            self._tally_all(future.result())
        return pending

    def _send(self, batch: Batch) -> list[tuple[Batch, BatchResult | None, str]]:
        """Send the batch; return (batch, answer, problem) for it, or for each of its parts.

        A batch refused as too large (413: more events or bytes than the aggregator
        takes) is sent again in halves, down to single events: only an event too large on
        its own is refused, not the events sent beside it. Nothing of a 413 is stored.
        """
        if self.fatal:
            return [(batch, None, "not sent after a fatal error")]
        try:
            result = self.publisher.publish(batch.body, batch.content_type)
        except PublishError as exc:
            if self.summary.interrupted is None:
                self.fatal = str(exc)
            return [(batch, None, str(exc))]
        if result.status == 413 and batch.size > 1 and not self.stopped():
            return [part for half in batch.halves() for part in self._send(half)]
        return [(batch, result, "")]

    def _tally_all(self, outcomes: list[tuple[Batch, BatchResult | None, str]]) -> None:
        for outcome in outcomes:
            self._tally(*outcome)

    def _tally(self, batch: Batch, result: BatchResult | None, problem: str) -> None:
        s = self.summary
        s.sent += batch.size if result else 0
        s.batches += 1
        if result is not None and result.status == 413 and batch.size == 1:
            # Too large on its own (its batch was split): refused, as an invalid event is.
            s.rejected += 1
            self._reject(batch, 0, {"_request": [f"HTTP 413: {result.message}"]})
        elif result is None or not result.acknowledged:
            s.failed += batch.size
            if result is not None:
                problem = f"HTTP {result.status}: {result.message}"
                if result.status in FATAL_STATUSES:
                    self.fatal = f"HTTP {result.status} {FATAL_STATUSES[result.status]}"
            if len(s.problems) < SHOWN_REJECTS:
                s.problems.append(f"batch of {batch.size} not acknowledged: {problem}")
        else:
            s.acknowledged += result.received
            s.unique += result.unique_processed
            s.duplicates += result.duplicate_dropped
            s.rejected += result.rejected
            for index, reason in result.errors.items():
                self._reject(batch, int(index), reason)
        self.progress(batch.size)

    def _reject(self, batch: Batch, index: int, reason: object) -> None:
        if batch.lines:
            self._record(f"rejected line {batch.lines[index]}: {json.dumps(reason)}", reason,
                         batch.lines[index], batch.raw[index])
        else:
            self._record(f"rejected event {index} of a batch: {json.dumps(reason)}", reason)

    def reject_line(self, number: int, line: bytes, reason: str) -> None:
        """Count a line of the file that is not sent (not a JSON object), as it is read."""
        self.summary.rejected += 1
        self._record(f"rejected line {number}: {reason}", reason, number, line)

    def _record(self, problem: str, reason: object, number: int | None = None,
                line: bytes | None = None) -> None:
        """Show the first few problems; write every rejected line to the rejects file."""
        if len(self.summary.problems) < SHOWN_REJECTS:
            self.summary.problems.append(problem)
        if self.rejects is not None and line is not None:
            self.rejects.write(json.dumps({"line": number, "errors": reason,
                                           "event": line.decode("utf-8", "replace")}) + "\n")
