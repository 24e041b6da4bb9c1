"""Marshmallow schemas: the event contract, the /events query and the answers (for
OpenAPI). app/batch.py checks a whole batch against EventSchema."""

from __future__ import annotations

import base64
import re
from datetime import UTC, datetime, timedelta
from json.encoder import c_make_encoder, encode_basestring
from urllib.parse import unquote_to_bytes

from marshmallow import (
    EXCLUDE,
    RAISE,
    Schema,
    ValidationError,
    fields,
    missing,
    post_load,
    pre_load,
    validate,
)

from .config import UNIT_SECONDS

NAME_MAX = 255
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# JSON's \ud800-style escapes can smuggle lone surrogates in: no UTF-8 encoding exists for them.
SURROGATE = re.compile(r"[\ud800-\udfff]")
_FRACTION = re.compile(r"[.,](\d+)")
# Digits of a second's fraction kept in the stored text: nanoseconds, as Go, Java and
# OpenTelemetry write them. Ordering and the time filters use microseconds.
FRACTION_DIGITS = 9
# A fraction after the hour or the minute (10.5, 10:30.5, 1030.5): ISO 8601 makes it a
# fraction of that unit (10:30:00, 10:30:30), but datetime.fromisoformat() reads it as a
# fraction of a second (10:00:00.5), so it is refused rather than stored wrong.
# Matched from the start: the date, the separator, then the hour and perhaps the minute.
_PARTIAL_FRACTION = re.compile(r"[\dW-]+.\d\d(?::?\d\d)?[.,]", re.DOTALL)
# The date forms datetime.fromisoformat() reads (calendar or week, extended or basic). It
# takes any one character after the date as the separator (2025-10-18x03:00, even
# 2025-10-18003:00); ISO 8601 has T, and RFC 3339 also allows t and a space.
_DATE = re.compile(r"\d{4}(?:-\d\d-\d\d|\d{4}|-W\d\d(?:-\d)?|W\d\d\d?)")
_SEPARATORS = ("T", "t", " ")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
# Already UTC and in the form we store: the text needs no rebuilding.
_CANONICAL = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{1,9})?Z")
# Compact JSON, non-ASCII kept as is; allow_nan=False: 1e400 parses as inf, which has no
# JSON form to hand back to readers. The C encoder json.dumps would build on every call is
# built once (a third of the cost of encoding a small payload); no cycle check, since
# parsed JSON has no cycles.
_ENCODE = c_make_encoder(None, None, encode_basestring, None, ":", ",", False, False, False)


def encode_json(value: object) -> str:
    """Return the compact JSON text of parsed JSON; ValueError for an infinite number."""
    return "".join(_ENCODE(value, 0))


def longer_than(text: str, max_bytes: int) -> bool:
    """Return whether text is over max_bytes in UTF-8 (encoded only when it could be)."""
    # A str of n characters encodes to at most 4n UTF-8 bytes.
    return len(text) * 4 > max_bytes and len(text.encode()) > max_bytes


def _moment(value: object, canonical: bool = False) -> datetime:
    """Return the aware datetime of an ISO 8601 string with an offset, or raise.

    canonical: the value is known to match _CANONICAL, whose only fraction is the seconds'.
    """
    if not isinstance(value, str) or not value:
        raise ValidationError("Not a valid date-time: expected an ISO 8601 string.")
    # RFC 3339 allows a lower-case z, which fromisoformat() does not read.
    text = value[:-1] + "Z" if value[-1] == "z" else value
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as exc:
        reason = str(exc).replace(repr(text), repr(value))
        raise ValidationError(f"Not a valid ISO 8601 date-time ({reason}).") from None
    if not canonical:
        date = _DATE.match(value)
        if date is None or value[date.end():date.end() + 1] not in _SEPARATORS:
            raise ValidationError(
                "Not a valid ISO 8601 date-time: the date must be followed by 'T' and the "
                "time (2025-10-18T03:00:00Z).")
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValidationError(
            "Date-time has no UTC offset: add 'Z' or an offset such as '+07:00'.")
    if not canonical and _PARTIAL_FRACTION.match(value):
        raise ValidationError(
            "Not a valid date-time: a decimal fraction is taken only of the seconds "
            "(10:30:00.5), not of an hour or a minute (10.5, 10:30.5).")
    return moment


def timestamp_micros(value: object) -> int:
    """Return microseconds since the epoch of an ISO 8601 date-time with an offset.

    Any instant datetime can write is fine here, even one whose UTC date falls outside
    years 1..9999 (subtracting aware datetimes never converts them).
    """
    return _micros(_moment(value))


def _micros(moment: datetime) -> int:
    return (moment - _EPOCH) // _MICROSECOND


def parse_timestamp(value: object) -> tuple[int, str]:
    """Return (microseconds since the epoch, normalised UTC text) of an ISO 8601 date-time.

    The text keeps as many digits of the second's fraction as were given, up to
    FRACTION_DIGITS. Raises ValidationError for a non-string, an impossible time, a naive
    one, or one whose UTC form falls outside years 1..9999.
    """
    canonical = isinstance(value, str) and _CANONICAL.fullmatch(value) is not None
    moment = _moment(value, canonical)
    if canonical:
        text = value
    else:
        offset = moment.utcoffset()
        try:
            moment = moment.astimezone(UTC)
        except OverflowError:
            raise ValidationError("Date-time is out of range once converted to UTC.") from None
        text = moment.isoformat()[:19]
        fraction = _FRACTION.search(value)
        if fraction:
            digits = fraction.group(1)
            # An offset moves the instant by whole microseconds at most, so the digits
            # after the sixth are the ones given. An offset with a fraction of its own (not
            # ISO 8601, but fromisoformat() takes one) keeps microseconds only: when the
            # time has none, the fraction found is the offset's.
            beyond = digits[6:FRACTION_DIGITS] if not offset.microseconds else ""
            text += "." + (f"{moment.microsecond:06d}" + beyond)[:min(len(digits), FRACTION_DIGITS)]
        text += "Z"
    return _micros(moment), text


class _Checked(fields.Field):
    """A field whose every check lives in _deserialize.

    It skips marshmallow's validator machinery (a third of the cost of a load, and
    these fields never carry validators) but keeps its required/null messages.
    """

    def deserialize(self, value, attr=None, data=None, **kwargs):
        if value is missing:
            if self.required:
                raise self.make_error("required")
            return self.load_default
        if value is None:
            raise self.make_error("null")
        return self._deserialize(value, attr, data, **kwargs)


class Name(_Checked):
    """A string of 1..255 characters with no control characters."""

    def _deserialize(self, value, attr, data, **kwargs):
        if not isinstance(value, str):
            raise ValidationError("Not a valid string.")
        if not 0 < len(value) <= NAME_MAX:
            raise ValidationError(f"Length must be between 1 and {NAME_MAX}.")
        if _CONTROL.search(value):
            raise ValidationError("Must not contain control characters.")
        if SURROGATE.search(value):
            raise ValidationError("Must be valid Unicode (no lone surrogate escapes).")
        return value


class Timestamp(_Checked):
    """An ISO 8601 date-time with an offset, loaded as (epoch microseconds, UTC text)."""

    def _deserialize(self, value, attr, data, **kwargs):
        return parse_timestamp(value)


class Payload(_Checked):
    """A JSON object, loaded as its compact JSON text, bounded in size."""

    def __init__(self, max_bytes: int, **kwargs):
        super().__init__(**kwargs)
        self.max_bytes = max_bytes

    def _deserialize(self, value, attr, data, **kwargs):
        if not isinstance(value, dict):
            raise ValidationError("Must be a JSON object.")
        try:
            text = encode_json(value)
        except ValueError:
            raise ValidationError("Numbers must be finite (1e400 overflows to infinity).") from None
        if SURROGATE.search(text):
            raise ValidationError("Strings must be valid Unicode (no lone surrogate escapes).")
        if longer_than(text, self.max_bytes):
            raise ValidationError(
                f"Payload is larger than {self.max_bytes} bytes once serialised.")
        return text


class EventSchema(Schema):
    """One event as publishers send it; loads to storage-ready values."""

    class Meta:
        unknown = RAISE

    # marshmallow's own is "Invalid input type.", for [1], "x" or null where an event goes.
    error_messages = {"type": "An event must be a JSON object."}

    topic = Name(required=True)
    event_id = Name(required=True, metadata={"description": "Unique within its topic."})
    timestamp = Timestamp(required=True, metadata={
        "description": "ISO 8601 with an offset; stored and returned in UTC."})
    source = Name(required=True)
    payload = Payload(max_bytes=64 * 1024, load_default="{}", metadata={
        "description": "Any JSON object, at most 64 KiB serialised (configurable)."})


class EventOutSchema(Schema):
    """One stored event as the API returns it."""

    topic = fields.String(required=True)
    event_id = fields.String(required=True)
    timestamp = fields.String(required=True, metadata={"format": "date-time"})
    source = fields.String(required=True)
    payload = fields.Dict(required=True)
    received_at = fields.String(required=True, metadata={"format": "date-time"})


class EventsPageSchema(Schema):
    """A page of GET /events."""

    events = fields.List(fields.Nested(EventOutSchema), required=True)
    next_cursor = fields.String(required=True, allow_none=True, metadata={
        "description": "after= for the next page; null when no more events match now"})
    end_cursor = fields.String(required=True, allow_none=True, metadata={
        "description": "past the page's last event (next_cursor when there is one; "
                       "oldest first at the end, past the last event stored): with "
                       "order=asc, after= for only the events that arrive later; null for an "
                       "empty page asked for without after (oldest first: of an empty store)"})


class PublishResultSchema(Schema):
    """The answer to POST /publish (200, 207 and 422)."""

    received = fields.Integer(required=True, metadata={"description": "valid events"})
    unique_processed = fields.Integer(required=True)
    duplicate_dropped = fields.Integer(required=True)
    rejected = fields.Integer(required=True)
    errors = fields.Dict(keys=fields.String(), values=fields.Dict(), metadata={
        "description": "Per-event errors by index: {\"<index>\": {\"<field>\": [msg]}}"})
    error = fields.String()
    message = fields.String()


class ErrorSchema(Schema):
    """Every error body."""

    error = fields.String(required=True, metadata={"description": "short code"})
    message = fields.String(required=True)
    errors = fields.Dict(metadata={"description": "details by field, when there are any"})
    limit = fields.Integer(metadata={"description": "the limit that was exceeded (413)"})


class StatsSchema(Schema):
    """GET /stats."""

    received = fields.Integer(required=True)
    unique_processed = fields.Integer(required=True)
    duplicate_dropped = fields.Integer(required=True)
    rejected = fields.Integer(required=True)
    expired = fields.Integer(required=True, metadata={
        "description": "events deleted by retention (AGGREGATOR_RETENTION); "
                       "unique_processed == events stored + expired"})
    topics = fields.Dict(keys=fields.String(), values=fields.Integer(), required=True,
                         metadata={"description": "events stored for the first time, by topic"})
    topics_last_stored_at = fields.Dict(
        keys=fields.String(), values=fields.String(allow_none=True), required=True,
        metadata={"description": "when each topic's newest event was stored (its commit, "
                                 "UTC to the millisecond); null for a topic not written "
                                 "since the aggregator could tell"})
    topics_in_all = fields.Integer(required=True, metadata={
        "description": "topics with events stored, listed in topics or not (see ?topics=)"})
    uptime = fields.Float(required=True, metadata={"description": "seconds"})
    started_at = fields.String(required=True, metadata={"format": "date-time"})
    queue_depth = fields.Integer(required=True, metadata={"description": "this worker's"})


class StatsQuerySchema(Schema):
    """The query string of GET /stats."""

    class Meta:
        unknown = EXCLUDE

    topics = fields.Integer(validate=validate.Range(min=0), metadata={
        "description": "list only this many topics, the largest (by count, then name), in "
                       "topics and topics_last_stored_at; all when absent"})

    @post_load
    def _at_most_every_topic(self, data, **kwargs):
        """More than any store holds is every topic: topics=99999999999999999999 was a 500
        (SQLite takes 64-bit integers only)."""
        if data.get("topics") is not None:
            data["topics"] = min(data["topics"], 2**62)
        return data


class HealthSchema(Schema):
    """The health endpoints."""

    status = fields.String(required=True, validate=validate.OneOf(["ok", "unavailable"]))
    checks = fields.Dict(keys=fields.String(), values=fields.String())


# A cursor is the base64url form of the 8-byte sequence number: exactly the strings this
# pattern allows decode to a sequence number in 0..2**63-1, so the OpenAPI document can
# state it and a cursor can never overflow SQLite's integers.
CURSOR_PATTERN = "^[A-Za-f][A-Za-z0-9_-]{9}[AEIMQUYcgkosw048]$"
_CURSOR = re.compile(CURSOR_PATTERN)


def encode_cursor(seq: int) -> str:
    """Turn an ingestion sequence number into an opaque cursor."""
    return base64.urlsafe_b64encode(seq.to_bytes(8, "big")).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    """Turn a cursor back into its sequence number, or raise ValidationError."""
    if not isinstance(cursor, str) or not _CURSOR.fullmatch(cursor):
        raise ValidationError("Not a valid cursor: use the next_cursor of a previous page.")
    return int.from_bytes(base64.urlsafe_b64decode(cursor + "="), "big")


class Cursor(fields.Field):
    def _deserialize(self, value, attr, data, **kwargs):
        return decode_cursor(value)


# A time relative to the request's, as Grafana writes them: now, now-15m, now-1.5h, now-7d.
RELATIVE_PATTERN = r"^now(?:-([0-9]+(?:\.[0-9]+)?)([smhd]))?$"  # also OpenAPI's
_RELATIVE = re.compile(RELATIVE_PATTERN)


# What an offset such as +07:00 becomes when a '+' in a query string is read as a space.
_SPACED_OFFSET = re.compile(r"[Tt][\d:.,]+ \d\d(?::?\d\d)?$")


class QueryTimestamp(fields.Field):
    """since or until: an ISO 8601 date-time with an offset, or a time relative to the
    request's (a view of the last hour stays one in a bookmark, and in the live page)."""

    def _deserialize(self, value, attr, data, **kwargs):
        if not (isinstance(value, str) and value.startswith("now")):
            try:
                return timestamp_micros(value)
            except ValidationError as exc:
                if _SPACED_OFFSET.search(value):
                    raise ValidationError(f"{exc.messages[0]} A '+' in a URL's query "
                                          "string reads as a space: write it %2B.") from None
                raise
        match = _RELATIVE.fullmatch(value)
        if match is None:
            raise ValidationError("Not a valid relative time: now, or now- and a duration "
                                  "such as now-15m, now-2h or now-7d (units s, m, h, d).")
        try:
            ago = timedelta(seconds=float(match[1] or 0) * UNIT_SECONDS[match[2] or "s"])
            return _micros(datetime.now(UTC) - ago)
        except OverflowError:  # before year 1: no event is older
            return _micros(datetime.min.replace(tzinfo=UTC))


# Parameters of the events page that the JSON API takes and ignores (app/pages.py).
PAGE_ONLY_PARAMS = ("live",)


def check_utf8_query(query_string: bytes) -> None:
    """Raise ValidationError naming the query string's parameters whose name or value is not
    UTF-8 once unescaped (topic=%FF). Werkzeug reads such bytes as U+FFFD, so the filter
    would be another one than asked: events whose text really holds U+FFFD (%EF%BF%BD)."""
    errors = {}
    for pair in query_string.split(b"&"):
        name = pair.partition(b"=")[0]
        try:
            unquote_to_bytes(pair.replace(b"+", b" ")).decode("utf-8")
        except UnicodeDecodeError:
            label = unquote_to_bytes(name.replace(b"+", b" ")).decode("utf-8", "replace")
            errors[label[:40]] = ["Not UTF-8 once unescaped: a %XX escape stands for one byte "
                                  "of the text's UTF-8 (%C3%A9 for é)."]
    if errors:
        raise ValidationError(errors)


class EventsQuerySchema(Schema):
    """The query string of GET /events."""

    class Meta:
        unknown = EXCLUDE

    # As in an event: a value no event can hold is refused, not looked for (PostgreSQL's
    # text cannot even be compared with a NUL).
    topic = Name(metadata={"description": "the events of this topic (exact match)"})
    event_id = Name(metadata={
        "description": "the events of this id: with topic, that one event; without, one "
                       "per topic at most (the same event_id under two topics is two "
                       "events), looked up in each topic"})
    source = Name(metadata={"description": "the events of this source (exact match)"})
    q = Name(metadata={
        "description": "the events whose payload, as returned (compact JSON), holds this "
                       "text; case-sensitive. A search reads AGGREGATOR_SEARCH_SCAN "
                       "(10,000) events past the cursor at a time, and more while it finds "
                       "none for up to AGGREGATOR_SEARCH_TIME (0.25 s): a page can then hold "
                       "fewer than limit events, or none, and still have a next_cursor"})
    since = QueryTimestamp(metadata={"description": "ISO 8601 with offset, or relative to "
                                                    "now (now-15m, now-2h, now-7d); inclusive"})
    until = QueryTimestamp(metadata={"description": "ISO 8601 with offset, or relative to "
                                                    "now (now, now-1h); exclusive"})
    limit = fields.Integer(load_default=100, validate=validate.Range(1, 1000), metadata={
        "description": "most events in the page; a page of large payloads ends sooner, "
                       "past AGGREGATOR_MAX_PAGE_BYTES (4 MiB) of them, with a next_cursor"})
    after = Cursor(metadata={"description": "next_cursor of the previous page, or an "
                                            "end_cursor: the events past it, in the order"})
    order = fields.String(load_default="asc", validate=validate.OneOf(["asc", "desc"]),
                          metadata={"description": "asc: oldest first, by the order they "
                                                   "were stored in; desc: newest first"})

    @pre_load
    def _known_and_once(self, data, **kwargs):
        """Refuse, in a query string, a parameter given twice (topic=a&topic=b: values are
        not combined) or one it does not know (topc=a would be every topic): either way
        the answer would be to another question than the one asked. `live`, the events
        page's own, is let through, so that a page's URL also works as an API call."""
        if not hasattr(data, "lists"):  # not a query string's MultiDict
            return data
        errors = {}
        for name, values in data.lists():
            if name not in self.fields and name not in PAGE_ONLY_PARAMS:
                errors[name] = [f"Unknown parameter: /events takes {', '.join(self.fields)}."]
            elif len(values) > 1:
                errors[name] = ["Given more than once; give it once (values are not combined)."]
        if errors:
            raise ValidationError(errors)
        return data
