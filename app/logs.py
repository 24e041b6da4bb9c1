"""JSON logs on stdout, one object per line, and per-request ids, timing and access lines."""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import uuid
from datetime import UTC, datetime

from flask import Flask, Response, current_app, g, has_request_context, request
from gunicorn import glogging

access_log = logging.getLogger("aggregator.access")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")
_FIELDS = ("request_id", "method", "path", "status", "duration_ms", "bytes", "events",
           "remote_addr")


def utc_text(seconds: float, timespec: str = "milliseconds") -> str:
    """Return a Unix time as the text of every time we write (logs, received_at, /stats):
    ISO 8601 in UTC, ending in Z."""
    moment = datetime.fromtimestamp(seconds, UTC)
    return moment.isoformat(timespec=timespec).replace("+00:00", "Z")


class JsonFormatter(logging.Formatter):
    """Format a record as one JSON object: time, level, logger, message, request fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": utc_text(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        for name in _FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value
        if "request_id" not in entry and has_request_context() and "request_id" in g:
            entry["request_id"] = g.request_id
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class GunicornLogger(glogging.Logger):
    """gunicorn's logger (`logger_class` in app/gunicorn.conf.py), minus its access log.

    The app writes the access lines itself (_finish), and gunicorn's own would be dropped
    anyway: the logging config gives `gunicorn.access` no handler, and it replaces any that
    --access-logfile or --log-syslog added. Yet gunicorn built each of them before dropping
    it (the atoms of every request: its headers, environ and timings), 10-15% of a worker's
    CPU for a request of 10 events from a single client (bench/RESULTS.md, Ingest).
    """

    def access(self, resp, req, environ, request_time) -> None:
        return None


def configure() -> None:
    """Send every log record to stdout as JSON, unless logging is configured already."""
    root = logging.getLogger()
    if root.handlers:
        return
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter())
    root.addHandler(handler)
    root.setLevel(logging.INFO)


# The reads whose duration is a metric, by endpoint: the path label.
_READS = {"api.events": "/events", "api.stats": "/stats"}
# Marks the requests a worker answers itself before it takes traffic (app.warm_up): they go
# through every step but are neither timed in the metrics nor logged.
WARM_UP = "aggregator.warm_up"


def _start() -> None:
    g.started = time.perf_counter()
    given = request.headers.get("X-Request-ID", "")
    g.request_id = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex


def _finish(response: Response) -> Response:
    duration = time.perf_counter() - g.get("started", time.perf_counter())
    response.headers["X-Request-ID"] = g.get("request_id", "")
    timer = None
    if request.endpoint == "api.publish":
        timer = current_app.extensions["metrics"].publish_seconds.labels(
            str(response.status_code))
    elif request.endpoint in _READS:
        timer = current_app.extensions["metrics"].read_seconds.labels(
            _READS[request.endpoint], str(response.status_code))
    if request.environ.get(WARM_UP):
        return response
    if timer is not None:
        timer.observe(duration)
    # Never the headers (tokens) nor the body (payloads): only what locates the request.
    access_log.info("%s %s %s", request.method, request.path, response.status_code, extra={
        "request_id": g.get("request_id"), "method": request.method, "path": request.path,
        "status": response.status_code, "duration_ms": round(duration * 1000, 2),
        # The answer's body as sent (gzipped, if it was: app/compression.py runs first).
        "bytes": response.content_length,
        "events": g.get("events"), "remote_addr": request.remote_addr})
    return response


def init_app(app: Flask) -> None:
    """Give every request an id (kept from X-Request-ID when sane) and an access line."""
    app.before_request(_start)
    app.after_request(_finish)
