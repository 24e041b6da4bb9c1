"""One JSON error shape for every failure: {"error": code, "message": text, ...}."""

from __future__ import annotations

import json
import logging

from flask import Flask, jsonify
from werkzeug.exceptions import HTTPException

from .ingest import CommitTimeout, QueueFull, ShuttingDown
from .store import StoreError

log = logging.getLogger(__name__)


class APIError(Exception):
    """An error answered to the client as JSON with the given status."""

    def __init__(self, status: int, code: str, message: str, *, retry_after: int | None = None,
                 headers: dict[str, str | list[str]] | None = None, **extra: object):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after
        self.headers = headers or {}
        self.extra = extra


def error_response(error: APIError):
    """Render an APIError as a JSON response."""
    response = jsonify({"error": error.code, "message": error.message, **error.extra})
    response.status_code = error.status
    if error.retry_after is not None:
        response.headers["Retry-After"] = str(error.retry_after)
    for name, values in error.headers.items():
        for value in [values] if isinstance(values, str) else values:
            response.headers.add(name, value)
    return response


def _code(reason: str) -> str:
    """Turn an HTTP reason phrase ("URI Too Long") into an error code ("uri_too_long")."""
    return (reason or "error").lower().replace(" ", "_").replace("'", "")


def raw_error(status: int, reason: str, message: str, code: str | None = None) -> bytes:
    """An HTTP/1.1 answer in the JSON error shape that closes the connection, as bytes to
    write to a socket the app never saw (gunicorn's refusals, late headers)."""
    body = json.dumps({"error": code or _code(reason), "message": message or reason},
                      separators=(",", ":")).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
    return head.encode("latin-1") + body


def write_server_error(sock, status: int, reason: str, message: str) -> None:
    """Answer a request gunicorn refused before the app ran (414, 431, bad request line)
    in the JSON error shape, as gunicorn.util.write_error does in HTML."""
    from gunicorn.util import write_nonblock

    write_nonblock(sock, raw_error(status, reason, message))


def _http_exception(exc: HTTPException):
    response = error_response(APIError(exc.code or 500, _code(exc.name),
                                       exc.description or exc.name))
    if exc.code == 405 and exc.valid_methods:
        response.headers["Allow"] = ", ".join(exc.valid_methods)
    return response


def _unexpected(exc: Exception):
    log.exception("unhandled error")
    return error_response(APIError(500, "internal_error", "The server failed; this is a bug."))


def _queue_full(exc: QueueFull):
    return error_response(APIError(429, "queue_full",
                                   "The ingest queue is full; retry after a moment.",
                                   retry_after=1))


def _shutting_down(exc: ShuttingDown):
    return error_response(APIError(503, "shutting_down",
                                   "The server is shutting down; retry on another instance.",
                                   retry_after=5))


def _commit_timeout(exc: CommitTimeout):
    return error_response(APIError(503, "commit_timeout",
                                   "The commit did not finish in time; retrying is safe.",
                                   retry_after=2))


def _store_error(exc: StoreError):
    # The database's own words go to the log, not to the client.
    log.error("store error: %s", exc)
    message = {"database_full": "The database is full; nothing of this request was stored."}
    return error_response(APIError(
        503, exc.code, message.get(exc.code, "The database is unavailable; retrying is safe."),
        retry_after=5))


def init_app(app: Flask) -> None:
    """Register the handlers that turn every error into the JSON shape."""
    app.register_error_handler(APIError, error_response)
    app.register_error_handler(QueueFull, _queue_full)
    app.register_error_handler(ShuttingDown, _shutting_down)
    app.register_error_handler(CommitTimeout, _commit_timeout)
    app.register_error_handler(StoreError, _store_error)
    app.register_error_handler(HTTPException, _http_exception)
    app.register_error_handler(Exception, _unexpected)
