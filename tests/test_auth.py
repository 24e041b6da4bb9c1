"""Tokens: the publish token guards writes, the read token (when set) guards reads."""

from __future__ import annotations

import base64

import pytest
import requests

from tests.helpers import database_url, event, table_keys

READS = ["/events", "/stats", "/metrics"]
OPEN = ["/health", "/health/live", "/health/ready", "/openapi.json", "/docs"]


def basic(password: str, user: str = "anyone") -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.fixture
def guarded(make_app):
    return make_app(api_token="write-tok", read_token="read-tok").test_client()


@pytest.mark.parametrize("authorization", [None, "Bearer wrong", "Bearer read-to",
                                           "Bearer read-tok2", "read-tok", basic("wrong"),
                                           "Basic !!notbase64", "Bearer "])
@pytest.mark.parametrize("path", READS)
def test_reads_need_the_read_token_when_one_is_set(guarded, path, authorization):
    headers = {"Authorization": authorization} if authorization else {}
    response = guarded.get(path, headers=headers)
    assert response.status_code == 401 and response.json["error"] == "unauthorized"
    challenges = response.headers.getlist("WWW-Authenticate")
    assert any(c.startswith("Bearer") for c in challenges)
    assert any(c.startswith("Basic") for c in challenges)


@pytest.mark.parametrize("authorization", ["Bearer read-tok", "bearer read-tok",
                                           basic("read-tok"), basic("read-tok", user=""),
                                           "Bearer write-tok"])
@pytest.mark.parametrize("path", READS)
def test_the_read_token_or_the_publish_token_opens_reads(guarded, path, authorization):
    assert guarded.get(path, headers={"Authorization": authorization}).status_code == 200


@pytest.mark.parametrize("path", OPEN)
def test_probes_and_the_api_description_stay_open(guarded, path):
    assert guarded.get(path).status_code == 200


def test_the_read_token_cannot_publish(guarded, db):
    for authorization in ("Bearer read-tok", basic("read-tok"), None):
        headers = {"Authorization": authorization} if authorization else {}
        response = guarded.post("/publish", json=event("r"), headers=headers)
        assert response.status_code == 401
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert table_keys(db) == []
    ok = guarded.post("/publish", json=event("w"), headers={"Authorization": "Bearer write-tok"})
    assert ok.status_code == 200


@pytest.mark.parametrize("method,path", [("post", "/publish"), ("get", "/events")])
def test_a_wrong_token_is_told_from_a_missing_one(guarded, method, path):
    """RFC 6750: a token that came and is not valid gets error="invalid_token"; a request
    with none is asked for one. "Send a token" to a client that sent one misleads."""
    send = getattr(guarded, method)
    missing = send(path, json=[])
    wrong = send(path, json=[], headers={"Authorization": "Bearer nope"})
    assert missing.status_code == wrong.status_code == 401
    assert "Send Authorization" in missing.json["message"]
    assert "not valid" in wrong.json["message"] and "Send" not in wrong.json["message"]
    bearer = [c for c in wrong.headers.getlist("WWW-Authenticate") if c.startswith("Bearer")]
    assert bearer == ['Bearer realm="aggregator", error="invalid_token"']
    assert all("error=" not in c for c in missing.headers.getlist("WWW-Authenticate"))


def test_reads_stay_open_when_only_the_publish_token_is_set(make_app):
    client = make_app(api_token="write-tok").test_client()
    for path in READS:
        assert client.get(path).status_code == 200


def test_tokens_never_reach_the_logs(gunicorn):
    server = gunicorn(workers=1, env={"AGGREGATOR_API_TOKEN": "w-SECRET-4242",
                                      "AGGREGATOR_READ_TOKEN": "r-SECRET-4242"})
    write = {"Authorization": "Bearer w-SECRET-4242"}
    assert requests.post(server.url + "/publish", json=[event("a")], headers=write,
                         timeout=10).status_code == 200
    for headers in ({"Authorization": "Bearer r-SECRET-4242"},
                    {"Authorization": "Bearer wrong-SECRET-4242"}, {}):
        requests.get(server.url + "/events", headers=headers, timeout=10)
    requests.post(server.url + "/publish", json=[event("b")], timeout=10,
                  headers={"Authorization": "Bearer bad-SECRET-4242"})
    assert server.terminate() == 0
    log = server.log_path.read_text()
    assert '"path": "/events"' in log and "SECRET-4242" not in log


def test_every_token_of_a_comma_separated_list_is_accepted_and_nothing_else(make_app, db):
    """Rotation: set "old,new", move the clients to the new token, then drop the old one."""
    client = make_app(api_token="old-tok,new-tok", read_token="r-one,r-two").test_client()
    for n, token in enumerate(["old-tok", "new-tok"]):
        response = client.post("/publish", json=event(str(n)),
                               headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 200
    for token in ["old-tok,new-tok", "old-tok,", "old", "new-to", "", "r-one"]:
        response = client.post("/publish", json=event("x"),
                               headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 401, token
    assert sorted(key[1] for key in table_keys(db)) == ["0", "1"]
    for authorization in ["Bearer r-one", "Bearer r-two", basic("r-two"), "Bearer old-tok",
                          "Bearer new-tok"]:
        assert client.get("/stats", headers={"Authorization": authorization}).status_code == 200
    for authorization in ["Bearer r-one,r-two", "Bearer r-", basic("r-one,r-two")]:
        assert client.get("/stats", headers={"Authorization": authorization}).status_code == 401


def test_tokens_and_the_database_url_can_be_read_from_files(gunicorn, db, tmp_path):
    """NAME_FILE=path, as Docker and Kubernetes mount secrets: the secret is in no
    environment; the file's line ending is not part of it."""
    secrets = {"AGGREGATOR_API_TOKEN": "w-SECRET-1,w-SECRET-2\n",
               "AGGREGATOR_READ_TOKEN": "r-SECRET-3\r\n", "DATABASE_URL": database_url(db)}
    env = {"DATABASE_URL": ""}
    for name, content in secrets.items():
        (tmp_path / name).write_text(content, newline="")
        env[f"{name}_FILE"] = str(tmp_path / name)
    server = gunicorn(workers=1, env=env)
    for n, token in enumerate(["w-SECRET-1", "w-SECRET-2"]):
        response = requests.post(server.url + "/publish", json=[event(str(n))], timeout=10,
                                 headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 200
    assert requests.post(server.url + "/publish", json=[event("x")], timeout=10,
                         headers={"Authorization": "Bearer r-SECRET-3"}).status_code == 401
    assert requests.get(server.url + "/stats", timeout=10).status_code == 401
    stats = requests.get(server.url + "/stats", timeout=10,
                         headers={"Authorization": "Bearer r-SECRET-3"}).json()
    assert stats["unique_processed"] == 2 and len(table_keys(db)) == 2
    assert server.terminate() == 0
    log = server.log_path.read_text()
    assert "publish token set (2 tokens), read token set" in log and "SECRET" not in log


@pytest.mark.backends("sqlite")  # the master's settings; the store plays no part
def test_sighup_takes_a_changed_token_file_and_a_bad_one_keeps_the_tokens_in_force(
        gunicorn, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("tok-A\n")
    server = gunicorn(workers=2, env={"AGGREGATOR_API_TOKEN_FILE": str(token_file)})

    def status(token: str) -> int:
        return requests.post(server.url + "/publish", json=[], timeout=10,
                             headers={"Authorization": f"Bearer {token}"}).status_code

    assert (status("tok-A"), status("tok-B")) == (200, 401)
    token_file.write_text("tok-B,tok-C\n")
    server.reload(workers_before=2)
    assert (status("tok-A"), status("tok-B"), status("tok-C")) == (401, 200, 200)
    assert len(server.messages("aggregator 0.1.0 (reloaded): ")) == 1

    token_file.write_text("")
    server.reload(workers_before=2)
    assert server.proc.poll() is None
    errors = [r for r in server.log_records() if r["level"] == "error"]
    assert [r["message"] for r in errors] == [
        "aggregator: bad configuration on reload, the settings in force are kept: "
        f"AGGREGATOR_API_TOKEN_FILE={str(token_file)!r} is empty"]
    for _ in range(10):  # answered by the workers started after the bad reload
        assert (status("tok-A"), status("tok-B"), status("tok-C")) == (401, 200, 200)
    assert server.terminate() == 0
    assert "tok-" not in server.log_path.read_text()
