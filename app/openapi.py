"""The OpenAPI 3 document, generated from the marshmallow schemas with apispec."""

from __future__ import annotations

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin

from . import schemas
from .batch import make_event_schema
from .schemas import NAME_MAX

_JSON = "application/json"


def _field_attributes(converter, field, **kwargs) -> dict:
    """Document what the checked fields enforce in code (length, characters, size)."""
    if isinstance(field, schemas.Name):
        return {"minLength": 1, "maxLength": NAME_MAX,
                "pattern": "^[^\\u0000-\\u001f\\u007f-\\u009f]*$"}
    if isinstance(field, schemas.Cursor):
        return {"pattern": schemas.CURSOR_PATTERN}
    if isinstance(field, schemas.QueryTimestamp):
        return {"anyOf": [{"type": "string", "format": "date-time"},
                          {"type": "string", "pattern": schemas.RELATIVE_PATTERN}]}
    if isinstance(field, schemas.Payload):
        return {"default": {}, "x-max-serialised-bytes": field.max_bytes}
    return {}


def _error(description: str, retry_after: bool = False) -> dict:
    response = {"description": description,
                "content": {_JSON: {"schema": "Error"}}}
    if retry_after:
        response["headers"] = {"Retry-After": {"schema": {"type": "integer"},
                                               "description": "seconds to wait"}}
    return response


def _ok(schema: str, description: str) -> dict:
    return {"description": description, "content": {_JSON: {"schema": schema}}}


def _publish() -> dict:
    batch = {"oneOf": [{"$ref": "#/components/schemas/Event"},
                       {"type": "array", "items": {"$ref": "#/components/schemas/Event"}},
                       {"type": "object", "additionalProperties": False, "required": ["events"],
                        "properties": {"events": {"type": "array", "items": {
                            "$ref": "#/components/schemas/Event"}}}}]}
    return {"post": {
        "summary": "Publish events (deduplicated, durably committed before the answer)",
        "description": "Each valid event is committed; invalid ones are refused by index. "
                       "Content-Encoding: gzip is accepted. Retrying is always safe.",
        "security": [{}, {"bearer": []}],
        "requestBody": {"required": True, "content": {
            _JSON: {"schema": batch},
            "application/x-ndjson": {"schema": {"type": "string",
                                                "description": "one event object per line"}},
        }},
        "responses": {
            "200": _ok("PublishResult", "Every event valid and committed"),
            "207": _ok("PublishResult", "Valid events committed; the others refused (errors)"),
            "400": _error("Malformed JSON, bad UTF-8, bad gzip, a body cut short or a "
                          "malformed chunk, or not an event / list"),
            "401": _error("Token required (AGGREGATOR_API_TOKEN is set)"),
            "408": _error("The body stopped coming (64 KiB of it took more than "
                          "AGGREGATOR_BODY_TIMEOUT seconds), or the headers took more than "
                          "AGGREGATOR_HEADER_TIMEOUT; nothing stored"),
            "413": _error("Too many events or too large a body"),
            "415": _error("Unsupported content type or encoding"),
            "422": _ok("PublishResult", "No event valid; nothing stored"),
            "429": _error("Ingest queue full, or no room in the body budget; nothing stored",
                          retry_after=True),
            "503": _error("Shutting down, database unavailable or full, or commit timed out",
                          retry_after=True),
        },
    }}


# Reads are open unless AGGREGATOR_READ_TOKEN is set; then the read token (or the publish
# token) as a bearer token or as a Basic password.
_READ_SECURITY = [{}, {"bearer": []}, {"basic": []}]
_READ_REFUSED = "Read token required (AGGREGATOR_READ_TOKEN is set)"


def _get(summary: str, responses: dict, *, guarded: bool = False, **extra: object) -> dict:
    """Return a GET operation; a guarded one needs the read token when it is set."""
    operation = {"summary": summary, **extra, "responses": responses}
    if guarded:
        operation["security"] = _READ_SECURITY
        responses["401"] = _error(_READ_REFUSED)
    return {"get": operation}


def _events() -> dict:
    return _get(
        "Stored events, filtered, keyset-paginated on the ingestion order",
        {"200": {"description": "A page of events", "content": {
            _JSON: {"schema": "EventsPage"},
            "text/html": {"schema": {"type": "string"}}}},
         "400": _error("A query parameter is not valid (named in the message)"),
         "414": _error("The query string is longer than the server reads (8190 bytes)"),
         "429": _error("A search (q) found this worker running its most searches at once "
                       "(AGGREGATOR_SEARCH_CONCURRENCY); Retry-After says when to try again")},
        guarded=True,
        description="A browser (Accept prefers text/html) gets the HTML events page.",
        parameters=[{"in": "query", "schema": schemas.EventsQuerySchema}])


def _simple(summary: str, schema: str, *, failing: str | None = None,
            guarded: bool = False) -> dict:
    responses = {"200": _ok(schema, summary)}
    if failing:
        responses["503"] = _ok(schema, failing)
    return _get(summary, responses, guarded=guarded)


def _text(summary: str, content_type: str, *, guarded: bool = False) -> dict:
    return _get(summary, {"200": {"description": summary, "content": {
        content_type: {"schema": {"type": "string"}}}}}, guarded=guarded)


def build_spec(version: str, max_payload: int) -> dict:
    """Return the OpenAPI document as a dict."""
    plugin = MarshmallowPlugin()
    spec = APISpec(title="Log aggregator", version=version, openapi_version="3.0.3",
                   plugins=[plugin], info={"description": "Deduplicating, durable event "
                                                          "ingest with exact counts."})
    plugin.map_to_openapi_type(schemas.Name, "string", None)
    plugin.map_to_openapi_type(schemas.Timestamp, "string", "date-time")
    plugin.map_to_openapi_type(schemas.QueryTimestamp, None, None)
    plugin.map_to_openapi_type(schemas.Cursor, "string", None)
    plugin.map_to_openapi_type(schemas.Payload, "object", None)
    plugin.converter.add_attribute_function(_field_attributes)
    spec.components.security_scheme("bearer", {"type": "http", "scheme": "bearer"})
    spec.components.security_scheme("basic", {"type": "http", "scheme": "basic"})
    spec.components.schema("Event", schema=make_event_schema(max_payload))
    for name, schema in (("EventOut", schemas.EventOutSchema),
                         ("EventsPage", schemas.EventsPageSchema),
                         ("PublishResult", schemas.PublishResultSchema),
                         ("Error", schemas.ErrorSchema), ("Stats", schemas.StatsSchema),
                         ("Health", schemas.HealthSchema)):
        spec.components.schema(name, schema=schema)
    spec.path("/publish", operations=_publish())
    spec.path("/events", operations=_events())
    spec.path("/stats", operations=_get(
        "Counters (exact, from the database)",
        {"200": _ok("Stats", "Counters (exact, from the database)"),
         "400": _error("topics is not a whole number of 0 or more")},
        guarded=True, parameters=[{"in": "query", "schema": schemas.StatsQuerySchema}]))
    spec.path("/health", operations=_simple(
        "Database answers and writers alive", "Health", failing="Not healthy"))
    spec.path("/health/live", operations=_simple("The process serves requests", "Health"))
    spec.path("/health/ready", operations=_simple(
        "Ready to commit: database writable, writers alive, queue not full", "Health",
        failing="Not ready"))
    spec.path("/metrics", operations=_text("Prometheus metrics", "text/plain; version=0.0.4",
                                            guarded=True))
    spec.path("/openapi.json", operations=_text("This document", _JSON))
    spec.path("/docs", operations=_text("This document as a readable page", "text/html"))
    spec.path("/", operations={"get": {"summary": "Redirect to the events page",
                                       "responses": {"302": {"description": "to /events"}}}})
    return spec.to_dict()
