"""python -m publisher.export: write the events an aggregator holds as NDJSON lines that
`python -m publisher --file` sends again: to another aggregator (from SQLite to
PostgreSQL), or to the same one after a loss (a backup in a portable form)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

from .cli import (
    TOKEN_FILE_HELP,
    UsageError,
    _not_empty,
    _opened,
    _positive,
    _retries,
    _url,
    handling_stop_signals,
    read_token_file,
)
from .client import Publisher, PublishError

# What a publisher sends of an event. received_at is the aggregator's own (when it received
# the event), and /publish refuses it as an unknown field.
FIELDS = ("topic", "event_id", "timestamp", "source", "payload")
FILTERS = {"topic": "of this topic", "source": "from this source",
           "q": "whose payload (compact JSON) holds this text",
           "since": "timestamped at or after this time (ISO 8601, or now-1h, now-7d)",
           "until": "timestamped before this time"}
MAX_PAGE = 1000  # the aggregator's largest limit
FOLLOW_EVERY_S = 1.0  # with --follow, how often to ask again once every event is written
# Answers that asking again will not change: a bad filter or cursor (400), a missing or
# wrong token (401, 403), no /events at --url (404, 405).
REFUSALS = (400, 401, 403, 404, 405)


def event_line(event: dict) -> str:
    """Return the event as one NDJSON line, in the form /publish takes (ASCII: escapes
    for the rest, whatever the encoding of standard output)."""
    return json.dumps({name: event[name] for name in FIELDS}, separators=(",", ":")) + "\n"


@dataclass
class Progress:
    """How far an export got: every event up to `cursor` is written (all of them once
    `done`: any past it arrived later)."""

    cursor: str | None
    written: int = 0
    pages: int = 0
    done: bool = False
    error: str | None = None
    status: int | None = None  # of the refusal that stopped it, if one did


def write_all(fd: int, data: bytes) -> None:
    """Write every byte to the file descriptor. Not through Python's buffered files: on
    CPython 3.11, a BufferedWriter blocked on a full pipe lost the rest of its write when
    a signal came (2 runs in 20; os.write loops, as here, lost nothing in 20)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def export(publisher: Publisher, filters: Mapping[str, str], out: int, *,
           after: str | None = None, page_size: int = MAX_PAGE,
           stop: threading.Event | None = None, follow: bool = False) -> Progress:
    """Write every event matching the filters to the file descriptor `out`, oldest first,
    from the one after the cursor `after` (from the start if None), until the end (or,
    following, the events that arrive later, asked for every FOLLOW_EVERY_S) or a stop;
    never raise PublishError.

    Each page is written whole (write_all) before the next is asked for, so `cursor` in
    the result always names where the events not yet written begin: the page's
    end_cursor, which is past its last event even at the end.
    """
    stop = stop if stop is not None else threading.Event()
    progress = Progress(cursor=after)
    params = {**filters, "limit": str(page_size), "order": "asc"}
    while not stop.is_set():
        try:
            page = publisher.events({**params, "after": progress.cursor} if progress.cursor
                                    else params)
        except PublishError as exc:
            progress.error, progress.status = str(exc), exc.status
            break
        write_all(out, "".join(event_line(event) for event in page["events"]).encode())
        progress.written += len(page["events"])
        progress.pages += 1 if page["events"] or not follow else 0  # not the empty polls
        progress.cursor = page["end_cursor"]
        if page["next_cursor"] is None:
            if not follow:
                progress.done = True
                break
            stop.wait(FOLLOW_EVERY_S)
    return progress


def parse_args(argv: list[str] | None, environ: Mapping[str, str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m publisher.export",
        description="Write the events an aggregator holds, oldest first, as NDJSON lines "
                    "that `python -m publisher --file` sends again. Exit status: 0 all "
                    "written, 1 stopped early (the last line says how to go on; 130 or 143 "
                    "for Ctrl-C or SIGTERM), 2 bad arguments, filters or token.")
    parser.add_argument("--url", type=_url,
                        default=environ.get("PUBLISHER_URL") or "http://127.0.0.1:8080",
                        help="aggregator base URL [env PUBLISHER_URL]")
    parser.add_argument("--token", default=environ.get("PUBLISHER_TOKEN") or None,
                        help="the read token, or the publish token, when the aggregator "
                             "needs one [env PUBLISHER_TOKEN]")
    parser.add_argument("--token-file", type=_not_empty,
                        default=environ.get("PUBLISHER_TOKEN_FILE") or None,
                        help=f"{TOKEN_FILE_HELP} [env PUBLISHER_TOKEN_FILE]")
    for name, text in FILTERS.items():
        parser.add_argument(f"--{name}", type=_not_empty,
                            help=f"only events {text}, as GET /events?{name}= takes it")
    parser.add_argument("--after", type=_not_empty,
                        help="go on from this cursor (a stopped export names it); the "
                             "output file is then appended to")
    parser.add_argument("--follow", "-f", action="store_true",
                        help="once every event is written, go on writing those that arrive, "
                             f"asking every {FOLLOW_EVERY_S:g} s, until Ctrl-C or SIGTERM "
                             "(with --retries unlimited, through outages as well)")
    parser.add_argument("--output", "-o", default="-",
                        help="the NDJSON file to write (default: standard output)")
    parser.add_argument("--page-size", type=_positive, default=MAX_PAGE,
                        help=f"events asked for at once (at most {MAX_PAGE})")
    parser.add_argument("--retries", type=_retries, default="8",
                        help="retries per page on connection errors, 408, 429 and "
                             "502/503/504 ('unlimited': until it answers, or Ctrl-C)")
    args = parser.parse_args(argv)
    read_token_file(parser, args)
    if args.page_size > MAX_PAGE:
        parser.error(f"argument --page-size: at most {MAX_PAGE}")
    return args


@contextmanager
def _stopping_on_signals(stop: threading.Event, publisher: Publisher,
                         received: list[int]) -> Iterator[None]:
    """Make a first SIGINT or SIGTERM end the export after the page under way (written
    whole), a second one at once; the signals are appended to received. An ignored SIGINT
    stays ignored, as in the publisher."""
    def handler(signum, frame) -> None:
        if stop.is_set():
            os._exit(128 + signum)
        received.append(signum)
        stop.set()
        publisher.stop_retrying()

    with handling_stop_signals(handler):
        yield


def main(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Run an export; return the exit status: 0 when every matching event was written, 1
    when it stopped early, 128 + the signal that stopped it, 2 for a refusal or an output
    that cannot be opened."""
    args = parse_args(argv, os.environ if environ is None else environ)
    filters = {name: getattr(args, name) for name in FILTERS if getattr(args, name) is not None}
    stop, signals = threading.Event(), []
    try:
        with ExitStack() as stack:
            out = (sys.stdout if args.output == "-" else
                   _opened(stack, "--output", args.output, "ab" if args.after else "wb"))
            publisher = Publisher(args.url, token=args.token, retries=args.retries)
            stack.callback(publisher.close)
            start = time.monotonic()
            with _stopping_on_signals(stop, publisher, signals):
                out.flush()  # pages go out through os.write, past what is buffered
                progress = export(publisher, filters, out.fileno(), after=args.after,
                                  page_size=args.page_size, stop=stop, follow=args.follow)
    except UsageError as exc:
        print(f"publisher.export: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"publisher.export: error: {exc.strerror or exc}: {exc.filename or ''}"
              .rstrip(": "), file=sys.stderr)
        return 1
    where = "standard output" if args.output == "-" else args.output
    print(f"publisher.export: wrote {progress.written} events ({progress.pages} pages) to "
          f"{where} in {time.monotonic() - start:.1f} s", file=sys.stderr)
    if progress.done:
        if progress.cursor:  # an incremental export takes on from there
            print(f"publisher.export: the events that arrive later follow --after "
                  f"{progress.cursor}", file=sys.stderr)
        return 0
    if progress.status in REFUSALS:  # going on would not help
        print(f"publisher.export: error: {progress.error}", file=sys.stderr)
        return 2
    why = progress.error or f"stopped by {signal.Signals(signals[0]).name}"
    again = (f"go on with --after {progress.cursor}" if progress.cursor
             else "run it again (nothing was written)")
    print(f"publisher.export: error: {why}; {again}", file=sys.stderr)
    return 128 + signals[0] if signals else 1


if __name__ == "__main__":
    sys.exit(main())
