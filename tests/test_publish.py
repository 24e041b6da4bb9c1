"""POST /publish through the Flask app on a real SQLite file: dedup, body forms, validation."""

from __future__ import annotations

import gzip
import json
import threading
import time
from datetime import UTC, datetime

import pytest

from app.body import BodyBudget
from app.errors import APIError
from tests.helpers import db_counters, event, table_keys


def publish(client, body, content_type="application/json", **headers):
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return client.post("/publish", data=data, content_type=content_type, headers=headers)


def test_same_event_twice_is_stored_once_and_counted_as_duplicate(client, db):
    first = publish(client, event("e1"))
    second = publish(client, event("e1"))
    assert first.status_code == second.status_code == 200
    assert first.json == {"received": 1, "unique_processed": 1, "duplicate_dropped": 0,
                          "rejected": 0}
    assert second.json == {"received": 1, "unique_processed": 0, "duplicate_dropped": 1,
                           "rejected": 0}
    assert table_keys(db) == [("orders", "e1")]


def test_same_event_id_in_two_topics_is_two_events(client, db):
    response = publish(client, [event("e1", topic="a"), event("e1", topic="b")])
    assert response.json["unique_processed"] == 2
    assert sorted(table_keys(db)) == [("a", "e1"), ("b", "e1")]
    assert client.get("/stats").json["topics"] == {"a": 1, "b": 1}


def test_duplicates_inside_one_batch_are_counted(client, db):
    response = publish(client, [event("x"), event("y"), event("x"), event("x")])
    assert response.json == {"received": 4, "unique_processed": 2, "duplicate_dropped": 2,
                             "rejected": 0}
    assert len(table_keys(db)) == 2


def test_first_write_wins_when_a_duplicate_differs(client):
    publish(client, event("e1", source="first"))
    response = publish(client, event("e1", source="second", payload={"other": True}))
    assert response.json["duplicate_dropped"] == 1
    stored = client.get("/events").json["events"]
    assert [(e["source"], e["payload"]) for e in stored] == [("first", {"n": "e1"})]


@pytest.mark.parametrize("form", ["object", "array", "events", "ndjson", "gzip-json",
                                  "gzip-ndjson"])
def test_every_body_form_is_accepted(client, db, form):
    events = [event("a"), event("b")] if form != "object" else [event("a")]
    if form == "object":
        body, ctype, headers = json.dumps(events[0]), "application/json", {}
    elif form in ("array", "gzip-json"):
        body, ctype, headers = json.dumps(events), "application/json", {}
    elif form == "events":
        body, ctype, headers = json.dumps({"events": events}), "application/json", {}
    else:
        body = "\n".join(json.dumps(e) for e in events) + "\n\n"
        ctype, headers = "application/x-ndjson", {}
    if form.startswith("gzip"):
        body, headers = gzip.compress(body.encode()), {"Content-Encoding": "gzip"}
    response = publish(client, body, ctype, **headers)
    assert response.status_code == 200, response.json
    assert response.json["unique_processed"] == len(events)
    assert sorted(k for _, k in table_keys(db)) == [e["event_id"] for e in events]


@pytest.mark.parametrize("form", ["json", "ndjson", "concatenated ndjson files"])
def test_a_byte_order_mark_before_a_json_text_is_ignored(client, db, form):
    """RFC 8259 lets a parser ignore one, and Windows tools start UTF-8 files with one."""
    events = [event("a"), event("b")]
    if form == "json":
        body, ctype = "\ufeff" + json.dumps(events), "application/json"
    elif form == "ndjson":
        body = "\ufeff" + "".join(json.dumps(e) + "\r\n" for e in events)
        ctype = "application/x-ndjson"
    else:
        body = "".join("\ufeff" + json.dumps(e) + "\r\n" for e in events)
        ctype = "application/x-ndjson"
    response = publish(client, body.encode(), ctype)
    assert response.status_code == 200, response.json
    assert response.json["unique_processed"] == 2
    assert sorted(k for _, k in table_keys(db)) == ["a", "b"]


def test_empty_batch_is_a_200_with_zeros(client):
    for body in ([], {"events": []}):
        response = publish(client, body)
        assert response.status_code == 200
        assert response.json == {"received": 0, "unique_processed": 0, "duplicate_dropped": 0,
                                 "rejected": 0}


BAD_EVENTS = [
    ("missing topic", {k: v for k, v in event("m").items() if k != "topic"}, "topic"),
    ("empty topic", event("m", topic=""), "topic"),
    ("long topic", event("m", topic="t" * 256), "topic"),
    ("topic not a string", event("m", topic=7), "topic"),
    ("control char in topic", event("m", topic="a\nb"), "topic"),
    ("NUL in event_id", event("a\x00b"), "event_id"),
    ("empty event_id", event(""), "event_id"),
    ("long event_id", event("e" * 256), "event_id"),
    ("missing source", {k: v for k, v in event("m").items() if k != "source"}, "source"),
    ("long source", event("m", source="s" * 256), "source"),
    ("naive timestamp", event("m", timestamp="2025-10-18T03:00:00"), "timestamp"),
    ("impossible date", event("m", timestamp="2025-02-30T00:00:00Z"), "timestamp"),
    ("impossible hour", event("m", timestamp="2025-10-18T25:00:00Z"), "timestamp"),
    ("timestamp not a string", event("m", timestamp=1760756400), "timestamp"),
    ("garbage timestamp", event("m", timestamp="yesterday"), "timestamp"),
    ("payload a list", event("m", payload=[1, 2]), "payload"),
    ("payload a string", event("m", payload="x"), "payload"),
    ("payload null", event("m", payload=None), "payload"),
    ("payload too large", event("m", payload={"x": "y" * 70_000}), "payload"),
    ("unknown field", event("m", severity="high"), "severity"),
    ("lone surrogate in event_id", event("a\ud800"), "event_id"),
    ("lone surrogate in topic", event("m", topic="\udfff"), "topic"),
    ("lone surrogate in payload", event("m", payload={"k": ["x\udc00"]}), "payload"),
]


@pytest.mark.parametrize("label,bad,field", BAD_EVENTS, ids=[b[0] for b in BAD_EVENTS])
def test_invalid_event_is_refused_naming_its_index_and_field(client, db, label, bad, field):
    response = publish(client, [event("good"), bad])
    assert response.status_code == 207
    assert response.json["received"] == 1
    assert response.json["rejected"] == 1
    assert list(response.json["errors"]) == ["1"]
    assert field in response.json["errors"]["1"]
    assert table_keys(db) == [("orders", "good")]


def test_number_that_overflows_to_infinity_is_refused_by_index(client, db):
    overflow = json.dumps(event("inf", payload={"x": 1})).replace('"x": 1', '"x": 1e400')
    body = f"[{json.dumps(event('good'))}, {overflow}]"
    response = publish(client, body)
    assert response.status_code == 207
    assert "finite" in response.json["errors"]["1"]["payload"][0]
    assert table_keys(db) == [("orders", "good")]
    assert "Infinity" not in client.get("/events").get_data(as_text=True)


def test_naive_timestamp_error_says_the_offset_is_missing(client):
    response = publish(client, event("m", timestamp="2025-10-18T03:00:00"))
    assert "offset" in response.json["errors"]["0"]["timestamp"][0]


def test_non_object_in_a_batch_is_refused_by_index(client):
    response = publish(client, [event("ok"), 42, "text", None, [event("nested")]])
    assert response.status_code == 207
    assert response.json["errors"] == {
        str(i): {"_schema": ["An event must be a JSON object."]} for i in range(1, 5)}


def test_a_batch_object_with_other_keys_is_a_400_naming_them(client, db):
    response = publish(client, {"events": [event("e1")], "source": "x", "meta": {}})
    assert response.status_code == 400
    assert response.json == {
        "error": "bad_body",
        "message": "An object holding 'events' is a batch, and 'events' must be its only "
                   "key; it also has 'source', 'meta'."}
    many = {"events": [], **{f"k{i}": i for i in range(7)}}
    assert publish(client, many).json["message"].endswith(
        "it also has 'k0', 'k1', 'k2', 'k3', 'k4' and 2 more.")
    assert table_keys(db) == []
    assert client.get("/stats").json["rejected"] == 0


def test_batch_with_no_valid_event_is_422_and_stores_nothing(client, db):
    response = publish(client, [event("a", topic=""), event("b", timestamp="nope")])
    assert response.status_code == 422
    assert response.json["error"] == "invalid_events"
    assert response.json["rejected"] == 2 and response.json["received"] == 0
    assert sorted(response.json["errors"]) == ["0", "1"]
    assert table_keys(db) == []
    assert client.get("/stats").json["rejected"] == 2


def test_mixed_batch_stores_only_the_valid_events_and_counts_rejected(client, db):
    batch = [event("v1"), event("bad", topic=""), event("v2"), event("v1"), {"topic": "x"}]
    response = publish(client, batch)
    assert response.status_code == 207
    assert {k: response.json[k] for k in ("received", "unique_processed", "duplicate_dropped",
                                          "rejected")} == {
        "received": 3, "unique_processed": 2, "duplicate_dropped": 1, "rejected": 2}
    assert sorted(response.json["errors"]) == ["1", "4"]
    assert sorted(table_keys(db)) == [("orders", "v1"), ("orders", "v2")]
    assert db_counters(db)["rejected"] == 2


WHOLE_REQUEST_ERRORS = [
    ("malformed JSON", b'[{"topic": ', "application/json", {}, 400, "malformed_json"),
    ("NaN is not JSON", b'{"x": NaN}', "application/json", {}, 400, "malformed_json"),
    ("invalid UTF-8", b'[{"topic": "\xff\xfe"}]', "application/json", {}, 400, "bad_utf8"),
    ("bad gzip", b"not gzip at all", "application/json", {"Content-Encoding": "gzip"}, 400,
     "bad_gzip"),
    ("truncated gzip", gzip.compress(b"[]" * 1000)[:-12], "application/json",
     {"Content-Encoding": "gzip"}, 400, "bad_gzip"),
    ("body a number", b"42", "application/json", {}, 400, "bad_body"),
    ("byte order mark inside", "[\ufeff{}]".encode(), "application/json", {}, 400,
     "malformed_json"),
    ("events not a list", b'{"events": {"a": 1}}', "application/json", {}, 400, "bad_body"),
    ("events beside other keys", b'{"events": [], "meta": 1}', "application/json", {}, 400,
     "bad_body"),
    ("bad NDJSON line", b'{"a": 1}\n{oops\n', "application/x-ndjson", {}, 400,
     "malformed_json"),
    ("deep nesting", b"[" * 100_000 + b"]" * 100_000, "application/json", {}, 400,
     "malformed_json"),
    ("text/plain", b"[]", "text/plain", {}, 415, "unsupported_media_type"),
    ("form", b"a=1", "application/x-www-form-urlencoded", {}, 415, "unsupported_media_type"),
    ("brotli", b"[]", "application/json", {"Content-Encoding": "br"}, 415,
     "unsupported_encoding"),
]


@pytest.mark.parametrize("label,body,ctype,headers,status,code", WHOLE_REQUEST_ERRORS,
                         ids=[e[0] for e in WHOLE_REQUEST_ERRORS])
def test_bad_request_body_gets_a_json_4xx_and_stores_nothing(client, db, label, body,
                                                             ctype, headers, status, code):
    response = publish(client, body, ctype, **headers)
    assert response.status_code == status
    assert response.is_json and response.json["error"] == code
    assert response.json["message"]
    assert "Traceback" not in response.get_data(as_text=True)
    assert table_keys(db) == []
    assert db_counters(db)["received"] == 0


def test_an_integer_python_will_not_parse_is_a_400_a_client_can_read(client, db):
    huge = "1" * 5000
    for body, ctype, where in [
            (f'{{"n": {huge}}}', "application/json", ""),
            (f'{{"n": 1}}\n{{"n": {huge}}}\n', "application/x-ndjson", " on line 2")]:
        response = publish(client, body.encode(), ctype)
        assert response.status_code == 400
        assert response.json["message"] == (
            f"An integer{where} has more than 4300 digits, the most this server parses.")
    assert table_keys(db) == []


def test_too_many_events_is_413(make_app, db):
    client = make_app(max_batch=5).test_client()
    for body, ctype in ((json.dumps([event(str(i)) for i in range(6)]), "application/json"),
                        ("\n".join(json.dumps(event(str(i))) for i in range(6)),
                         "application/x-ndjson")):
        response = publish(client, body, ctype)
        assert response.status_code == 413
        assert response.json["error"] == "too_many_events"
    assert publish(client, [event(str(i)) for i in range(5)]).status_code == 200


def test_body_over_the_limit_is_413(make_app, db):
    client = make_app(max_body=1000).test_client()
    response = publish(client, [event(str(i)) for i in range(20)])
    assert response.status_code == 413
    assert response.json["error"] == "body_too_large"
    assert table_keys(db) == []


def test_gzip_bomb_is_stopped_while_decompressing(make_app, db):
    client = make_app(max_body=1024 * 1024).test_client()
    bomb = gzip.compress(b"[" + b" " * (200 * 1024 * 1024) + b"]", compresslevel=9)
    assert len(bomb) < 1024 * 1024
    response = publish(client, bomb, **{"Content-Encoding": "gzip"})
    assert response.status_code == 413
    assert response.json["error"] == "body_too_large"


def test_token_is_required_when_configured(make_app, db):
    client = make_app(api_token="s3cret").test_client()
    assert publish(client, event("a")).status_code == 401
    assert publish(client, event("a"), Authorization="Bearer wrong").status_code == 401
    assert publish(client, event("a"), Authorization="Bearer s3cret").status_code == 200
    assert table_keys(db) == [("orders", "a")]


def test_payload_round_trip_is_exact(client):
    payload = {"nested": {"list": [1, [2, [3, {"deep": True}]]], "empty": {}, "none": None},
               "unicode": "héllo wörld ✓ 日本語 🎉", "int": 2 ** 62, "neg": -17,
               "float": 0.1 + 0.2, "small": 1e-300, "bool": False, "escapes": "a\"b\\c\n\t"}
    publish(client, event("p", payload=payload))
    stored = client.get("/events").json["events"][0]
    assert stored["payload"] == payload
    assert json.dumps(stored["payload"], sort_keys=True) == json.dumps(payload, sort_keys=True)


@pytest.mark.parametrize("given,normalised", [
    ("2025-10-18T10:00:00+07:00", "2025-10-18T03:00:00Z"),
    ("2025-10-18T03:00:00Z", "2025-10-18T03:00:00Z"),
    ("2025-10-17T22:30:00.250-04:30", "2025-10-18T03:00:00.250Z"),
    ("2025-10-18T03:00:00.123456+00:00", "2025-10-18T03:00:00.123456Z"),
    ("2025-01-01T00:30:00+01:00", "2024-12-31T23:30:00Z"),
    # Nanoseconds, as Go, Java and OpenTelemetry write them, are kept; beyond, cut.
    ("2025-10-18T03:00:00.123456789Z", "2025-10-18T03:00:00.123456789Z"),
    ("2025-10-18T10:00:00.000000001+07:00", "2025-10-18T03:00:00.000000001Z"),
    ("2025-10-18T03:00:00.12345678Z", "2025-10-18T03:00:00.12345678Z"),
    ("2025-10-18T03:00:00.1234567891234Z", "2025-10-18T03:00:00.123456789Z"),
    ("2025-10-18T02:59:59.9999999990-00:00", "2025-10-18T02:59:59.999999999Z"),
])
def test_timestamps_come_back_normalised_to_utc(client, given, normalised):
    publish(client, event("t", timestamp=given))
    assert client.get("/events").json["events"][0]["timestamp"] == normalised


@pytest.mark.parametrize("given", ["2025-10-18T03.5Z", "2025-10-18T03:30.5Z",
                                   "2025-10-18T0330,5+01:00", "20251018T03.25Z",
                                   "2025-W42-6T03.5Z"])
def test_a_fraction_of_an_hour_or_a_minute_is_refused_not_read_as_seconds(client, db, given):
    # datetime.fromisoformat() reads "03.5" as 03:00:00.5, where ISO 8601 means 03:30.
    response = publish(client, [event("kept"), event("fraction", timestamp=given)])
    assert response.status_code == 207
    assert "fraction" in response.json["errors"]["1"]["timestamp"][0]
    assert table_keys(db) == [("orders", "kept")]


def test_a_fraction_of_the_seconds_in_any_form_is_taken(client):
    for n, given in enumerate(["2025-10-18T033000.5Z", "2025-10-18T03:30:00,5Z",
                               "2025-W42-6T03:30:00.5Z"]):
        assert publish(client, event(str(n), timestamp=given)).status_code == 200
    stamps = {e["timestamp"] for e in client.get("/events").json["events"]}
    assert stamps == {"2025-10-18T03:30:00.5Z"}


@pytest.mark.parametrize("given", ["2025-10-18x03:00:00Z", "2025-10-18003:00:00+00:00",
                                   "2025-10-18-03:00:00Z", "2025-10-18\u00e903:00:00Z",
                                   "20251018W030000Z", "2025-W42-6:03:00:00Z"])
def test_a_date_and_time_not_separated_by_t_are_refused(client, db, given):
    # datetime.fromisoformat() takes any one character between them, a digit included.
    response = publish(client, [event("kept"), event("separated", timestamp=given)])
    assert response.status_code == 207
    assert "followed by 'T'" in response.json["errors"]["1"]["timestamp"][0]
    assert table_keys(db) == [("orders", "kept")]


def test_rfc_3339_forms_of_the_separator_and_of_z_are_taken(client):
    # RFC 3339 allows a lower-case t and z, and a space between the date and the time.
    for n, given in enumerate(["2025-10-18t03:00:00z", "2025-10-18 03:00:00Z",
                               "2025-10-18T03:00:00z", "20251018t030000z"]):
        assert publish(client, event(str(n), timestamp=given)).status_code == 200
    stamps = {e["timestamp"] for e in client.get("/events").json["events"]}
    assert stamps == {"2025-10-18T03:00:00Z"}


def test_stats_are_exact_after_a_mix_of_batches(client, db):
    publish(client, [event(str(i), topic="a") for i in range(10)])
    publish(client, [event(str(i), topic="a") for i in range(5, 15)])
    publish(client, [event(str(i), topic="b") for i in range(3)] + [event("x", topic="")])
    publish(client, event("0", topic="a"))
    publish(client, [event("bad", timestamp="2025-10-18")])
    stats = client.get("/stats").json
    assert stats["received"] == 24
    assert stats["unique_processed"] == 18
    assert stats["duplicate_dropped"] == 6
    assert stats["rejected"] == 2
    assert stats["topics"] == {"a": 15, "b": 3}
    assert stats["received"] == stats["unique_processed"] + stats["duplicate_dropped"]
    assert stats["unique_processed"] == len(table_keys(db))
    assert stats["queue_depth"] == 0 and stats["uptime"] >= 0 and stats["started_at"]


def test_stats_can_list_only_the_largest_topics_and_always_count_them_all(client):
    publish(client, [event(f"{topic}{i}", topic=topic)
                     for topic, count in (("a", 1), ("b", 3), ("c", 2), ("d", 2))
                     for i in range(count)])
    whole = client.get("/stats").json
    assert whole["topics"] == {"a": 1, "b": 3, "c": 2, "d": 2} and whole["topics_in_all"] == 4
    # A number past 64 bits (SQLite's integers) is every topic too, not a 500.
    for asked, topics in ((2, {"b": 3, "c": 2}), (0, {}), (9, whole["topics"]),
                          (2**63, whole["topics"]), ("9" * 40, whole["topics"])):
        stats = client.get(f"/stats?topics={asked}").json
        assert stats["topics"] == topics and set(stats["topics_last_stored_at"]) == set(topics)
        assert stats["topics_in_all"] == 4 and stats["unique_processed"] == 8
    for bad in ("-1", "two", "1.5"):
        answer = client.get(f"/stats?topics={bad}")
        assert answer.status_code == 400 and list(answer.json["errors"]) == ["topics"]


def test_stats_say_when_each_topic_last_had_an_event_stored(client):
    """A topic's time moves with each commit that stores one of its events, and not with
    duplicates or refused events: how long it has been silent, to alert on."""

    def last_stored():
        return client.get("/stats").json["topics_last_stored_at"]

    def now():
        return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")

    before = now()
    publish(client, [event("1", topic="a"), event("1", topic="b")])
    first = last_stored()
    after = now()
    assert set(first) == {"a", "b"} and before <= first["a"] == first["b"] <= after
    time.sleep(0.01)
    publish(client, [event("2", topic="a"), event("1", topic="b"),  # a new, b a duplicate
                     event("3", topic="c", timestamp="yesterday")])  # refused
    second = last_stored()
    assert second["b"] == first["b"] and second["a"] > first["a"] and set(second) == {"a", "b"}
    assert datetime.fromisoformat(second["a"]) <= datetime.now(UTC)


def test_counters_survive_a_new_app_on_the_same_file(make_app, db):
    publish(make_app().test_client(), [event("a"), event("b")])
    stats = make_app().test_client().get("/stats").json
    assert (stats["received"], stats["unique_processed"]) == (2, 2)


def test_errors_are_json_for_unknown_routes_and_methods(client):
    missing = client.get("/nope")
    assert missing.status_code == 404 and missing.json["error"] == "not_found"
    wrong = client.get("/publish")
    assert wrong.status_code == 405 and wrong.json["error"] == "method_not_allowed"
    assert "POST" in wrong.headers["Allow"]


def test_health_is_ok_with_a_live_database_and_writer(client):
    response = client.get("/health")
    assert response.status_code == 200 and response.json["status"] == "ok"


def test_health_is_503_once_the_writers_are_stopped(app, client):
    app.extensions["ingestor"].close()
    response = client.get("/health")
    assert response.status_code == 503 and response.json["checks"]["writers"] == "stopped"
    refused = publish(client, event("late"))
    assert refused.status_code == 503 and refused.headers["Retry-After"]


@pytest.mark.parametrize("size", [1, 3, 255, 256, 257, 511, 513, 1537])
def test_a_batch_of_any_size_is_stored_in_order_once_with_exact_counts(client, db, size):
    # Rows go in by statements of power-of-two runs: every size must keep the order sent,
    # drop repeats within the batch and count exactly.
    ids = [f"e{i:05d}" for i in range(size)]
    repeats = ids[::7]
    first = publish(client, [event(i) for i in ids + repeats])
    assert first.json == {"received": size + len(repeats), "unique_processed": size,
                          "duplicate_dropped": len(repeats), "rejected": 0}
    # Re-sent events between new ones: only the new ones are stored, in the order sent.
    mixed = [x for n, old in enumerate(ids[:40]) for x in (old, f"n{n:05d}")][:size + 1]
    second = publish(client, [event(i) for i in mixed])
    new = [i for i in mixed if i.startswith("n")]
    assert second.json["unique_processed"] == len(new)
    assert table_keys(db) == [("orders", i) for i in ids + new]
    assert db_counters(db) == {"received": len(ids + repeats + mixed),
                               "unique_processed": size + len(new),
                               "duplicate_dropped": len(repeats) + len(mixed) - len(new),
                               "rejected": 0, "expired": 0}


# --- The body budget: what one process reads and parses at once (app/body.py) ---

class Waiters:
    """Threads that each hold some of a BodyBudget until told to let go, noting the order
    in which they got in (and any error)."""

    def __init__(self, budget):
        self.budget, self.order, self.errors, self._go = budget, [], {}, {}

    def start(self, name, size):
        self._go[name] = threading.Event()

        def run():
            try:
                with self.budget.hold(size):
                    self.order.append(name)
                    self._go[name].wait(10)
            except APIError as exc:
                self.errors[name] = exc

        thread = threading.Thread(target=run)
        thread.start()
        time.sleep(0.1)  # in line, in this order
        return thread

    def release(self, name):
        self._go[name].set()
        time.sleep(0.1)


def test_body_budget_lets_requests_in_in_arrival_order():
    budget = BodyBudget(10, wait=5)
    waiters = Waiters(budget)
    threads = [waiters.start("first", 6), waiters.start("big", 8), waiters.start("small", 2)]
    assert waiters.order == ["first"]  # small would fit, but big came before it
    waiters.release("first")
    assert waiters.order == ["first", "big", "small"] and budget.used == 10
    waiters.release("big")
    waiters.release("small")
    for thread in threads:
        thread.join()
    assert budget.used == 0 and not waiters.errors


def test_body_budget_answers_429_busy_after_its_wait_and_holds_nothing_for_it():
    budget = BodyBudget(10, wait=0.3)
    waiters = Waiters(budget)
    holder = waiters.start("holder", 10)
    started = time.monotonic()
    with pytest.raises(APIError) as refused, budget.hold(1):
        pass
    assert time.monotonic() - started >= 0.3
    assert (refused.value.status, refused.value.code, refused.value.retry_after) == \
        (429, "busy", 1)
    assert "AGGREGATOR_BODY_BUDGET" in refused.value.message
    assert budget.used == 10
    waiters.release("holder")
    holder.join()
    assert budget.used == 0


def test_body_larger_than_the_budget_waits_for_all_of_it():
    budget = BodyBudget(10, wait=5)
    waiters = Waiters(budget)
    threads = [waiters.start("some", 1), waiters.start("huge", 50)]
    assert waiters.order == ["some"]
    waiters.release("some")
    assert waiters.order == ["some", "huge"] and budget.used == 10
    waiters.release("huge")
    for thread in threads:
        thread.join()
    assert budget.used == 0


BUDGET_CASES = [
    ("stored", [event("ok")], {}, 200),
    ("some invalid", [event("ok2"), {"topic": "x"}], {}, 207),
    ("none valid", [{"topic": "x"}], {}, 422),
    ("malformed", b"[{", {}, 400),
    ("too many", [event(str(i)) for i in range(6)], {}, 413),
    ("gzip", gzip.compress(json.dumps([event("gz")]).encode()), {"Content-Encoding": "gzip"},
     200),
    ("gzip too large", gzip.compress(b"[" + b" " * 5000 + b"]"), {"Content-Encoding": "gzip"},
     413),
]


# Named by label: a gzip member's header holds the time it was made, and pytest-xdist needs
# every worker to collect the same test ids.
@pytest.mark.parametrize("label,body,headers,status", BUDGET_CASES,
                         ids=[case[0] for case in BUDGET_CASES])
def test_every_publish_gives_its_body_budget_back(make_app, label, body, headers, status):
    app = make_app(max_batch=5, max_body=4000, body_budget=3000)
    response = publish(app.test_client(), body, **headers)
    assert response.status_code == status, response.json
    assert app.extensions["body_budget"].used == 0
