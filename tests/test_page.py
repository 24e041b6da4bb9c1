"""The events page: negotiation and escaping (Flask), then a real headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
from datetime import UTC, datetime, timedelta
from html import escape, unescape
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from tests.helpers import ROOT, event

HTML = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}
SCREENSHOTS = ROOT / "tests" / "artifacts"
HOSTILE = '"><script>window.pwned=1</script><img src=x onerror="window.pwned=2">\''


def test_browser_gets_html_and_api_client_gets_json(client):
    client.post("/publish", json=[event("a")])
    page = client.get("/events", headers=HTML)
    assert page.status_code == 200 and page.mimetype == "text/html"
    assert page.headers["Content-Security-Policy"].startswith("default-src 'self'")
    assert page.headers["X-Content-Type-Options"] == "nosniff"
    assert "<table" in page.get_data(as_text=True)
    for accept in ("application/json", "*/*", None):
        api = client.get("/events", headers={"Accept": accept} if accept else {})
        assert api.is_json and api.json["events"][0]["event_id"] == "a"


def test_root_leads_to_the_page(client):
    response = client.get("/", headers=HTML)
    assert response.status_code in (301, 302, 303, 307, 308)
    assert response.headers["Location"].endswith("/events")


def test_page_shows_counters_topics_and_newest_first(client):
    client.post("/publish", json=[event("old", topic="x"), event("new", topic="y"),
                                  event("old", topic="x"), event("bad", topic="")])
    html = client.get("/events", headers=HTML).get_data(as_text=True)
    assert html.index(">new<") < html.index(">old<")
    for label, value in (("Received", 3), ("Unique", 2), ("Duplicates dropped", 1),
                         ("Rejected", 1)):
        assert f"<dt>{label}</dt><dd>{value}</dd>" in html
    assert 'href="/events?topic=x"' in html and 'href="/events?topic=y"' in html
    stored_at = client.get("/stats").json["topics_last_stored_at"]["x"]
    assert f'href="/events?topic=x" title="newest stored {stored_at}"' in html


def test_page_filters_by_the_form_parameters(client):
    client.post("/publish", json=[event("a1", topic="a", source="s1"),
                                  event("a2", topic="a", source="s2"),
                                  event("b1", topic="b", source="s1")])
    html = client.get("/events?topic=a&source=s1&since=&until=&limit=25",
                      headers=HTML).get_data(as_text=True)
    assert ">a1<" in html and ">a2<" not in html and ">b1<" not in html
    assert '<option value="a" selected>' in html


def test_the_page_size_shown_is_the_one_in_force_even_off_the_list(client):
    """limit=10 from a bookmark must not show 25, which a click on Filter would then send."""
    client.post("/publish", json=[event(f"e{i}") for i in range(12)])
    html = client.get("/events?limit=10", headers=HTML).get_data(as_text=True)
    assert html.count('<td class="id"') == 10
    options = re.findall(r'<option value="(\d+)"( selected)?>', html)
    assert options == [("10", " selected"), ("25", ""), ("50", ""), ("100", ""), ("250", ""),
                       ("500", ""), ("1000", "")]


def test_a_rows_topic_and_source_link_to_the_view_narrowed_to_them(client):
    """Other filters stay; the page starts again from the newest (no cursor)."""
    client.post("/publish", json=[event(f"e{i}", topic=f"t{i % 2}", source=f"s{i % 3}",
                                        timestamp=f"2025-10-18T03:00:{i:02d}Z")
                                  for i in range(30)])
    html = client.get("/events?since=2025-10-18T03:00:10Z&limit=5&after=AAAAAAAAAB8",
                      headers=HTML).get_data(as_text=True)
    topic_links = set(re.findall(r'<td class="topic" data-label="Topic"><a href="([^"]+)"', html))
    source_links = set(re.findall(r'<td class="source" data-label="Source"><a href="([^"]+)"',
                                  html))
    assert topic_links and source_links
    for link in map(unescape, topic_links | source_links):
        params = parse_qs(urlsplit(link).query)
        assert "after" not in params and params["since"] == ["2025-10-18T03:00:10Z"]
        ((name, (value,)),) = [(k, v) for k, v in params.items() if k in ("topic", "source")]
        narrowed = client.get(link).json["events"]
        assert narrowed and {e[name] for e in narrowed} == {value}
        assert all(e["timestamp"] >= "2025-10-18T03:00:10Z" for e in narrowed)


def test_each_event_id_links_to_that_event_alone(client):
    """The link names the pair, encoded: an id with &, spaces or markup, and the same id
    under another topic, still lead to the one event."""
    odd = 'a&b c?d=<i>"x"#'
    client.post("/publish", json=[event(odd, topic="t/1", payload={"n": 1}),
                                  event(odd, topic="t 2", payload={"n": 2}),
                                  event("other", topic="t/1")])
    html = client.get("/events", headers=HTML).get_data(as_text=True)
    links = re.findall(r'<td class="id" data-label="Event ID"><a href="([^"]+)"', html)
    found = []
    for link in map(unescape, links):
        page = client.get(link, headers=HTML).get_data(as_text=True)
        assert page.count('<td class="id"') == 1
        (one,) = client.get(link).json["events"]
        found.append((one["topic"], one["event_id"], one["payload"]))
    assert sorted(found) == [("t 2", odd, {"n": 2}), ("t/1", odd, {"n": 1}),
                             ("t/1", "other", {"n": "other"})]


def publish_60_topics(post) -> None:
    """Topic t-NN gets NN + 1 events: the 50 largest are t-10 .. t-59."""
    assert post("/publish", json=[event(f"e{n}-{i}", topic=f"t-{n:02d}")
                                  for n in range(60) for i in range(n + 1)]).status_code == 200


def test_page_names_the_50_largest_topics_and_any_topic_can_be_typed(client):
    publish_60_topics(client.post)
    html = client.get("/events", headers=HTML).get_data(as_text=True)
    linked = {n for n in range(60) if f'href="/events?topic=t-{n:02d}"' in html}
    assert linked == set(range(10, 60))
    assert "and 10 smaller topics" in html
    assert '<select name="topic">' not in html
    assert '<input name="topic" list="topic-names" value=""' in html
    assert html.count("<option value=\"t-") == 50
    # A topic not named on the page is filtered by typing it.
    html = client.get("/events?topic=t-03", headers=HTML).get_data(as_text=True)
    assert '<input name="topic" list="topic-names" value="t-03"' in html
    assert sorted(re.findall(r">(e3-\d)<", html)) == ["e3-0", "e3-1", "e3-2", "e3-3"]


def test_topic_filter_with_no_events_stays_selected(client):
    client.post("/publish", json=[event("a", topic="x")])
    html = client.get("/events?topic=nothing-here", headers=HTML).get_data(as_text=True)
    assert '<option value="nothing-here" selected>' in html


def test_bad_filter_is_an_html_400_for_a_browser_and_json_for_an_api(client):
    page = client.get("/events?since=yesterday&limit=9999", headers=HTML)
    assert page.status_code == 400 and page.mimetype == "text/html"
    text = page.get_data(as_text=True)
    assert "Bad filter" in text and "since" in text and "limit" in text
    api = client.get("/events?since=yesterday")
    assert api.status_code == 400 and api.json["error"] == "bad_query"


def test_empty_store_says_no_events_yet(client):
    assert "No events yet" in client.get("/events", headers=HTML).get_data(as_text=True)


def test_every_field_is_escaped(client):
    hostile = event(HOSTILE, topic=HOSTILE[:200], source=HOSTILE,
                    payload={"html": HOSTILE, HOSTILE: [HOSTILE]})
    assert client.post("/publish", json=hostile).status_code == 200
    html = client.get("/events", headers=HTML).get_data(as_text=True)
    assert "<script>" not in html and "<img" not in html
    assert "onerror=\"window" not in html
    assert "&lt;script&gt;" in html and "&#34;&gt;" in html
    bad = client.get("/events", query_string={"source": HOSTILE, "since": HOSTILE},
                     headers=HTML).get_data(as_text=True)
    assert "<script>" not in bad and "<img" not in bad


def test_a_search_marks_its_matches_and_a_long_payload_shows_them_in_its_summary(client):
    """The summary of a folded payload is then the text around the first match, not its
    first 80 characters; every match in the shown text is marked, and all stays escaped."""
    client.post("/publish", json=[
        event("long", payload={"lines": list(range(60)), "why": "<b>NEEDLE</b>",
                               "more": list(range(30))}),
        event("short", payload={"note": "a <b>NEEDLE</b> and a <b>NEEDLE</b>"})])
    html = client.get("/events", query_string={"q": "<b>NEEDLE"},
                      headers=HTML).get_data(as_text=True)
    assert "<b>" not in html
    summary = re.search(r"<summary>(.*?)</summary>", html).group(1)
    assert summary.startswith("…") and summary.endswith("…")
    assert "&#34;why&#34;:&#34;<mark>&lt;b&gt;NEEDLE</mark>&lt;/b&gt;&#34;" in summary
    assert html.count("<mark>&lt;b&gt;NEEDLE</mark>") == 4  # the summary, long's, short's 2
    plain = client.get("/events", headers=HTML).get_data(as_text=True)
    assert "<mark>" not in plain and "<summary>{&#34;lines&#34;:[0,1,2" in plain


def test_a_short_payload_is_one_line_as_stored_and_a_longer_one_indented(client):
    short = {"level": "info", "n": 1, "tags": ["a", "b"]}
    longer = {"level": "info", "message": "x" * 60, "n": 2}
    client.post("/publish", json=[event("short", payload=short),
                                  event("longer", payload=longer)])
    html = unescape(client.get("/events", headers=HTML).get_data(as_text=True))
    assert '<pre>{"level":"info","n":1,"tags":["a","b"]}</pre>' in html
    assert "<pre>" + json.dumps(longer, indent=2) + "</pre>" in html


def test_the_last_hour_is_a_link_and_a_view_that_stays_the_last_hour(client):
    now = datetime.now(UTC)
    client.post("/publish", json=[
        event(name, timestamp=(now - ago).isoformat().replace("+00:00", "Z"))
        for name, ago in (("old", timedelta(hours=2)), ("recent", timedelta(minutes=5)))])
    html = unescape(client.get("/events?topic=orders&after=AAAAAAAAAAE",
                               headers=HTML).get_data(as_text=True))
    links = dict((label, parse_qs(urlsplit(href).query)) for href, label in re.findall(
        r'<a href="([^"]*since=now[^"]*)"[^>]*>([^<]+)</a>', html))
    assert list(links) == ["15 minutes", "hour", "24 hours", "7 days"]
    assert links["hour"] == {"since": ["now-1h"], "topic": ["orders"]}  # not after
    html = client.get("/events?since=now-1h", headers=HTML).get_data(as_text=True)
    assert ">recent<" in html and ">old<" not in html
    assert re.search(r'since=now-1h"[^>]* aria-current="true">hour<', html)


def test_each_rows_links_filter_on_its_values_whatever_their_characters(client):
    """A row links its topic, its event alone and its source; values with the characters a
    query string gives meaning to (& = + # % ? and spaces), and others, arrive whole."""
    odd = [("a&b=c #1", "id+1%2F?x", "src é/=&"), ("a", "id 1", "src")]
    client.post("/publish", json=[event(eid, topic=topic, source=source)
                                  for topic, eid, source in odd])
    html = client.get("/events?limit=10&q=%7B", headers=HTML).get_data(as_text=True)
    for topic, eid, source in odd:
        (row,) = [row.split("</tr>")[0] for row in html.split("<tr")
                  if f">{escape(eid)}</a>" in row]
        hrefs = [unescape(h) for h in re.findall(r'<a href="([^"]+)"', row)]
        assert [parse_qs(urlsplit(h).query) for h in hrefs] == [
            {"topic": [topic], "limit": ["10"], "q": ["{"]},
            {"topic": [topic], "event_id": [eid]},
            {"source": [source], "limit": ["10"], "q": ["{"]}]
        assert all(h.startswith("/events?") for h in hrefs)
        assert [e["event_id"] for e in client.get(hrefs[1]).json["events"]] == [eid]


def test_the_templates_are_compiled_when_the_app_is_made_not_by_its_first_page(make_app):
    """A new app (as each gunicorn worker makes one) holds its templates compiled; so does
    the next one made in the same process, from the compiled code the first kept."""
    for _ in range(2):
        cache = make_app().jinja_env.cache
        assert {name for _, name in cache} == {"events.html", "docs.html"}


def test_long_payloads_are_collapsed(client):
    client.post("/publish", json=[event("big", payload={"lines": list(range(100))}),
                                  event("small", payload={"k": 1})])
    html = client.get("/events", headers=HTML).get_data(as_text=True)
    assert html.count("<details>") == 1


# --- a real browser ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser():
    if shutil.which("chromium") is None:
        pytest.fail("Debian's chromium is needed: apt-get install chromium chromium-driver")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path="/usr/bin/chromium",
            args=["--headless", "--no-sandbox", "--disable-gpu",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run", "--disable-quic"])
        yield chromium
        chromium.close()


def screenshot(page, name: str) -> Path:
    SCREENSHOTS.mkdir(exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def test_browser_sees_rows_filters_pages_and_never_runs_event_script(browser, gunicorn):
    server = gunicorn()
    batch = [event(f"evt-{i:03d}", topic=("alpha", "beta")[i % 2], payload={"i": i})
             for i in range(60)]
    batch.append(event("xss", topic="alpha", source=HOSTILE,
                       payload={"note": "<script>window.pwned=1</script>", "q": HOSTILE}))
    assert requests.post(server.url + "/publish", json=batch, timeout=10).status_code == 200

    page = browser.new_page()
    page.goto(server.url + "/events?limit=25")
    rows = page.locator("tbody tr")
    assert rows.count() == 25
    assert rows.first.locator("td").nth(2).inner_text() == "xss"
    assert "<script>window.pwned=1</script>" in rows.first.inner_text()
    assert page.evaluate("typeof window.pwned") == "undefined"
    screenshot(page, "events-page")

    page.select_option("select[name=topic]", "beta")
    page.click("button[type=submit]")
    page.wait_for_url("**topic=beta**")
    topics = page.locator("tbody tr td:nth-child(2)").all_inner_texts()
    assert len(topics) == 25 and set(topics) == {"beta"}

    seen = page.locator("tbody tr td:nth-child(3)").all_inner_texts()
    page.click("a[rel=next]")
    page.wait_for_url("**after=**")
    older = page.locator("tbody tr td:nth-child(3)").all_inner_texts()
    assert older and not set(older) & set(seen)
    assert sorted(seen + older, reverse=True) == seen + older
    assert set(seen + older) == {f"evt-{i:03d}" for i in range(1, 60, 2)}
    page.click("a[rel=first]")
    page.wait_for_url(lambda url: "after=" not in url)
    assert page.evaluate("typeof window.pwned") == "undefined"

    page.goto(server.url + "/events?limit=25")  # an event's id leads to it alone
    page.click("tbody tr:first-child td.id a")
    page.wait_for_url("**event_id=xss**")
    assert page.locator("tbody tr").count() == 1
    assert page.input_value("input[name=event_id]") == "xss"
    assert page.evaluate("typeof window.pwned") == "undefined"
    page.goto(server.url + "/events?limit=25")  # a row's source (markup) narrows to it
    page.click("tbody tr:first-child td.source a")
    page.wait_for_url("**source=**")
    assert page.locator("tbody tr td.source").all_inner_texts() == [HOSTILE]
    assert page.input_value("input[name=source]") == HOSTILE
    assert page.evaluate("typeof window.pwned") == "undefined"
    page.goto(server.url + "/events?limit=25")  # a search of the payloads' text
    page.fill("input[name=q]", '"i":5')
    page.click("button[type=submit]")
    page.wait_for_url("**q=**")
    assert page.locator("tbody tr td.id").all_inner_texts() == [  # 5 and 50..59
        f"evt-{i:03d}" for i in (*range(59, 49, -1), 5)]
    page.fill("input[name=q]", "window.pwned")
    page.click("button[type=submit]")
    page.wait_for_url("**q=window.pwned**")
    assert page.locator("tbody tr td.id").all_inner_texts() == ["xss"]
    assert page.evaluate("typeof window.pwned") == "undefined"

    page.set_viewport_size({"width": 375, "height": 800})
    page.goto(server.url + "/events?limit=5")
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 375, f"page is {width}px wide at a 375px viewport"
    screenshot(page, "events-page-375px")
    page.close()


def test_browser_types_a_topic_the_page_does_not_name(browser, gunicorn):
    server = gunicorn()
    publish_60_topics(lambda path, json: requests.post(server.url + path, json=json,
                                                       timeout=10))
    page = browser.new_page()
    page.goto(server.url + "/events")
    assert page.locator("nav[aria-label=Topics] a").count() == 50
    screenshot(page, "events-page-many-topics")
    page.fill("input[name=topic]", "t-02")
    page.click("button[type=submit]")
    page.wait_for_url("**topic=t-02**")
    assert sorted(page.locator("tbody tr td:nth-child(3)").all_inner_texts()) == [
        "e2-0", "e2-1", "e2-2"]
    page.close()


def test_live_mode_refreshes_and_shows_new_events(browser, gunicorn):
    server = gunicorn()
    requests.post(server.url + "/publish", json=[event("first")], timeout=10)
    page = browser.new_page()
    page.goto(server.url + "/events")
    assert page.locator("meta[http-equiv=refresh]").count() == 0
    page.click("text=Watch live")
    page.wait_for_url("**live=1**")
    requests.post(server.url + "/publish", json=[event("second")], timeout=10)
    page.wait_for_selector("td.id a:text-is('second')", timeout=15_000)
    assert json.loads(page.evaluate("JSON.stringify(window.pwned ?? null)")) is None
    page.close()
