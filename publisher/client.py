"""A client for the aggregator: one session, timeouts on every call, urllib3 retries."""

from __future__ import annotations

import gzip
import re
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

RETRY_STATUSES = (408, 429, 502, 503, 504)
GZIP_LEVEL = 6  # zlib's default: batches of generated events shrink 8 times, 4.5 us per event
MAX_BACKOFF = 30.0
WAIT_NOTICE_SECONDS = 10.0


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def checked_url(text: str) -> str:
    """Return the aggregator's base URL, stripped, if it is http:// or https:// with a host
    (and a port, if any, in 1..65535); else raise ValueError naming it. Without this,
    `localhost:8080` failed only at the first request ("No connection adapters were
    found"): after the CLI's whole --wait, or, in AggregatorHandler, every record dropped."""
    parts = urllib.parse.urlsplit(text.strip())
    try:
        port_ok = parts.port != 0
    except ValueError:  # not a number, or not in 0..65535
        port_ok = False
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname or not port_ok:
        raise ValueError(f"{text!r} is not an http:// or https:// URL with a host, such as "
                         "http://127.0.0.1:8080")
    return text.strip()


def valid_name(value: str) -> bool:
    """Return whether the aggregator takes value as a topic or a source: 1 to 255
    characters, none a control character."""
    return 0 < len(value) <= 255 and not _CONTROL.search(value)


class PublishError(Exception):
    """A batch could not be delivered; the message is one line for the user. status is the
    HTTP status of a refusal, None when no answer came."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class BatchResult:
    """The aggregator's answer to one batch."""

    status: int
    received: int = 0
    unique_processed: int = 0
    duplicate_dropped: int = 0
    rejected: int = 0
    errors: dict[str, dict] = field(default_factory=dict)
    message: str = ""

    @property
    def acknowledged(self) -> bool:
        """Return whether the aggregator committed every valid event (200, 207 or 422)."""
        return self.status in (200, 207, 422)


class StoppableRetry(Retry):
    """urllib3's Retry that tells on_retry(reason, seconds, attempt) before each wait, and
    that stops retrying once its stop event is set: a wait under way ends at once (one last
    attempt follows), and no retry comes after it."""

    def __init__(self, *args, stop: threading.Event | None = None,
                 on_retry: Callable[[str, float, int], None] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.stop = stop if stop is not None else threading.Event()
        self.on_retry = on_retry

    def new(self, **kw) -> StoppableRetry:
        return super().new(stop=self.stop, on_retry=self.on_retry, **kw)

    def is_exhausted(self) -> bool:
        return self.stop.is_set() or super().is_exhausted()

    def sleep(self, response=None) -> None:
        seconds = None
        if self.respect_retry_after_header and response is not None:
            seconds = self.get_retry_after(response)
        if not seconds:
            seconds = self.get_backoff_time()
        if self.on_retry is not None and self.history:
            last = self.history[-1]
            reason = _reason(last.error) if last.error else f"HTTP {last.status}"
            self.on_retry(reason, seconds, len(self.history))
        self.stop.wait(seconds)


class Publisher:
    """Send batches to an aggregator, retrying what is safe to retry."""

    def __init__(self, url: str, *, token: str | None = None, retries: int | None = 8,
                 backoff: float = 0.5, max_backoff: float = MAX_BACKOFF,
                 timeout: tuple[float, float] = (5.0, 60.0), pool_size: int = 10,
                 on_retry: Callable[[str, float, int], None] | None = None,
                 compress: bool = False):
        """retries=None retries without end, until stop_retrying() is called; on_retry is
        called (from the sending thread) before each wait for a retry. compress=True sends
        every body gzipped (Content-Encoding: gzip)."""
        self.url = checked_url(url).rstrip("/")
        self.compress = compress
        self.timeout = timeout
        self.session = requests.Session()
        self._stop = threading.Event()
        # Every POST is safe to repeat: the aggregator deduplicates on (topic, event_id).
        retry = StoppableRetry(total=retries, connect=retries, read=retries, status=retries,
                               other=retries, backoff_factor=backoff, backoff_max=max_backoff,
                               backoff_jitter=backoff, status_forcelist=RETRY_STATUSES,
                               allowed_methods=None, respect_retry_after_header=True,
                               raise_on_status=False, stop=self._stop, on_retry=on_retry)
        adapter = HTTPAdapter(max_retries=retry, pool_connections=1, pool_maxsize=pool_size)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"

    def stop_retrying(self) -> None:
        """Make every request under way give up at its next wait for a retry (or end that
        wait at once): it then answers with its last status, or raises PublishError."""
        self._stop.set()

    def wait_ready(self, seconds: float,
                   on_wait: Callable[[str, float], None] | None = None) -> bool:
        """Wait until /health answers 200 and return True, or return False as soon as
        stop_retrying() is called; raise PublishError after the given seconds (math.inf:
        no end). While it waits, on_wait(reason, seconds waited so far) is called every
        WAIT_NOTICE_SECONDS."""
        start = time.monotonic()
        deadline = start + seconds
        notice = start + WAIT_NOTICE_SECONDS
        last = "no answer"
        while not self._stop.is_set():
            try:
                response = requests.get(self.url + "/health", timeout=(2, 5))
                if response.status_code == 200:
                    return True
                last = f"/health answered {response.status_code}"
            except requests.RequestException as exc:
                last = _reason(exc)
            now = time.monotonic()
            if now >= deadline:
                raise PublishError(f"{self.url} was not ready within {seconds:g}s ({last})")
            if on_wait is not None and now >= notice:
                notice += WAIT_NOTICE_SECONDS
                on_wait(last, now - start)
            self._stop.wait(min(0.5, deadline - now))
        return False

    def publish(self, body: bytes, content_type: str = "application/json") -> BatchResult:
        """POST one batch body; return the answer, or raise PublishError if unreachable."""
        headers = {"Content-Type": content_type}
        if self.compress:
            body = gzip.compress(body, compresslevel=GZIP_LEVEL, mtime=0)
            headers["Content-Encoding"] = "gzip"
        try:
            response = self.session.post(self.url + "/publish", data=body, timeout=self.timeout,
                                         headers=headers)
        except requests.RequestException as exc:
            raise PublishError(f"cannot deliver to {self.url}: {_reason(exc)}") from None
        answer = _json_object(response) or {}
        counts = {key: answer.get(key, 0) for key in
                  ("received", "unique_processed", "duplicate_dropped", "rejected")}
        return BatchResult(response.status_code, **counts, errors=answer.get("errors") or {},
                           message=answer.get("message") or response.reason or "")

    def events(self, params: dict[str, str]) -> dict:
        """Return one page of GET /events ({"events": [...], "next_cursor": ...}), retried
        as a publish is; raise PublishError, with the aggregator's message, otherwise."""
        try:
            response = self.session.get(self.url + "/events", params=params,
                                        timeout=self.timeout,
                                        headers={"Accept": "application/json"})
        except requests.RequestException as exc:
            raise PublishError(f"cannot read from {self.url}: {_reason(exc)}") from None
        page = _json_object(response)
        if response.status_code != 200 or page is None:
            message = (page or {}).get("message")
            raise PublishError(f"GET /events answered HTTP {response.status_code}: "
                               f"{message or response.reason}", status=response.status_code)
        return page

    def stats(self) -> dict:
        """Return the aggregator's /stats."""
        response = self.session.get(self.url + "/stats", timeout=self.timeout)
        response.raise_for_status()
        return response.json()

    def close(self) -> None:
        """Close the session's connections."""
        self.session.close()


def _json_object(response: requests.Response) -> dict | None:
    """Return the answer's JSON object, or None when it is not one (a proxy's HTML page)."""
    try:
        answer = response.json()
    except ValueError:
        return None
    return answer if isinstance(answer, dict) else None


def _reason(exc: BaseException) -> str:
    """Return the innermost cause of a requests or urllib3 error, in a few words."""
    cause: BaseException = exc
    while cause.__context__ is not None and cause.__context__ is not cause:
        cause = cause.__context__
    text = str(cause) or type(cause).__name__
    if "Connection refused" in text:
        return "connection refused"
    return text.split(": ", 1)[-1][:200]
