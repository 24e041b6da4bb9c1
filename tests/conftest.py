"""Fixtures: an app on a temporary database, its client, and real gunicorn servers.

Every test that uses the `db` fixture (directly or through make_app, app, client or
gunicorn) runs once per backend: on a SQLite file, and on a fresh schema of a real
PostgreSQL server that the session starts from the machine's binaries. Mark a test (or a
module, with pytestmark) `@pytest.mark.backends("sqlite")` to run it on those named only.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from app import create_app, shutdown
from tests.helpers import GunicornServer, database_url, free_port
from tests.postgres import PostgresServer

BACKENDS = ("sqlite", "postgresql")


def pytest_configure(config):
    config.addinivalue_line("markers", "backends(*names): run only on these storage backends")
    # The tests send SIGINT as a terminal sends Ctrl-C to its foreground job. A suite started
    # in the background (`make test &`) inherits SIGINT ignored, and so would every process
    # it starts: the publisher then keeps to that, as nohup'd programs do, and the tests of
    # Ctrl-C fail (9 of them did). Its children get SIGINT's default again.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_generate_tests(metafunc):
    if "backend" in metafunc.fixturenames:
        marker = metafunc.definition.get_closest_marker("backends")
        metafunc.parametrize("backend", marker.args if marker else BACKENDS)


@pytest.fixture(scope="session")
def postgres():
    """A PostgreSQL server for the whole session, on a loopback port; stopped by its PID."""
    server = PostgresServer(free_port())
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture
def db_path(tmp_path):
    return tmp_path / "dedup.db"


@pytest.fixture
def db(backend, db_path, request):
    """The test's own database: a SQLite file, or the URL of a new PostgreSQL schema."""
    if backend == "sqlite":
        return db_path
    return request.getfixturevalue("postgres").fresh_url()


@pytest.fixture
def make_app(db):
    """Build apps on the test database (and shut each one down afterwards)."""
    apps = []

    def make(**overrides):
        app = create_app({"database_url": database_url(db), **overrides})
        apps.append(app)
        return app

    yield make
    for app in apps:
        shutdown(app)


@pytest.fixture
def app(make_app):
    return make_app()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def gunicorn(tmp_path, db):
    """Start real gunicorn servers on the test database; every one is stopped afterwards."""
    servers = []
    default_db = db

    def start(*, wait_path: str = "/health", db: Path | str | None = None,
              **kwargs) -> GunicornServer:
        server = GunicornServer(db or default_db, tmp_path / f"gunicorn-{len(servers)}.log",
                                **kwargs)
        servers.append(server)
        return server.start(path=wait_path)

    yield start
    for server in servers:
        server.kill()
