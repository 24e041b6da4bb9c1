"""GET /events: keyset pagination, filters, ordering and parameter errors."""

from __future__ import annotations

import base64
import gzip
import json
import re
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
import requests
from hypothesis import given, settings
from hypothesis import strategies as st

from app.schemas import CURSOR_PATTERN, decode_cursor, encode_cursor, encode_json
from tests.helpers import event, write_lock_held_outside


def post(url, batch):
    response = requests.post(url + "/publish", json=batch, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def test_cursor_paging_returns_each_event_once_while_more_arrive(gunicorn):
    server = gunicorn()
    for start in range(0, 2600, 500):
        post(server.url, [event(f"old-{i}") for i in range(start, min(start + 500, 2600))])
    stop = threading.Event()

    def keep_publishing():
        for n in range(200):
            if stop.wait(0.01):
                return
            post(server.url, [event(f"new-{n}-{i}") for i in range(10)])

    writer = threading.Thread(target=keep_publishing)
    writer.start()
    try:
        seen, cursor, pages = [], None, 0
        with requests.Session() as session:
            while True:
                params = {"limit": 97, **({"after": cursor} if cursor else {})}
                page = session.get(server.url + "/events", params=params, timeout=10).json()
                seen.extend(e["event_id"] for e in page["events"])
                pages += 1
                cursor = page["next_cursor"]
                if cursor is None:
                    break
    finally:
        stop.set()
        writer.join()
    assert len(seen) == len(set(seen))
    assert {f"old-{i}" for i in range(2600)} <= set(seen)
    assert seen[:2600] == [f"old-{i}" for i in range(2600)]
    assert pages >= 27


def test_a_follower_on_end_cursor_sees_every_event_once_while_two_publishers_write(gunicorn):
    """end_cursor is where to go on for what arrives later, next_cursor or not: a reader
    polling with it, while two publishers commit 2,000 events over both workers, gets each
    of them once (sequence numbers follow the commits, so none arrives behind it)."""
    server = gunicorn()
    post(server.url, [event(f"old-{i}") for i in range(300)])

    def keep_publishing(name):
        for n in range(100):
            post(server.url, [event(f"{name}-{n}-{i}") for i in range(10)])

    writers = [threading.Thread(target=keep_publishing, args=(name,)) for name in "ab"]
    seen, cursor = [], None
    with requests.Session() as session:
        first = session.get(server.url + "/events", params={"limit": 1000}, timeout=10).json()
        assert first["next_cursor"] is None
        seen.extend(e["event_id"] for e in first["events"])
        cursor = first["end_cursor"]
        for writer in writers:
            writer.start()
        deadline = time.monotonic() + 60
        while len(seen) < 2300 and time.monotonic() < deadline:
            page = session.get(server.url + "/events", params={"limit": 37, "after": cursor},
                               timeout=10).json()
            seen.extend(e["event_id"] for e in page["events"])
            assert page["end_cursor"] is not None
            assert page["next_cursor"] in (None, page["end_cursor"])
            cursor = page["end_cursor"]
    for writer in writers:
        writer.join()
    assert len(seen) == len(set(seen)) == 2300
    assert seen[:300] == [f"old-{i}" for i in range(300)]


def test_end_cursor_is_past_the_last_event_of_each_filter_and_order(client):
    assert client.get("/events").json == {"events": [], "next_cursor": None,
                                          "end_cursor": None}
    client.post("/publish", json=[event(f"e{i}", topic="ab"[i % 2],
                                        payload={"n": i, "hit": i == 4}) for i in range(6)])
    full = client.get("/events?limit=2").json
    assert full["end_cursor"] == full["next_cursor"] is not None
    # Each later event matches its own query only (and the last query, every event).
    for query, last, later in (("topic=a&", "e4", event("a-later", topic="a")),
                               ("q=%22hit%22:true&", "e4",
                                event("hit-later", topic="c", payload={"hit": True})),
                               ("", "hit-later", event("any-later", topic="d"))):
        page = client.get(f"/events?{query}limit=1000").json
        assert page["next_cursor"] is None and page["events"][-1]["event_id"] == last
        end = page["end_cursor"]
        caught_up = client.get(f"/events?{query}after={end}").json
        assert caught_up == {"events": [], "next_cursor": None, "end_cursor": end}
        client.post("/publish", json=[later])
        assert ids(client.get(f"/events?{query}after={end}")) == [later["event_id"]]
    newest_first = client.get("/events?order=desc&limit=1000").json
    assert newest_first["events"][-1]["event_id"] == "e0"
    assert client.get(f"/events?order=desc&after={newest_first['end_cursor']}").json[
        "events"] == []


def test_oldest_first_at_the_end_end_cursor_is_past_the_last_event_stored(make_app):
    """A page that read to the end, oldest first, has an end_cursor past every event
    stored, matched or not: a follower's next poll reads only what arrived since, and a
    search's does not scan again the events that did not match (scans of 4 here)."""
    client = make_app(search_scan=4, search_time=60).test_client()
    client.post("/publish", json=[event(f"e{i}", topic="ab"[i < 3],
                                        payload={"hit": i == 1}) for i in range(10)])
    end = client.get("/events").json["end_cursor"]
    assert decode_cursor(end) == 10
    for query in ("topic=a", "q=%22hit%22:true", "topic=a&q=%22hit%22:true",
                  "since=2000-01-01T00:00:00Z&q=%22hit%22:true", "source=nowhere",
                  "q=nowhere", "event_id=e1"):
        page = client.get(f"/events?{query}").json
        while page["next_cursor"] is not None:  # a search's page ends at its scan
            page = client.get(f"/events?{query}&after={page['next_cursor']}").json
        assert page["end_cursor"] == end, query
        assert client.get(f"/events?{query}&after={end}").json["end_cursor"] == end, query
    # A cursor given past them all stays; newest first, the end is the last event read.
    ahead = encode_cursor(100)
    assert client.get(f"/events?after={ahead}").json["end_cursor"] == ahead
    newest_first = client.get("/events?order=desc&topic=b").json
    assert decode_cursor(newest_first["end_cursor"]) == 1


@pytest.fixture
def filled(client):
    batch = []
    for i in range(60):
        batch.append(event(f"e{i}", topic=("a", "b", "c")[i % 3], source=("s1", "s2")[i % 2],
                           timestamp=f"2025-10-18T{i // 6:02d}:{(i % 6) * 10:02d}:00+00:00"))
    assert client.post("/publish", json=batch).status_code == 200
    return batch


def ids(response):
    assert response.status_code == 200, response.json
    return [e["event_id"] for e in response.json["events"]]


def test_filters_combine(client, filled):
    expected = [e["event_id"] for e in filled
                if e["topic"] == "a" and e["source"] == "s2"
                and "2025-10-18T02:00:00" <= e["timestamp"][:19] < "2025-10-18T08:00:00"]
    got = ids(client.get("/events", query_string={
        "topic": "a", "source": "s2", "since": "2025-10-18T02:00:00Z",
        "until": "2025-10-18T10:00:00+02:00"}))
    assert got == expected and len(expected) == 6


def test_since_compares_instants_not_text(client, filled):
    got = ids(client.get("/events", query_string={"since": "2025-10-18T11:50:00+02:00"}))
    assert got == [f"e{i}" for i in range(59, 60)]


def test_descending_order_pages_newest_first(client, filled):
    first = client.get("/events", query_string={"order": "desc", "limit": 25}).json
    second = client.get("/events", query_string={"order": "desc", "limit": 25,
                                                 "after": first["next_cursor"]}).json
    third = client.get("/events", query_string={"order": "desc", "limit": 25,
                                                "after": second["next_cursor"]}).json
    got = [e["event_id"] for page in (first, second, third) for e in page["events"]]
    assert got == [f"e{i}" for i in reversed(range(60))]
    assert third["next_cursor"] is None


def test_topic_filter_pages_with_cursor(client, filled):
    first = client.get("/events", query_string={"topic": "b", "limit": 15}).json
    rest = client.get("/events", query_string={"topic": "b", "limit": 15,
                                               "after": first["next_cursor"]}).json
    got = [e["event_id"] for e in first["events"] + rest["events"]]
    assert got == [f"e{i}" for i in range(1, 60, 3)]
    assert rest["next_cursor"] is None


def test_a_topic_and_an_event_id_find_that_one_event(client, filled):
    assert ids(client.get("/events?topic=a&event_id=e3")) == ["e3"]
    assert ids(client.get("/events?topic=b&event_id=e3&order=desc")) == []
    assert ids(client.get("/events?topic=a&event_id=e3&source=s2")) == ["e3"]
    assert ids(client.get("/events?topic=a&event_id=e3&since=2025-10-18T00:30:00Z")) == ["e3"]
    assert ids(client.get("/events?topic=a&event_id=e3&since=2025-10-18T00:31:00Z")) == []
    # The same id under two topics is two events, each found under its own.
    twins = [event("twin", topic="x", payload={"n": 1}), event("twin", topic="y",
                                                                 payload={"n": 2})]
    assert client.post("/publish", json=twins).json["unique_processed"] == 2
    for topic, n in (("x", 1), ("y", 2)):
        page = client.get(f"/events?topic={topic}&event_id=twin").json
        assert [e["payload"] for e in page["events"]] == [{"n": n}]
        assert page["next_cursor"] is None


def test_an_event_id_alone_finds_it_in_every_topic_that_holds_it(client, filled):
    assert ids(client.get("/events?event_id=e4")) == ["e4"]
    assert ids(client.get("/events?event_id=nowhere")) == []
    same = [event("req-7", topic=topic, source=topic) for topic in ("x", "a", "y")]
    client.post("/publish", json=[event("e4", topic="z"), *same])
    assert [(e["topic"], e["event_id"]) for e in client.get(
        "/events?event_id=e4").json["events"]] == [("b", "e4"), ("z", "e4")]
    for order, topics in (("asc", ["x", "a", "y"]), ("desc", ["y", "a", "x"])):
        first = client.get(f"/events?event_id=req-7&order={order}&limit=2").json
        rest = client.get(f"/events?event_id=req-7&order={order}&limit=2"
                          f"&after={first['next_cursor']}").json
        assert [e["topic"] for e in first["events"] + rest["events"]] == topics
        assert rest["next_cursor"] is None
    assert ids(client.get("/events?event_id=req-7&source=a")) == ["req-7"]
    assert ids(client.get("/events?event_id=e4&until=2025-10-18T00:00:00Z")) == []


def test_event_fields_are_returned(client, filled):
    first = client.get("/events", query_string={"limit": 1}).json["events"][0]
    assert set(first) == {"topic", "event_id", "timestamp", "source", "payload", "received_at"}
    assert first["received_at"].endswith("Z")


# Payload sizes (JSON characters: 8 + the string's length) against a budget of 10,000.
LARGE = [3000, 3000, 3000, 3000, 25000, 100, 100, 25000, 25000, 100]
LARGE_PAGES = {"asc": [[0, 1, 2], [3], [4], [5, 6], [7], [8], [9]],
               "desc": [[9], [8], [7], [6, 5], [4], [3, 2, 1], [0]]}


@pytest.mark.parametrize("order", ["asc", "desc"])
@pytest.mark.parametrize("filters", [{}, {"topic": "big"}, {"since": "2025-10-18T00:00:00Z"}],
                         ids=["all", "topic", "since"])
def test_a_page_of_large_payloads_ends_at_the_page_budget_and_paging_gets_them_all(
        make_app, order, filters):
    """Past AGGREGATOR_MAX_PAGE_BYTES of payloads a page ends early (but holds at least one
    event) with a cursor, through every plan that reads a page; paging returns each event
    once, payloads whole."""
    client = make_app(max_page_bytes=10_000).test_client()
    payloads = [{"x": "y" * size} for size in LARGE]
    batch = [event(f"big-{i}", topic="big", payload=payload) for i, payload in enumerate(payloads)]
    assert client.post("/publish", json=batch).status_code == 200
    pages, cursor = [], None
    while True:
        answer = client.get("/events", query_string={
            **filters, "order": order, "limit": 1000, **({"after": cursor} if cursor else {})})
        assert answer.status_code == 200, answer.json
        pages.append([int(e["event_id"][4:]) for e in answer.json["events"]])
        for got in answer.json["events"]:
            assert got["payload"] == payloads[int(got["event_id"][4:])]
        cursor = answer.json["next_cursor"]
        if cursor is None:
            break
    assert pages == LARGE_PAGES[order]
    # Whichever comes first, the count or the budget, ends the page.
    first = client.get("/events", query_string={**filters, "order": order, "limit": 2}).json
    assert [int(e["event_id"][4:]) for e in first["events"]] == {"asc": [0, 1],
                                                                 "desc": [9]}[order]
    assert first["next_cursor"] is not None


def test_the_page_budget_counts_bytes_not_characters(make_app):
    """A payload of 300 "e" is 308 bytes of JSON; of 300 "é", 308 characters but 608 bytes.
    With a budget of 1,000 bytes, a page holds the events before the one that takes it
    over: 3 of the first kind, 1 of the second (3 as well, were characters counted)."""
    client = make_app(max_page_bytes=1000).test_client()
    for topic, letter in (("ascii", "e"), ("accents", "é")):
        batch = [event(f"{topic}-{i}", topic=topic, payload={"x": letter * 300})
                 for i in range(10)]
        assert client.post("/publish", json=batch).status_code == 200
    for topic, expected in (("ascii", 3), ("accents", 1)):
        page = client.get("/events", query_string={"topic": topic, "limit": 100}).json
        assert [e["event_id"] for e in page["events"]] == [f"{topic}-{i}"
                                                            for i in range(expected)]
        assert page["next_cursor"] is not None


def test_the_events_page_says_why_a_page_holds_fewer_events_than_asked(make_app):
    client = make_app(max_page_bytes=10_000).test_client()
    batch = [event(f"big-{i}", topic="big", payload={"x": "y" * size})
             for i, size in enumerate(LARGE)]
    assert client.post("/publish", json=batch).status_code == 200
    html = {"Accept": "text/html"}
    short = client.get("/events?limit=100", headers=html).get_data(as_text=True)
    assert "This page ends after 1 of 100 events" in short and 'rel="next"' in short
    full = client.get("/events?limit=1", headers=html).get_data(as_text=True)  # by count
    assert "This page ends" not in full and 'rel="next"' in full
    last = client.get("/events?limit=100&topic=none", headers=html).get_data(as_text=True)
    assert "This page ends" not in last


SEARCHED = [
    {"level": "error", "message": "upstream TimeoutError after 30 s"},
    {"level": "info", "message": "GET /cart -> 200"},
    {"level": "error", "error": {"type": "TimeoutError", "retryable": True}},
    {"level": "info", "message": 'said "hi"', "city": "Café Zürich"},
    {"level": "warning", "amount": 12.5, "tags": ["eu", "mobile"]},
]


def search_all(client, **params) -> tuple[list[str], list[int]]:
    """Page through a search as a client would: the ids found, and each page's size."""
    found, sizes, cursor = [], [], None
    while True:
        answer = client.get("/events", query_string={
            **params, **({"after": cursor} if cursor else {})})
        assert answer.status_code == 200, answer.json
        found += [e["event_id"] for e in answer.json["events"]]
        sizes.append(len(answer.json["events"]))
        cursor = answer.json["next_cursor"]
        if cursor is None:
            return found, sizes


def test_a_search_finds_every_payload_holding_the_text_a_bounded_scan_at_a_time(make_app):
    """q is a case-sensitive substring of the payload as /events returns it (compact JSON,
    non-ASCII as is), combined with every other filter. With AGGREGATOR_SEARCH_SCAN=40 (and
    AGGREGATOR_SEARCH_TIME=0: no more scans after an empty one), a page reads at most 40
    events: one that finds fewer than limit, or none, still has a next_cursor, and paging
    on finds each match once, in order."""
    client = make_app(search_scan=40, search_time=0).test_client()
    batch = [event(f"s{i}", topic=("web", "db")[i % 2], payload=SEARCHED[i % 5],
                   timestamp=f"2025-10-18T{i // 10:02d}:{i % 10:02d}:00Z") for i in range(200)]
    assert client.post("/publish", json=batch).status_code == 200

    def expected(text, keep=lambda i: True):
        return [f"s{i}" for i in range(200) if text in encode_json(SEARCHED[i % 5]) and keep(i)]

    for text in ("TimeoutError", '"level":"error"', "Café", 'said \\"hi\\"', "12.5",
                 '["eu","mobile"]'):
        for order in ("asc", "desc"):
            found, sizes = search_all(client, q=text, order=order, limit=30)
            assert found == expected(text)[::-1 if order == "desc" else 1], (text, order)
            assert len(sizes) == 5 and max(sizes) <= 16  # 200 events, 40 a page
    assert expected("TimeoutError") and expected('said \\"hi\\"')
    # Each filter narrows what is read first; the scan counts the topic's events.
    found, sizes = search_all(client, q="TimeoutError", topic="db", limit=1000)
    assert found == expected("TimeoutError", lambda i: i % 2) and len(sizes) == 3
    found, _ = search_all(client, q="TimeoutError", since="2025-10-18T05:00:00Z",
                          until="2025-10-18T12:00:00Z", order="desc")
    assert found == expected("TimeoutError", lambda i: 50 <= i < 120)[::-1]
    assert search_all(client, q="timeouterror") == ([], [0] * 5)  # the case counts
    # A full page by count ends where its last event is, not at the scan.
    first = client.get("/events?q=level&limit=7").json
    assert [e["event_id"] for e in first["events"]] == [f"s{i}" for i in range(7)]
    second = client.get(f"/events?q=level&limit=7&after={first['next_cursor']}").json
    assert [e["event_id"] for e in second["events"]] == [f"s{i}" for i in range(7, 14)]
    # An event_id is looked up by its key whatever the scan; q then tests its payload.
    assert ids(client.get("/events?event_id=s2&q=TimeoutError")) == ["s2"]
    assert ids(client.get("/events?event_id=s1&q=TimeoutError")) == []


def needle_at_5(client):
    batch = [event(f"s{i}", payload={"message": "needle" if i == 5 else "hay"})
             for i in range(100)]
    assert client.post("/publish", json=batch).status_code == 200


def test_a_search_that_finds_nothing_reads_on_for_its_time(make_app):
    """Newest first, the scans of 40 read s99..s60 and s59..s20 in vain, then s19..s0: with
    time for them, one request finds s5, and says that nothing is left."""
    needle_at_5(slow := make_app(search_scan=40, search_time=60).test_client())
    page = slow.get("/events?q=needle&order=desc").json
    assert [e["event_id"] for e in page["events"]] == ["s5"] and page["next_cursor"] is None
    nowhere = slow.get("/events?q=nowhere&order=desc").json
    assert nowhere["events"] == [] and nowhere["next_cursor"] is None
    hasty = make_app(search_scan=40, search_time=0).test_client()
    page = hasty.get("/events?q=needle&order=desc").json
    assert page["events"] == [] and decode_cursor(page["next_cursor"]) == 61  # s60's seq


def test_searches_at_once_are_bounded_and_one_past_them_waits_then_is_429_busy(make_app):
    """With AGGREGATOR_SEARCH_CONCURRENCY=2 and both slots held (as two running searches
    hold them), a search waits for one, 1 s at most, then is a 429; reads that are not
    searches go on. A slot freed while it waits lets it run."""
    app = make_app(search_concurrency=2)
    needle_at_5(client := app.test_client())
    slots = app.extensions["searches"]
    assert slots.acquire(timeout=1) and slots.acquire(timeout=1)
    began = time.monotonic()
    busy = client.get("/events?q=needle")
    waited = time.monotonic() - began
    assert busy.status_code == 429 and 0.9 <= waited < 5
    assert busy.json["error"] == "busy" and busy.headers["Retry-After"] == "1"
    assert "AGGREGATOR_SEARCH_CONCURRENCY" in busy.json["message"]
    assert ids(client.get("/events?limit=1")) == ["s0"]
    assert ids(client.get("/events?event_id=s5&q=needle")) == ["s5"]  # a lookup by key
    threading.Timer(0.3, slots.release).start()
    began = time.monotonic()
    assert ids(client.get("/events?q=needle")) == ["s5"]
    assert 0.2 <= time.monotonic() - began < 1
    slots.release()
    # Every slot is back: the searches released theirs (a release too many would raise).
    assert all(slots.acquire(timeout=0) for _ in range(2)) and not slots.acquire(timeout=0)


def test_the_events_page_searches_and_says_when_a_scan_found_nothing(make_app):
    needle_at_5(client := make_app(search_scan=40, search_time=0).test_client())
    html = {"Accept": "text/html"}
    newest = client.get("/events?q=needle", headers=html).get_data(as_text=True)
    assert "No event matched yet. A search reads 40 events at a time" in newest
    assert "one scan a page (<code>AGGREGATOR_SEARCH_TIME=0</code>)" in newest
    assert 'value="needle"' in newest and 'rel="next"' in newest
    older = re.search(r'href="([^"]+)">search older events', newest).group(1)
    middle = client.get(older.replace("&amp;", "&"), headers=html).get_data(as_text=True)
    assert "No event matched yet" in middle
    last_link = re.search(r'href="([^"]+)" rel="next"', middle).group(1)
    last = client.get(last_link.replace("&amp;", "&"), headers=html).get_data(as_text=True)
    assert ">s5<" in last and "This page ends" not in last and 'rel="next"' not in last
    short = client.get("/events?q=hay&limit=100", headers=html).get_data(as_text=True)
    assert "This page ends after 40 of 100 events: a search reads 40 events at a time" in short


def test_received_at_is_when_the_request_arrived_not_when_it_was_committed(gunicorn, db):
    server = gunicorn(workers=1)
    sent = []
    with write_lock_held_outside(db):
        # The request arrives now, and waits half a second for its commit.
        before = datetime.now(UTC)
        sender = threading.Thread(target=lambda: sent.append(
            post(server.url, [event(f"r{i}") for i in range(3)])))
        sender.start()
        time.sleep(0.5)
        released = datetime.now(UTC)
    sender.join(timeout=30)
    assert sent and sent[0]["unique_processed"] == 3
    post(server.url, [event("later")])
    page = requests.get(server.url + "/events", timeout=10).json()["events"]
    stamps = [e["received_at"] for e in page]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", s) for s in stamps)
    # One request's events share its time; a later request has a later one.
    assert stamps[0] == stamps[1] == stamps[2] < stamps[3]
    arrived = datetime.fromisoformat(stamps[0])
    assert before - timedelta(milliseconds=1) <= arrived < released - timedelta(milliseconds=300)


@pytest.mark.parametrize("param,value", [
    ("limit", "0"), ("limit", "1001"), ("limit", "ten"), ("order", "sideways"),
    ("since", "yesterday"), ("until", "2025-10-18T03:00:00"), ("after", "not-a-cursor"),
    ("since", "2025-10-18T03.5Z"), ("until", "2025-10-18T03:30.5+01:00"),
    ("topic", ""), ("event_id", ""), ("event_id", "x" * 256),
    # No event holds a control character; PostgreSQL cannot even compare text with a NUL.
    ("topic", "a\x00b"), ("source", "\x00"), ("event_id", "a\x1fb"), ("event_id", "\x00"),
    ("q", ""), ("q", "x" * 256), ("q", "a\x00b"), ("q", "\n"),
])
def test_bad_query_parameter_is_400_naming_it(client, param, value):
    response = client.get("/events", query_string={param: value})
    assert response.status_code == 400
    assert response.json["error"] == "bad_query"
    assert param in response.json["message"] and param in response.json["errors"]


def test_an_offset_whose_plus_became_a_space_is_named(client, filled):
    """A '+' in a query string is a space: since=...T03:00:00+07:00 typed into curl arrives
    as '...T03:00:00 07:00', and the answer says how to write it."""
    response = client.get("/events?since=2025-10-18T03:00:00+07:00")
    assert response.status_code == 400
    assert "%2B" in response.json["errors"]["since"][0]
    response = client.get("/events?since=2025-10-18T03:00:00%2B07:00")
    assert response.status_code == 200
    # Without a time before the space, the hint is not given.
    response = client.get("/events?until=2025-10-18+03:00")
    assert "%2B" not in response.json["errors"]["until"][0]


@pytest.mark.parametrize("param,values", [
    ("topic", ["orders", "payments"]), ("limit", ["1", "1"]), ("order", ["asc", "desc"]),
])
def test_a_query_parameter_given_twice_is_400_naming_it(client, filled, param, values):
    """topic=a&topic=b is not both topics, and answering for one of them would be silently
    wrong."""
    response = client.get(f"/events?{param}={values[0]}&{param}={values[1]}&limit=5")
    assert response.status_code == 400
    assert response.json["error"] == "bad_query"
    assert list(response.json["errors"]) == [param]
    assert "more than once" in response.json["errors"][param][0]


@pytest.mark.parametrize("query", ["topc=a", "topic=a&pretty=1", "Topic=a", "format=json"])
def test_an_unknown_query_parameter_is_400_naming_it(client, filled, query):
    """A misspelt filter must not answer with every event."""
    response = client.get(f"/events?{query}")
    assert response.status_code == 400 and response.json["error"] == "bad_query"
    (name,) = response.json["errors"]
    assert name in query and name != "topic"
    assert "Unknown parameter" in response.json["errors"][name][0]
    assert ("topic, event_id, source, q, since, until, limit, after, order"
            in response.json["errors"][name][0])


def test_a_parameter_not_utf8_once_unescaped_is_400_not_a_filter_on_u_fffd(client):
    """Werkzeug reads %FF as U+FFFD, so topic=%FF used to answer for a topic named U+FFFD."""
    replaced = "\ufffd"
    assert client.post("/publish", json=[event("r1", topic=replaced, payload={"t": replaced}),
                                         event("r2")]).status_code == 200
    for query, name in [("topic=%FF", "topic"), ("q=%C3", "q"),
                        ("limit=5&source=a%E9b", "source"), ("q=%FF%FE&topic=%ff", "q")]:
        response = client.get(f"/events?{query}")
        assert response.status_code == 400, query
        assert response.json["error"] == "bad_query"
        assert name in response.json["errors"]
        assert "Not UTF-8 once unescaped" in response.json["errors"][name][0]
        page = client.get(f"/events?{query}", headers={"Accept": "text/html"})
        assert page.status_code == 400
        assert "Not UTF-8 once unescaped" in page.get_data(as_text=True)
    assert client.get("/stats?topics=%FF").status_code == 400
    # The character itself, escaped as its UTF-8, is a filter like any other.
    for query in ("topic=%EF%BF%BD", "q=%EF%BF%BD"):
        assert [e["event_id"] for e in client.get(f"/events?{query}").json["events"]] == ["r1"]


def test_the_pages_own_parameter_is_let_through(client, filled):
    """A URL of the live page also works as an API call."""
    response = client.get("/events?topic=a&live=1&limit=5")
    assert response.status_code == 200
    assert {e["topic"] for e in response.json["events"]} == {"a"}


@settings(max_examples=300, deadline=None)
@given(cursor=st.from_regex(CURSOR_PATTERN, fullmatch=True))
def test_every_cursor_the_document_allows_decodes_to_a_sqlite_integer(cursor):
    seq = decode_cursor(cursor)
    assert 0 <= seq < 2 ** 63 and encode_cursor(seq) == cursor


def test_cursor_too_large_for_sqlite_is_a_400_not_a_500(client, filled):
    huge = base64.urlsafe_b64encode(b"s" + b"9" * 30).decode().rstrip("=")
    response = client.get("/events", query_string={"after": huge})
    assert response.status_code == 400 and "after" in response.json["errors"]


def test_bounds_far_outside_utc_years_compare_as_instants(client, filled):
    assert len(ids(client.get("/events", query_string={
        "since": "0001-01-01T00:00:00+01:00", "until": "9999-12-31T23:59:59-14:00"}))) == 60


def test_request_line_too_long_is_a_json_414(gunicorn):
    server = gunicorn(workers=1)
    response = requests.get(server.url + "/events", params={"topic": "t" * 9000}, timeout=10)
    assert response.status_code == 414
    assert response.json()["error"] == "uri_too_long"


def test_reads_are_gzipped_for_a_client_that_takes_it(client):
    client.post("/publish", json=[event(f"e{i}", payload={"text": "x" * 50, "i": i})
                                  for i in range(100)])
    browser = {"Accept": "text/html"}
    for path, headers in (("/events", {}), ("/events", browser), ("/metrics", {})):
        plain = client.get(path, headers=headers)
        assert "Content-Encoding" not in plain.headers
        assert "Accept-Encoding" in plain.headers["Vary"]
        packed = client.get(path, headers={**headers, "Accept-Encoding": "gzip, deflate"})
        assert packed.headers["Content-Encoding"] == "gzip", path
        assert "Accept-Encoding" in packed.headers["Vary"]
        assert int(packed.headers["Content-Length"]) == len(packed.data) < len(plain.data) / 3
        if path != "/metrics":  # its histograms move between the two scrapes
            assert gzip.decompress(packed.data) == plain.data
    for refused in ("gzip;q=0", "identity", "br"):
        assert "Content-Encoding" not in client.get(
            "/events", headers={"Accept-Encoding": refused}).headers
    for small in ("/health", "/stats"):  # under 1 KiB: not worth it
        answer = client.get(small, headers={"Accept-Encoding": "gzip"})
        assert answer.status_code == 200 and "Content-Encoding" not in answer.headers


def test_a_gzipped_page_through_gunicorn_is_whole_and_7_times_smaller(gunicorn):
    server = gunicorn()
    post(server.url, [event(f"e{i}", payload={"level": "info", "message": f"GET /x/{i} -> 200",
                                              "user_id": i * 7919 % 50000})
                      for i in range(1000)])
    url = server.url + "/events?limit=1000"
    identity = requests.get(url, headers={"Accept-Encoding": "identity"}, timeout=10)
    packed = requests.get(url, stream=True, timeout=10)  # requests asks for gzip
    raw = packed.raw.read(decode_content=False)
    assert packed.headers["Content-Encoding"] == "gzip"
    assert len(raw) == int(packed.headers["Content-Length"]) < len(identity.content) / 7
    assert gzip.decompress(raw) == identity.content
    assert len(json.loads(identity.content)["events"]) == 1000
    server.terminate()
    pages = [r["bytes"] for r in server.log_records() if r.get("path") == "/events"]
    assert pages == [len(identity.content), len(raw)]  # the access lines: as sent


def test_since_and_until_take_times_relative_to_now(client):
    now = datetime.now(UTC)
    client.post("/publish", json=[
        event(name, timestamp=(now - ago).isoformat().replace("+00:00", "Z"))
        for name, ago in (("days-ago", timedelta(days=3)), ("2h-ago", timedelta(hours=2)),
                          ("30m-ago", timedelta(minutes=30)),
                          ("in-an-hour", timedelta(hours=-1)))])
    for query, expected in (("since=now-1h", ["30m-ago", "in-an-hour"]),
                            ("since=now-2.5h&until=now-1h", ["2h-ago"]),
                            ("since=now-7d&until=now", ["days-ago", "2h-ago", "30m-ago"]),
                            ("since=now", ["in-an-hour"]), ("until=now-1d", ["days-ago"]),
                            ("since=now-90s", ["in-an-hour"]),
                            # Before year 1 (a timedelta's end, then datetime's): from the start.
                            ("since=now-99999999999d", ["days-ago", "2h-ago", "30m-ago",
                                                         "in-an-hour"]),
                            ("until=now-4000000d", [])):
        assert ids(client.get(f"/events?{query}")) == expected, query
    for bad in ("now+1h", "now-1x", "now-", "nowadays", "now-1h30m", "now-1e3d"):
        answer = client.get("/events", query_string={"since": bad})
        assert answer.status_code == 400, bad
        assert list(answer.json["errors"]) == ["since"], bad
        assert "relative time" in answer.json["errors"]["since"][0].lower(), bad
