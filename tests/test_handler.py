"""publisher.AggregatorHandler: a program's log records shipped to a real gunicorn server."""

from __future__ import annotations

import logging
import re
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime

import pytest

from publisher import AggregatorHandler, Publisher
from tests.helpers import ROOT, every_event, free_port, wait_for

pytestmark = pytest.mark.backends("sqlite")


@pytest.fixture
def logger(request):
    """A logger of the test's own, whose handlers are closed and removed afterwards."""
    log = logging.getLogger(f"tests.{request.node.name}")
    log.setLevel(logging.DEBUG)
    log.propagate = False
    yield log
    for handler in list(log.handlers):
        handler.close()
        log.removeHandler(handler)


def test_records_arrive_in_order_as_events_with_their_fields(gunicorn, logger):
    """Batches of 100 are over the aggregator's AGGREGATOR_MAX_BATCH=64: each is sent again
    in halves (a 413 stores nothing). The last batch, not full, goes at close()."""
    server = gunicorn(env={"AGGREGATOR_MAX_BATCH": "64"})
    handler = AggregatorHandler(server.url, topic="billing", source="host-1", batch_size=100,
                                linger=30, close_timeout=20)
    logger.addHandler(handler)
    before = datetime.now(UTC)
    for i in range(250):
        logger.info("charged %s cents", i, extra={"order": f"o-{i}", "at": datetime(2025, 1, 1)})
    logger.info("odd numbers", extra={"ratio": float("nan"), "limit": float("-inf")})
    logger.info("x" * 100_000)  # over the aggregator's 64 KiB: cut, not refused
    try:
        raise ZeroDivisionError("no refunds")
    except ZeroDivisionError:
        logger.exception("refund failed")
    started = time.monotonic()
    handler.close()  # sends the last 53 at once, not after the linger
    assert time.monotonic() - started < 10
    events = every_event(server.url)
    assert (handler.sent, handler.rejected, handler.dropped) == (253, 0, 0)
    long = "x" * 16384 + "… [83616 more characters]"
    assert [e["payload"]["message"] for e in events] == [
        *(f"charged {i} cents" for i in range(250)), "odd numbers", long, "refund failed"]
    assert events[250]["payload"]["extra"] == {"ratio": "NaN", "limit": "-Infinity"}
    first = events[0]
    assert (first["topic"], first["source"]) == ("billing", "host-1")
    assert first["payload"]["extra"] == {"order": "o-0", "at": "2025-01-01 00:00:00"}
    assert {k: first["payload"][k] for k in ("level", "logger", "function")} == {
        "level": "INFO", "logger": logger.name,
        "function": "test_records_arrive_in_order_as_events_with_their_fields"}
    assert before <= datetime.fromisoformat(first["timestamp"]) <= datetime.now(UTC)
    last = events[-1]["payload"]
    assert last["level"] == "ERROR" and "ZeroDivisionError" in last["exception"]
    assert len({e["event_id"] for e in events}) == 253


def test_records_logged_during_an_outage_arrive_once_it_is_over(gunicorn, logger):
    server = gunicorn()
    handler = AggregatorHandler(server.url, topic="t", batch_size=10, linger=0.05,
                                capacity=40, close_timeout=60)  # room for 40 unsent
    logger.addHandler(handler)
    for i in range(30):
        logger.warning("before %d", i)
    wait_for(lambda: handler.sent == 30, 10, "the first 30 records", 0.05)
    server.kill()
    for i in range(30):
        logger.warning("during %d", i)  # returns at once: the handler's thread retries
    time.sleep(1)
    server.start()  # the same port and database
    handler.close()
    assert (handler.sent, handler.rejected, handler.dropped) == (60, 0, 0)
    assert [e["payload"]["message"] for e in every_event(server.url)] == [
        *(f"before {i}" for i in range(30)), *(f"during {i}" for i in range(30))]


def test_with_nothing_listening_logging_goes_on_and_close_gives_up(logger):
    """The buffer holds 50 records (10 of them in the batch being retried); the other 950
    are dropped, counted, without a wait; close() gives up on the 50 after its timeout."""
    handler = AggregatorHandler(f"http://127.0.0.1:{free_port()}", topic="t", capacity=50,
                                batch_size=10, linger=0.01, close_timeout=0.5)
    logger.addHandler(handler)
    for i in range(1000):
        logger.error("lost %d", i)
    assert handler.dropped == 950
    started = time.monotonic()
    handler.close()
    assert time.monotonic() - started < 5  # 0.5 s, and at most 1 s for the batch under way
    assert (handler.sent, handler.rejected, handler.dropped) == (0, 0, 1000)
    logger.error("after close")
    assert handler.dropped == 1001


def test_close_counts_a_batch_whose_answer_never_comes_as_dropped_and_only_once(logger):
    """A server that takes the request and never answers: close() gives up after its
    timeout and a second more for the batch under way, and counts as dropped all 30
    records, the 10 of that batch as well, and the batch's end later counts nothing."""
    with socket.create_server(("127.0.0.1", 0)) as silent:
        handler = AggregatorHandler(f"http://127.0.0.1:{silent.getsockname()[1]}", topic="t",
                                    batch_size=10, linger=0.01, close_timeout=0.5)
        logger.addHandler(handler)
        for i in range(30):
            logger.error("unanswered %d", i)
        taken, _ = silent.accept()  # the first batch's request, read by no one
        started = time.monotonic()
        handler.close()
        assert time.monotonic() - started < 5
        assert (handler.sent, handler.rejected, handler.dropped) == (0, 0, 30)
        taken.close()  # now the request fails, after close() counted it
    handler._sender.join(10)
    assert not handler._sender.is_alive()
    assert (handler.sent, handler.rejected, handler.dropped) == (0, 0, 30)


def test_a_wrong_token_counts_the_records_rejected_and_a_bad_topic_is_refused(gunicorn,
                                                                              logger):
    server = gunicorn(env={"AGGREGATOR_API_TOKEN": "right"})
    handler = AggregatorHandler(server.url, topic="t", token="wrong", linger=0.05)
    logger.addHandler(handler)
    for i in range(5):
        logger.info("refused %d", i)
    handler.close()
    assert (handler.sent, handler.rejected, handler.dropped) == (0, 5, 0)
    for topic in ("", "t" * 256, "a\nb"):
        with pytest.raises(ValueError, match="topic must be 1 to 255 characters"):
            AggregatorHandler(server.url, topic=topic)


@pytest.mark.parametrize("kwargs,message", [
    ({"url": "localhost:8080"}, "is not an http:// or https:// URL with a host"),
    ({"url": "ftp://127.0.0.1:8080"}, "is not an http:// or https:// URL with a host"),
    ({"url": "http://127.0.0.1:80800"}, "is not an http:// or https:// URL with a host"),
    ({"batch_size": 0}, "batch_size must be at least 1, not 0"),
    ({"capacity": 0}, "capacity must be at least 1, not 0"),
    ({"linger": -1}, "linger must be at least 0, not -1"),
    ({"close_timeout": float("nan")}, "close_timeout must be at least 0, not nan"),
])
def test_bad_arguments_are_refused_when_the_handler_is_made(kwargs, message):
    """Not taken, then every record dropped unseen (a URL without http://: requests' "No
    connection adapters"; capacity 0) or batches sent oddly (batch_size 0 sent one record
    at a time)."""
    arguments = {"url": "http://127.0.0.1:8080", "topic": "t", **kwargs}
    with pytest.raises(ValueError, match=re.escape(message)):
        AggregatorHandler(**arguments)
    if "url" in kwargs:  # the client of the CLI and of programs, too
        with pytest.raises(ValueError, match=re.escape(message)):
            Publisher(kwargs["url"])


def test_a_program_that_just_exits_has_its_records_sent(gunicorn):
    """logging.shutdown(), at exit, closes the handler: what it buffered is sent first."""
    server = gunicorn()
    program = ("import logging\n"
               "from publisher import AggregatorHandler\n"
               f"logging.getLogger().addHandler(AggregatorHandler({server.url!r}, topic='exit'))\n"
               "for i in range(300):\n"
               "    logging.warning('n %d', i)\n")
    result = subprocess.run([sys.executable, "-c", program], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert [e["payload"]["message"] for e in every_event(server.url)] == [
        f"n {i}" for i in range(300)]


def test_a_forked_process_sends_its_own_records_and_not_its_parents(gunicorn):
    """A child forked after the handler was made (as gunicorn forks its workers) gets a
    sending thread of its own; the records queued before the fork are the parent's."""
    server = gunicorn()
    program = ("import logging, os\n"
               "from publisher import AggregatorHandler\n"
               f"handler = AggregatorHandler({server.url!r}, topic='fork', linger=0.2)\n"
               "logging.getLogger().addHandler(handler)\n"
               "for i in range(20):\n"
               "    logging.warning('parent %d', i)\n"
               "child = os.fork()\n"
               "who = 'child' if child == 0 else 'parent'\n"
               "for i in range(20, 40):\n"
               "    logging.warning(who + ' %d', i)\n"
               "if child:\n"
               "    assert os.waitpid(child, 0)[1] == 0\n")
    result = subprocess.run([sys.executable, "-c", program], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    messages = [e["payload"]["message"] for e in every_event(server.url)]
    assert sorted(messages) == sorted([*(f"parent {i}" for i in range(40)),
                                       *(f"child {i}" for i in range(20, 40))])


def test_flush_sends_what_is_buffered_now_and_waits_for_it(gunicorn, logger):
    server = gunicorn()
    handler = AggregatorHandler(server.url, topic="t", linger=60)
    logger.addHandler(handler)
    for i in range(7):
        logger.info("flushed %d", i)
    assert handler.flush() is True and handler.sent == 7  # not after the 60 s linger
    assert len(every_event(server.url)) == 7
    unreachable = AggregatorHandler(f"http://127.0.0.1:{free_port()}", topic="t")
    logger.addHandler(unreachable)
    logger.info("nowhere to go")
    assert unreachable.flush(timeout=0.5) is False


def test_a_program_that_exits_with_nothing_listening_waits_once_not_twice():
    """logging.shutdown() calls flush() then close(): after a flush that waited its
    close_timeout in vain, close() gives up at once."""
    program = ("import logging\n"
               "from publisher import AggregatorHandler\n"
               f"handler = AggregatorHandler('http://127.0.0.1:{free_port()}', topic='t', "
               "close_timeout=3)\n"
               "logging.getLogger().addHandler(handler)\n"
               "logging.warning('lost')\n")
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", program], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert 3 <= time.monotonic() - started < 5.5  # 3 s, not 6
