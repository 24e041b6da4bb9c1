"""HTTP endpoints: publish, events, stats, health."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from json.encoder import encode_basestring as _quote
from typing import NamedTuple

from flask import (
    Blueprint,
    Response,
    current_app,
    g,
    jsonify,
    redirect,
    render_template,
    request,
    url_for,
)
from marshmallow import Schema, ValidationError

from . import pages
from .auth import require_read, require_write
from .batch import build_batch
from .body import check_headers, encoding_label, parse_events, read_body
from .config import Config
from .errors import APIError
from .ingest import Ingestor
from .logs import utc_text
from .metrics import CONTENT_TYPE
from .schemas import EventsQuerySchema, StatsQuerySchema, check_utf8_query, encode_cursor
from .store import EventQuery, Store, StoredEvent, StoreError
from .store.base import utf8_length

bp = Blueprint("api", __name__)
_events_query = EventsQuerySchema()
_stats_query = StatsQuerySchema()
# How long a search waits for a slot (see _search_slot): a search takes about
# AGGREGATOR_SEARCH_TIME (0.25 s) at most, so a few turns.
SEARCH_WAIT_S = 1.0


def _config() -> Config:
    return current_app.config["AGGREGATOR"]


def _store() -> Store:
    return current_app.extensions["store"]


def _ingestor() -> Ingestor:
    return current_app.extensions["ingestor"]


@bp.post("/publish")
def publish() -> tuple[Response, int]:
    """Validate, durably store and count a batch of events."""
    config = _config()
    require_write(config)
    check_headers(request, max_body=config.max_body)
    data, received = read_body(request, max_body=config.max_body,
                               step_timeout=config.body_timeout)
    current_app.extensions["metrics"].observe_body(encoding_label(request), received, len(data))
    # From here until its commit is answered, what the body becomes in memory (text,
    # objects, rows) is several times its size: it is held of the process's budget.
    with current_app.extensions["body_budget"].hold(len(data)):
        raw = parse_events(request, data, max_batch=config.max_batch)
        g.events = len(raw)
        del data
        batch, errors = build_batch(raw, current_app.extensions["event_schema"])
        del raw
        outcome = _ingestor().submit(batch)
        del batch
    body = {"received": outcome.received, "unique_processed": outcome.unique_processed,
            "duplicate_dropped": outcome.duplicate_dropped, "rejected": outcome.rejected}
    if not errors:
        return jsonify(body), 200
    if outcome.received:
        return jsonify({**body, "errors": errors}), 207
    return jsonify({"error": "invalid_events", "message": "No event in the request was valid.",
                    **body, "errors": errors}), 422


@bp.get("/")
def index() -> Response:
    """Lead to the events page."""
    return redirect(url_for("api.events"))


@bp.get("/events")
def events() -> Response:
    """Return a page of stored events: JSON, or the HTML page for a browser."""
    require_read(_config())
    if pages.prefers_html():
        return _events_page()
    page = _fetch_page(_load_query(_events_query))
    # Each payload goes out as it is stored: the compact JSON that ingest encoded (and
    # checked). Parsing it to encode it again cost time and, for a page of large or
    # deeply nested payloads, memory many times the page's size.
    events = ", ".join(
        f'{{"topic": {_quote(e.topic)}, "event_id": {_quote(e.event_id)}, '
        f'"timestamp": {_quote(e.timestamp)}, "source": {_quote(e.source)}, '
        f'"payload": {e.payload}, "received_at": {_quote(e.received_at)}}}'
        for e in page.events)
    body = (f'{{"events": [{events}], "next_cursor": {json.dumps(page.next_cursor)}, '
            f'"end_cursor": {json.dumps(page.end_cursor)}}}\n')
    return current_app.response_class(body, mimetype="application/json")


def _load_query(schema: Schema) -> dict:
    """Return the request's query string loaded by the schema; 400 naming what is bad."""
    try:
        check_utf8_query(request.query_string)
        return schema.load(request.args)
    except ValidationError as exc:
        names = ", ".join(sorted(exc.messages))
        raise APIError(400, "bad_query", f"Invalid query parameter(s): {names}.",
                       errors=exc.messages) from None


def _events_page() -> Response:
    params = pages.page_params(request.args)
    counters = _store().counters(largest=pages.TOPICS_SHOWN)
    try:
        check_utf8_query(request.query_string)
        args = _events_query.load({**params, "order": "desc"})
    except ValidationError as exc:
        return pages.render_events_page(counters, params, errors=exc.messages)
    page = _fetch_page(args)
    return pages.render_events_page(counters, params, events=page.events,
                                    next_cursor=page.next_cursor, limit=args["limit"],
                                    searched=_config() if page.searched else None)


@contextmanager
def _search_slot(query: EventQuery) -> Iterator[None]:
    """Hold one of this process's AGGREGATOR_SEARCH_CONCURRENCY search slots while a search
    (not an event_id lookup) runs; 429 busy when none frees up within SEARCH_WAIT_S."""
    if not query.searching:
        yield
        return
    slots = current_app.extensions["searches"]
    if not slots.acquire(timeout=SEARCH_WAIT_S):
        raise APIError(429, "busy", "This worker is running as many searches as "
                       "AGGREGATOR_SEARCH_CONCURRENCY allows; retry in a moment.",
                       retry_after=1)
    try:
        yield
    finally:
        slots.release()


class _Page(NamedTuple):
    events: list[StoredEvent]
    next_cursor: str | None  # where the next page begins; None: no more events now
    # Past the page's last event (or, for a page with none, where it was asked from), and
    # oldest first at the end, past the last event stored: where a later request goes on to
    # see only what arrived since. next_cursor when there is one.
    end_cursor: str | None
    searched: bool  # a search read its scans (AGGREGATOR_SEARCH_SCAN) before it was full


def _fetch_page(args: dict) -> _Page:
    """Return one page of events for loaded query arguments.

    A page holds up to limit events, and fewer when their payloads are over
    AGGREGATOR_MAX_PAGE_BYTES (but at least one): the store reads one event past the
    page, by count or by size, which says that another page follows. A search's page
    holds fewer, or none, when it read its scans first: it goes on from where they ended."""
    limit = args["limit"]
    config = _config()
    query = EventQuery(
        topic=args.get("topic"), event_id=args.get("event_id"), source=args.get("source"),
        since=args.get("since"), until=args.get("until"), after=args.get("after"),
        limit=limit + 1, descending=args["order"] == "desc",
        max_bytes=config.max_page_bytes, contains=args.get("q"), scan=config.search_scan)
    with _search_slot(query):
        result = _store().events(query)
        # A search that found nothing in its scan reads on, another scan at a time, for up
        # to AGGREGATOR_SEARCH_TIME: a rare text is not a long run of empty pages.
        deadline = time.monotonic() + config.search_time
        while not result.events and result.searched_to is not None and (
                time.monotonic() < deadline):
            query = replace(query, after=result.searched_to)
            result = _store().events(query)
    rows = result.events
    more = len(rows) > limit or query.over_size(
        len(rows), sum(utf8_length(event.payload) for event in rows))
    if more:
        cursor = encode_cursor(rows[-2].seq)
        return _Page(rows[:-1], cursor, cursor, False)
    if result.searched_to is not None:
        cursor = encode_cursor(result.searched_to)
        return _Page(rows, cursor, cursor, True)
    end = rows[-1].seq if rows else query.after
    if result.read_to is not None and (end is None or result.read_to > end):
        end = result.read_to  # oldest first: past the events that did not match as well
    return _Page(rows, None, None if end is None else encode_cursor(end), False)


@bp.get("/stats")
def stats() -> Response:
    """Return the persisted counters and this process's queue depth."""
    require_read(_config())
    counters = _store().counters(largest=_load_query(_stats_query).get("topics"))
    started = current_app.extensions["started_at"]
    return jsonify({
        "received": counters.received, "unique_processed": counters.unique_processed,
        "duplicate_dropped": counters.duplicate_dropped, "rejected": counters.rejected,
        "expired": counters.expired, "topics": counters.topics,
        "topics_last_stored_at": counters.last_stored, "topics_in_all": counters.topics_in_all,
        "uptime": round(time.time() - started, 3),
        "started_at": utc_text(started, "seconds"),
        "queue_depth": _ingestor().depth,
    })


@bp.get("/health")
def health() -> tuple[Response, int]:
    """Answer 200 when the database answers and the writers are alive, else 503."""
    return _health(ready=False)


@bp.get("/health/live")
def live() -> Response:
    """Answer 200 while the process serves requests (liveness)."""
    return jsonify({"status": "ok"})


@bp.get("/health/ready")
def ready() -> tuple[Response, int]:
    """Answer 200 when a batch sent now would be committed (readiness), else 503."""
    return _health(ready=True)


def _health(*, ready: bool) -> tuple[Response, int]:
    ingestor = _ingestor()
    checks = {"database": "ok", "writers": "ok"}
    try:
        _store().ping()
    except StoreError as exc:
        checks["database"] = str(exc)
    problem = ingestor.writers_problem
    if problem:
        checks["writers"] = problem
    if ready:
        checks["last_commit"] = ingestor.last_error or "ok"
        checks["queue"] = "full" if ingestor.saturated else "ok"
    healthy = all(v == "ok" for v in checks.values())
    return jsonify({"status": "ok" if healthy else "unavailable", "checks": checks}), (
        200 if healthy else 503)


@bp.get("/metrics")
def metrics() -> Response:
    """Return every metric in the Prometheus text format."""
    require_read(_config())
    return Response(current_app.extensions["metrics"].render(), content_type=CONTENT_TYPE)


@bp.get("/openapi.json")
def openapi() -> Response:
    """Return the OpenAPI document."""
    return jsonify(current_app.extensions["openapi"])


@bp.get("/docs")
def docs() -> str:
    """Render the OpenAPI document as a page (no CDN, no JavaScript)."""
    spec = current_app.extensions["openapi"]

    def resolve(schema: dict, depth: int = 0) -> dict:
        """Inline component references so each body reads on its own."""
        if isinstance(schema, dict):
            ref = schema.get("$ref", "")
            if ref.startswith("#/components/schemas/") and depth < 4:
                return resolve(spec["components"]["schemas"][ref.rsplit("/", 1)[1]], depth + 1)
            return {k: resolve(v, depth) for k, v in schema.items()}
        if isinstance(schema, list):
            return [resolve(v, depth) for v in schema]
        return schema

    return render_template("docs.html", spec=spec, resolve=resolve)
