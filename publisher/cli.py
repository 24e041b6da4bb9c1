"""python -m publisher: simulate or replay traffic to an aggregator, then summarise."""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import asdict

from tqdm import tqdm

from .client import MAX_BACKOFF, Publisher, PublishError, checked_url, valid_name
from .events import DEFAULT_LINGER, EventFactory, file_batches, generated_batches, send_order
from .sender import Sender, Summary

LOG_EVERY_SECONDS = 5.0
DEFAULT_WAIT = 30.0


def _url(text: str) -> str:
    try:
        return checked_url(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _not_empty(text: str) -> str:
    """An option given empty (`--file "$LOG"` with LOG unset) is refused: taken as left
    out, it meant another thing (generated events sent instead of the file's; in an export,
    every event, and an empty --after wrote the output file anew)."""
    if text == "":
        raise argparse.ArgumentTypeError("empty; leave the option out instead")
    return text


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError
    return value


def _retries(text: str) -> int | None:
    if text.strip().lower() == "unlimited":
        return None
    return _non_negative(text)


def _wait(text: str) -> float:
    if text.strip().lower() == "unlimited":
        return math.inf
    return _seconds(text)


def _rate(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 10:
        raise ValueError
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not 0 <= value < float("inf"):
        raise ValueError
    return value


def _events_per_s(text: str) -> float | None:
    if text.strip().lower() == "unlimited":
        return None
    value = float(text)
    if not 0 < value < float("inf"):
        raise ValueError
    return value


def _topics(text: str) -> list[str]:
    topics = [t.strip() for t in text.split(",") if t.strip()]
    if not topics:
        raise ValueError
    for topic in topics:
        if not valid_name(topic):  # else every event of it would be refused
            raise argparse.ArgumentTypeError(
                f"topic {topic[:40]!r}{'...' if len(topic) > 40 else ''} is not 1 to 255 "
                "characters without control characters, as the aggregator takes them")
    return topics


# argparse names the type in its message: "invalid positive integer value: '0'".
_positive.__name__ = "positive integer"
_non_negative.__name__ = "non-negative integer"
_retries.__name__ = "retry count (or unlimited)"
_wait.__name__ = "seconds (or unlimited)"
_rate.__name__ = "rate (0 to 10)"
_seconds.__name__ = "seconds"
_events_per_s.__name__ = "events per second (or unlimited)"
_topics.__name__ = "topic list"

TOKEN_FILE_HELP = ("read the token from this file (its one line), so that it is in no "
                   "process list or environment")
MAX_TOKEN_FILE = 65536


def read_token_file(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Set args.token from --token-file, if given; exit 2 (a usage error) when the file
    cannot be read or is empty, or --token is given as well."""
    if not args.token_file:
        return
    if args.token:
        parser.error("give --token or --token-file, not both")
    try:
        with open(args.token_file, encoding="utf-8") as file:
            text = file.read(MAX_TOKEN_FILE + 1)
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        parser.error(f"argument --token-file: {reason}: {args.token_file}")
    args.token = text.rstrip("\r\n")
    if not args.token:
        parser.error(f"argument --token-file: empty: {args.token_file}")
    if len(text) > MAX_TOKEN_FILE:
        parser.error(f"argument --token-file: too long: {args.token_file}")


# option -> (environment variable, default, type, help)
OPTIONS = {
    "--url": ("PUBLISHER_URL", "http://127.0.0.1:8080", _url, "aggregator base URL"),
    "--events": ("PUBLISHER_EVENTS", "5000", _non_negative, "unique events to generate"),
    "--duplicate-rate": ("PUBLISHER_DUPLICATE_RATE", "0.2", _rate,
                         "re-sends per unique event (0.2 sends 1.2 x events in all)"),
    "--batch-size": ("PUBLISHER_BATCH_SIZE", "500", _positive, "events per request"),
    "--concurrency": ("PUBLISHER_CONCURRENCY", "4", _positive, "parallel senders"),
    "--rate": ("PUBLISHER_RATE", "unlimited", _events_per_s,
               "send at most this many events per second, on average since the first batch "
               "(a steady load, to watch latency or a dashboard under it)"),
    "--topics": ("PUBLISHER_TOPICS", "orders,payments,auth,shipping", _topics,
                 "topics of generated events"),
    "--seed": ("PUBLISHER_SEED", None, _non_negative,
               "seed for ids and order (default: random, printed)"),
    "--token": ("PUBLISHER_TOKEN", None, str, "bearer token for /publish"),
    "--token-file": ("PUBLISHER_TOKEN_FILE", None, _not_empty, TOKEN_FILE_HELP),
    "--wait": ("PUBLISHER_WAIT", None, _wait,
               "seconds to wait for /health first, or 'unlimited' (default: 30; "
               "unlimited with --retries unlimited)"),
    "--retries": ("PUBLISHER_RETRIES", "8", _retries,
                  "retries per batch on connection errors, 408, 429 and 502/503/504 "
                  "('unlimited': until it is delivered, or Ctrl-C)"),
    "--max-backoff": ("PUBLISHER_MAX_BACKOFF", f"{MAX_BACKOFF:g}", _seconds,
                      "longest wait between two retries, in seconds"),
    "--file": ("PUBLISHER_FILE", None, _not_empty,
               "replay events from an NDJSON file (- for stdin)"),
    "--rejects": ("PUBLISHER_REJECTS", None, _not_empty,
                  "with --file, write refused lines here as NDJSON"),
    "--linger": ("PUBLISHER_LINGER", str(DEFAULT_LINGER), _seconds,
                 "with --file, send a batch that is not full once its first line has "
                 "waited this many seconds"),
}


def parse_args(argv: list[str] | None, environ: Mapping[str, str]) -> argparse.Namespace:
    """Parse options; each defaults to its PUBLISHER_* environment variable."""
    parser = argparse.ArgumentParser(
        prog="python -m publisher",
        description="Send events to the log aggregator and print a summary. Exit status: "
                    "0 every event acknowledged, 1 failure, 2 bad arguments.")
    for option, (variable, default, kind, text) in OPTIONS.items():
        shown = "" if default is None else f"; default {default}"
        # Set empty (compose's "${X:-}" when X is unset) is unset, as the aggregator's are.
        given = environ.get(variable) or default
        parser.add_argument(option, default=given, type=kind,
                            help=f"{text} [env {variable}{shown}]")
    for option, variable, text in (
            ("--gzip", "PUBLISHER_GZIP", "send each batch gzipped: about 8 times fewer bytes "
                                         "for some CPU on both sides"),
            ("--json", "PUBLISHER_JSON", "print the summary as JSON")):
        parser.add_argument(option, action="store_true",
                            default=environ.get(variable, "") not in ("", "0", "false"),
                            help=f"{text} [env {variable}]")
    args = parser.parse_args(argv)
    read_token_file(parser, args)
    if args.rejects and not args.file:
        parser.error("--rejects goes with --file")
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(2**31)
    if args.wait is None:  # retrying until delivered, so also until the aggregator is up
        args.wait = math.inf if args.retries is None else DEFAULT_WAIT
    return args


@contextmanager
def _stop_sending_on_signals(summary: Summary, stop_retrying) -> Iterator[None]:
    """Make a first SIGINT (Ctrl-C) or SIGTERM (docker stop) mark the summary interrupted,
    instead of raising where the main thread happens to be (possibly between an answer and
    its tally) or, for SIGTERM, ending at once (or, as PID 1 in a container, being
    ignored). A second one exits at once, without waiting for answers that may be slow to
    come (the aggregator may still commit those batches: sending them again is safe).
    Nothing changes off the main thread, nor for a signal that is ignored (see
    handling_stop_signals). stop_retrying() is called at the first one."""

    def interrupt(signum, frame) -> None:
        if summary.interrupted is not None:
            print("publisher: stopped without waiting for the batches in flight",
                  file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(128 + signum)
        summary.interrupted = signal.Signals(signum).name
        stop_retrying()
        print(f"publisher: {summary.interrupted}: sending nothing more; waiting for the "
              "answers to the batches in flight", file=sys.stderr, flush=True)

    with handling_stop_signals(interrupt):
        yield


@contextmanager
def handling_stop_signals(handler) -> Iterator[None]:
    """Handle SIGINT and SIGTERM with handler inside the block, then put back what was
    there. Nothing changes off the main thread, nor for a signal that is ignored: SIGINT is,
    in a job that a script starts in the background, and a Ctrl-C is then the script's."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    for signum, before in previous.items():
        if before is not signal.SIG_IGN:
            signal.signal(signum, handler)
    try:
        yield
    finally:
        for signum, before in previous.items():
            if before is not None:  # None: set outside Python, cannot be put back
                signal.signal(signum, before)


def _say_waiting(reason: str, waited: float) -> None:
    """Tell, on stderr, that the aggregator is not ready yet and why."""
    print(f"publisher: waited {waited:.0f} s for /health so far: {reason}", file=sys.stderr,
          flush=True)


def _say_retrying(reason: str, seconds: float, attempt: int) -> None:
    """Tell, on stderr (above a progress bar), that a batch will be sent again and why."""
    tqdm.write(f"publisher: retrying a batch in {seconds:.1f} s (retry {attempt}): {reason}",
               file=sys.stderr)


def _progress(total: int | None, stack: ExitStack):
    """Return a callback advancing a tqdm bar on a terminal, or logging now and then."""
    if sys.stderr.isatty():
        bar = stack.enter_context(tqdm(total=total, unit="ev", unit_scale=True,
                                       file=sys.stderr, desc="publishing"))
        return bar.update
    state = {"done": 0, "start": time.monotonic(), "last": time.monotonic()}

    def log(n: int) -> None:
        state["done"] += n
        now = time.monotonic()
        if now - state["last"] >= LOG_EVERY_SECONDS:
            state["last"] = now
            rate = state["done"] / max(now - state["start"], 1e-9)
            of = f"/{total}" if total else ""
            print(f"publisher: {state['done']}{of} events handled ({rate:,.0f}/s)",
                  file=sys.stderr, flush=True)
    return log


def publish(args: argparse.Namespace) -> Summary:
    """Wait for the aggregator, send everything, and return the summary."""
    publisher = Publisher(args.url, token=args.token, retries=args.retries,
                          max_backoff=args.max_backoff, pool_size=args.concurrency,
                          on_retry=_say_retrying, compress=args.gzip)
    summary = Summary(url=args.url, seed=None if args.file else args.seed)
    with ExitStack() as stack:
        stack.callback(publisher.close)
        # Before the wait for the aggregator, which can be long: a mistyped path fails now.
        stream = (sys.stdin.buffer if args.file == "-"
                  else _opened(stack, "--file", args.file, "rb") if args.file else None)
        rejects = _opened(stack, "--rejects", args.rejects, "w") if args.rejects else None
        stack.enter_context(_stop_sending_on_signals(summary, publisher.stop_retrying))
        if not publisher.wait_ready(args.wait, on_wait=_say_waiting):
            return summary  # Ctrl-C or SIGTERM before the aggregator was up: nothing sent
        order = None if args.file else send_order(args.events, args.duplicate_rate, args.seed)
        sender = Sender(publisher, summary,
                        _progress(None if order is None else len(order), stack), rejects,
                        rate=args.rate)
        if args.file:
            batches = file_batches(stream, args.batch_size, sender.reject_line,
                                   linger=args.linger)
        else:
            batches = generated_batches(EventFactory(args.seed, args.topics, args.events), order,
                                        args.batch_size)
        start = time.monotonic()
        sender.run(batches, args.concurrency)
        summary.elapsed_s = round(time.monotonic() - start, 3)
    summary.events_per_s = round(summary.sent / summary.elapsed_s, 1) if summary.elapsed_s else 0
    if sender.fatal:
        raise PublishError(f"{sender.fatal} (acknowledged {summary.acknowledged} events first)")
    return summary


class UsageError(Exception):
    """An argument cannot be used (a file that cannot be opened): exit status 2."""


def _opened(stack: ExitStack, option: str, path: str, mode: str):
    """Return path opened in mode (text in UTF-8) for the stack to close, or raise
    UsageError naming the option."""
    try:
        return stack.enter_context(open(path, mode, **({} if "b" in mode else
                                                      {"encoding": "utf-8"})))
    except OSError as exc:
        raise UsageError(f"{option}: {exc.strerror or exc}: {path}") from None


def _print(summary: Summary, as_json: bool) -> None:
    if as_json:
        print(json.dumps(asdict(summary) | {"ok": summary.ok}))
        return
    print(f"publisher: {summary.url}  seed {summary.seed}" if summary.seed is not None
          else f"publisher: {summary.url}")
    for label, value in (("sent", summary.sent), ("acknowledged", summary.acknowledged),
                         ("unique", summary.unique), ("duplicates", summary.duplicates),
                         ("rejected", summary.rejected), ("failed", summary.failed)):
        print(f"  {label:<13}{value:>10}")
    print(f"  {'elapsed':<13}{summary.elapsed_s:>10.2f} s")
    print(f"  {'rate':<13}{summary.events_per_s:>10,.0f} events/s")
    for problem in summary.problems:
        print(f"  ! {problem}")


def main(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Run the publisher; return 0 when every event was acknowledged, 2 for bad arguments,
    else 1 (or 128 + the signal that stopped it)."""
    args = parse_args(argv, os.environ if environ is None else environ)
    try:
        summary = publish(args)
    except UsageError as exc:
        print(f"publisher: error: {exc}", file=sys.stderr)
        return 2
    except PublishError as exc:
        print(f"publisher: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"publisher: error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "),
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("publisher: interrupted", file=sys.stderr)
        return 130
    _print(summary, args.json)
    if summary.interrupted is not None:
        print(f"publisher: {summary.interrupted}: nothing was sent after the batches counted "
              "above", file=sys.stderr)
        return 128 + signal.Signals[summary.interrupted]
    if not summary.ok:
        print(f"publisher: error: {summary.rejected + summary.failed} events were not "
              "acknowledged", file=sys.stderr)
        return 1
    return 0
