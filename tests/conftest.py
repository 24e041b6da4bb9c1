"""Fixtures: an app on a temporary SQLite file, its client, and real gunicorn servers."""

from __future__ import annotations

from pathlib import Path

import pytest

from app import create_app, shutdown
from tests.helpers import GunicornServer


@pytest.fixture
def db_path(tmp_path):
    return tmp_path / "dedup.db"


@pytest.fixture
def make_app(db_path):
    """Build apps on the test database (and shut each one down afterwards)."""
    apps = []

    def make(**overrides):
        app = create_app({"database_url": f"sqlite:///{db_path}", **overrides})
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
def gunicorn(tmp_path, db_path):
    """Start real gunicorn servers on the test database; every one is stopped afterwards."""
    servers = []

    def start(*, wait_path: str = "/health", db: Path | None = None, **kwargs) -> GunicornServer:
        server = GunicornServer(db or db_path, tmp_path / f"gunicorn-{len(servers)}.log",
                                **kwargs)
        servers.append(server)
        return server.start(path=wait_path)

    yield start
    for server in servers:
        server.kill()
