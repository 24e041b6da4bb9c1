"""gunicorn settings for the aggregator; every value can be overridden by flags or
GUNICORN_CMD_ARGS, and the app's own settings come from the environment (app/config.py)."""

import sys

from app.config import ConfigError, from_env

try:
    _config = from_env()
except ConfigError as exc:
    # One clear line, no traceback, non-zero exit.
    sys.exit(f"aggregator: bad configuration: {exc}")

# --- Server socket ---
bind = _config.bind

# --- Workers ---
# gthread: request threads wait on the writer's commit, so threads are cheap
# waiters; processes give CPU parallelism for JSON parsing and validation.
# Defaults (2 workers x 8 threads, 1 writer each; app/config.py) come from a grid run
# with bench/ingest.py on 2 cores: 3 or 4 workers and 2 writers per worker were no
# faster (SQLite takes one writer at a time) and used more memory.
worker_class = "gthread"
workers = _config.web_concurrency
threads = _config.threads
timeout = 60
graceful_timeout = _config.graceful_timeout
keepalive = 5

# Several instances (tests, replicas) may share a HOME; nothing here uses the control socket.
control_socket_disable = True

# --- Logging ---
accesslog = "-"
errorlog = "-"
loglevel = "info"


# --- Hooks ---
def worker_exit(server, worker):
    """Commit what is queued and stop the writers before the worker process exits."""
    from app import shutdown

    app = getattr(worker, "wsgi", None)
    if app is not None and hasattr(app, "extensions"):
        shutdown(app)
