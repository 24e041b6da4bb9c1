"""Read a /publish body into a list of raw events, bounded at every step."""

from __future__ import annotations

import json
import sys
import threading
import zlib
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager

from flask import Request
from werkzeug.exceptions import ClientDisconnected

from .deadlines import STEP, WATCHER
from .errors import APIError

JSON_TYPES = {"application/json"}
NDJSON_TYPES = {"application/x-ndjson", "application/ndjson", "application/jsonl"}
# How long a request waits for room in the body budget before its 429.
BUDGET_WAIT_SECONDS = 5.0


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _too_large(limit: int) -> APIError:
    return APIError(413, "body_too_large", f"The body is larger than {limit} bytes.", limit=limit)


def _read_raw(request: Request, limit: int, step_timeout: float) -> bytes:
    """Read at most limit bytes of the body (chunked or not), refusing more, and giving up
    when a step of the body (STEP bytes, or the rest) takes more than step_timeout
    seconds.

    gunicorn's threads read a body from a blocking socket with no timeout: a client that
    stopped sending (a publisher that died, a network cut with no reset), or sent a byte
    now and then, held the thread for as long as it liked. A late step is ended by the
    process's deadline watcher (app/deadlines.py), which the 408 reports.
    """
    sock = request.environ.get("gunicorn.socket")
    deadline = WATCHER.watch(sock, step_timeout) if sock is not None else None
    stream, parts, size, failure = request.stream, [], 0, None
    try:
        while True:
            part = stream.read(min(STEP, limit + 1 - size))
            if not part:
                break
            parts.append(part)
            size += len(part)
            if size > limit:
                raise _too_large(limit)
            if deadline is not None:
                deadline.renew()
    except (OSError, ValueError, ClientDisconnected):
        # gunicorn raises the socket's error (or its NoMoreData, an OSError, at an early
        # end); werkzeug, under other servers, turns it into ClientDisconnected.
        failure = _incomplete()
    except Exception as exc:
        if type(exc).__module__ != "gunicorn.http.errors":
            raise
        failure = APIError(400, "bad_chunked_body", f"The chunked body is malformed "
                           f"({type(exc).__name__}: {exc}); nothing was stored.")
    finally:
        late = deadline is not None and not deadline.cancel()
    if late:  # the watcher ended the read: whatever came short or broke came from that
        raise APIError(408, "body_timeout", f"The body stopped coming: {STEP // 1024} "
                       f"KiB of it (or the rest) took more than {step_timeout:g} s "
                       "(AGGREGATOR_BODY_TIMEOUT); nothing was stored.")
    if failure is not None:
        raise failure
    if request.content_length is not None and size < request.content_length:
        raise _incomplete()
    return b"".join(parts)


def _incomplete() -> APIError:
    return APIError(400, "incomplete_body", "The connection ended before the whole body "
                    "arrived; nothing was stored.")


def _gunzip(data: bytes, limit: int) -> bytes:
    """Decompress gzip (several members allowed), stopping as soon as limit is passed."""
    out, size = [], 0
    while data:
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            chunk = inflater.decompress(data, limit + 1 - size)
        except zlib.error as exc:
            raise APIError(400, "bad_gzip", f"The body is not valid gzip: {exc}.") from None
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        out.append(chunk)
        if not inflater.eof:
            if inflater.unconsumed_tail:
                raise _too_large(limit)
            raise APIError(400, "bad_gzip", "The gzip body is truncated.")
        data = inflater.unused_data
    return b"".join(out)


def _loads(text: str, where: str = "") -> object:
    # RFC 8259 (8.1) lets a parser ignore a byte order mark. Windows tools write one at the
    # start of UTF-8 files (PowerShell 5's `Out-File -Encoding UTF8`, Notepad before 2019),
    # and shippers send such files, or concatenations of them, whole or line by line.
    if text.startswith("\ufeff"):
        text = text[1:]
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except ValueError as exc:
        if type(exc) is ValueError and "digits" in str(exc):
            # Python's guard against quadratic int parsing; its message tells a programmer
            # to call sys.set_int_max_str_digits(), which a client cannot.
            raise APIError(400, "malformed_json",
                           f"An integer{where} has more than {sys.get_int_max_str_digits()} "
                           "digits, the most this server parses.") from None
        raise APIError(400, "malformed_json",
                       f"The body is not valid JSON{where}: {exc}.") from None
    except RecursionError:
        raise APIError(400, "malformed_json", f"The JSON{where} is nested too deeply.") from None


def _events_of(document: object) -> list:
    if isinstance(document, list):
        return document
    if isinstance(document, dict):
        if "events" in document:
            # An event has no field named events, so this object is a batch whatever
            # else it holds; read as one event, it got a 422 listing five missing fields.
            if len(document) > 1:
                others = [key for key in document if key != "events"]
                named = ", ".join(repr(key[:40]) for key in others[:5])
                more = f" and {len(others) - 5} more" if len(others) > 5 else ""
                raise APIError(400, "bad_body",
                               "An object holding 'events' is a batch, and 'events' must be "
                               f"its only key; it also has {named}{more}.")
            if isinstance(document["events"], list):
                return document["events"]
            raise APIError(400, "bad_body", "'events' must be a JSON array of events.")
        return [document]
    raise APIError(400, "bad_body",
                   "The body must be an event object, an array of events or {\"events\": [...]}.")


class BodyBudget:
    """The bytes of /publish bodies that one process parses and holds at once.

    A body takes several times its size in memory until its events are committed: a
    14.5 MB body of ordinary events took a worker from 32 to 96 MB, and 16 of them at
    once to 1 GB. Once its body is read, a request holds the body's size until its
    commit is answered; requests wait their turn in arrival order, for at most
    BUDGET_WAIT_SECONDS, then get a 429. Parsing takes the GIL anyway, so bodies parsed
    one after the other go about as fast as bodies parsed at once. A body larger than the
    whole budget waits for all of it.

    The budget is taken after the body is read, not before: a client that sends slowly
    (a slow link, or on purpose) then holds only its own bytes and a thread, never room
    that the others need.
    """

    def __init__(self, limit: int, wait: float = BUDGET_WAIT_SECONDS):
        self.limit = limit
        self.used = 0
        self._wait = wait
        self._room = threading.Condition()
        self._queue: deque[object] = deque()

    @contextmanager
    def hold(self, size: int) -> Iterator[None]:
        """Hold size bytes (or the whole budget, if less) for the with-block; raise a 429
        APIError if there is no room in time."""
        size = min(size, self.limit)
        ticket = object()
        with self._room:
            self._queue.append(ticket)
            try:
                fits = self._room.wait_for(
                    lambda: self._queue[0] is ticket and self.used + size <= self.limit,
                    self._wait)
            finally:
                self._queue.remove(ticket)
                self._room.notify_all()
            if not fits:
                raise APIError(429, "busy", "The server is parsing as many bytes of request "
                               "bodies as AGGREGATOR_BODY_BUDGET allows; retry after a moment.",
                               retry_after=1)
            self.used += size
        try:
            yield
        finally:
            with self._room:
                self.used -= size
                self._room.notify_all()


def check_headers(request: Request, *, max_body: int) -> None:
    """Refuse a /publish request by its headers, before its body is read (APIError)."""
    if request.mimetype not in JSON_TYPES and request.mimetype not in NDJSON_TYPES:
        raise APIError(415, "unsupported_media_type",
                       "Send Content-Type: application/json or application/x-ndjson.")
    if _encoding(request) not in ("identity", "gzip", "x-gzip"):
        raise APIError(415, "unsupported_encoding",
                       "Content-Encoding must be gzip or absent.")
    if request.content_length is not None and request.content_length > max_body:
        raise _too_large(max_body)


def _encoding(request: Request) -> str:
    return (request.headers.get("Content-Encoding") or "identity").strip().lower()


def read_body(request: Request, *, max_body: int, step_timeout: float) -> tuple[bytes, int]:
    """Return the body of a request check_headers accepted, decompressed, and its size as
    received, or raise APIError (step_timeout: seconds each STEP bytes may take before a
    408)."""
    data = _read_raw(request, max_body, step_timeout)
    received = len(data)
    if _encoding(request) != "identity":
        data = _gunzip(data, max_body)
    return data, received


def encoding_label(request: Request) -> str:
    """Return the body's encoding as a metric label: gzip (x-gzip too) or identity."""
    return "identity" if _encoding(request) == "identity" else "gzip"


def parse_events(request: Request, data: bytes, *, max_batch: int) -> list:
    """Return the raw (unvalidated) events of a body read_body returned, or raise
    APIError."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise APIError(400, "bad_utf8",
                       f"The body is not valid UTF-8 (byte {exc.start}).") from None
    if request.mimetype in JSON_TYPES:
        events = _events_of(_loads(text))
    else:
        events = _ndjson(text, max_batch)
    if len(events) > max_batch:
        raise _too_many(max_batch)
    return events


def _too_many(limit: int) -> APIError:
    return APIError(413, "too_many_events", f"The batch holds more than {limit} events.",
                    limit=limit)


def _ndjson(text: str, max_batch: int) -> list:
    events = []
    for number, line in enumerate(text.split("\n"), 1):
        if line.strip():
            if len(events) == max_batch:
                raise _too_many(max_batch)
            events.append(_loads(line, f" on line {number}"))
    return events
