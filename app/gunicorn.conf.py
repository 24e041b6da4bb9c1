"""gunicorn settings for the aggregator; every value can be overridden by flags or
GUNICORN_CMD_ARGS, and the app's own settings come from the environment (app/config.py)."""

import atexit
import ctypes
import gc
import logging
import os
import shutil
import signal
import sys
import tempfile

# Workers share metric samples through files in this directory. prometheus-client picks
# its storage when first imported, so the variable is set before anything imports it.
_own_metrics_dir = "PROMETHEUS_MULTIPROC_DIR" not in os.environ
if _own_metrics_dir:
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="aggregator-metrics-")
    _master_pid = os.getpid()

    # At the master's exit, however it exits (SIGTERM, a bad setting, a port in use, a
    # worker that failed to boot: gunicorn skips on_exit for the last two). Workers are
    # forked with this handler too; only the master removes the directory.
    @atexit.register
    def _remove_metrics_dir():
        if os.getpid() == _master_pid:
            shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)


def _cap_malloc_arenas(arenas: int = 2) -> None:
    """Let glibc's malloc keep at most this many arenas in each process, as
    MALLOC_ARENA_MAX does (which, when set, wins).

    By default glibc gives a thread that finds the arenas busy one of its own, up to 8 per
    core, and what a request frees in one arena is not reused by threads allocating in
    another. 16 bodies of 14.5 MB, at most two parsed at a time (the body budget) on a
    worker's 16 threads, raised its peak by 659-662 MiB; with 2 arenas, by 379-417 MiB.
    Ingest speed did not move (bench/ingest.py, within its noise). Done in the master
    before any thread starts; forked workers inherit it.
    """
    if "MALLOC_ARENA_MAX" in os.environ:
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc: another allocator, nothing to cap
        return
    m_arena_max = -8  # glibc's malloc.h
    mallopt(m_arena_max, arenas)


_cap_malloc_arenas()

from gunicorn import util as _gunicorn_util  # noqa: E402

from app import config as _settings  # noqa: E402
from app.config import ConfigError, from_env  # noqa: E402
from app.errors import write_server_error  # noqa: E402

# What gunicorn refuses before the app runs (a request line over limit_request_line, too
# many headers, a malformed request line) it answers with an HTML page; the contract is
# JSON for every error, so its error writer is swapped for one that writes our shape.
_gunicorn_util.write_error = write_server_error

# gunicorn runs this file again in the master on SIGHUP (a reload), then forks new workers:
# the way to take a changed secret's file (AGGREGATOR_API_TOKEN_FILE and so on) without a
# restart. The settings an earlier run of this file kept tell a reload from the start.
_previous = _settings.kept()


def _reloaded(previous):
    """Return the settings to keep on a reload: the new ones if valid, and if they name
    another database, one that opens (a worker that cannot open it fails to boot, and
    gunicorn then stops); else, with one error line, the previous ones. So a bad setting
    on reload leaves the server up, as nginx keeps its configuration when a reload finds
    an error."""
    log = logging.getLogger("gunicorn.error")
    try:
        config = from_env()
    except ConfigError as exc:
        log.error("aggregator: bad configuration on reload, the settings in force are "
                  "kept: %s", exc)
        return previous
    if config.database_url != previous.database_url:
        from app.store import StoreError, open_store

        try:
            open_store(config).close()
        except (StoreError, OSError) as exc:
            log.error("aggregator: database unavailable on reload, the settings in force "
                      "are kept: %s", " ".join(str(exc).split()))
            return previous
    return config


if _previous is not None:
    _config = _reloaded(_previous)
else:
    try:
        _config = from_env()
    except ConfigError as exc:
        # One clear line, no traceback, non-zero exit.
        sys.exit(f"aggregator: bad configuration: {exc}")
_settings.keep(_config)

# --- Server socket ---
bind = _config.bind

# --- Workers ---
# gthread: request threads wait on the writer's commit, so threads are cheap
# waiters; processes give CPU parallelism for JSON parsing and validation.
# Defaults (2 workers x 16 threads, 1 writer each; app/config.py) come from a grid run
# with bench/ingest.py on 2 cores (events/s, 2 runs each, 16 keep-alive clients):
# 2 workers x 8 threads 80,604 / 77,874; 3 x 8 77,486 / 74,488 (RSS 159 MiB);
# 4 x 8 73,944 / 77,297 (RSS 200 MiB); 2 x 16 80,686 / 87,028. More threads than a
# worker's share of connections cover the moments when recycled connections (below)
# land unevenly; more workers only add memory, since SQLite takes one writer at a time.
# gthread, with time limits on reading a request's headers and on sending its answer
# (app/worker.py).
worker_class = "app.worker.ThreadWorker"
# Static files are written with sendall() like every answer, under the worker's send limit:
# socket.sendfile() on a blocking socket waits for it to be writable with no limit.
sendfile = False
workers = _config.web_concurrency
threads = _config.threads
timeout = 60
graceful_timeout = _config.graceful_timeout
keepalive = 5
# gunicorn's largest request line (the default is 4094): room for every /events filter
# at its longest; a longer line is a JSON 414.
limit_request_line = 8190

# Several instances (tests, replicas) may share a HOME; nothing here uses the control socket.
control_socket_disable = True

# A keep-alive connection stays with the worker that accepted it, so a few long-lived
# publishers can load one worker while another idles (half the throughput; see
# ../shared/MEASURED.md). Each connection is closed after this many requests, like nginx's
# keepalive_requests: the client reconnects at once (urllib3, http.client do), and the
# new connection goes to whichever worker accepts first, the less busy one.
# 20 kept a 4-connection publisher's load within [1.8, 1.6] CPU seconds across two workers
# where unlimited keep-alive gave [1.0, 2.7] (bench/ingest.py --clients 4); SO_REUSEPORT
# (the kernel hashing connections over per-worker sockets) balanced worse, [1.1, 2.5].
KEEPALIVE_REQUESTS = 20

# --- Logging ---
# JSON lines on stdout. The app writes the access lines itself (with request id and
# event counts), so gunicorn's own access log stays off. gunicorn's --log-level applies to
# every logger: gunicorn.error keeps the level gunicorn gives it (no "level" below), and
# the root logger, which the app's loggers (access lines included) go through, is given
# it too (_follow_log_level).
accesslog = None
logger_class = "app.logs.GunicornLogger"  # which does not even build gunicorn's access lines
errorlog = "-"
loglevel = "info"
logconfig_dict = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"json": {"()": "app.logs.JsonFormatter"}},
    "handlers": {"stdout": {"class": "logging.StreamHandler", "formatter": "json",
                            "stream": "ext://sys.stdout"}},
    "root": {"level": "INFO", "handlers": ["stdout"]},
    "loggers": {
        "gunicorn.error": {"handlers": ["stdout"], "propagate": False},
        "gunicorn.access": {"level": "INFO", "handlers": [], "propagate": False},
    },
}


# --- Hooks ---
def on_starting(server):
    """Start with no metric samples or failed commit left by an earlier run in the same
    directory, and with a database that answers (waiting up to AGGREGATOR_START_TIMEOUT
    for PostgreSQL), before any worker is forked: a database that is not there is one
    clear line."""
    from app.ingest import CommitHealth
    from app.metrics import prepare_multiprocess_dir
    from app.store import StoreError, wait_for_database

    if server.cfg.is_ssl:
        # app/worker.py ends slow clients by their plain socket: on a TLS one, a client
        # stalled in its handshake or headers held its thread for good.
        sys.exit("aggregator: gunicorn's own TLS (--certfile, --keyfile) is not supported: "
                 "the limits on slow clients work on plain connections only; terminate TLS "
                 "in a reverse proxy in front")
    # Ctrl-C stops the server as SIGTERM does (see post_worker_init).
    server.handle_int = server.handle_term
    # The workers share this directory: metric samples, and the last failed commit.
    prepare_multiprocess_dir(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    CommitHealth.reset(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    try:
        wait_for_database(_config, lambda reason: server.log.warning(
            "waiting for the database (up to AGGREGATOR_START_TIMEOUT=%gs): %s",
            _config.start_timeout, reason))
    except (StoreError, OSError) as exc:
        sys.exit("aggregator: database unavailable: " + " ".join(str(exc).split()))
    _follow_log_level(server)
    _log_settings(server, "")


def on_reload(server):
    """Log the settings in force after a reload (SIGHUP), before the new workers start."""
    _follow_log_level(server)
    _log_settings(server, " (reloaded)")


def _follow_log_level(server) -> None:
    """Give the root logger gunicorn's --log-level (logconfig_dict set it to INFO), before
    any worker is forked: the app's own lines follow the flag as gunicorn's do."""
    logging.getLogger().setLevel(server.log.loglevel)


def _log_settings(server, when: str) -> None:
    from app import __version__

    server.log.info("aggregator %s%s: %d workers of %d threads; %s", __version__, when,
                    server.cfg.workers, server.cfg.threads, _config.summary())


def post_worker_init(worker):
    """Make SIGINT a graceful stop, as SIGTERM is; SIGQUIT stays gunicorn's quick one.

    Ctrl-C in a terminal sends SIGINT to the master and to every worker at once. gunicorn
    takes it as a quick shutdown: a worker exits from its signal handler, and the master
    sends it SIGQUIT as well, whose handler exits again while the first exit is running
    the worker's exit hooks. Under load, most workers stopped by Ctrl-C skipped
    worker_exit (which commits what is queued) that way. Graceful, each worker finishes
    its requests in flight, runs worker_exit once, and exits.

    Then the worker answers a few reads itself (app.warm_up), so that its first clients do
    not pay for its first uses, and freezes what it has made.
    """
    signal.signal(signal.SIGINT, worker.handle_exit)
    if hasattr(worker.wsgi, "test_client"):
        from app import warm_up

        try:
            warm_up(worker.wsgi)
        except Exception:  # the worker serves cold rather than not at all
            worker.log.exception("aggregator: warming the worker up failed")
    # The app is loaded: move its ~40,000 objects (modules, schemas, templates) out of the
    # cyclic garbage collector's reach, as Instagram's servers do. They live as long as the
    # worker, yet each full collection walked them all: 7-14 ms with the GIL held, about
    # once a second per worker under ingest, and while its writer held the write lock both
    # workers waited. In process (75,000 events of /publish, then 300 HTML pages): full
    # collections 157-192 ms in all against 14-18 ms; the page's p99 16-19 against 6-8 ms.
    # End to end (bench/ingest.py, 5 alternating pairs, medians of 3): faster in each pair,
    # by 2% to 25% (median 7.5%). See bench/RESULTS.md, Ingest.
    gc.freeze()


def pre_request(worker, req):
    """Close the connection after this request once it has served KEEPALIVE_REQUESTS."""
    if req.req_number >= KEEPALIVE_REQUESTS:
        req.force_close()


def worker_exit(server, worker):
    """Commit what is queued and stop the writers before the worker process exits."""
    from app import shutdown

    app = getattr(worker, "wsgi", None)
    if app is not None and hasattr(app, "extensions"):
        shutdown(app)


def child_exit(server, worker):
    """Drop a dead worker's live gauges (queue depth) from the metrics."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
