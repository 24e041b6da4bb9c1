"""The column-at-a-time check of a batch against EventSchema, the validator of record.

build_batch checks a plainly valid batch one column at a time and sends every other
batch through EventSchema event by event. These properties hold the fast path to the
schema: it accepts only batches the schema accepts whole, loads them to the very same
rows, and does not miss plainly valid batches (or the speed-up would silently vanish).
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.batch import build_batch, load_by_column, load_by_event, make_event_schema

MAX_PAYLOAD = 300
SCHEMA = make_event_schema(MAX_PAYLOAD)
RECEIVED = "2025-10-18T08:00:01.000Z"

# Near the edges of every rule: lengths 0/1/255/256, controls, surrogates, non-ASCII.
EDGE_NAME_VALUES = ["orders", "é", "x" * 255, "é" * 255, "x" * 256, "", "a\nb", "a\x7fb",
                    "a\x9fb", "\ud800", "ok\udfff", "日本", "\u2028", None, 7, ["x"]]
names = st.one_of(st.sampled_from(EDGE_NAME_VALUES), st.text(min_size=0, max_size=8),
                  st.integers(), st.none(), st.booleans(), st.lists(st.just("x"), max_size=1))
EDGE_TIMESTAMPS = ["2025-10-18T10:00:00Z", "2025-10-18T10:00:00.123456Z",
                     "2025-10-18T10:00:00.1234567Z", "2025-10-18T10:00:00+07:00",
                     "2025-10-18T10:00:00", "2025-10-18", "0001-01-01T00:00:00+01:00",
                     "9999-12-31T23:59:59-01:00", "2025-02-30T00:00:00Z", "", "now", None, 0]
# Built once: st.timezones() lists the zone database each time it is built (25 ms), and a
# composite that built it per draw spent 47 of its 82 s there under the profiler.
zoned_datetimes = st.datetimes(timezones=st.timezones())
timestamps = st.one_of(
    st.sampled_from(EDGE_TIMESTAMPS),
    zoned_datetimes.map(lambda d: d.isoformat()),
    st.integers(), st.none())
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
    | st.text(max_size=20) | st.just(float("inf")) | st.just("\ud834"),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                 max_size=3),
    max_leaves=12)
EDGE_PAYLOADS = [{"big": "x" * MAX_PAYLOAD}, {"n": "é" * 100}, {"n": "é" * 147},
                 {"n": "x" * 292}, {"n": "x" * 293}, {"n": float("inf")}, {"s": "\ud834"},
                 {"a": [{"b": -1e308}]}, {}, [], "x", None, 1]
payloads = st.one_of(st.dictionaries(st.text(max_size=5), json_values, max_size=4),
                     st.sampled_from(EDGE_PAYLOADS), json_values)
FIELDS = {"topic": names, "event_id": names, "timestamp": timestamps, "source": names,
          "payload": payloads}


@st.composite
def events(draw, plain: bool = False):
    """A plainly valid event, or one with a field changed to an edge value, dropped, or
    an extra field (one change at a time, so the column check has to catch each)."""
    event = {"topic": draw(st.text("abc", min_size=1, max_size=5)),
             "event_id": draw(st.text("0123456789é", min_size=1, max_size=12)),
             "timestamp": draw(zoned_datetimes).isoformat(),
             "source": draw(st.sampled_from(["api", "web"])),
             **draw(st.sampled_from([{}, {"payload": {}}, {"payload": {"a": [1, 2.5]}}]))}
    if plain:
        return event
    change = draw(st.sampled_from([*FIELDS, "drop", "extra"]))
    if change == "drop":
        event.pop(draw(st.sampled_from(sorted(event))))
    elif change == "extra":
        event["extra"] = 1
    else:
        event[change] = draw(FIELDS[change])
    return event


@st.composite
def batches(draw):
    """Plainly valid events around one that may differ from them in one way."""
    batch = draw(st.lists(events(plain=True), max_size=4))
    odd = draw(st.one_of(events(), events(), events(), st.just([]), st.just("x")))
    batch.insert(draw(st.integers(0, len(batch))), odd)
    return batch


PROPERTY = settings(max_examples=300, deadline=None)


PLAIN = {"topic": "t", "event_id": "1", "timestamp": "2025-10-18T10:00:00Z", "source": "s"}
EDGES = [(name, value) for name in ("topic", "event_id", "source") for value in EDGE_NAME_VALUES]
EDGES += [("timestamp", value) for value in EDGE_TIMESTAMPS]
EDGES += [("payload", value) for value in EDGE_PAYLOADS]


@pytest.mark.parametrize(("name", "value"), EDGES)
def test_every_edge_value_gets_the_schemas_answer(name, value):
    assert_the_paths_agree([PLAIN, {**PLAIN, name: value}, PLAIN])


@PROPERTY
@given(batches())
def test_the_column_path_accepts_only_what_the_schema_accepts_with_the_same_rows(raw):
    assert_the_paths_agree(raw)


def assert_the_paths_agree(raw: list) -> None:
    by_event, errors = load_by_event(raw, SCHEMA, RECEIVED)
    by_column = load_by_column(raw, SCHEMA, RECEIVED)
    if by_column is not None:
        assert errors == {} and by_event.rejected == 0
        assert by_column == by_event.rows
    elif raw:
        # Refused by the columns: the schema must find a fault (a plainly valid batch
        # that fell through would mean the fast path silently stopped being used).
        assert errors, raw


@PROPERTY
@given(st.lists(events(plain=True), min_size=1, max_size=20))
def test_plainly_valid_batches_take_the_column_path(raw):
    rows = load_by_column(raw, SCHEMA, RECEIVED)
    assert rows is not None
    batch, errors = build_batch(raw, SCHEMA, RECEIVED)
    assert batch.rows == rows == load_by_event(raw, SCHEMA, RECEIVED)[0].rows and errors == {}


def test_an_absent_payload_is_stored_as_an_empty_object_by_both_paths():
    raw = [{"topic": "t", "event_id": "1", "timestamp": "2025-10-18T10:00:00+02:00",
            "source": "s"}]
    by_event = load_by_event(raw, SCHEMA, RECEIVED)[0].rows
    assert load_by_column(raw, SCHEMA, RECEIVED) == by_event == [
        ("t", "1", 1760774400000000, "2025-10-18T08:00:00Z", "s", "{}", RECEIVED)]


def test_one_bad_event_sends_the_batch_to_the_schema_which_names_it():
    good = {"topic": "t", "event_id": "1", "timestamp": "2025-10-18T10:00:00Z", "source": "s"}
    raw = [good, {**good, "event_id": "2", "payload": json.loads('{"x": 1e400}')}]
    assert load_by_column(raw, SCHEMA, RECEIVED) is None
    batch, errors = build_batch(raw, SCHEMA, RECEIVED)
    assert [row[1] for row in batch.rows] == ["1"] and batch.rejected == 1
    assert errors == {"1": {"payload": ["Numbers must be finite (1e400 overflows to infinity)."]}}
