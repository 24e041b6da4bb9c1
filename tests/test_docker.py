"""The Docker images and compose.yaml: static checks, and the whole system run for real."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import uuid

import pytest
import requests
import yaml

from app.config import _VARIABLES as AGGREGATOR_VARIABLES
from publisher.cli import OPTIONS as PUBLISHER_OPTIONS
from tests.helpers import ROOT, every_event, free_port, publish_large_events, raw_get, wait_for

# One engine, one build cache: under `make test` (pytest-xdist) these run in one process,
# one after another.
pytestmark = pytest.mark.xdist_group("docker")

DOCKERFILES = ["Dockerfile.aggregator", "Dockerfile.publisher"]
# Every character that a postgresql:// URL would need encoded (PostgreSQL checks it: SCRAM).
CLUSTER_PASSWORD = "p@ss:w/rd#1?%20 'x\"$y"


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


def compose_file() -> dict:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def network_aliases(service: dict) -> list[str]:
    networks = service.get("networks") or {}
    if isinstance(networks, list):
        return []
    return [alias for network in networks.values() for alias in (network or {}).get("aliases", [])]


def test_compose_environment_names_are_honoured_by_the_code():
    services = compose_file()["services"]
    # PGPASSWORD is libpq's own: the cluster test below proves the replicas log in with it.
    known = (set(AGGREGATOR_VARIABLES) | {v[0] for v in PUBLISHER_OPTIONS.values()}
             | {"PGPASSWORD"})
    entrypoint = (ROOT / "deploy/postgres/entrypoint.sh").read_text()
    for name, service in services.items():
        names = set(service.get("environment", {}))
        if name == "postgres":
            assert names and all(f"${{{n}" in entrypoint for n in names), names
        else:
            assert names <= known, (name, names - known)
    assert {n for n, s in services.items() if s.get("environment")} == {
        "aggregator", "publisher", "postgres", "aggregator-1", "aggregator-2", "aggregator-3",
        "cluster-publisher"}


def test_compose_profiles_keep_single_server_and_cluster_apart():
    services = compose_file()["services"]
    profiles = {name: service.get("profiles") for name, service in services.items()}
    assert {n for n, p in profiles.items() if p == ["single"]} == {"aggregator", "publisher"}
    assert {n for n, p in profiles.items() if p == ["cluster"]} == {
        "postgres", "aggregator-1", "aggregator-2", "aggregator-3", "nginx", "cluster-publisher"}
    # `docker compose up` with no flags runs the single server: .env names its profile.
    assert re.search(r"^COMPOSE_PROFILES=single$", (ROOT / ".env").read_text(), re.M)
    # nginx balances over a name that exactly the cluster's replicas carry, found at
    # request time through Docker's DNS.
    conf = (ROOT / "deploy/nginx/nginx.conf").read_text()
    assert re.search(r"^\s*resolver 127\.0\.0\.11 ", conf, re.M)
    assert re.search(r"^\s*proxy_pass http://\$aggregators:8080;", conf, re.M)
    name = re.search(r"^\s*set \$aggregators (\S+);", conf, re.M).group(1)
    assert {n for n, s in services.items() if name in network_aliases(s)} == {
        "aggregator-1", "aggregator-2", "aggregator-3"}
    assert services["cluster-publisher"]["environment"]["PUBLISHER_URL"] == "http://nginx:8080"
    for replica in ("aggregator-1", "aggregator-2", "aggregator-3"):
        assert services[replica]["environment"]["DATABASE_URL"].startswith("postgresql://")


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


def compose_project(*profile: str, **variables: str):
    """`docker compose` for a throw-away project on a free loopback port, with extra
    environment variables for compose.yaml; `down` on exit."""
    if not docker_available():
        if os.environ.get("CI"):
            pytest.fail("CI needs a Docker engine: .ci/run starts one")
        pytest.skip("no Docker engine (../shared/docker-standin.sh starts one)")
    project = f"aggtest{uuid.uuid4().hex[:8]}"
    port = free_port()
    # Not a developer's own choice of files or profiles (a compose.override.yaml, say,
    # which `docker compose` reads unasked): the project's compose.yaml and .env.
    env = {**{k: v for k, v in os.environ.items() if k not in ("COMPOSE_FILE",
                                                                "COMPOSE_PROFILES")},
           "AGGREGATOR_PORT": str(port), "AGGREGATOR_HOST_IP": "127.0.0.1", **variables}

    def run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run(["docker", "compose", "-p", project, *profile, *args], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=timeout)

    run.port = port
    run.url = f"http://127.0.0.1:{port}"
    try:
        yield run
    finally:
        run("down", "-v", "--timeout", "40")


@pytest.fixture
def compose():
    """The default profile: one aggregator on SQLite and its publisher."""
    yield from compose_project("-f", "compose.yaml")


@pytest.fixture
def cluster():
    """The cluster profile: PostgreSQL, three replicas, nginx, and the cluster's publisher,
    with a database password that a URL could not hold unencoded."""
    yield from compose_project("-f", "compose.yaml", "--profile", "cluster",
                               POSTGRES_PASSWORD=CLUSTER_PASSWORD)


def inspect_container(compose, service: str) -> dict:
    ids = compose("ps", "-a", "-q", service).stdout.split()
    if not ids:
        return {}
    inspect = subprocess.run(["docker", "inspect", ids[0]], capture_output=True, text=True,
                             timeout=30)
    return json.loads(inspect.stdout)[0]


def container_state(compose, service: str) -> dict:
    return inspect_container(compose, service).get("State", {})


def stats(url: str) -> dict:
    return requests.get(url + "/stats", timeout=10).json()


def healthy(compose, *services: str) -> bool:
    return all(container_state(compose, service).get("Health", {}).get("Status") == "healthy"
               for service in services)


def upstreams(url: str, path: str = "/stats", requests_sent: int = 30) -> set[str]:
    """Send GETs through nginx; return the replica addresses that answered (X-Upstream).

    nginx picks a replica at random for each request: 30 requests miss one of three with
    a chance of 3 * (2/3)**30, about 1 in 60,000."""
    answers = [requests.get(url + path, timeout=10) for _ in range(requests_sent)]
    assert [answer.status_code for answer in answers] == [200] * requests_sent
    return {answer.headers["X-Upstream"] for answer in answers}


def addresses(compose, service: str) -> set[str]:
    """Return the container's IP addresses, one per network it is on."""
    networks = inspect_container(compose, service)["NetworkSettings"]["Networks"]
    return {network["IPAddress"] for network in networks.values()}


def up_and_publish(compose, publisher: str) -> None:
    """`up --build -d`; the publisher service exits 0 with all 6000 events acknowledged."""
    up = compose("up", "--build", "-d")
    assert up.returncode == 0, up.stderr[-3000:]
    state = wait_for(lambda: (s := container_state(compose, publisher))
                     and s["Status"] == "exited" and s, 300, "the publisher to exit")
    logs = compose("logs", publisher).stdout
    assert state["ExitCode"] == 0, logs[-3000:]
    assert "acknowledged       6000" in logs


def test_compose_up_publishes_exact_counts_and_data_survives_restart(compose):
    up_and_publish(compose, "publisher")
    # Plain `docker compose up` is the single server: none of the cluster runs.
    assert container_state(compose, "postgres") == {}
    assert healthy(compose, "aggregator")
    assert "(healthy)" in compose("ps", "aggregator").stdout
    before = stats(compose.url)
    assert (before["received"], before["unique_processed"], before["duplicate_dropped"]) == (
        6000, 5000, 1000)

    assert compose("restart", "aggregator").returncode == 0
    wait_for(lambda: healthy(compose, "aggregator"), 90, "the aggregator to be healthy again")
    after = stats(compose.url)
    for key in ("received", "unique_processed", "duplicate_dropped", "topics"):
        assert after[key] == before[key]
    assert len(every_event(compose.url)) == 5000
    # An online backup from inside the container, as README's Backups has it.
    taken = compose("exec", "-T", "aggregator", "python", "-m", "app.backup",
                    "/app/data/backup.db")
    assert taken.returncode == 0 and "5000 events" in taken.stderr, taken.stderr
    checked = compose("exec", "-T", "aggregator", "python", "-m", "app.check")
    assert checked.returncode == 0 and "5,000 events stored" in checked.stdout, (
        checked.stdout + checked.stderr)

    again = ("run", "--rm", "publisher", "python", "-m", "publisher", "--events", "200",
             "--duplicate-rate", "0", "--seed", "77", "--json")
    first, second = compose(*again), compose(*again)
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert json.loads(first.stdout.splitlines()[-1])["unique"] == 200
    assert json.loads(second.stdout.splitlines()[-1])["duplicates"] == 200


@pytest.fixture
def compose_with_secret(tmp_path):
    """The default profile with README's compose.override.yaml, its token file in tmp_path."""
    readme = (ROOT / "README.md").read_text()
    override = readme.split("```yaml\nservices:\n  aggregator:\n    environment: "
                            "{AGGREGATOR_API_TOKEN_FILE", 1)[1].split("```", 1)[0]
    override = "services:\n  aggregator:\n    environment: {AGGREGATOR_API_TOKEN_FILE" + override
    assert "./api_token.txt" in override
    token = tmp_path / "api_token.txt"
    token.write_text("tok-1\n")
    (tmp_path / "override.yaml").write_text(override.replace("./api_token.txt", str(token)))
    for run in compose_project("-f", "compose.yaml", "-f", str(tmp_path / "override.yaml")):
        run.token = token
        yield run


def test_compose_token_as_a_secret_file_is_in_no_environment_and_sighup_rotates_it(
        compose_with_secret):
    compose = compose_with_secret
    up_and_publish(compose, "publisher")

    def status(token: str) -> int:
        return requests.post(compose.url + "/publish", json=[], timeout=10,
                             headers={"Authorization": f"Bearer {token}"}).status_code

    assert (status("tok-1"), status("tok-2")) == (200, 401)
    for service in ("aggregator", "publisher"):
        assert "tok-" not in json.dumps(inspect_container(compose, service)["Config"]["Env"])
    compose.token.write_text("tok-2\n")  # in place: the container sees the same file
    assert compose("kill", "-s", "HUP", "aggregator").returncode == 0
    wait_for(lambda: status("tok-2") == 200, 30, "the reloaded workers", interval=0.5)
    assert status("tok-1") == 401 and healthy(compose, "aggregator")
    assert stats(compose.url)["unique_processed"] == 5000


REPLICAS = ("aggregator-1", "aggregator-2", "aggregator-3")
CLUSTER = ("postgres", *REPLICAS, "nginx")
COUNTS = ("received", "unique_processed", "duplicate_dropped", "topics")


def test_cluster_profile_three_replicas_behind_nginx_exact_counts_and_restart(cluster):
    up_and_publish(cluster, "cluster-publisher")
    assert healthy(cluster, *CLUSTER)
    # The single-server profile is not running alongside.
    assert container_state(cluster, "aggregator") == {}

    # nginx spreads requests over all three replicas; each answers the same counts.
    assert len(upstreams(cluster.url)) == 3
    answers = [requests.get(cluster.url + "/stats", timeout=10) for _ in range(9)]
    counts = [{key: answer.json()[key] for key in COUNTS} for answer in answers]
    assert (counts[0]["received"], counts[0]["unique_processed"],
            counts[0]["duplicate_dropped"], sum(counts[0]["topics"].values())) == (
        6000, 5000, 1000, 5000)
    assert all(count == counts[0] for count in counts)
    # A cursor read on one replica is continued on the next.
    assert len(every_event(cluster.url)) == 5000
    checked = cluster("exec", "-T", "aggregator-1", "python", "-m", "app.check")
    assert checked.returncode == 0 and "5,000 events stored" in checked.stdout, (
        checked.stdout + checked.stderr)
    # The replicas believe nginx's X-Forwarded-For: their access lines name the publisher.
    nginx_ips = addresses(cluster, "nginx")
    logs = cluster("logs", "--no-log-prefix", "aggregator-1", "aggregator-2",
                   "aggregator-3").stdout
    clients = {json.loads(line)["remote_addr"] for line in logs.splitlines()
               if line.startswith("{") and '"path": "/publish"' in line}
    assert clients and not clients & nginx_ips, (clients, nginx_ips)

    # A replica that comes back on another address is found with no reload of nginx: while
    # aggregator-2 is stopped, a placeholder container takes its address (Docker hands out
    # the lowest free one), so it starts again on a new one.
    (old,) = addresses(cluster, "aggregator-2")
    assert cluster("stop", "aggregator-2").returncode == 0
    placeholder = cluster("run", "-d", "--no-deps", "cluster-publisher", "sleep", "600")
    assert placeholder.returncode == 0, placeholder.stderr[-3000:]
    try:
        assert cluster("start", "aggregator-2").returncode == 0
        (new,) = addresses(cluster, "aggregator-2")
        assert new != old, "aggregator-2 got its old address back: the check proves nothing"
        wait_for(lambda: healthy(cluster, "aggregator-2"), 90, "aggregator-2 to be healthy")
        wait_for(lambda: f"{new}:8080" in upstreams(cluster.url, "/health/ready"), 30,
                 "nginx to send requests to aggregator-2's new address")
    finally:
        subprocess.run(["docker", "rm", "-f", placeholder.stdout.strip()], capture_output=True,
                       timeout=60)

    # One replica SIGKILLed: publishing through nginx still succeeds, every event stored once.
    assert cluster("kill", "-s", "SIGKILL", "aggregator-2").returncode == 0
    # --no-deps: `run` would otherwise start the killed replica again.
    again = ("run", "--rm", "--no-deps", "cluster-publisher", "python", "-m", "publisher",
             "--events", "200", "--duplicate-rate", "0", "--seed", "77", "--json")
    first = cluster(*again)
    assert first.returncode == 0, first.stderr[-3000:]
    assert json.loads(first.stdout.splitlines()[-1])["unique"] == 200
    assert container_state(cluster, "aggregator-2")["Status"] == "exited"
    before = stats(cluster.url)
    assert (before["received"], before["unique_processed"]) == (6200, 5200)

    # The whole cluster restarted, PostgreSQL included: the data is on its volume.
    assert cluster("restart", *CLUSTER).returncode == 0
    wait_for(lambda: healthy(cluster, *CLUSTER), 180, "the cluster to be healthy again")
    after = stats(cluster.url)
    assert {key: after[key] for key in COUNTS} == {key: before[key] for key in COUNTS}
    assert len(every_event(cluster.url)) == 5200
    assert len(upstreams(cluster.url, "/health/ready")) == 3
    second = cluster(*again)
    assert second.returncode == 0, second.stderr[-3000:]
    assert json.loads(second.stdout.splitlines()[-1])["duplicates"] == 200

    # Containers removed and created anew: only the named volume carries the data.
    assert cluster("down", "--timeout", "40").returncode == 0
    assert cluster("up", "-d", *CLUSTER).returncode == 0
    wait_for(lambda: healthy(cluster, *CLUSTER), 180, "the new cluster to be healthy")
    final = stats(cluster.url)
    assert (final["received"], final["unique_processed"]) == (6400, 5200)
    assert len(every_event(cluster.url)) == 5200


@pytest.fixture
def big_page_cluster(tmp_path):
    """The cluster profile, its replicas allowed /events pages of 64 MiB by an override
    file: larger than all the socket buffers between a replica and a client."""
    override = tmp_path / "big-pages.yaml"
    override.write_text(yaml.safe_dump({"services": {
        name: {"environment": {"AGGREGATOR_MAX_PAGE_BYTES": str(64 << 20)}}
        for name in REPLICAS}}))
    yield from compose_project("-f", "compose.yaml", "-f", str(override), "--profile", "cluster")


def connections_from_nginx(compose) -> int:
    """Count the TCP connections open to the replicas' port 8080 from another address than
    their own loopback (their healthcheck's): nginx's, each one an answer being read."""
    count = 0
    for name in REPLICAS:
        table = compose("exec", "-T", name, "cat", "/proc/net/tcp").stdout.splitlines()[1:]
        for line in table:
            local, remote, state = line.split()[1:4]
            count += (local.endswith(":1F90") and state == "01"  # ESTABLISHED
                      and not remote.startswith("0100007F:"))
    return count


def test_cluster_nginx_takes_whole_answers_so_a_stalled_reader_holds_no_replica(
        big_page_cluster):
    """With `proxy_buffering off`, nginx read a replica's answer only as fast as its client
    took it: a client that read nothing of a 40 MB page kept the replica's connection, and
    its thread, until the replica's own send limit let go. nginx now takes the whole answer
    at once (into a temporary file) and the replica is free."""
    cluster = big_page_cluster
    up = cluster("up", "--build", "-d", *CLUSTER)
    assert up.returncode == 0, up.stderr[-3000:]
    wait_for(lambda: healthy(cluster, *CLUSTER), 180, "the cluster to be healthy")
    publish_large_events(cluster.url, 1000, 40_000)
    readers = []
    try:
        for _ in range(2):
            readers.append(raw_get(cluster.port, "/events?limit=1000"))
            head = readers[-1].recv(4096)  # and nothing more
            assert head.startswith(b"HTTP/1.1 200"), head[:300]
            assert int(re.search(rb"Content-Length: (\d+)", head)[1]) > 40_000_000
        wait_for(lambda: connections_from_nginx(cluster) == 0, 30,
                 "the replicas to be done with both answers")
        assert cluster("logs", "nginx").stdout.count(
            "an upstream response is buffered to a temporary file") >= 2
        # The data is there, and the cluster answers while both readers hold theirs.
        assert requests.get(cluster.url + "/stats", timeout=10).json()["unique_processed"] == 1000
    finally:
        for sock in readers:
            sock.close()
