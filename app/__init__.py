"""The log aggregator: a Flask app that deduplicates and durably stores events."""

from __future__ import annotations

# werkzeug's routing encodes each request's host with the "idna" codec, whose first use
# imports encodings.idna and stringprep: 3-4 ms inside each worker's first request, the
# slowest part of it. Imported with the app instead.
import encodings.idna  # noqa: F401
import threading
import time
from collections.abc import Mapping

from flask import Flask
from werkzeug.middleware.proxy_fix import ProxyFix

from . import compression, errors, logs, pages, views
from .batch import make_event_schema
from .body import BodyBudget
from .config import Config, in_force, with_overrides
from .ingest import Ingestor
from .metrics import Metrics
from .openapi import build_spec
from .store import open_store

__version__ = "0.1.0"


def create_app(test_config: Mapping[str, object] | None = None) -> Flask:
    """Build the app: the settings in force (the environment's, or those the gunicorn master
    checked) first, test overrides second."""
    config: Config = in_force()
    if test_config:
        config = with_overrides(config, test_config)
    logs.configure()
    app = Flask(__name__)
    app.config["AGGREGATOR"] = config
    app.json.sort_keys = False
    if config.trusted_proxies:
        # Behind that many proxies (nginx, a load balancer), the client is the address
        # they add to X-Forwarded-For; the rest of the header could be anyone's claim.
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=config.trusted_proxies,
                                x_proto=config.trusted_proxies)
    store = open_store(config)
    metrics = Metrics(store, __version__, config.metrics_dir, config.metrics_topics)
    app.extensions["store"] = store
    app.extensions["metrics"] = metrics
    app.extensions["ingestor"] = Ingestor(store, queue_size=config.queue_size,
                                          writers=config.writers,
                                          commit_timeout=config.commit_timeout,
                                          metrics=metrics, shared_dir=config.metrics_dir,
                                          retention=config.retention)
    app.extensions["event_schema"] = make_event_schema(config.max_payload)
    app.extensions["body_budget"] = BodyBudget(config.body_budget)
    # Searches read payloads for up to AGGREGATOR_SEARCH_TIME each: so many at once, and no
    # more, take the cores from ingest and the request threads from everyone.
    app.extensions["searches"] = threading.BoundedSemaphore(config.search_concurrency)
    app.extensions["openapi"] = build_spec(__version__, config.max_payload)
    app.extensions["started_at"] = time.time()
    logs.init_app(app)
    errors.init_app(app)
    pages.init_app(app)
    compression.init_app(app)
    app.register_blueprint(views.bp)
    return app


# What a worker reads of itself before it takes traffic (see warm_up).
WARM_UP_READS = (("/health", "application/json"), ("/stats", "application/json"),
                 ("/events", "application/json"), ("/events", "text/html"))


def warm_up(app: Flask) -> None:
    """Answer a few reads in this process before it takes traffic, unlogged and untimed.

    A worker's first answers paid for first uses: Flask's first request, a metric's values
    for a new label set, a reader connection, the code paths' first runs. Through
    gunicorn, a fresh worker's first /stats took 3.0-4.5 ms of the app's time against
    0.5-1.5 ms for the next ones; warmed, 1.5-2.9 ms. The p99 of a fresh server's first
    200 /stats fell from 6.31 to 4.58 ms (medians of 8 alternating servers of 2 workers,
    2026-12-07; bench/RESULTS.md, Growth). With a read token set the reads are refused,
    which warms less but still the most.
    """
    client = app.test_client()
    for path, accept in WARM_UP_READS:
        client.get(path, headers={"Accept": accept}, environ_base={logs.WARM_UP: True})


def shutdown(app: Flask) -> None:
    """Commit what is queued, stop the writers and close the store; safe to call twice."""
    app.extensions["ingestor"].close()
    app.extensions["store"].close()
