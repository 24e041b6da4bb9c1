"""Operators' view: Prometheus metrics, the OpenAPI document and /docs, JSON logs, health."""

from __future__ import annotations

import fcntl
import gzip
import json
import logging
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest
import requests
from openapi_schema_validator import OAS30Validator
from openapi_spec_validator import validate as validate_spec
from prometheus_client.parser import text_string_to_metric_families

from app import warm_up
from tests.helpers import ROOT, event, probe_every_worker, wait_for, write_lock_held_outside


def scrape(url: str) -> dict[str, float]:
    """Return {sample name{labels}: value} from one fresh-connection scrape."""
    return samples_of(requests.get(url + "/metrics", timeout=10,
                                   headers={"Connection": "close"}).text)


def samples_of(text: str) -> dict[str, float]:
    """Return {sample name{labels}: value} from a /metrics text."""
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples


def test_metrics_are_exact_whichever_worker_answers(gunicorn):
    server = gunicorn(workers=2)
    with requests.Session() as session:
        for i in range(12):
            batch = [event(f"m{i}-{j}", topic=("a", "b")[j % 2]) for j in range(50)]
            batch += batch[:10] + [event("bad", topic="")]
            assert session.post(server.url + "/publish", json=batch,
                                headers={"Connection": "close"}, timeout=10).status_code == 207
    scrapes = [scrape(server.url) for _ in range(8)]
    stats = requests.get(server.url + "/stats", timeout=10).json()
    for samples in scrapes:
        assert samples["aggregator_events_received_total{}"] == 12 * 60
        assert samples["aggregator_events_stored_total{}"] == 12 * 50
        assert samples["aggregator_events_duplicate_total{}"] == 12 * 10
        assert samples["aggregator_events_rejected_total{}"] == 12
        assert samples["aggregator_topic_events_stored_total{topic=a}"] == 300
        assert samples["aggregator_topic_events_stored_total{topic=b}"] == 300
        assert (samples["aggregator_topic_last_stored_timestamp_seconds{topic=a}"]
                == datetime.fromisoformat(stats["topics_last_stored_at"]["a"]).timestamp())
        assert samples["aggregator_publish_request_duration_seconds_count{status=207}"] == 12
        assert samples["aggregator_commit_events_sum{}"] == 12 * 60
        assert samples["aggregator_ingest_queue_depth{}"] == 0
        assert any(k.startswith("aggregator_build_info{") for k in samples)
        assert samples["aggregator_commit_duration_seconds_count{}"] >= 1
        # Each commit's wait for the write lock and its hold of it are inside its duration.
        held = samples["aggregator_write_lock_held_seconds_total{}"]
        wait = samples["aggregator_write_lock_wait_seconds_total{}"]
        assert held > 0 and wait >= 0
        assert held + wait <= samples["aggregator_commit_duration_seconds_sum{}"]



@pytest.mark.backends("sqlite")  # request bodies; the store plays no part
def test_metrics_count_the_bytes_of_bodies_as_received_and_once_decompressed(gunicorn):
    server = gunicorn(workers=2, env={"AGGREGATOR_MAX_BODY": "100000"})
    plain = json.dumps([event(f"p{i}") for i in range(40)]).encode()
    packed = json.dumps([event(f"z{i}") for i in range(400)]).encode()
    zipped = gzip.compress(packed)
    sent = [(plain, {}, 200), (zipped, {"Content-Encoding": "gzip"}, 200),
            (zipped, {"Content-Encoding": "x-gzip"}, 200),  # all duplicates, still read
            (b"[{", {}, 400),  # read, then refused
            (b"x" * 100_001, {}, 413)]  # refused before it is read: not counted
    for body, headers, status in sent:
        response = requests.post(server.url + "/publish", data=body, timeout=10, headers={
            "Content-Type": "application/json", "Connection": "close", **headers})
        assert response.status_code == status, response.text
    for samples in [scrape(server.url) for _ in range(4)]:
        assert samples["aggregator_publish_body_bytes_total{encoding=identity}"] == (
            len(plain) + 2)
        assert samples["aggregator_publish_decoded_bytes_total{encoding=identity}"] == (
            len(plain) + 2)
        assert samples["aggregator_publish_body_bytes_total{encoding=gzip}"] == 2 * len(zipped)
        assert samples["aggregator_publish_decoded_bytes_total{encoding=gzip}"] == (
            2 * len(packed))


def test_metrics_name_only_the_largest_topics_and_count_them_all(gunicorn):
    """Publishers name topics: a series for each let them grow a scrape without bound."""
    server = gunicorn(workers=1, env={"AGGREGATOR_METRICS_TOPICS": "3"})
    # Topic t-N gets N + 1 events; t-4 and u-4 tie, and the tie goes by name.
    batch = [event(f"e{n}-{i}", topic=f"t-{n}") for n in range(6) for i in range(n + 1)]
    batch += [event(f"u{i}", topic="u-4") for i in range(5)]
    assert requests.post(server.url + "/publish", json=batch, timeout=10).status_code == 200
    samples = scrape(server.url)
    named = {key: value for key, value in samples.items()
             if key.startswith("aggregator_topic_events_stored_total")}
    assert named == {"aggregator_topic_events_stored_total{topic=t-5}": 6,
                     "aggregator_topic_events_stored_total{topic=t-4}": 5,
                     "aggregator_topic_events_stored_total{topic=u-4}": 5}
    assert samples["aggregator_topics{}"] == 7
    stats = requests.get(server.url + "/stats", timeout=10).json()
    assert len(stats["topics"]) == 7 and stats["topics"]["t-0"] == 1

def test_a_warmed_up_app_has_made_its_first_uses_but_timed_and_logged_nothing(app, caplog):
    """Each gunicorn worker answers a few reads itself before it takes traffic (app.warm_up):
    from then on the metric values of those reads exist (made on first use, part of a cold
    worker's first answer), at zero, and no access line tells of them."""
    client = app.test_client()
    count = "aggregator_read_request_duration_seconds_count"
    stats, events = f"{count}{{path=/stats,status=200}}", f"{count}{{path=/events,status=200}}"
    assert stats not in samples_of(client.get("/metrics").text)
    with caplog.at_level(logging.INFO):
        warm_up(app)
    assert [r.getMessage() for r in caplog.records if r.name == "aggregator.access"] == []
    samples = samples_of(client.get("/metrics").text)
    assert samples[stats] == 0 and samples[events] == 0
    assert client.get("/stats").status_code == 200
    assert samples_of(client.get("/metrics").text)[stats] == 1


def test_a_workers_warm_up_is_neither_logged_nor_counted(gunicorn):
    server = gunicorn(workers=2)
    probe_every_worker(server)  # both workers have warmed up and serve
    reads = [r for r in server.log_records()
             if r.get("logger") == "aggregator.access" and r["path"] in ("/stats", "/events")]
    assert reads == []
    samples = scrape(server.url)
    assert samples["aggregator_read_request_duration_seconds_count{path=/stats,status=200}"] == 0
    assert requests.get(server.url + "/stats", timeout=10).ok
    assert [r["path"] for r in server.log_records()
            if r.get("logger") == "aggregator.access" and r["path"] == "/stats"] == ["/stats"]


def test_reads_are_timed_by_path_and_status(gunicorn):
    server = gunicorn(workers=2)
    close = {"Connection": "close"}  # new connections: either worker may answer
    for params, page in ((["limit=5"] * 4, False), (["limit=0", "since=x"], False),
                         (["topic=a"], True)):
        for query in params:
            headers = {**close, "Accept": "text/html"} if page else close
            requests.get(f"{server.url}/events?{query}", headers=headers, timeout=10)
    for _ in range(3):
        assert requests.get(server.url + "/stats", headers=close, timeout=10).ok
    samples = scrape(server.url)
    count = "aggregator_read_request_duration_seconds_count"
    assert samples[f"{count}{{path=/events,status=200}}"] == 5  # 4 JSON pages, 1 HTML
    assert samples[f"{count}{{path=/events,status=400}}"] == 2
    assert samples[f"{count}{{path=/stats,status=200}}"] == 3
    assert samples["aggregator_read_request_duration_seconds_sum{path=/stats,status=200}"] > 0
    assert not any(k.startswith(count) and "path=/metrics" in k for k in samples)


@pytest.mark.backends("sqlite")
def test_time_waiting_for_the_write_lock_is_counted(gunicorn, db_path):
    """Another process holds the writers' lock (the flock on <db>.lock) for a second: the
    publish waits for it, and the wait is in aggregator_write_lock_wait_seconds."""
    server = gunicorn(workers=1)
    assert requests.post(server.url + "/publish", json=[event("warm")], timeout=10).ok
    with open(f"{db_path}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        timer = threading.Timer(1.0, fcntl.flock, (lock, fcntl.LOCK_UN))
        timer.start()
        try:
            answer = requests.post(server.url + "/publish", json=[event("waited")], timeout=10)
        finally:
            timer.join()
    assert answer.status_code == 200
    samples = scrape(server.url)
    assert 0.9 <= samples["aggregator_write_lock_wait_seconds_total{}"] < 5
    assert samples["aggregator_write_lock_held_seconds_total{}"] < 0.9


def test_batches_queued_while_the_writer_waits_for_its_turn_join_its_commit(gunicorn, db):
    """The writer takes a batch and waits for the write lock; the batches queued meanwhile
    go into the same commit once its turn comes: one commit of three batches, not three."""
    server = gunicorn(workers=1)
    assert requests.post(server.url + "/publish", json=[event("warm")], timeout=10).ok
    before = scrape(server.url)
    answers: list[int] = []

    def publish(n: int) -> None:
        batch = [event(f"turn{n}-{i}") for i in range(20)]
        answers.append(requests.post(server.url + "/publish", json=batch, timeout=30).status_code)

    threads = [threading.Thread(target=publish, args=(n,)) for n in range(3)]
    with write_lock_held_outside(db):
        for thread in threads:
            thread.start()
        # One batch is with the writer (waiting for the lock), two wait in the queue.
        deadline = time.monotonic() + 10
        while scrape(server.url)["aggregator_ingest_queue_depth{}"] < 2:
            assert time.monotonic() < deadline, "the batches never queued"
            time.sleep(0.05)
    for thread in threads:
        thread.join()
    assert answers == [200, 200, 200]
    after = scrape(server.url)
    commits = "aggregator_commit_events_count{}"
    assert after[commits] - before[commits] == 1
    assert after["aggregator_commit_events_sum{}"] - before["aggregator_commit_events_sum{}"] == 60
    assert after["aggregator_events_stored_total{}"] == 61


def test_openapi_document_validates_and_lists_every_route(app, client):
    document = client.get("/openapi.json").json
    validate_spec(document)
    routes = {rule.rule for rule in app.url_map.iter_rules() if rule.endpoint != "static"}
    assert routes <= set(document["paths"]), routes - set(document["paths"])
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            assert method.lower() in document["paths"][rule.rule], (rule.rule, method)


def event_validator(document: dict) -> OAS30Validator:
    schema = {**document["components"]["schemas"]["Event"],
              "components": document["components"]}
    return OAS30Validator(schema)


@pytest.mark.parametrize("candidate,valid", [
    (event("ok"), True),
    (event("ok2", payload={"nested": [1, {"x": None}]}), True),
    ({k: v for k, v in event("m").items() if k != "source"}, False),
    (event("x", extra="field"), False),
    (event("y", topic="t" * 256), False),
    (event("z", payload=[1, 2]), False),
    (event("", topic="a"), False),
])
def test_what_the_document_allows_is_accepted_and_what_it_forbids_is_refused(
        client, candidate, valid):
    validator = event_validator(client.get("/openapi.json").json)
    assert validator.is_valid(candidate) is valid
    response = client.post("/publish", json=[candidate])
    assert response.status_code == (200 if valid else 422)


def test_docs_page_describes_every_path(client):
    document = client.get("/openapi.json").json
    page = client.get("/docs")
    assert page.status_code == 200 and page.mimetype == "text/html"
    html = page.get_data(as_text=True)
    for path in document["paths"]:
        assert f"{path}</code>" in html
    assert "cdn" not in html.lower() and "<script" not in html


@pytest.mark.backends("sqlite")
@pytest.mark.parametrize("proxies,client", [("0", "127.0.0.1"), ("1", "203.0.113.7"),
                                            ("2", "198.51.100.9")])
def test_access_log_names_the_client_behind_trusted_proxies(gunicorn, proxies, client):
    server = gunicorn(workers=1, env={"AGGREGATOR_TRUSTED_PROXIES": proxies})
    # What a client claimed, then what each proxy appended (the last: the nearest proxy).
    forwarded = "192.0.2.66, 198.51.100.9, 203.0.113.7"
    response = requests.get(server.url + "/stats", headers={
        "X-Forwarded-For": forwarded, "X-Request-ID": "proxied-1"}, timeout=10)
    assert response.status_code == 200
    server.terminate()
    (line,) = [r for r in server.log_records() if r.get("request_id") == "proxied-1"]
    assert line["remote_addr"] == client


def test_one_json_log_line_per_request_with_the_given_request_id(gunicorn, tmp_path):
    server = gunicorn(workers=1, env={"AGGREGATOR_API_TOKEN": "tok-secret-123"})
    secret_payload = {"card": "4111-SECRET-PAYLOAD"}
    response = requests.post(server.url + "/publish", json=[event("l1", payload=secret_payload)],
                             headers={"X-Request-ID": "req-42",
                                      "Authorization": "Bearer tok-secret-123"}, timeout=10)
    assert response.status_code == 200 and response.headers["X-Request-ID"] == "req-42"
    generated = requests.get(server.url + "/stats", timeout=10).headers["X-Request-ID"]
    assert len(generated) == 32
    server.terminate()
    lines = server.log_path.read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert all({"time", "level", "message"} <= set(r) for r in records)
    access = [r for r in records if r.get("path") == "/publish"]
    assert len(access) == 1
    assert access[0]["request_id"] == "req-42" and access[0]["status"] == 200
    assert access[0]["method"] == "POST" and access[0]["events"] == 1
    assert access[0]["duration_ms"] >= 0 and access[0]["bytes"] == len(response.content)
    assert any(r.get("request_id") == generated and r.get("path") == "/stats" for r in records)
    text = server.log_path.read_text()
    assert "tok-secret-123" not in text and "4111-SECRET-PAYLOAD" not in text


def worker_pids(server) -> set[int]:
    pid = server.proc.pid
    return set(map(int, Path(f"/proc/{pid}/task/{pid}/children").read_text().split()))


@pytest.mark.backends("sqlite")  # logging; the store plays no part
def test_gunicorns_log_level_applies_to_every_line_and_outlives_a_reload(gunicorn):
    """--log-level warning leaves out info lines, gunicorn's and the app's (access lines);
    --log-level debug lets gunicorn's debug lines through. A SIGHUP reload keeps it."""
    quiet = gunicorn(env={"GUNICORN_CMD_ARGS": "--log-level warning"})
    before = worker_pids(quiet)
    quiet.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: len(worker_pids(quiet) - before) == 2 and not before & worker_pids(quiet),
             40, "the reload's new workers", interval=0.2)
    wait_for(lambda: requests.get(quiet.url + "/health", timeout=5).status_code == 200, 20,
             "the new workers to answer", interval=0.2)
    for _ in range(4):
        assert requests.post(quiet.url + "/publish", json=[event("q")],
                             timeout=10).status_code == 200
        assert requests.get(quiet.url + "/stats", timeout=10).status_code == 200
    assert quiet.terminate() == 0
    assert [r["message"] for r in quiet.log_records()] == []

    loud = gunicorn(env={"GUNICORN_CMD_ARGS": "--log-level debug"})
    assert requests.get(loud.url + "/stats", timeout=10).status_code == 200
    assert loud.terminate() == 0
    levels = {(r["level"], r["logger"]) for r in loud.log_records()}
    assert {("debug", "gunicorn.error"), ("info", "gunicorn.error"),
            ("info", "aggregator.access")} <= levels


def test_liveness_and_readiness(app, client):
    assert client.get("/health/live").json == {"status": "ok"}
    ready = client.get("/health/ready")
    assert ready.status_code == 200 and ready.json["checks"]["queue"] == "ok"
    app.extensions["ingestor"].close()
    assert client.get("/health/ready").status_code == 503
    assert client.get("/health/live").status_code == 200


def test_a_script_that_builds_an_app_exits_without_calling_shutdown(tmp_path):
    script = ("from app import create_app\n"
              f"app = create_app({{'database_url': 'sqlite:///{tmp_path}/s.db'}})\n"
              "r = app.test_client().post('/publish', json={'topic': 't', 'event_id': 'e',"
              " 'timestamp': '2025-01-01T00:00:00Z', 'source': 's'})\n"
              "assert r.status_code == 200\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, timeout=30,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.backends("sqlite")  # the metrics files; the store plays no part
def test_a_scrape_while_a_worker_is_creating_its_sample_files_is_whole(gunicorn, tmp_path):
    """prometheus-client creates a worker's sample file empty, then sizes it: a scrape in
    between (a worker starting, or restarted) read the empty file and answered 500."""
    shared = tmp_path / "metrics"
    server = gunicorn(env={"PROMETHEUS_MULTIPROC_DIR": str(shared)})
    batch = [event(f"s{n}") for n in range(5)]
    assert requests.post(server.url + "/publish", json=batch, timeout=10).status_code == 200
    before = scrape(server.url)
    (shared / "histogram_4242424.db").touch()  # as a starting worker leaves it for a moment
    after = scrape(server.url)
    assert after["aggregator_events_stored_total{}"] == 5
    assert after["aggregator_commit_events_sum{}"] == before["aggregator_commit_events_sum{}"]
