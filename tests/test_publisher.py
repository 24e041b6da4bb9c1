"""The publisher CLI against a real gunicorn aggregator (and a flaky proxy in front of it)."""

from __future__ import annotations

import codecs
import contextlib
import gzip
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from publisher.events import file_batches
from tests.helpers import (
    ROOT,
    GunicornServer,
    event,
    every_event,
    free_port,
    query,
    table_keys,
    write_lock_held_outside,
)


def run_publisher(*args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "publisher", *args], cwd=ROOT,
                          env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=timeout)


def start_publisher(*args: str, stdin=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "publisher", *args], cwd=ROOT, stdin=stdin,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def feed(publisher: subprocess.Popen, *events: dict) -> None:
    """Write the events to the publisher's stdin as NDJSON lines, and flush them."""
    publisher.stdin.write("".join(json.dumps(e) + "\n" for e in events))
    publisher.stdin.flush()


def poll_while_running(publisher: subprocess.Popen, until, seconds: float = 60) -> None:
    """Poll until until() holds, within the seconds given; the publisher must still run."""
    deadline = time.monotonic() + seconds
    while not until():
        assert publisher.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)


def poll_stats_while_running(publisher: subprocess.Popen, url: str, until) -> None:
    """Poll the aggregator's /stats until until(stats) holds; the publisher must still run."""
    poll_while_running(
        publisher, lambda: until(requests.get(url + "/stats", timeout=5).json()))


def test_generated_events_with_duplicates_end_with_exact_counts(gunicorn, db):
    server = gunicorn()
    result = run_publisher("--url", server.url, "--events", "5000", "--duplicate-rate", "0.2",
                           "--batch-size", "250", "--concurrency", "4", "--seed", "11",
                           "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["sent"], summary["acknowledged"], summary["unique"],
            summary["duplicates"]) == (6000, 6000, 5000, 1000)
    stats = requests.get(server.url + "/stats", timeout=5).json()
    assert (stats["received"], stats["unique_processed"], stats["duplicate_dropped"]) == (
        6000, 5000, 1000)
    assert len(table_keys(db)) == 5000
    # Simulated logs end now: no timestamp from the future, and they follow the numbers.
    events = every_event(server.url)
    when = datetime.fromisoformat
    assert all(when(e["timestamp"]) < when(e["received_at"]) for e in events)
    by_number = sorted(events, key=lambda e: int(e["event_id"].split("-")[1]))
    assert [e["timestamp"] for e in by_number] == sorted(e["timestamp"] for e in events)


def test_same_seed_again_is_all_duplicates(gunicorn):
    server = gunicorn()
    args = ("--url", server.url, "--events", "1000", "--duplicate-rate", "0.5", "--seed", "5",
            "--json")
    assert run_publisher(*args).returncode == 0
    again = json.loads(run_publisher(*args).stdout)
    assert (again["unique"], again["duplicates"]) == (0, 1500)


@pytest.mark.backends("sqlite")  # the publisher's waiting; the store plays no part
@pytest.mark.parametrize("options, late, notices", [
    (("--wait", "60"), 2, 0),
    # No --wait: unlimited, not the default 30 s; it says so every 10 s.
    (("--retries", "unlimited"), 33, 3),
], ids=["wait-60", "retries-unlimited"])
def test_publisher_started_before_the_server_waits_and_succeeds(tmp_path, db, options, late,
                                                                notices):
    server = GunicornServer(db, tmp_path / "late.log")
    publisher = start_publisher("--url", server.url, "--events", "300", "--duplicate-rate",
                                "0.1", *options, "--json")
    try:
        time.sleep(late)
        assert publisher.poll() is None
        server.start()
        out, err = publisher.communicate(timeout=60)
    finally:
        publisher.kill()
        server.kill()
    assert publisher.returncode == 0, err
    assert err.count(" s for /health so far: connection refused") == notices, err
    assert json.loads(out)["unique"] == 300


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_sends_nothing_more_and_sums_up_exactly_what_was_committed(
        gunicorn, signum):
    """A first Ctrl-C (or SIGTERM: docker stop) stops sending, waits for the answers to the
    batches in flight and prints the summary: its counts are the aggregator's, to the event."""
    server = gunicorn()
    publisher = start_publisher("--url", server.url, "--events", "1000000", "--duplicate-rate",
                                "0.2", "--batch-size", "100", "--concurrency", "8", "--json")
    try:
        poll_stats_while_running(publisher, server.url, lambda stats: stats["received"] >= 5000)
        publisher.send_signal(signum)
        out, err = publisher.communicate(timeout=60)
    finally:
        publisher.kill()
    assert publisher.returncode == 128 + signum, err
    summary = json.loads(out)
    assert summary["interrupted"] == signum.name and not summary["ok"]
    assert f"publisher: {signum.name}: nothing was sent after" in err
    assert 5000 <= summary["sent"] < 1_200_000 and summary["failed"] == 0
    stats = requests.get(server.url + "/stats", timeout=5).json()
    assert (summary["acknowledged"], summary["unique"], summary["duplicates"]) == (
        stats["received"], stats["unique_processed"], stats["duplicate_dropped"])


@pytest.mark.backends("sqlite")  # the publisher's pacing; the store plays no part
def test_rate_spreads_the_batches_over_time_and_a_ctrl_c_ends_a_wait_at_once(gunicorn, db):
    server = gunicorn()
    result = run_publisher("--url", server.url, "--events", "2000", "--duplicate-rate", "0",
                           "--batch-size", "100", "--rate", "1000", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["acknowledged"] == 2000
    # 20 batches of 100 at 1000 events/s: batch k goes 0.1 k s after the first, no sooner.
    # (Each arrives when it is sent or later; 0.3 s allows for a late first arrival.)
    arrived = sorted({datetime.fromisoformat(received) for (received,) in query(
        db, "SELECT received_at FROM events")})
    assert len(arrived) == 20
    after_first = [(at - arrived[0]).total_seconds() for at in arrived]
    assert all(seconds >= 0.1 * k - 0.3 for k, seconds in enumerate(after_first)), after_first
    assert after_first[-1] < 15, after_first

    slow = start_publisher("--url", server.url, "--events", "1000", "--batch-size", "10",
                           "--rate", "2", "--json")  # a batch every 5 s
    try:
        poll_stats_while_running(slow, server.url, lambda stats: stats["received"] >= 2010)
        time.sleep(0.5)  # well inside its wait for the next batch
        start = time.monotonic()
        slow.send_signal(signal.SIGINT)
        out, err = slow.communicate(timeout=30)
        elapsed = time.monotonic() - start
    finally:
        slow.kill()
    assert slow.returncode == 130 and elapsed < 3, (elapsed, err)
    summary = json.loads(out)
    assert summary["interrupted"] == "SIGINT" and summary["acknowledged"] == 10


def test_a_second_ctrl_c_exits_at_once_while_answers_are_pending(gunicorn, db):
    server = gunicorn(workers=1)
    with write_lock_held_outside(db):  # no batch can be committed, so none is answered
        publisher = start_publisher("--url", server.url, "--events", "1000", "--batch-size",
                                    "100", "--concurrency", "2", "--json")
        try:
            # One batch is with the writer, waiting for the lock; one more waits behind it.
            poll_stats_while_running(publisher, server.url,
                                     lambda stats: stats["queue_depth"] >= 1)
            publisher.send_signal(signal.SIGINT)
            time.sleep(1.0)
            assert publisher.poll() is None, "the first Ctrl-C waits for the answers"
            publisher.send_signal(signal.SIGINT)
            out, err = publisher.communicate(timeout=10)
        finally:
            publisher.kill()
    assert publisher.returncode == 130
    assert out == "" and "stopped without waiting" in err


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_ends_the_wait_for_the_aggregator_at_once(signum):
    """docker stop of a publisher still waiting for the aggregator (as PID 1, which the
    kernel does not kill for a signal it has no handler for) ends it at once, summed up."""
    publisher = start_publisher("--url", f"http://127.0.0.1:{free_port()}", "--wait",
                                "unlimited", "--json")
    try:
        time.sleep(2)
        assert publisher.poll() is None
        start = time.monotonic()
        publisher.send_signal(signum)
        out, err = publisher.communicate(timeout=30)
        elapsed = time.monotonic() - start
    finally:
        publisher.kill()
    assert publisher.returncode == 128 + signum, err
    assert elapsed < 2, err
    summary = json.loads(out)
    assert (summary["sent"], summary["interrupted"]) == (0, signum.name)


def test_nothing_listening_exits_1_with_one_line_within_the_wait(tmp_path):
    start = time.monotonic()
    result = run_publisher("--url", f"http://127.0.0.1:{free_port()}", "--wait", "2",
                           timeout=60)
    elapsed = time.monotonic() - start
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert "not ready within 2s" in result.stderr
    assert elapsed < 15


def test_bad_arguments_exit_2(tmp_path):
    assert run_publisher("--events", "-3").returncode == 2
    assert run_publisher("--batch-size", "0").returncode == 2
    assert run_publisher("--retries", "forever").returncode == 2
    assert run_publisher("--max-backoff", "-1").returncode == 2
    assert run_publisher("--wait", "forever").returncode == 2
    assert run_publisher("--rate", "0").returncode == 2
    assert run_publisher("--rate", "-5").returncode == 2
    too_long = run_publisher("--topics", "a," + "t" * 256)
    assert too_long.returncode == 2 and "topic 'tttt" in too_long.stderr
    assert "1 to 255 characters" in too_long.stderr
    assert run_publisher("--topics", "a,b\x01c").returncode == 2
    bad_env = run_publisher(PUBLISHER_CONCURRENCY="many")
    assert bad_env.returncode == 2 and "--concurrency" in bad_env.stderr


@pytest.mark.parametrize("option", ["--file", "--rejects", "--token-file"])
def test_a_file_option_given_empty_exits_2_and_an_empty_variable_is_unset(option):
    """`--file "$LOG"` with LOG unset used to send 5,000 generated events instead."""
    url = f"http://127.0.0.1:{free_port()}"
    given = run_publisher("--url", url, "--wait", "1", *(["--file", "-"] * (option ==
                                                         "--rejects")), option, "")
    assert given.returncode == 2
    assert f"argument {option}: empty; leave the option out instead" in given.stderr
    # Set empty, a variable is unset (compose's "${X:-}"), as the aggregator's are.
    variable = "PUBLISHER_" + option[2:].upper().replace("-", "_")
    unset = run_publisher("--url", url, "--wait", "1", **{variable: "", "PUBLISHER_EVENTS": "",
                                                           "PUBLISHER_RETRIES": ""})
    assert unset.returncode == 1 and "not ready within 1s" in unset.stderr


@pytest.mark.parametrize("url", ["localhost:8080", "ftp://127.0.0.1:8080", "http://",
                                 "http://127.0.0.1:80800", "http://127.0.0.1:port"])
def test_a_url_that_is_not_http_exits_2_at_once_naming_it(url):
    """Not after waiting for /health for --wait seconds, with requests' own words."""
    start = time.monotonic()
    for result in (run_publisher("--url", url, "--wait", "10", timeout=60),
                   run_publisher("--wait", "10", PUBLISHER_URL=url, timeout=60)):
        assert result.returncode == 2
        line = result.stderr.strip().splitlines()[-1]
        assert "--url" in line and repr(url) in line and "http://127.0.0.1:8080" in line
    assert time.monotonic() - start < 10


def test_a_file_that_cannot_be_opened_exits_2_at_once_naming_it(tmp_path):
    """Not after waiting for the aggregator for --wait seconds, as a failure (exit 1)."""
    lines = tmp_path / "events.ndjson"
    lines.write_text("{}\n")
    start = time.monotonic()
    for args, option in (
            (["--file", str(tmp_path / "missing.ndjson")], "--file"),
            (["--file", str(tmp_path)], "--file"),
            (["--file", str(lines), "--rejects", str(tmp_path / "no" / "r.ndjson")], "--rejects")):
        result = run_publisher("--url", f"http://127.0.0.1:{free_port()}", "--wait", "20", *args,
                               timeout=60)
        assert result.returncode == 2
        assert result.stderr.strip().splitlines()[-1].startswith(f"publisher: error: {option}: ")
    assert time.monotonic() - start < 20


def test_every_option_can_come_from_the_environment(gunicorn):
    server = gunicorn()
    result = run_publisher(PUBLISHER_URL=server.url, PUBLISHER_EVENTS="400",
                           PUBLISHER_DUPLICATE_RATE="0.25", PUBLISHER_BATCH_SIZE="100",
                           PUBLISHER_CONCURRENCY="2", PUBLISHER_TOPICS="x,y",
                           PUBLISHER_SEED="9", PUBLISHER_WAIT="5", PUBLISHER_JSON="1")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["sent"], summary["batches"], summary["seed"]) == (500, 5, 9)
    assert set(requests.get(server.url + "/stats", timeout=5).json()["topics"]) <= {"x", "y"}


def test_file_replay_reports_rejects_and_exits_1(gunicorn, tmp_path, db):
    server = gunicorn()
    source = tmp_path / "events.ndjson"
    lines = [json.dumps(event(f"f{i}")) for i in range(10)]
    lines[3] = json.dumps(event("f3", timestamp="2025-10-18T03:00:00"))
    lines[7] = "{not json"
    source.write_text("\n".join(lines) + "\n")
    rejects = tmp_path / "rejects.ndjson"
    result = run_publisher("--url", server.url, "--file", str(source), "--batch-size", "4",
                           "--rejects", str(rejects), "--json")
    assert result.returncode == 1
    summary = json.loads(result.stdout)
    assert (summary["acknowledged"], summary["rejected"]) == (8, 2)
    refused = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert sorted(r["line"] for r in refused) == [4, 8]
    assert any("timestamp" in r["errors"] for r in refused if r["line"] == 4)
    assert len(table_keys(db)) == 8


def test_file_replay_of_windows_files_drops_their_byte_order_marks(gunicorn, tmp_path, db):
    """Two UTF-8 files written on Windows (a byte order mark first, CRLF line ends) and
    concatenated are sent whole; a UTF-16 line is refused by line number, not sent."""
    server = gunicorn()
    source = tmp_path / "windows.ndjson"
    part = "\r\n".join(json.dumps(event(f"w{i}")) for i in range(3)) + "\r\n"
    utf16 = json.dumps(event("w16")).encode("utf-16-le")
    source.write_bytes(codecs.BOM_UTF8 + part.encode() + codecs.BOM_UTF8
                       + part.replace('"w', '"v').encode() + utf16 + b"\r\n")
    rejects = tmp_path / "rejects.ndjson"
    result = run_publisher("--url", server.url, "--file", str(source), "--rejects",
                           str(rejects), "--json")
    assert result.returncode == 1, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["acknowledged"], summary["rejected"], summary["failed"]) == (6, 1, 0)
    assert sorted(k for _, k in table_keys(db)) == ["v0", "v1", "v2", "w0", "w1", "w2"]
    (refused,) = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert refused["line"] == 7 and "not a JSON event object" in refused["errors"]


def test_file_batches_send_no_byte_order_mark(tmp_path):
    """What the publisher sends of a file lacks the marks, whatever the aggregator would
    make of them."""
    source = tmp_path / "marked.ndjson"
    source.write_bytes(codecs.BOM_UTF8 + b'{"n": 1}\n' + codecs.BOM_UTF8 + b'{"n": 2}\n'
                       + codecs.BOM_UTF8 + b"\n")
    with source.open("rb") as stream:
        batches = [b for b in file_batches(stream, 10, pytest.fail) if b is not None]
    assert [b.body for b in batches] == [b'{"n": 1}\n{"n": 2}']


def test_a_line_with_an_integer_python_will_not_parse_is_refused_saying_so(tmp_path):
    source = tmp_path / "huge.ndjson"
    source.write_bytes(b'{"n": 1}\n{"n": ' + b"9" * 5000 + b'}\n{"n": 3}\n')
    refused = []
    with source.open("rb") as stream:
        batches = [b for b in file_batches(stream, 10, lambda *bad: refused.append(bad))
                   if b is not None]
    assert [b.body for b in batches] == [b'{"n": 1}\n{"n": 3}']
    assert [(number, reason) for number, _, reason in refused] == [
        (2, "not a JSON event object (an integer of more than 4300 digits)")]


def test_a_line_too_large_for_the_aggregator_is_refused_alone(gunicorn, tmp_path, db):
    """Its batch gets a 413 and is sent again in halves: the lines beside it are stored,
    and it alone is a rejected line (before, the whole batch failed)."""
    server = gunicorn(env={"AGGREGATOR_MAX_BODY": "50000"})
    source = tmp_path / "events.ndjson"
    lines = [json.dumps(event(f"s{i}")) for i in range(10)]
    lines[5] = json.dumps(event("big", payload={"text": "x" * 60_000}))
    source.write_text("\n".join(lines) + "\n")
    rejects = tmp_path / "rejects.ndjson"
    result = run_publisher("--url", server.url, "--file", str(source), "--batch-size", "4",
                           "--rejects", str(rejects), "--json")
    assert result.returncode == 1, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["acknowledged"], summary["rejected"], summary["failed"]) == (9, 1, 0)
    assert sorted(k for _, k in table_keys(db)) == sorted(f"s{i}" for i in range(10) if i != 5)
    (refused,) = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert refused["line"] == 6 and "HTTP 413" in json.dumps(refused["errors"])


def test_batches_over_the_aggregators_max_batch_are_split_and_all_delivered(gunicorn, db):
    server = gunicorn(env={"AGGREGATOR_MAX_BATCH": "100"})
    result = run_publisher("--url", server.url, "--events", "1000", "--duplicate-rate", "0.1",
                           "--batch-size", "250", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["acknowledged"], summary["unique"], summary["failed"]) == (1100, 1000, 0)
    assert len(table_keys(db)) == 1000


def test_file_replay_of_50000_lines_stays_under_100_mb(gunicorn, tmp_path):
    server = gunicorn()
    source = tmp_path / "big.ndjson"
    with source.open("w") as out:
        for i in range(50_000):
            out.write(json.dumps(event(f"big-{i}", payload={"i": i, "text": "x" * 200})) + "\n")
    result, peak_kib = run_publisher_peak("--url", server.url, "--file", str(source), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["unique"] == 50_000
    assert peak_kib < 100 * 1024, f"publisher peak RSS {peak_kib} KiB"


def test_file_of_200000_bad_lines_is_reported_line_by_line_under_100_mb(gunicorn, tmp_path):
    server = gunicorn()
    source = tmp_path / "garbage.ndjson"
    with source.open("w") as out:
        out.write(json.dumps(event("good-0")) + "\n")
        for i in range(200_000):
            out.write(f"[{i}, " + "0, " * 200 + "0]\n")  # 611 bytes of JSON, not an object
    rejects = tmp_path / "rejects.ndjson"
    result, peak_kib = run_publisher_peak("--url", server.url, "--file", str(source),
                                          "--rejects", str(rejects), "--json")
    assert result.returncode == 1, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["acknowledged"], summary["rejected"]) == (1, 200_000)
    assert len(summary["problems"]) == 5
    with rejects.open() as written:
        assert sum(1 for _ in written) == 200_000
    assert peak_kib < 100 * 1024, f"publisher peak RSS {peak_kib} KiB"


def test_a_stream_that_pauses_has_its_lines_sent_after_the_linger(gunicorn, tmp_path, db):
    """tail -f | publisher --file -: lines that come a few at a time are sent once the first
    of them has waited --linger seconds, not held until a batch is full or the stream ends;
    a refusal is in the rejects file meanwhile."""
    server = gunicorn()
    rejects = tmp_path / "rejects.ndjson"
    publisher = start_publisher("--url", server.url, "--file", "-", "--batch-size", "500",
                                "--linger", "0.3", "--rejects", str(rejects), "--json",
                                stdin=subprocess.PIPE)
    try:
        feed(publisher, event("slow-0"), event("slow-1"),
             event("naive", timestamp="2025-10-18T03:00:00"))
        poll_stats_while_running(publisher, server.url,
                                 lambda stats: (stats["received"], stats["rejected"]) == (2, 1))
        poll_while_running(publisher, rejects.read_text, seconds=10)
        assert json.loads(rejects.read_text())["line"] == 3
        feed(publisher, event("slow-2"))
        poll_stats_while_running(publisher, server.url, lambda stats: stats["received"] == 3)
        out, err = publisher.communicate(timeout=30)  # closes stdin: the end of the stream
    finally:
        publisher.kill()
    assert publisher.returncode == 1, err  # one event was refused
    summary = json.loads(out)
    assert (summary["acknowledged"], summary["rejected"], summary["batches"]) == (3, 1, 2)
    assert {key for _, key in table_keys(db)} == {"slow-0", "slow-1", "slow-2"}


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_stops_a_publisher_waiting_on_a_silent_stream_at_once(gunicorn, signum):
    """Ctrl-C (or docker stop) does not wait for the next line of a stream that has gone
    quiet; a line held for a batch that is not full is not sent."""
    server = gunicorn()
    publisher = start_publisher("--url", server.url, "--file", "-", "--batch-size", "2",
                                "--linger", "60", "--json", stdin=subprocess.PIPE)
    try:
        feed(publisher, event("quiet-0"), event("quiet-1"))
        poll_stats_while_running(publisher, server.url, lambda stats: stats["received"] == 2)
        feed(publisher, event("held"))
        time.sleep(0.5)
        publisher.send_signal(signum)
        publisher.wait(timeout=10)  # not communicate(): it would close stdin, an end
        out, err = publisher.stdout.read(), publisher.stderr.read()
    finally:
        publisher.kill()
        publisher.stdin.close()
    assert publisher.returncode == 128 + signum, err
    summary = json.loads(out)
    assert (summary["acknowledged"], summary["interrupted"]) == (2, signum.name)
    assert requests.get(server.url + "/stats", timeout=5).json()["received"] == 2


@pytest.mark.backends("sqlite")  # the publisher's retrying; the store plays no part
def test_with_unlimited_retries_a_followed_stream_outlives_an_outage(gunicorn):
    """tail -F | publisher --file - --retries unlimited: an aggregator away for longer than
    8 retries take is waited for, saying so, and every line gets delivered."""
    server = gunicorn()
    publisher = start_publisher("--url", server.url, "--file", "-", "--linger", "0.1",
                                "--retries", "unlimited", "--max-backoff", "1", "--json",
                                stdin=subprocess.PIPE)
    try:
        feed(publisher, event("before"))
        poll_stats_while_running(publisher, server.url, lambda stats: stats["received"] == 1)
        server.terminate()
        feed(publisher, event("during"))
        time.sleep(12)  # 8 retries, at most 1 s apart, are over in under 9 s
        assert publisher.poll() is None
        server.start()
        feed(publisher, event("after"))
        out, err = publisher.communicate(timeout=60)  # closes stdin: the end of the stream
    finally:
        publisher.kill()
    assert publisher.returncode == 0, err
    assert "publisher: retrying a batch in 1.0 s (retry 9): connection refused" in err
    summary = json.loads(out)
    assert (summary["acknowledged"], summary["unique"], summary["failed"]) == (3, 3, 0)
    stats = requests.get(server.url + "/stats", timeout=5).json()
    assert (stats["received"], stats["unique_processed"]) == (3, 3)


@pytest.mark.backends("sqlite")
def test_ctrl_c_ends_a_wait_between_retries_at_once_and_retries_no_more(gunicorn):
    """With the aggregator away, Ctrl-C does not wait out the backoff (8 s and more by the
    5th retry), nor retry again and again: the batch counts as failed, exit status 130."""
    server = gunicorn()
    publisher = start_publisher("--url", server.url, "--file", "-", "--linger", "0.1",
                                "--retries", "unlimited", "--json", stdin=subprocess.PIPE)
    try:
        feed(publisher, event("before"))
        poll_stats_while_running(publisher, server.url, lambda stats: stats["received"] == 1)
        server.terminate()
        feed(publisher, event("during"))
        time.sleep(10)  # retries after 0, 1, 2 and 4 s (+ jitter), then a wait of 8 s or more
        assert publisher.poll() is None
        start = time.monotonic()
        publisher.send_signal(signal.SIGINT)
        publisher.wait(timeout=30)  # not communicate(): it would close stdin, an end
        elapsed = time.monotonic() - start
        out, err = publisher.stdout.read(), publisher.stderr.read()
    finally:
        publisher.kill()
        publisher.stdin.close()
    assert publisher.returncode == 130, err
    assert elapsed < 3, err
    assert "retry 4): connection refused" in err and "retry 6)" not in err
    assert "publisher: error" not in err
    summary = json.loads(out)
    assert (summary["acknowledged"], summary["failed"], summary["interrupted"]) == (
        1, 1, "SIGINT")


def run_publisher_peak(*args: str) -> tuple[subprocess.CompletedProcess, int]:
    """Run the publisher; return its result and its peak RSS in KiB."""
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forking (pytest) process.
    script = ("import runpy, sys; sys.argv = ['publisher'] + sys.argv[1:];\n"
              "try:\n    runpy.run_module('publisher', run_name='__main__')\n"
              "finally:\n    print([l for l in open('/proc/self/status')"
              " if l.startswith('VmHWM')][0], file=sys.stderr)")
    result = subprocess.run([sys.executable, "-c", script, *args], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    return result, int(result.stderr.split("VmHWM:")[1].split()[0])


class FlakyProxy(BaseHTTPRequestHandler):
    """Answer `status` (+ Retry-After) to the first attempts, then forward to the
    aggregator."""

    refusals = 0
    status = 503
    target = ""
    lock = threading.Lock()
    seen = 0
    posts: list[tuple[str | None, bytes]] = []  # (Content-Encoding, body) of each POST

    def do_GET(self):
        self._forward(b"")

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        with FlakyProxy.lock:
            FlakyProxy.seen += 1
            FlakyProxy.posts.append((self.headers.get("Content-Encoding"), body))
            refuse = FlakyProxy.refusals > 0
            FlakyProxy.refusals -= refuse
        if refuse:
            self.send_response(FlakyProxy.status)
            self.send_header("Retry-After", "1")
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")
            return
        self._forward(body)

    def _forward(self, body: bytes):
        headers = {name: self.headers[name] for name in ("Content-Type", "Content-Encoding")
                   if name in self.headers}
        response = requests.request(self.command, self.target + self.path, data=body or None,
                                    headers=headers, timeout=30)
        self.send_response(response.status_code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(response.content)))
        self.end_headers()
        self.wfile.write(response.content)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def flaky_proxy(target: str, refusals: int = 0, status: int = 503) -> Iterator[str]:
    """Run a FlakyProxy in front of target that refuses the first POSTs with status; yield
    its URL. FlakyProxy.seen and .posts then tell what it was sent."""
    FlakyProxy.target, FlakyProxy.refusals, FlakyProxy.status = target, refusals, status
    FlakyProxy.seen, FlakyProxy.posts = 0, []
    proxy = ThreadingHTTPServer(("127.0.0.1", 0), FlakyProxy)
    thread = threading.Thread(target=proxy.serve_forever)
    thread.start()
    try:
        yield f"http://127.0.0.1:{proxy.server_port}"
    finally:
        proxy.shutdown()
        thread.join()
        proxy.server_close()


@pytest.mark.parametrize("status", [503, 408])  # 408: the body stalled (server or proxy)
def test_retries_on_503_or_408_with_retry_after_and_counts_stay_exact(gunicorn, status):
    server = gunicorn()
    with flaky_proxy(server.url, refusals=4, status=status) as url:
        start = time.monotonic()
        result = run_publisher("--url", url, "--events", "1000", "--duplicate-rate", "0.3",
                               "--batch-size", "100", "--concurrency", "2", "--json")
        elapsed = time.monotonic() - start
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["unique"], summary["duplicates"], summary["failed"]) == (1000, 300, 0)
    assert FlakyProxy.seen == 13 + 4
    assert elapsed >= 1.0
    stats = requests.get(server.url + "/stats", timeout=5).json()
    assert (stats["received"], stats["unique_processed"]) == (1300, 1000)


def test_gzip_sends_every_batch_compressed_split_ones_too_and_counts_stay_exact(gunicorn,
                                                                               db):
    server = gunicorn(env={"AGGREGATOR_MAX_BATCH": "100"})  # batches of 250 go in halves
    with flaky_proxy(server.url) as url:
        result = run_publisher("--url", url, "--events", "1000", "--duplicate-rate", "0.1",
                               "--batch-size", "250", "--gzip", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["acknowledged"], summary["unique"], summary["failed"]) == (1100, 1000, 0)
    assert len(table_keys(db)) == 1000
    # 1100 events: 4 batches of 250, refused, their 8 halves of 125, refused, then 16 of 62
    # or 63; and one of 100.
    assert [encoding for encoding, _ in FlakyProxy.posts] == ["gzip"] * 29
    sizes = sorted(len(json.loads(gzip.decompress(body))) for _, body in FlakyProxy.posts)
    assert sizes == [62] * 8 + [63] * 8 + [100] + [125] * 8 + [250] * 4
    wire = sum(len(body) for _, body in FlakyProxy.posts)
    plain = sum(len(gzip.decompress(body)) for _, body in FlakyProxy.posts)
    assert plain > 5 * wire


def test_wrong_token_exits_1_with_one_line(gunicorn):
    server = gunicorn(env={"AGGREGATOR_API_TOKEN": "right"})
    wrong = run_publisher("--url", server.url, "--events", "50", "--token", "wrong")
    assert wrong.returncode == 1 and "401" in wrong.stderr and "Traceback" not in wrong.stderr
    right = run_publisher("--url", server.url, "--events", "50", "--token", "right")
    assert right.returncode == 0, right.stderr


@pytest.mark.backends("sqlite")  # the publisher's options; the store plays no part
def test_the_token_can_come_from_a_file_and_a_bad_file_exits_2_naming_it(gunicorn, tmp_path):
    server = gunicorn(env={"AGGREGATOR_API_TOKEN": "right"})
    good, empty = tmp_path / "token", tmp_path / "empty"
    good.write_text("right\n")
    empty.write_text("\n")
    by_option = run_publisher("--url", server.url, "--events", "50", "--token-file", str(good),
                              "--json")
    assert by_option.returncode == 0, by_option.stderr
    by_env = run_publisher("--url", server.url, "--events", "50", "--json",
                           PUBLISHER_TOKEN_FILE=str(good))
    assert by_env.returncode == 0, by_env.stderr
    assert json.loads(by_env.stdout)["acknowledged"] == 60
    for args, words in [(("--token-file", str(tmp_path / "none")),
                         f"--token-file: No such file or directory: {tmp_path / 'none'}"),
                        (("--token-file", str(empty)), f"--token-file: empty: {empty}"),
                        (("--token-file", str(tmp_path)), "--token-file: Is a directory"),
                        (("--token-file", str(good), "--token", "right"),
                         "give --token or --token-file, not both")]:
        result = run_publisher("--url", server.url, "--events", "50", *args, "--wait", "0")
        assert result.returncode == 2 and words in result.stderr, result.stderr
    stats = requests.get(server.url + "/stats", timeout=5).json()
    assert stats["received"] == 120
