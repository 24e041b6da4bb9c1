"""The Docker images and compose.yaml: static checks, and the whole system run for real."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid

import pytest
import requests

from app.config import _VARIABLES as AGGREGATOR_VARIABLES
from publisher.cli import OPTIONS as PUBLISHER_OPTIONS
from tests.helpers import ROOT, free_port

DOCKERFILES = ["Dockerfile.aggregator", "Dockerfile.publisher"]


def dockerfile_healthcheck() -> list[str]:
    text = (ROOT / "Dockerfile.aggregator").read_text()
    return json.loads(re.search(r"HEALTHCHECK [^\n]*\\\n\s*CMD (\[[^\n]*\])", text).group(1))


@pytest.mark.parametrize("name", DOCKERFILES)
def test_every_copy_source_exists_and_the_image_runs_as_non_root(name):
    text = (ROOT / name).read_text()
    sources = [part for line in re.findall(r"^COPY (.+)$", text, re.M)
               for part in line.split()[:-1]]
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), source
    assert re.search(r"^USER app$", text, re.M)
    assert re.search(r'^CMD \["', text, re.M)


def test_compose_environment_names_are_honoured_by_the_code():
    text = (ROOT / "compose.yaml").read_text()
    names = set(re.findall(r"^\s{6}([A-Z_]+):", text, re.M))
    known = set(AGGREGATOR_VARIABLES) | {v[0] for v in PUBLISHER_OPTIONS.values()}
    assert names and names <= known, names - known


def test_healthcheck_command_passes_on_a_live_server_and_fails_on_none(gunicorn):
    command = dockerfile_healthcheck()
    server = gunicorn()
    live = [part.replace("127.0.0.1:8080", f"127.0.0.1:{server.port}") for part in command]
    assert subprocess.run([sys.executable, *live[1:]], timeout=10).returncode == 0
    dead = [part.replace("127.0.0.1:8080", f"127.0.0.1:{free_port()}") for part in command]
    assert subprocess.run([sys.executable, *dead[1:]], capture_output=True,
                          timeout=10).returncode != 0


def docker_available() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0


@pytest.fixture
def compose():
    """Run `docker compose` for a throw-away project on a free loopback port."""
    if not docker_available():
        if os.environ.get("CI"):
            pytest.fail("CI needs a Docker engine: .ci/run starts one")
        pytest.skip("no Docker engine (../shared/docker-standin.sh starts one)")
    project = f"aggtest{uuid.uuid4().hex[:8]}"
    port = free_port()
    env = {**os.environ, "AGGREGATOR_PORT": str(port), "AGGREGATOR_HOST_IP": "127.0.0.1"}

    def run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run(["docker", "compose", "-p", project, *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=timeout)

    run.url = f"http://127.0.0.1:{port}"
    try:
        yield run
    finally:
        run("down", "-v", "--timeout", "40")


def container_state(compose, service: str) -> dict:
    ids = compose("ps", "-a", "-q", service).stdout.split()
    if not ids:
        return {}
    inspect = subprocess.run(["docker", "inspect", ids[0]], capture_output=True, text=True,
                             timeout=30)
    return json.loads(inspect.stdout)[0]["State"]


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


def stats(url: str) -> dict:
    return requests.get(url + "/stats", timeout=10).json()


def count_events(url: str) -> int:
    total, cursor = 0, None
    while True:
        params = {"limit": 1000, **({"after": cursor} if cursor else {})}
        page = requests.get(url + "/events", params=params, timeout=10).json()
        total += len(page["events"])
        cursor = page["next_cursor"]
        if cursor is None:
            return total


def test_compose_up_publishes_exact_counts_and_data_survives_restart(compose):
    up = compose("up", "--build", "-d")
    assert up.returncode == 0, up.stderr[-3000:]
    publisher = wait_for(lambda: (s := container_state(compose, "publisher"))
                         and s["Status"] == "exited" and s, 180, "the publisher to exit")
    assert publisher["ExitCode"] == 0, compose("logs", "publisher").stdout[-3000:]
    assert "acknowledged       6000" in compose("logs", "publisher").stdout
    assert container_state(compose, "aggregator")["Health"]["Status"] == "healthy"
    assert "(healthy)" in compose("ps", "aggregator").stdout
    before = stats(compose.url)
    assert (before["received"], before["unique_processed"], before["duplicate_dropped"]) == (
        6000, 5000, 1000)

    assert compose("restart", "aggregator").returncode == 0
    wait_for(lambda: container_state(compose, "aggregator").get("Health", {}).get("Status")
             == "healthy", 90, "the aggregator to be healthy again")
    after = stats(compose.url)
    for key in ("received", "unique_processed", "duplicate_dropped", "topics"):
        assert after[key] == before[key]
    assert count_events(compose.url) == 5000

    again = ("run", "--rm", "publisher", "python", "-m", "publisher", "--events", "200",
             "--duplicate-rate", "0", "--seed", "77", "--json")
    first, second = compose(*again), compose(*again)
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert json.loads(first.stdout.splitlines()[-1])["unique"] == 200
    assert json.loads(second.stdout.splitlines()[-1])["duplicates"] == 200
