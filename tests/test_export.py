"""python -m publisher.export: an aggregator's events as NDJSON that the publisher replays,
through real gunicorn servers, a real SQLite file and a real PostgreSQL."""

from __future__ import annotations

import array
import fcntl
import json
import signal
import subprocess
import sys
import termios
import threading

import pytest
import requests

from tests.helpers import ROOT, event, every_event, free_port, wait_for

pytestmark = pytest.mark.backends("sqlite")

PAYLOADS = [{}, {"text": "naïve café ☕ 日本語", "emoji": "🦆"}, {"n": -0.0, "big": 2**63 + 1},
            {"nested": [[1, [2, [3, {"deep": None}]]], {"f": 1.5e-300}]},
            {"quote": "\"'<script>", "ctl": "a\tb\nc"}]


def run(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def stored(url: str) -> list[dict]:
    """Every event the aggregator holds, in its order, without received_at."""
    return [{k: v for k, v in e.items() if k != "received_at"} for e in every_event(url)]


def waiting_bytes(pipe) -> int:
    """Return how many bytes wait in the pipe, unread (Linux's FIONREAD)."""
    count = array.array("i", [0])
    fcntl.ioctl(pipe.fileno(), termios.FIONREAD, count)
    return count[0]


def publish(url: str, count: int, prefix: str = "e", pad: int = 0, **fields) -> None:
    """Publish count events over topics a, b, c, with every payload of PAYLOADS in turn
    (padded with pad characters), each batch with 50 of its events twice."""
    batch = [event(f"{prefix}{i}", topic=("a", "b", "c")[i % 3],
                   payload={**PAYLOADS[i % len(PAYLOADS)], **({"pad": "x" * pad} if pad else {})},
                   **fields) for i in range(count)]
    for start in range(0, count, 500):
        part = batch[start:start + 500]
        answer = requests.post(url + "/publish", json=part + part[:50], timeout=30)
        assert answer.status_code == 200, answer.text


def test_an_export_replayed_into_postgresql_holds_the_same_events(gunicorn, tmp_path,
                                                                   postgres):
    """The migration from the embedded default to the cluster's backend: every event,
    payloads JSON-equal, in the same order (replayed by one sender)."""
    source = gunicorn()
    publish(source.url, 2500)
    out = tmp_path / "events.ndjson"
    exported = run("publisher.export", "--url", source.url, "--output", str(out))
    assert exported.returncode == 0, exported.stderr
    assert "wrote 2500 events (3 pages)" in exported.stderr
    assert len(out.read_text().splitlines()) == 2500
    target = gunicorn(db=postgres.fresh_url())
    replayed = run("publisher", "--url", target.url, "--file", str(out), "--concurrency", "1",
                   "--json")
    assert replayed.returncode == 0, replayed.stderr
    assert json.loads(replayed.stdout)["unique"] == 2500
    assert stored(target.url) == stored(source.url)
    assert requests.get(target.url + "/stats", timeout=10).json()["topics"] == {
        "a": 834, "b": 833, "c": 833}


def test_filters_choose_what_is_exported(gunicorn, tmp_path):
    server = gunicorn()
    publish(server.url, 30, timestamp="2025-10-18T03:00:00Z")
    publish(server.url, 30, prefix="late", timestamp="2025-10-19T03:00:00Z")
    result = run("publisher.export", "--url", server.url, "--topic", "b", "--since",
                 "2025-10-19T00:00:00Z")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [e["event_id"] for e in lines] == [f"late{i}" for i in range(1, 30, 3)]
    assert all(set(e) == {"topic", "event_id", "timestamp", "source", "payload"} for e in lines)


def test_a_search_is_exported_through_its_pages_of_nothing(gunicorn):
    """With scans of 7 events and no time for more, most pages of a search hold no event
    and a next_cursor: the export reads on through them to the end."""
    server = gunicorn(env={"AGGREGATOR_SEARCH_SCAN": "7", "AGGREGATOR_SEARCH_TIME": "0"})
    publish(server.url, 100)
    result = run("publisher.export", "--url", server.url, "--q", "日本語")
    assert result.returncode == 0, result.stderr
    assert [json.loads(line)["event_id"] for line in result.stdout.splitlines()] == [
        f"e{i}" for i in range(1, 100, len(PAYLOADS))]
    assert "wrote 20 events (15 pages)" in result.stderr  # 100 events (and 50 re-sent) / 7


def test_a_finished_export_names_where_the_next_one_takes_on(gunicorn, tmp_path):
    """Incremental exports: each writes only what arrived since the one before."""
    server = gunicorn()
    publish(server.url, 40)
    out = tmp_path / "events.ndjson"
    cursor = None
    for count, prefix in ((40, "e"), (7, "later")):
        if prefix == "later":
            publish(server.url, count, prefix=prefix)
        args = ["--after", cursor] if cursor else []
        result = run("publisher.export", "--url", server.url, "--topic", "a", "-o", str(out),
                     *args)
        assert result.returncode == 0, result.stderr
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("publisher.export: the events that arrive later follow --after ")
        cursor = last.rsplit(" ", 1)[-1]
    assert [json.loads(line)["event_id"] for line in out.read_text().splitlines()] == [
        *(f"e{i}" for i in range(0, 40, 3)), *(f"later{i}" for i in range(0, 7, 3))]


def test_follow_writes_the_events_that_arrive_until_sigint(gunicorn):
    """--follow: every event once, those published while it runs as well, each as soon as
    it is asked for; SIGINT ends it with the cursor to go on from."""
    server = gunicorn()
    publish(server.url, 30)
    export = subprocess.Popen(
        [sys.executable, "-m", "publisher.export", "--url", server.url, "--follow",
         "--page-size", "10"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(export.stdout), daemon=True)
    reader.start()
    try:
        wait_for(lambda: len(lines) >= 30, 20, "the first 30 events", 0.05)
        for total in (40, 50):
            publish(server.url, 10, prefix=f"new{total}-")
            wait_for(lambda want=total: len(lines) >= want, 20, "the new events", 0.05)
        export.send_signal(signal.SIGINT)
        export.wait(timeout=30)
        errors = export.stderr.read().decode()
    finally:
        if export.poll() is None:
            export.kill()
    reader.join(timeout=10)
    assert export.returncode == 130, errors
    assert [json.loads(line)["event_id"] for line in lines] == [
        e["event_id"] for e in stored(server.url)]
    assert len(lines) == 50 and "wrote 50 events (5 pages)" in errors  # not the empty polls
    cursor = errors.strip().splitlines()[-1].rsplit(" ", 1)[-1]
    publish(server.url, 3, prefix="after")
    rest = run("publisher.export", "--url", server.url, "--after", cursor)
    assert [json.loads(line)["event_id"] for line in rest.stdout.splitlines()] == [
        "after0", "after1", "after2"]


def test_a_bad_filter_or_token_exits_2_with_the_aggregators_words(gunicorn, tmp_path):
    server = gunicorn(env={"AGGREGATOR_READ_TOKEN": "r-tok"})
    bad_filter = run("publisher.export", "--url", server.url, "--token", "r-tok",
                     "--since", "yesterday")
    assert bad_filter.returncode == 2 and bad_filter.stdout == ""
    assert "HTTP 400" in bad_filter.stderr and "since" in bad_filter.stderr
    no_token = run("publisher.export", "--url", server.url)
    assert no_token.returncode == 2 and "HTTP 401" in no_token.stderr
    assert "go on" not in no_token.stderr and "again" not in no_token.stderr
    assert run("publisher.export", "--url", server.url, "--token", "r-tok").returncode == 0
    token_file = tmp_path / "read-token"
    token_file.write_text("r-tok\n")
    assert run("publisher.export", "--url", server.url, "--token-file",
               str(token_file)).returncode == 0
    missing = run("publisher.export", "--url", server.url, "--token-file", str(tmp_path / "x"))
    assert missing.returncode == 2 and "--token-file: No such file" in missing.stderr


@pytest.mark.parametrize("cut", ["the server dies", "SIGTERM", "SIGINT"])
def test_an_export_cut_off_goes_on_from_the_cursor_it_names(gunicorn, tmp_path, cut):
    """The server dies mid-export (exit 1), or the export is told to stop (130, 143, after
    the page under way): it names a cursor, and going on from it, to the same file, leaves
    every event in the file exactly once, in order."""
    server = gunicorn()
    publish(server.url, 1000, pad=300)  # 400 KB: more than a pipe holds
    everything = stored(server.url)
    export = subprocess.Popen(
        [sys.executable, "-m", "publisher.export", "--url", server.url, "--page-size", "25",
         "--retries", "0"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        # The export has written pages, and waits on a full pipe, when it is cut off.
        wait_for(lambda: waiting_bytes(export.stdout) >= 32 * 1024, 20, "a full pipe", 0.05)
        if cut == "the server dies":
            server.kill()
        else:
            export.send_signal(getattr(signal, cut))
        rest, errors = export.communicate(timeout=60)
    finally:
        if export.poll() is None:
            export.kill()
    expected = {"the server dies": 1, "SIGTERM": 143, "SIGINT": 130}[cut]
    assert export.returncode == expected, errors
    last = errors.decode().strip().splitlines()[-1]
    assert "go on with --after " in last and (cut in last or cut == "the server dies")
    cursor = last.rsplit(" ", 1)[-1]
    out = tmp_path / "events.ndjson"
    out.write_bytes(rest)
    written = len(out.read_text().splitlines())
    assert 25 < written < 1000 and written % 25 == 0  # whole pages only, more than one
    if cut == "the server dies":
        server = gunicorn()  # on the same database
    resumed = run("publisher.export", "--url", server.url, "--after", cursor, "--output",
                  str(out), "--page-size", "25")
    assert resumed.returncode == 0, resumed.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines == [{k: e[k] for k in ("topic", "event_id", "timestamp", "source", "payload")}
                     for e in everything]


def test_an_export_started_with_sigint_ignored_keeps_to_it(gunicorn):
    """A job that a script starts in the background has SIGINT ignored (a Ctrl-C is for the
    script): the export keeps to that, as the publisher does, and writes every event."""
    server = gunicorn()
    publish(server.url, 1000, pad=300)
    export = subprocess.Popen(
        ["sh", "-c", 'trap "" INT; exec "$@"', "sh", sys.executable, "-m", "publisher.export",
         "--url", server.url, "--page-size", "25"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: waiting_bytes(export.stdout) >= 32 * 1024, 20, "a full pipe", 0.05)
        export.send_signal(signal.SIGINT)
        out, errors = export.communicate(timeout=60)
    finally:
        if export.poll() is None:
            export.kill()
    assert export.returncode == 0, errors
    assert len(out.splitlines()) == 1000 and b"SIGINT" not in errors


def test_nothing_listening_exits_1_saying_to_run_it_again():
    result = run("publisher.export", "--url", f"http://127.0.0.1:{free_port()}", "--retries",
                 "0")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.strip().splitlines()[-1].endswith("run it again (nothing was written)")


@pytest.mark.parametrize("option", ["--topic", "--source", "--q", "--since", "--until",
                                    "--after", "--token-file"])
def test_an_empty_filter_or_cursor_exits_2_and_leaves_the_output_alone(tmp_path, option):
    """`--topic "$TOPIC"` with TOPIC unset: not every event, and (for --after) not the
    output file written anew."""
    output = tmp_path / "events.ndjson"
    output.write_text('{"kept": true}\n')
    result = run("publisher.export", "--url", f"http://127.0.0.1:{free_port()}", "--retries",
                 "0", "--output", str(output), option, "")
    assert result.returncode == 2
    assert f"argument {option}: empty; leave the option out instead" in result.stderr
    assert output.read_text() == '{"kept": true}\n'


def test_an_output_that_cannot_be_opened_exits_2_naming_it(tmp_path):
    """A bad argument (2), not an export that stopped early and could go on (1)."""
    for output in (tmp_path / "no" / "events.ndjson", tmp_path):
        result = run("publisher.export", "--url", f"http://127.0.0.1:{free_port()}",
                     "--output", str(output))
        assert result.returncode == 2
        assert result.stderr.strip().splitlines()[-1].startswith(
            "publisher.export: error: --output: ") and str(output) in result.stderr
