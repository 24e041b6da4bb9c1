"""The storage interface: what the aggregator needs from a database, and no more."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

# A validated event ready to store:
# (topic, event_id, ts_us, timestamp, source, payload_json, received_at).
Row = tuple[str, str, int, str, str, str, str]


class StoreError(Exception):
    """The database could not do what was asked; a retry later may succeed."""

    code = "database_unavailable"


class StoreFull(StoreError):
    """The database has no room left for the write."""

    code = "database_full"


@dataclass
class Batch:
    """The valid events of one request, in the order sent, and its rejected count."""

    rows: list[Row] = field(default_factory=list)
    rejected: int = 0


# What a writer calls once it holds the write lock: further batches for the same commit.
More = Callable[[], list[Batch]]


def nothing_more() -> list[Batch]:
    return []


@dataclass(frozen=True)
class StoredEvent:
    """One stored event as it is returned to readers."""

    seq: int
    topic: str
    event_id: str
    timestamp: str
    source: str
    payload: str
    received_at: str


@dataclass(frozen=True)
class Counters:
    """The persisted counters, exact across processes and restarts."""

    received: int
    unique_processed: int
    duplicate_dropped: int
    rejected: int
    # Events stored by topic: every topic, or the largest when counters(largest=N) asked.
    topics: dict[str, int]
    # Events deleted by retention (AGGREGATOR_RETENTION): unique_processed == events stored
    # + expired. Like unique_processed, topic counts are totals (Prometheus counters): they
    # do not fall when events expire.
    expired: int
    # How many topics there are, named in topics or not.
    topics_in_all: int
    # When each topic of topics last had an event stored (received_at's text, at its
    # commit); None for a topic not written since the column was added.
    last_stored: dict[str, str | None] = field(default_factory=dict)


def utf8_length(text: str) -> int:
    """The UTF-8 size of text: its length when ASCII (which CPython knows without a scan),
    else the length of its encoding."""
    return len(text) if text.isascii() else len(text.encode())


@dataclass(frozen=True)
class EventQuery:
    """Filters and keyset position for a page of events.

    A page ends after limit events. With max_bytes, it also ends at the first event, from
    the second on, that takes the payloads read (in UTF-8 bytes) over max_bytes. A reader
    that asks for one event more than it shows can tell from that last event that more
    follow, whichever rule ended the page; and a page holds about max_bytes of payloads,
    however large each is.
    """

    topic: str | None = None
    event_id: str | None = None  # looked up by the (topic, event_id) key, in each topic
    source: str | None = None
    since: int | None = None
    until: int | None = None
    after: int | None = None
    limit: int = 100
    descending: bool = False
    max_bytes: int | None = None
    # A search: the events whose payload, as stored (compact JSON), holds this text.
    contains: str | None = None
    # A search reads about this many events past the cursor, at most, and then ends the
    # page (EventPage.searched_to): of its topic or source when one is asked, else by
    # ingestion order. None reads on until the page is full.
    scan: int | None = None

    @property
    def searching(self) -> bool:
        """Return whether this is a search of the payloads, which reads them scan by scan:
        contains without an event_id (a lookup by key reads one event per topic at most,
        and contains then only tests its payload)."""
        return self.contains is not None and self.event_id is None

    def over_size(self, count: int, size: int) -> bool:
        """Return whether count events whose payloads take size bytes are over
        max_bytes: the last of them is past the page (never the first)."""
        return self.max_bytes is not None and count > 1 and size > self.max_bytes


@dataclass(frozen=True)
class EventPage:
    """The events read for a page, and where a search stopped short of a full page.

    searched_to is set when a search (EventQuery.contains) read its scan of events before
    the page was full: the page goes on after that sequence number, in the order read, and
    a cursor of it resumes the search. None when the page is full or nothing is left.

    read_to is set when a page oldest first read to the end of what is stored: the highest
    sequence number in its snapshot. Every event committed later has a higher one, so a
    cursor of it is where a reader goes on for only those, without reading again the
    events past the page's last one that did not match.
    """

    events: list[StoredEvent]
    searched_to: int | None = None
    read_to: int | None = None


class Writer:
    """A write connection owned by one writer thread.

    Writers of every process take turns under one write lock (SQLite has one writer; the
    PostgreSQL backend serialises writers to keep seq in commit order). After each write(),
    lock_wait_s and lock_held_s say how long it waited for that lock and then held it.
    """

    lock_wait_s: float = 0.0
    lock_held_s: float = 0.0

    def write(self, batches: list[Batch], more: More = nothing_more) -> list[int]:
        """Commit every batch in ONE transaction; return each batch's newly stored count.

        Once the write lock is held, more() is called once and the batches it returns are
        committed in the same transaction, after the others (their counts follow too): a
        writer that waited for its turn takes what was queued meanwhile, so writers that
        take turns commit larger groups, fewer times. Counters are updated in the same
        transaction. Raises StoreError (and stores nothing) when the transaction cannot
        commit.
        """
        raise NotImplementedError

    def expire(self, received_before: str, limit: int) -> int:
        """Delete up to limit of the oldest events received before received_before (text
        as received_at is stored), in one transaction under the write lock; return how many.

        Only the oldest limit events are looked at, so a call is short. The newest event is
        never deleted: its seq is where the next events' seq continue from. The events
        deleted are counted in expired in the same transaction.
        """
        raise NotImplementedError

    def close(self) -> None:
        """Release the connection; safe to call twice."""
        raise NotImplementedError


class Store:
    """A database of events and counters. Subclasses implement every method."""

    def writer(self) -> Writer:
        """Open a write connection for one writer thread."""
        raise NotImplementedError

    def counters(self, largest: int | None = None) -> Counters:
        """Return the counters, in time independent of the number of events; with largest,
        name only that many topics, the largest (by count, then name)."""
        raise NotImplementedError

    def events(self, query: EventQuery) -> EventPage:
        """Return up to query.limit events in ingestion order after the cursor (fewer when
        their payloads are over query.max_bytes, or a search read its scan first)."""
        raise NotImplementedError

    def ping(self) -> None:
        """Raise StoreError unless the database answers."""
        raise NotImplementedError

    def close(self) -> None:
        """Release every connection this thread holds; safe to call twice."""
        raise NotImplementedError
