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


def shutdown(app: Flask) -> None:
    """Commit what is queued, stop the writers and close the store; safe to call twice."""
    app.extensions["ingestor"].close()
    app.extensions["store"].close()
