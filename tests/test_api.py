"""The API of `serve` (/api/v1/): readers added by double opt-in through a real SMTP
server or as confirmed with their consent, read, changed, unsubscribed, listed by page;
sends listed and followed after a real send; tokens, scopes, limits, errors, the OpenAPI
document, logs that never show a token, and bad requests from the corpus and a fuzzer."""

from __future__ import annotations

import contextlib
import dataclasses
import email
import http.client
import json
import math
import os
import re
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from email import policy
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings, strategies
from starlette.testclient import TestClient

from qant_mail.app.context import Context
from qant_mail.base.config import Settings, load_settings
from qant_mail.base.errors import ConfigError
from qant_mail.delivery.transport import MemoryTransport
from qant_mail.store.subscribers import Status, Subscribers
from qant_mail.web import api
from qant_mail.web.api import Api, ApiRequest, api_tokens
from qant_mail.web.serve import create_app
from qant_mail.web.serve import shown_path as serve_shown_path
from qant_mail.web.webserver import BackgroundServer
from tests.conftest import ROOT, prepare_send, send_to_list
from tests.smtp_server import SmtpServer, free_port

SECRET = b"the-site-secret-for-these-tests"
WRITE = "write-token-of-the-api-tests-0123456789abcdef"
READ = "read-token-of-the-api-tests-0123456789abcdef"
ENV = {"QANT_API_TOKEN": f"write:{WRITE}, read:{READ}"}
JSON = {"Content-Type": "application/json"}
FINANCE = """
[newsletters.finance]
name = "Qant Finance"
title = "Qant Finance"
description = "Chaque lundi."
"""
CONSENT = {"source": "shop checkout", "at": "2024-05-01T09:30:00+02:00", "ip": "203.0.113.5"}
BAD = ROOT / "tests" / "bad"
CASES: dict[str, Any] = tomllib.loads((BAD / "cases.toml").read_text(encoding="utf-8"))["api"]


def auth(token: str = WRITE) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def site(local: Settings, project: Path) -> Settings:
    """The project's settings with a second newsletter, mailing the scripted server."""
    path = project / "qant.toml"
    path.write_text(path.read_text(encoding="utf-8") + FINANCE, encoding="utf-8")
    return dataclasses.replace(load_settings(path, env={}), smtp=local.smtp)


@pytest.fixture
def ctx(site: Settings) -> Context:
    return Context(site, env=ENV, secret=SECRET)


@pytest.fixture
def client(ctx: Context) -> Iterator[TestClient]:
    """The public application with its API; what it queues is delivered by `mails`."""
    with TestClient(create_app(ctx, None, drain=False), follow_redirects=False) as test_client:
        yield test_client


def mails(ctx: Context, server: SmtpServer, address: str) -> list[email.message.EmailMessage]:
    """Deliver what the outbox holds; return what `address` received."""
    while ctx.outbox.drain().tried:
        pass
    return [
        email.message_from_bytes(r.data, policy=policy.default)
        for r in server.handler.received
        if r.recipient == address
    ]


def add_confirmed(client: TestClient, address: str, **fields: Any) -> dict[str, Any]:
    body = {"email": address, "confirmed": True, "consent": CONSENT, **fields}
    answer = client.post("/api/v1/subscribers", json=body, headers=auth())
    assert answer.status_code == 201, answer.text
    found: dict[str, Any] = answer.json()
    return found


def statuses(reader: dict[str, Any]) -> dict[str, str]:
    return {n["id"]: n["status"] for n in reader["newsletters"]}


# -- readers ---------------------------------------------------------------------------


def test_a_post_mails_the_confirmation_and_adds_nobody_until_the_reader_confirms(
    client: TestClient, ctx: Context, site: Settings, smtp_server: SmtpServer
) -> None:
    body = {"email": "Lea@Example.com", "name": "Léa", "newsletters": ["default", "finance"]}
    answer = client.post("/api/v1/subscribers", json=body, headers=auth())
    assert answer.status_code == 202
    assert answer.json()["status"] == "pending"
    assert answer.json()["newsletters"] == ["default", "finance"]
    listed = client.get("/api/v1/subscribers?email=lea@example.com", headers=auth(READ))
    assert listed.json()["data"] == []  # nobody before the confirmation
    (confirmation,) = mails(ctx, smtp_server, "lea@example.com")
    text = confirmation.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    link = re.search(r"https://lettre\.qant\.example(/confirm/\S+)", text)
    assert link is not None
    assert client.post(link[1]).status_code == 200
    (found,) = client.get("/api/v1/subscribers?email=LEA@example.com", headers=auth()).json()[
        "data"
    ]
    reader = client.get(f"/api/v1/subscribers/{found['id']}", headers=auth(READ)).json()
    assert (reader["email"], reader["name"], reader["status"]) == (
        "lea@example.com",
        "Léa",
        "active",
    )
    assert statuses(reader) == {"default": "active", "finance": "active"}
    assert {n["consent"]["form"] for n in reader["newsletters"]} == {"api"}


def test_a_confirmed_reader_needs_a_record_of_consent_and_keeps_it_without_a_mail(
    client: TestClient, ctx: Context, smtp_server: SmtpServer
) -> None:
    refused = client.post(
        "/api/v1/subscribers", json={"email": "max@example.com", "confirmed": True}, headers=auth()
    )
    assert refused.status_code == 422
    assert [e["field"] for e in refused.json()["errors"]] == ["consent"]
    answer = client.post(
        "/api/v1/subscribers",
        json={"email": "max@example.com", "name": "Max", "confirmed": True, "consent": CONSENT},
        headers=auth(),
    )
    assert answer.status_code == 201
    reader = answer.json()
    assert answer.headers["location"] == f"/api/v1/subscribers/{reader['id']}"
    (subscription,) = reader["newsletters"]
    assert subscription["status"] == "active"
    assert subscription["consent"]["asked_at"] == "2024-05-01T07:30:00+00:00"
    assert subscription["consent"]["form"] == "api: shop checkout (from 203.0.113.5)"
    assert subscription["consent"]["confirmed_at"]
    again = client.post(
        "/api/v1/subscribers",
        json={"email": "max@example.com", "confirmed": True, "consent": CONSENT},
        headers=auth(),
    )
    assert (again.status_code, again.json()["id"]) == (200, reader["id"])
    assert mails(ctx, smtp_server, "max@example.com") == []


def test_a_reader_removed_on_request_comes_back_only_through_their_own_confirmation(
    client: TestClient, site: Settings
) -> None:
    add_confirmed(client, "max@example.com")
    with Subscribers.open(site.store_path) as store:
        store.remove("max@example.com")
        store.import_rows("email\nlea@example.com\n", "test")
        store.set_status("lea@example.com", Status.COMPLAINED, "arf")
    for address in ("max@example.com", "lea@example.com"):
        body = {"email": address, "confirmed": True, "consent": CONSENT}
        refused = client.post("/api/v1/subscribers", json=body, headers=auth())
        assert refused.status_code == 422, address
        assert "their own confirmation" in refused.json()["errors"][0]["message"]
        asked = client.post("/api/v1/subscribers", json={"email": address}, headers=auth())
        assert asked.status_code == 202


def test_patch_changes_the_name_and_makes_the_newsletters_those_given(
    client: TestClient,
) -> None:
    reader = add_confirmed(client, "max@example.com")
    url = f"/api/v1/subscribers/{reader['id']}"
    renamed = client.patch(url, json={"name": "  Max  Martin "}, headers=auth())
    assert renamed.json()["name"] == "Max Martin"
    moved = client.patch(url, json={"newsletters": ["finance"]}, headers=auth()).json()
    assert statuses(moved) == {"default": "unsubscribed", "finance": "active"}
    both = client.patch(url, json={"newsletters": ["finance", "default"]}, headers=auth()).json()
    assert statuses(both) == {"default": "active", "finance": "active"}
    bad = client.patch(url, json={"newsletters": ["sport"], "name": "x\ny"}, headers=auth())
    assert bad.status_code == 422
    assert sorted(e["field"] for e in bad.json()["errors"]) == ["name", "newsletters"]
    assert client.get(url, headers=auth()).json() == both  # nothing of a refused change


def test_delete_unsubscribes_from_one_newsletter_or_all_and_keeps_the_reader(
    client: TestClient, site: Settings
) -> None:
    reader = add_confirmed(client, "max@example.com", newsletters=["default", "finance"])
    url = f"/api/v1/subscribers/{reader['id']}"
    one = client.delete(f"{url}?newsletter=finance", headers=auth())
    assert statuses(one.json()) == {"default": "active", "finance": "unsubscribed"}
    every = client.delete(url, headers=auth())
    assert statuses(every.json()) == {"default": "unsubscribed", "finance": "unsubscribed"}
    assert client.get(url, headers=auth()).status_code == 200
    with Subscribers.open(site.store_path) as store:
        again = store.import_rows("email\nmax@example.com\n", "test")
    assert again.added == 0  # kept, so that no import brings them back


def test_the_list_gives_every_reader_once_page_by_page_in_a_stable_order(
    client: TestClient, site: Settings
) -> None:
    rows = "email\n" + "".join(f"reader{n}@example.com\n" for n in range(7))
    with Subscribers.open(site.store_path) as store:
        store.import_rows(rows, "test")
        store.unsubscribe("reader3@example.com")
    seen: list[int] = []
    after: int | None = 0
    while after is not None:
        page = client.get(f"/api/v1/subscribers?limit=3&after={after}", headers=auth(READ)).json()
        assert len(page["data"]) <= 3
        seen += [reader["id"] for reader in page["data"]]
        after = page["next_after"]
    assert seen == sorted(seen)
    assert len(seen) == len(set(seen)) == 7
    active = client.get("/api/v1/subscribers?status=active&limit=500", headers=auth()).json()
    assert len(active["data"]) == 6
    assert active["next_after"] is None
    assert client.get("/api/v1/subscribers?limit=501", headers=auth()).status_code == 422
    other = client.get("/api/v1/subscribers?newsletter=finance", headers=auth()).json()
    assert (other["newsletter"], other["data"]) == ("finance", [])


# -- sends -----------------------------------------------------------------------------


def test_sends_are_listed_and_followed_after_a_real_send(
    client: TestClient, site: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert client.get("/api/v1/sends", headers=auth(READ)).json() == {
        "data": [],
        "next_after": None,
    }
    with Subscribers.open(site.store_path) as store:
        store.import_rows("email\nlea@example.com\nmax@example.com\n", "test")
    monkeypatch.setenv("QANT_SECRET_KEY", SECRET.decode())
    prepared = prepare_send(site.issues_dir / "2023-11-20.yaml", site)
    send_to_list(prepared, site, MemoryTransport())
    (send,) = client.get("/api/v1/sends", headers=auth(READ)).json()["data"]
    assert (send["issue"], send["recipients"], send["counts"]["sent"]) == ("2023-11-20", 2, 2)
    assert send["finished_at"]
    state = client.get("/api/v1/sends/2023-11-20", headers=auth(READ)).json()
    assert (state["id"], state["left"], state["running"]) == (send["id"], 0, False)
    assert state["counts"]["sent"] == 2
    assert client.get("/api/v1/sends/2099-01-01", headers=auth()).status_code == 404


# -- tokens, scopes, limits, errors ----------------------------------------------------


def test_no_token_or_a_wrong_one_gets_401_asking_for_a_bearer_token(client: TestClient) -> None:
    for headers in ({}, auth(WRITE[:-1]), auth(WRITE + "x"), {"Authorization": f"Basic {WRITE}"}):
        answer = client.get("/api/v1/subscribers", headers=headers)
        assert answer.status_code == 401
        assert answer.headers["www-authenticate"].startswith("Bearer")
        assert answer.headers["content-type"] == "application/problem+json"
        assert answer.json()["status"] == 401


def test_a_read_token_reads_and_cannot_write(client: TestClient) -> None:
    reader = add_confirmed(client, "max@example.com")
    url = f"/api/v1/subscribers/{reader['id']}"
    assert client.get(url, headers=auth(READ)).status_code == 200
    assert client.patch(url, json={"name": "x"}, headers=auth(READ)).status_code == 403
    assert client.delete(url, headers=auth(READ)).status_code == 403
    posted = client.post("/api/v1/subscribers", json={"email": "a@example.com"}, headers=auth(READ))
    assert posted.status_code == 403
    assert client.get(url, headers=auth()).json() == reader


def test_unknown_readers_and_sends_are_404(client: TestClient) -> None:
    for path in ("/subscribers/424242", "/subscribers/x", "/sends/none", "/nothing"):
        answer = client.get(f"/api/v1{path}", headers=auth())
        assert answer.status_code == 404, path
        assert answer.json()["status"] == 404


def test_a_tokens_requests_past_its_burst_get_429_until_it_refills(ctx: Context) -> None:
    clock = Still()
    handler = Api(ctx, api_tokens(ENV), clock=clock)

    def status(token: str) -> int:
        return handler.handle(ApiRequest("GET", "/sends", authorization=f"Bearer {token}")).status

    assert [status(READ) for _ in range(api.BURST)] == [200] * api.BURST
    refused = handler.handle(ApiRequest("GET", "/sends", authorization=f"Bearer {READ}"))
    assert refused.status == 429
    assert refused.headers["Retry-After"] == str(math.ceil(60 / api.PER_MINUTE))
    assert status(WRITE) == 200  # each token has its own
    clock.now += 60 / api.PER_MINUTE
    assert [status(READ), status(READ)] == [200, 429]


def test_a_client_guessing_tokens_is_stopped_even_with_a_good_one(client: TestClient) -> None:
    wrong = [client.get("/api/v1/sends", headers=auth("x" * 40)) for _ in range(10)]
    assert {a.status_code for a in wrong} == {401}
    stopped = client.get("/api/v1/sends", headers=auth())
    assert stopped.status_code == 429
    assert "retry-after" in stopped.headers


def test_the_confirmations_an_address_gets_a_day_are_limited(
    client: TestClient, site: Settings
) -> None:
    limit = site.signup.per_address_per_day
    answers = [
        client.post("/api/v1/subscribers", json={"email": "lea@example.com"}, headers=auth())
        for _ in range(limit + 1)
    ]
    assert [a.status_code for a in answers] == [202] * limit + [429]
    assert answers[-1].headers["retry-after"] == "86400"


@pytest.mark.sqlite_only
def test_the_tokens_are_read_with_their_scopes_and_bad_ones_refused_without_showing_them(
    tmp_path: Path,
) -> None:
    found = api_tokens({"QANT_API_TOKEN": f"read:{READ}\nwrite:{WRITE}"})
    assert [(t.label, t.scope) for t in found] == [("read #1", "read"), ("write #2", "write")]
    assert WRITE not in repr(found)
    path = tmp_path / "tokens"
    path.write_text(f"write:{WRITE}\n", encoding="utf-8")
    assert [t.scope for t in api_tokens({"QANT_API_TOKEN_FILE": str(path)})] == ["write"]
    assert api_tokens({}) == []
    short = "short-token-0123456789"
    for value, says in (
        (f"write:{short}", "fewer than 32"),
        (WRITE, "write it read:TOKEN or write:TOKEN"),
        (f"admin:{WRITE}", "write it read:TOKEN or write:TOKEN"),
        (f"read:{WRITE},write:{WRITE}", "the same token"),
        (f"write:{WRITE}é", "letters, digits"),
        (" , ", "holds no token"),
    ):
        with pytest.raises(ConfigError, match=says) as raised:
            api_tokens({"QANT_API_TOKEN": value})
        assert short not in str(raised.value)
        assert WRITE not in str(raised.value)


@pytest.mark.sqlite_only
def test_without_tokens_the_api_is_off(site: Settings) -> None:
    app = create_app(Context(site, env={}, secret=SECRET), None, drain=False)
    with TestClient(app) as test_client:
        assert test_client.get("/api/v1/subscribers", headers=auth()).status_code == 404
        assert test_client.get("/api/v1/openapi.json").status_code == 404


@pytest.mark.sqlite_only
def test_a_short_token_stops_serve_before_it_listens_and_is_never_shown(project: Path) -> None:
    env = _serve_env() | {"QANT_API_TOKEN": "write:tooshort-secret"}
    command = [sys.executable, "-m", "qant_mail", "serve", "--port", str(free_port())]
    done = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "QANT_API_TOKEN: entry 1" in done.stderr
    assert "tooshort-secret" not in done.stdout + done.stderr


# -- the OpenAPI document --------------------------------------------------------------


@pytest.mark.sqlite_only
def test_the_openapi_document_is_valid_openapi_3_1_and_names_every_route(
    client: TestClient,
) -> None:
    answer = client.get("/api/v1/openapi.json")  # no token needed
    assert answer.status_code == 200
    document = answer.json()
    # The OpenAPI Initiative's schema of 3.1 documents (spec.openapis.org/oas/3.1/schema/
    # 2022-10-07), kept in the tests so that they run offline.
    schema = json.loads((ROOT / "tests" / "openapi-3.1-schema.json").read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator(schema).validate(document)
    for component in document["components"]["schemas"].values():
        jsonschema.Draft202012Validator.check_schema(component)
    app = Api(Context(load_settings(ROOT / "qant.toml", env={})), [])
    routes = {
        pattern.pattern.replace("([^/]*)", "{id}").replace("([^/]+)", "{issue}"): set(methods)
        for pattern, methods in app.routes
    }
    documented = {
        path: {m.upper() for m in item if m != "parameters"}
        for path, item in document["paths"].items()
    }
    assert documented == routes


# -- the log ---------------------------------------------------------------------------


def _serve_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QANT_")}
    return env | {"QANT_SECRET_KEY": SECRET.decode(), "QANT_SMTP_SECURITY": "none"}


def _request(
    port: int, method: str, path: str, body: object = None, token: str | None = None
) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    try:
        data = None if body is None else json.dumps(body)
        connection.request(method, path, body=data, headers=headers)
        answer = connection.getresponse()
        answer.read()
        return answer.status
    finally:
        connection.close()


@pytest.mark.sqlite_only
@pytest.mark.parametrize("log_format", ["text", "json"])
def test_no_token_ever_appears_in_the_log_of_serve(project: Path, log_format: str) -> None:
    port = free_port()
    guess = "a-wrong-token-someone-tried-0123456789abcdef"
    env = _serve_env() | ENV
    (project / "empty-site").mkdir()
    command = [sys.executable, "-m", "qant_mail", "serve", "--archive", "empty-site"]
    command += ["--port", str(port), "--log-format", log_format]
    server = subprocess.Popen(
        command, cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        _wait_for(port, server)
        signup = {"email": "lea@example.com", "name": "Léa"}
        assert _request(port, "POST", "/api/v1/subscribers", signup, WRITE) == 202
        consented = {"email": "max@example.com", "confirmed": True, "consent": CONSENT}
        assert _request(port, "POST", "/api/v1/subscribers", consented, WRITE) == 201
        assert _request(port, "GET", "/api/v1/subscribers/1", token=READ) == 200
        assert _request(port, "GET", f"/api/v1/subscribers?email={READ}", token=READ) == 200
        assert _request(port, "DELETE", "/api/v1/subscribers/1", token=READ) == 403
        assert _request(port, "GET", "/api/v1/sends", token=guess) == 401
        assert _request(port, "GET", f"/api/v1/sends/{WRITE}", token=WRITE) == 404
        assert _request(port, "GET", "/api/v1/sends") == 401
    finally:
        server.terminate()
        out, err = server.communicate(timeout=30)
    whole = out + err
    assert "/api/v1/subscribers/1 " in out or '"/api/v1/subscribers/1"' in out
    assert "/api/v1/sends/…" in out
    assert "api_refused" in out
    for secret in (WRITE, READ, guess, WRITE[:16], READ[-16:], guess[:16]):
        assert secret not in whole
    assert "lea@" not in whole
    assert "max@" not in whole


def _wait_for(port: int, server: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert server.poll() is None, server.communicate()[1]
            assert time.monotonic() < deadline, "serve did not start"
            time.sleep(0.05)


# -- bad requests: the corpus, and a fuzzer --------------------------------------------


@pytest.fixture
def api_server(ctx: Context) -> Iterator[BackgroundServer]:
    """`serve` with its API, listening on loopback."""
    with BackgroundServer(create_app(ctx, None, drain=False)) as server:
        yield server


def exchange(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes; return the answer's status, headers and body."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        with contextlib.suppress(OSError):  # the server may answer before the body ends
            sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
            if b"\r\n\r\n" in answer and _complete(answer):
                break
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), headers, body


def _complete(answer: bytes) -> bool:
    head, _, body = answer.partition(b"\r\n\r\n")
    length = re.search(rb"(?i)content-length: (\d+)", head)
    return length is not None and len(body) >= int(length[1])


@pytest.mark.sqlite_only
def test_the_log_shows_of_an_api_path_its_resource_and_a_readers_number_only() -> None:
    shown = {
        "/api/v1/subscribers": "/api/v1/subscribers",
        "/api/v1/subscribers/42": "/api/v1/subscribers/42",
        f"/api/v1/subscribers/{WRITE}": "/api/v1/subscribers/…",
        "/api/v1/sends/2024-02-29": "/api/v1/sends/…",
        f"/api/v1/{WRITE}/1": "/api/v1/…/1",
        "/api/v1/subscribers/1/x/y": "/api/v1/subscribers/1/…",
        f"/API/V1/{WRITE}": "/api/…",
        f"/api/{WRITE}": "/api/…",
    }
    for path, expected in shown.items():
        assert serve_shown_path({"path": path, "query_string": b""}) == expected
    assert serve_shown_path({"path": "/api/v1/sends", "query_string": b"after=1"}) == (
        "/api/v1/sends?…"
    )


def test_the_api_corpus_is_all_exercised() -> None:
    files = {path.name.removesuffix(".http") for path in (BAD / "api").glob("*.http")}
    assert files == set(CASES)


@pytest.mark.parametrize(("name", "spec"), sorted(CASES.items()), ids=sorted(CASES))
def test_bad_api_requests_get_their_error_and_change_nothing(
    api_server: BackgroundServer, site: Settings, name: str, spec: dict[str, Any]
) -> None:
    with Subscribers.open(site.store_path) as store:
        store.import_rows("email\nreader@example.com\n", "test")
        before = list(store.all())
    raw = (BAD / "api" / f"{name}.http").read_bytes()
    raw = raw.replace(b"{token}", WRITE.encode()).replace(b"{read}", READ.encode())
    status, headers, body = exchange(api_server.port, raw)
    assert status == spec["status"], body
    if status < 500 and headers.get("content-type") == "application/problem+json":
        problem = json.loads(body)
        assert problem["status"] == status
        if "field" in spec:
            assert spec["field"] in [e["field"] for e in problem["errors"]], problem
    elif "field" in spec:
        raise AssertionError(f"{name}: no problem details: {body[:200]!r}")
    with Subscribers.open(site.store_path) as store:
        assert list(store.all()) == before
    alive, _, _ = exchange(api_server.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert alive == 200


TEXT = strategies.text(
    strategies.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=60
) | strategies.sampled_from(
    ["lea@example.com", "LEA@EXAMPLE.COM", "default", "finance", "x" * 1200, "a\r\nBcc: x@e"]
)
JSON_VALUE = strategies.recursive(
    strategies.none() | strategies.booleans() | strategies.integers() | strategies.floats() | TEXT,
    lambda inner: (
        strategies.lists(inner, max_size=4) | strategies.dictionaries(TEXT, inner, max_size=4)
    ),
    max_leaves=12,
)
CONSENTS = strategies.fixed_dictionaries(
    {},
    optional={
        "source": TEXT,
        "at": TEXT
        | strategies.sampled_from(
            ["2024-05-01T09:30:00Z", "2024-05-01", "9999-12-31T00:00:00+14:00"]
        ),
        "confirmed_at": TEXT,
        "ip": TEXT | strategies.sampled_from(["203.0.113.5", "::1", "1.2.3"]),
        "extra": JSON_VALUE,
    },
)
BODIES = (
    strategies.fixed_dictionaries(
        {},
        optional={
            "email": TEXT | JSON_VALUE,
            "name": TEXT | JSON_VALUE,
            "newsletters": strategies.lists(TEXT, max_size=3) | JSON_VALUE,
            "confirmed": strategies.booleans() | JSON_VALUE,
            "consent": CONSENTS | JSON_VALUE,
            "other": JSON_VALUE,
        },
    )
    | JSON_VALUE
)


class Still:
    """A clock that moves only when the test moves it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Clock:
    """A clock ten minutes further on at each look: no token bucket ever runs dry."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 600
        return self.now


@settings(
    max_examples=100,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(body=BODIES)
def test_fuzzed_creations_never_fail_and_mail_only_valid_addresses(
    ctx: Context, body: object
) -> None:
    transport = MemoryTransport()
    mailing = Context(ctx.settings, env=ENV, secret=SECRET, transport=transport)
    tokens = api_tokens(ENV)
    handler = Api(mailing, tokens, clock=Clock())
    request = ApiRequest(
        "POST",
        "/subscribers",
        authorization=f"Bearer {WRITE}",
        content_type="application/json",
        body=json.dumps(body).encode(),
    )
    answer = handler.handle(request)
    assert answer.status in (200, 201, 202, 400, 422, 429), answer.body
    json.dumps(answer.body, allow_nan=False)  # what the server will write
    mailing.outbox.drain()
    for _, address, data in transport.messages:
        assert "\r" not in address
        assert "\n" not in address
        assert data.count(b"\r\nTo: ") == 1
