"""A logging handler that ships a Python program's log records to an aggregator.

    handler = AggregatorHandler("http://127.0.0.1:8080", topic="billing")
    logging.getLogger().addHandler(handler)

Records are sent in batches by a thread of the handler's own, and retried until they are
acknowledged: each has an event_id of its own, so a batch sent twice (an answer lost in an
outage) is stored once. Logging never waits for the network nor raises: when the buffer
is full, a record is dropped and counted. logging.shutdown(), which runs at exit, closes
the handler, which sends what is buffered first.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import socket
import threading
import time
import weakref
from datetime import UTC, datetime

from .client import Publisher, PublishError, valid_name
from .events import Batch

# What every LogRecord has: the rest of its attributes came as extra={...}.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}
_FORMATTER = logging.Formatter()
_CLOSE, _FLUSH = object(), object()  # in the queue: stop once what is before is sent; send now
# A message, traceback or stack longer than this is cut: the aggregator refuses a payload
# over AGGREGATOR_MAX_PAYLOAD (64 KiB by default), which would lose the whole record.
MAX_TEXT = 16 * 1024


class AggregatorHandler(logging.Handler):
    """Send log records to an aggregator's /publish, as events of one topic.

    sent, rejected and dropped count the records acknowledged (stored, or duplicates of
    ones stored), refused by the aggregator (a payload over its limit; every record of a
    batch for a wrong token), and never delivered (the buffer full, or still unsent when
    close() gave up).
    """

    def __init__(self, url: str, topic: str, *, source: str | None = None,
                 token: str | None = None, batch_size: int = 500, linger: float = 1.0,
                 capacity: int = 10_000, close_timeout: float = 5.0,
                 level: int = logging.NOTSET):
        """source defaults to the host's name. A batch goes once it holds batch_size records
        or its first has waited linger seconds. At most capacity records wait to be sent;
        close() waits up to close_timeout seconds for them to be acknowledged."""
        super().__init__(level)
        # Bad arguments fail here, not as every record dropped or refused, unseen (a bad
        # URL in Publisher, which _start() below makes).
        for name, value in (("topic", topic), ("source", source)):
            if value is not None and not valid_name(value):
                raise ValueError(f"{name} must be 1 to 255 characters, none a control one")
        for name, value, least in (("batch_size", batch_size, 1), ("capacity", capacity, 1),
                                   ("linger", linger, 0), ("close_timeout", close_timeout, 0)):
            if not value >= least:  # NaN too
                raise ValueError(f"{name} must be at least {least}, not {value!r}")
        self.topic = topic
        self.source = source or socket.gethostname()[:255] or "localhost"
        self.batch_size = batch_size
        self.linger = linger
        self.close_timeout = close_timeout
        self._url, self._token, self._capacity = url, token, capacity
        self._closed = False
        self._start()
        # A process forked after this (gunicorn's workers, when the app is preloaded) has
        # no sending thread: it gets one of its own, and leaves the records queued before
        # the fork to the parent, which sends them.
        ref = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: (handler := ref()) and handler._start())

    def _start(self) -> None:
        """Make the sending side afresh: the counts, the client, the queue and its thread."""
        self.sent = self.rejected = self.dropped = 0
        self._unsent = 0  # records queued or in the batch being sent
        self._abandoned = False  # close() counted what was unsent as dropped: count no more
        self._stalled = False  # a flush() timed out, and nothing was acknowledged since
        self._settled = threading.Condition()  # guards the counts; told when _unsent falls
        self._publisher = Publisher(self._url, token=self._token, retries=None, pool_size=1)
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._ids = (f"{self.source[:64]}-{os.getpid()}-{time.time_ns():x}-{n}"
                     for n in range(1, 1 << 62))
        self._given_up = threading.Event()
        self._sender = threading.Thread(target=self._send_batches, daemon=True,
                                        name="aggregator-handler")
        if not self._closed:
            self._sender.start()

    def emit(self, record: logging.LogRecord) -> None:
        """Queue the record as an event, or drop it (counted) if the buffer is full."""
        try:
            event = self._event(record)
        except Exception:  # noqa: BLE001 - logging's contract: report, never raise
            self.handleError(record)
            return
        with self._settled:
            if self._closed or self._unsent >= self._capacity:
                self.dropped += 1
                return
            self._unsent += 1
        self._queue.put(event)

    def _event(self, record: logging.LogRecord) -> dict:
        payload = {"level": record.levelname, "logger": record.name,
                   "message": _cut(record.getMessage()), "module": record.module,
                   "function": record.funcName, "line": record.lineno,
                   "process": record.process, "thread": record.threadName}
        if record.exc_info:
            payload["exception"] = _cut(_FORMATTER.formatException(record.exc_info))
        if record.stack_info:
            payload["stack"] = _cut(record.stack_info)
        extra = {k: v for k, v in vars(record).items() if k not in _STANDARD}
        if extra:  # JSON as far as it goes, the text of anything else (NaN: "NaN", not a
            # token that makes the aggregator refuse the whole batch as malformed JSON)
            payload["extra"] = json.loads(json.dumps(extra, default=str), parse_constant=str)
        return {"topic": self.topic, "event_id": next(self._ids),
                "timestamp": datetime.fromtimestamp(record.created, UTC).isoformat(
                    timespec="microseconds").replace("+00:00", "Z"),
                "source": self.source, "payload": payload}

    def _send_batches(self) -> None:
        """Send batch after batch until close(); once it gives up, count the rest dropped."""
        closing = False
        while not closing:
            first = self._queue.get()
            if first is _CLOSE:
                return
            if first is _FLUSH:
                continue
            batch, due = [first], time.monotonic() + self.linger
            while len(batch) < self.batch_size and (left := due - time.monotonic()) > 0:
                try:
                    event = self._queue.get(timeout=left)
                except queue.Empty:
                    break
                if event is _CLOSE or event is _FLUSH:  # send what is here now
                    closing = event is _CLOSE
                    break
                batch.append(event)
            if self._given_up.is_set():
                self._settle(len(batch), dropped=len(batch))
            else:
                self._send(Batch.of_events(batch))

    def _send(self, batch: Batch) -> None:
        try:
            result = self._publisher.publish(batch.body, batch.content_type)
        except PublishError:  # retried until close() gave up on it
            self._settle(batch.size, dropped=batch.size)
            return
        if result.status == 413 and batch.size > 1:  # over the aggregator's limits: halves
            for half in batch.halves():
                self._send(half)
        elif result.acknowledged:
            self._stalled = False
            self._settle(batch.size, sent=result.received, rejected=result.rejected)
        else:  # a refusal that retrying does not mend (401: the token)
            self._settle(batch.size, rejected=batch.size)

    def _settle(self, size: int, sent: int = 0, rejected: int = 0, dropped: int = 0) -> None:
        """Count what became of size records, which leave _unsent in the same step: so
        close(), giving up on a batch still under way, counts what is unsent then as
        dropped, and each record is counted once."""
        with self._settled:
            if not self._abandoned:
                self.sent += sent
                self.rejected += rejected
                self.dropped += dropped
            self._unsent -= size
            self._settled.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Send what is buffered now, without waiting for the linger, and wait up to timeout
        seconds (default close_timeout) for it to be sent; return whether it was."""
        self._queue.put(_FLUSH)
        with self._settled:
            settled = self._settled.wait_for(lambda: self._unsent == 0, self.close_timeout
                                             if timeout is None else timeout)
            self._stalled = not settled
            return settled

    def close(self) -> None:
        """Send what is buffered, waiting up to close_timeout seconds for it (and a second
        more for a batch under way once it gives up), then stop."""
        with self.lock:
            if self._closed:
                return
            self._closed = True
        self._queue.put(_CLOSE)
        # logging.shutdown() flushes first: after a flush that waited in vain, no second wait.
        self._sender.join(0 if self._stalled else self.close_timeout)
        if self._sender.is_alive():  # the aggregator is away: give up on what is left
            self._given_up.set()
            self._publisher.stop_retrying()
            self._sender.join(1.0)
        with self._settled:
            if self._sender.is_alive():  # a batch still under way: its connection hangs
                self._abandoned = True
                self.dropped += self._unsent
        self._publisher.close()
        super().close()


def _cut(text: str) -> str:
    """Return text, or its first MAX_TEXT characters and how many more there were."""
    if len(text) <= MAX_TEXT:
        return text
    return f"{text[:MAX_TEXT]}… [{len(text) - MAX_TEXT} more characters]"
