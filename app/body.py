"""Read a /publish body into a list of raw events, bounded at every step."""

from __future__ import annotations

import json
import zlib

from flask import Request

from .errors import APIError

JSON_TYPES = {"application/json"}
NDJSON_TYPES = {"application/x-ndjson", "application/ndjson", "application/jsonl"}
_READ_CHUNK = 1024 * 1024


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _too_large(limit: int) -> APIError:
    return APIError(413, "body_too_large", f"The body is larger than {limit} bytes.", limit=limit)


def _read_raw(request: Request, limit: int) -> bytes:
    """Read at most limit bytes of the body (chunked or not), refusing more."""
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(limit)
    stream, parts, size = request.stream, [], 0
    while True:
        part = stream.read(min(_READ_CHUNK, limit + 1 - size))
        if not part:
            return b"".join(parts)
        parts.append(part)
        size += len(part)
        if size > limit:
            raise _too_large(limit)


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
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except ValueError as exc:
        raise APIError(400, "malformed_json",
                       f"The body is not valid JSON{where}: {exc}.") from None
    except RecursionError:
        raise APIError(400, "malformed_json", f"The JSON{where} is nested too deeply.") from None


def _events_of(document: object) -> list:
    if isinstance(document, list):
        return document
    if isinstance(document, dict):
        if "events" in document and len(document) == 1:
            if isinstance(document["events"], list):
                return document["events"]
            raise APIError(400, "bad_body", "'events' must be a JSON array of events.")
        return [document]
    raise APIError(400, "bad_body",
                   "The body must be an event object, an array of events or {\"events\": [...]}.")


def read_events(request: Request, *, max_body: int, max_batch: int) -> list:
    """Return the raw (unvalidated) events of a /publish request, or raise APIError."""
    mimetype = request.mimetype
    if mimetype not in JSON_TYPES and mimetype not in NDJSON_TYPES:
        raise APIError(415, "unsupported_media_type",
                       "Send Content-Type: application/json or application/x-ndjson.")
    encoding = (request.headers.get("Content-Encoding") or "identity").strip().lower()
    if encoding not in ("identity", "gzip", "x-gzip"):
        raise APIError(415, "unsupported_encoding",
                       "Content-Encoding must be gzip or absent.")
    data = _read_raw(request, max_body)
    if encoding != "identity":
        data = _gunzip(data, max_body)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise APIError(400, "bad_utf8",
                       f"The body is not valid UTF-8 (byte {exc.start}).") from None
    events = _events_of(_loads(text)) if mimetype in JSON_TYPES else _ndjson(text, max_batch)
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
