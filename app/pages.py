"""The HTML events page: rendering, and the headers every HTML response carries."""

from __future__ import annotations

import json
from collections.abc import Mapping
from urllib.parse import urlencode

from flask import Flask, Response, render_template, request, url_for
from jinja2 import BytecodeCache
from jinja2.bccache import Bucket

from .config import Config
from .store import Counters, StoredEvent

REFRESH_SECONDS = 5
PAGE_PARAMS = ("topic", "event_id", "source", "q", "since", "until", "limit", "after", "live")
# The page names at most this many topics (the largest); past it, the topic filter is a
# text field suggesting them, so a store of many thousand topics keeps a small page.
TOPICS_SHOWN = 50
# A payload this short is shown on one line, as stored (the payload column's width), not
# indented over several: {"i":1} took three lines a row.
_ONE_LINE_CHARS = 80
_LONG_PAYLOAD_CHARS = 300
_SUMMARY_CHARS = 80
_LONG_PAYLOAD_LINES = 12
# The page shows at most this much of a payload; the JSON API returns it whole.
SHOWN_PAYLOAD_CHARS = 16 * 1024
_INDENTED = json.JSONEncoder(indent=2, ensure_ascii=False)
# What a query string leaves as is, as werkzeug's url_for encodes one.
_QUERY_SAFE = "!$'()*,/:;?@"
CSP = ("default-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'; "
       "object-src 'none'")


def prefers_html() -> bool:
    """Return whether the client (a browser) ranks text/html above JSON."""
    best = request.accept_mimetypes.best_match(["application/json", "text/html"])
    return best == "text/html"


def page_params(args: Mapping[str, str]) -> dict[str, str]:
    """Return the page's non-empty query parameters (a submitted form sends empty ones)."""
    return {k: v for k, v in args.items() if k in PAGE_PARAMS and v.strip()}


def _row(event: StoredEvent, search: str | None) -> dict:
    compact = event.payload  # as stored
    if len(compact) <= _ONE_LINE_CHARS:  # one line as stored, as a search matches it
        pretty, cut, long = compact, False, False
    else:
        pretty, cut = _pretty(compact)
        long = (cut or len(pretty) > _LONG_PAYLOAD_CHARS
                or pretty.count("\n") > _LONG_PAYLOAD_LINES)
    return {"timestamp": event.timestamp, "topic": event.topic, "event_id": event.event_id,
            "source": event.source, "received_at": event.received_at,
            "pretty": _marked(pretty, search), "cut": cut, "size": len(compact), "long": long,
            "summary": _marked(_summary(compact, search), search)}


def _summary(compact: str, search: str | None) -> str:
    """The first 80 characters of a payload's compact JSON, or for a search those around
    the first match (a search matches that text), marked … where cut."""
    start = 0
    if search and (at := compact.find(search)) > _SUMMARY_CHARS // 2:
        start = at - _SUMMARY_CHARS // 4
    text = compact[start:start + _SUMMARY_CHARS]
    return ("…" if start else "") + text + ("…" if start + _SUMMARY_CHARS < len(compact) else "")


def _marked(text: str, search: str | None) -> list[str]:
    """Split text around each occurrence of the search: the page marks what is between."""
    return text.split(search) if search else [text]


def _pretty(payload: str) -> tuple[str, bool]:
    """Return the stored payload (compact JSON) indented, and whether it was cut: to at
    most SHOWN_PAYLOAD_CHARS, for indenting can make a small payload huge (two spaces a
    level on every line: 2 KB nested 990 deep is 2 MB indented)."""
    if len(payload) > SHOWN_PAYLOAD_CHARS:
        return payload[:SHOWN_PAYLOAD_CHARS], True
    shown, size = [], 0
    for chunk in _INDENTED.iterencode(json.loads(payload)):
        shown.append(chunk)
        size += len(chunk)
        if size > SHOWN_PAYLOAD_CHARS:
            return "".join(shown)[:SHOWN_PAYLOAD_CHARS], True
    return "".join(shown), False


def render_events_page(counters: Counters, params: dict[str, str], *,
                       events: list[StoredEvent] = (), next_cursor: str | None = None,
                       limit: int = 100, searched: Config | None = None,
                       errors: Mapping[str, list] | None = None) -> Response:
    """Render the events page (a 400 page when errors name bad filters), naming the topics
    of counters (the largest TOPICS_SHOWN: Store.counters(largest=TOPICS_SHOWN)). searched
    is given (the settings of a search: search_scan, search_time) when a search's scans
    ended the page before it was full."""
    live = params.get("live") == "1"
    # The page's links are built here, not by url_for: its rows link their topic, event and
    # source, and 300 calls of url_for took a third of a page's time.
    base = url_for("api.events")

    def events_url(**args: str | None) -> str:
        query = urlencode([(k, v) for k, v in args.items() if v is not None], safe=_QUERY_SAFE)
        return f"{base}?{query}" if query else base

    def page_url(**changes: str | None) -> str:
        return events_url(**{**params, **changes})

    filters = {**params, "limit": limit}
    html = render_template(
        "events.html", stats=counters, events=[_row(e, params.get("q")) for e in events],
        topics=sorted(counters.topics.items()),
        topics_not_shown=counters.topics_in_all - len(counters.topics),
        next_cursor=next_cursor, searched=searched, filters=filters, live=live,
        refresh_seconds=REFRESH_SECONDS,
        page_url=page_url, events_url=events_url,
        error=("Some filter values are not valid." if errors else None),
        error_fields=errors or {})
    return Response(html, status=400 if errors else 200, mimetype="text/html")


def _security_headers(response: Response) -> Response:
    response.headers["X-Content-Type-Options"] = "nosniff"
    if response.mimetype == "text/html":
        response.headers["Content-Security-Policy"] = CSP
        response.headers["Referrer-Policy"] = "same-origin"
    return response


class _CompiledTemplates(BytecodeCache):
    """The templates' compiled code, kept for every app this process makes (Jinja checks
    each against its source's checksum)."""

    def __init__(self) -> None:
        self._code: dict[str, bytes] = {}

    def load_bytecode(self, bucket: Bucket) -> None:
        if (code := self._code.get(bucket.key)) is not None:
            bucket.bytecode_from_string(code)

    def dump_bytecode(self, bucket: Bucket) -> None:
        self._code[bucket.key] = bucket.bytecode_to_string()


_COMPILED = _CompiledTemplates()


def init_app(app: Flask) -> None:
    """Add the security headers to every response, and compile the templates now, not
    in the first request that renders each: the first events page a worker served took
    23 ms more than the next (45 ms more with /docs). A process compiles them once, for
    all the apps it makes (0.6-0.9 ms for each app after the first)."""
    app.after_request(_security_headers)
    app.jinja_env.bytecode_cache = _COMPILED
    for name in ("events.html", "docs.html"):
        app.jinja_env.get_template(name)
