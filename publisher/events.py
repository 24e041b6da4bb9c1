"""Where batches come from: generated events with re-sends, or an NDJSON file."""

from __future__ import annotations

import codecs
import json
import os
import random
import select
import sys
import time
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import IO

# A batch read from a stream goes once its first line has waited this long (--linger).
DEFAULT_LINGER = 1.0
# How often a stream that has nothing to read is checked for a stop (Ctrl-C, SIGTERM).
POLL_SECONDS = 0.2
# The most one read of a stream takes.
READ_BYTES = 256 * 1024

LEVELS = ("debug", "info", "info", "info", "warning", "error")
SERVICES = ("api-gateway", "checkout", "billing", "auth", "search", "inventory")
PATHS = ("/v1/orders", "/v1/cart", "/v1/login", "/v1/search", "/v1/items/{id}", "/healthz")


@dataclass
class Batch:
    """One request body and where its events came from (for reporting rejects)."""

    body: bytes
    content_type: str
    size: int
    lines: list[int] = field(default_factory=list)
    raw: list[bytes] = field(default_factory=list)

    @classmethod
    def of_events(cls, events: list[dict]) -> Batch:
        """Return a JSON array body of the events."""
        return cls(json.dumps(events).encode(), "application/json", len(events))

    @classmethod
    def of_lines(cls, lines: list[int], raw: list[bytes]) -> Batch:
        """Return an NDJSON body of the raw lines (their numbers in the stream: lines)."""
        return cls(b"\n".join(raw), "application/x-ndjson", len(raw), lines, raw)

    def halves(self) -> tuple[Batch, Batch]:
        """Return the batch split in two (of at least two events), bodies and all."""
        middle = self.size // 2
        if self.raw:  # NDJSON lines of a stream
            return (Batch.of_lines(self.lines[:middle], self.raw[:middle]),
                    Batch.of_lines(self.lines[middle:], self.raw[middle:]))
        events = json.loads(self.body)  # a JSON array of generated events
        return Batch.of_events(events[:middle]), Batch.of_events(events[middle:])


class EventFactory:
    """Make event number i of `events` the same way every time for a given seed.

    Their timestamps are about 7 ms apart, in the order of their numbers, the last one
    just before `end` (now by default): a simulated log has no event from the future.
    """

    def __init__(self, seed: int, topics: list[str], events: int,
                 end: datetime | None = None):
        self.seed = seed
        self.topics = topics
        self.start = ((end or datetime.now(UTC)).replace(microsecond=0)
                      - timedelta(milliseconds=7 * events))

    def event(self, i: int) -> dict:
        """Return event i: its id, topic, time and payload depend only on (seed, i)."""
        rng = random.Random(self.seed * 1_000_003 + i)
        level = rng.choice(LEVELS)
        moment = self.start + timedelta(milliseconds=i * 7 + rng.randrange(5))
        payload = {
            "level": level,
            "message": f"{rng.choice(('GET', 'POST', 'PUT'))} {rng.choice(PATHS)} "
                       f"-> {200 if level != 'error' else 500}",
            "duration_ms": round(rng.lognormvariate(3, 1), 3),
            "user_id": rng.randrange(1, 50_000),
            "tags": rng.sample(("web", "mobile", "beta", "eu", "us", "retry"), rng.randrange(3)),
            "http": {"status": 200 if level != "error" else 500, "bytes": rng.randrange(10**6)},
        }
        if level == "error":
            payload["error"] = {"type": "TimeoutError", "retryable": rng.random() < 0.5}
        return {
            "topic": self.topics[rng.randrange(len(self.topics))],
            "event_id": f"{self.seed:x}-{i:09d}-{rng.getrandbits(32):08x}",
            "timestamp": moment.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "source": rng.choice(SERVICES),
            "payload": payload,
        }


def send_order(events: int, duplicate_rate: float, seed: int) -> array:
    """Return event numbers to send: each once, plus round(events x rate) re-sends, shuffled.

    Whichever copy of a number comes first is the original; every later copy is a
    re-send of an event already sent. Four bytes per entry keep this small.
    """
    rng = random.Random(seed)
    resends = round(events * duplicate_rate)
    order = list(range(events))
    if events:
        order += rng.choices(range(events), k=resends)
    rng.shuffle(order)
    return array("I", order)


def generated_batches(factory: EventFactory, order: array, batch_size: int) -> Iterator[Batch]:
    """Yield JSON array bodies of batch_size generated events, in send order."""
    for start in range(0, len(order), batch_size):
        yield Batch.of_events([factory.event(i) for i in order[start:start + batch_size]])


def file_batches(stream: IO[bytes], batch_size: int,
                 bad_line: Callable[[int, bytes, str], None], *,
                 linger: float = DEFAULT_LINGER) -> Iterator[Batch | None]:
    """Yield NDJSON bodies of up to batch_size lines of the stream, reading it as it goes.

    A batch goes when it is full, at the end of the stream, or once its first line has
    waited `linger` seconds for the rest: a pipe that `tail -f` feeds a few lines at a time
    must not hold them until batch_size lines have come. While it waits for input it yields
    None every POLL_SECONDS at most, so that the caller can count the answers that came
    meanwhile, and stop (a Ctrl-C must not wait for the next line). A line that is not a
    JSON object is not sent but handed to bad_line(number, line, reason). Memory: one read
    of READ_BYTES, the longest line and one batch.
    """
    fd = stream.fileno()
    pending = bytearray()  # read, not yet a whole line
    lines: list[int] = []
    raw: list[bytes] = []
    number = 0
    due = None  # when the batch being filled must go, full or not

    def take(line: bytes) -> Batch | None:
        nonlocal number, due
        number += 1
        # A byte order mark starts a file that Windows tools wrote, and each part of a
        # concatenation of such files: it is no part of the event.
        line = line.removeprefix(codecs.BOM_UTF8).strip()
        if not line:
            return None
        try:
            # As the aggregator reads it: UTF-8 (json.loads would take UTF-16 bytes too).
            if not isinstance(json.loads(line.decode("utf-8")), dict):
                raise ValueError("not a JSON object")
        except (ValueError, UnicodeDecodeError) as exc:
            # Python's guard on long integers tells a programmer to call
            # sys.set_int_max_str_digits(); the aggregator would refuse the line as well.
            why = (f"an integer of more than {sys.get_int_max_str_digits()} digits"
                   if type(exc) is ValueError and "digits" in str(exc) else exc)
            bad_line(number, line, f"not a JSON event object ({why})")
            return None
        if not raw:
            due = time.monotonic() + linger
        lines.append(number)
        raw.append(line)
        return cut() if len(raw) == batch_size else None

    def cut() -> Batch:
        nonlocal lines, raw
        batch = Batch.of_lines(lines, raw)
        lines, raw = [], []
        return batch

    while True:
        wait = POLL_SECONDS if not raw else min(POLL_SECONDS, max(0.0, due - time.monotonic()))
        if select.select([fd], [], [], wait)[0]:
            chunk = os.read(fd, READ_BYTES)
            # At the end of the stream, a last line without its newline is whole too.
            pending += chunk or (b"\n" if pending else b"")
            end = pending.rfind(b"\n")
            if end >= 0:
                whole = bytes(pending[:end])
                del pending[:end + 1]
                for line in whole.split(b"\n"):
                    batch = take(line)
                    if batch is not None:
                        yield batch
            if not chunk:
                if raw:
                    yield cut()
                return
        else:
            yield None
        if raw and time.monotonic() >= due:
            yield cut()
