"""The public application: one-click unsubscription over real HTTP, and the archive."""

from __future__ import annotations

import datetime as dt
import http.client
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from email import message_from_bytes, policy
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from starlette.routing import Route
from starlette.testclient import TestClient

from qant_mail.app.context import Context
from qant_mail.audience import tokens
from qant_mail.authoring.archive import build_archive
from qant_mail.base.config import Settings
from qant_mail.delivery.transport import MemoryTransport
from qant_mail.store.ledger import Ledger, State
from qant_mail.store.subscribers import Status, Subscribers
from qant_mail.web.serve import ONE_CLICK_DONE, TOKEN_PATHS, create_app, shown_path
from qant_mail.web.webserver import BackgroundServer
from tests.browser import needs_chromium
from tests.conftest import prepare_send, send_to_list
from tests.smtp_server import SmtpServer

if TYPE_CHECKING:
    from playwright.sync_api import Browser

SECRET = b"the-site-secret-for-these-tests"
ONE_CLICK = {"Content-Type": "application/x-www-form-urlencoded"}


@pytest.fixture
def people(project_settings: Settings) -> dict[str, int]:
    with Subscribers.open(project_settings.store_path) as store:
        store.import_rows("email,name\nlea@example.com,Léa\nmax@example.com,Max\n", "test")
        return {s.email: s.id for s in store.all()}


@pytest.fixture
def client(project_settings: Settings, people: dict[str, int]) -> Iterator[TestClient]:
    site = build_archive(project_settings, project_settings.output_dir / "archive").folder
    app = create_app(Context(project_settings, secret=SECRET), site)
    with TestClient(app, follow_redirects=False) as test_client:
        yield test_client


def link(people: dict[str, int], email: str, secret: bytes = SECRET) -> str:
    return f"/unsubscribe/{tokens.make(secret, people[email], email)}"


def one_click(port: int, subscriber_id: int, email: str) -> int:
    """POST a one-click unsubscription of `email` to the server on `port`; its status."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request(
            "POST",
            f"/unsubscribe/{tokens.make(SECRET, subscriber_id, email)}",
            body="List-Unsubscribe=One-Click",
            headers=ONE_CLICK,
        )
        return connection.getresponse().status
    finally:
        connection.close()


def status_of(settings: Settings, email: str) -> tuple[Status, str]:
    with Subscribers.open(settings.store_path) as store:
        found = store.get(email)
    assert found is not None
    return found.status, found.status_reason


def test_get_shows_the_address_and_never_unsubscribes(
    client: TestClient, people: dict[str, int], project_settings: Settings
) -> None:
    for _ in range(3):  # link scanners may follow it several times
        response = client.get(link(people, "lea@example.com"))
        assert response.status_code == 200
        assert "lea@example.com" in response.text
        assert "<button" in response.text
        assert 'lang="fr"' in response.text
    assert status_of(project_settings, "lea@example.com") == (Status.ACTIVE, "")


def test_one_click_post_unsubscribes_at_once(
    client: TestClient, people: dict[str, int], project_settings: Settings
) -> None:
    response = client.post(
        link(people, "lea@example.com"), content="List-Unsubscribe=One-Click", headers=ONE_CLICK
    )
    assert response.status_code == 200
    assert response.text == ONE_CLICK_DONE
    assert "set-cookie" not in response.headers
    assert status_of(project_settings, "lea@example.com") == (Status.UNSUBSCRIBED, "one-click")
    assert status_of(project_settings, "max@example.com") == (Status.ACTIVE, "")


def test_the_page_button_unsubscribes_with_reason_page(
    client: TestClient, people: dict[str, int], project_settings: Settings
) -> None:
    response = client.post(link(people, "max@example.com"), data={"confirm": "page"})
    assert response.status_code == 200
    assert "C’est fait" in response.text
    assert status_of(project_settings, "max@example.com") == (Status.UNSUBSCRIBED, "page")


def test_doing_it_twice_is_harmless(
    client: TestClient, people: dict[str, int], project_settings: Settings
) -> None:
    url = link(people, "lea@example.com")
    first = client.post(url, content="List-Unsubscribe=One-Click", headers=ONE_CLICK)
    again = client.post(url, data={"confirm": "page"})
    assert (first.status_code, again.status_code) == (200, 200)
    assert status_of(project_settings, "lea@example.com") == (Status.UNSUBSCRIBED, "one-click")
    assert "C’est fait" in client.get(url).text


def test_bad_tokens_get_one_answer_that_names_nobody(
    client: TestClient, people: dict[str, int], project_settings: Settings
) -> None:
    good = tokens.make(SECRET, people["lea@example.com"], "lea@example.com")
    number, mac = good.split(".")
    altered = mac[:-1] + ("A" if mac[-1] != "A" else "B")
    bad = [
        f"{number}.{altered}",  # altered signature
        good[:-4],  # truncated
        tokens.make(b"someone else's secret!", people["lea@example.com"], "lea@example.com"),
        tokens.make(tokens.SAMPLE_SECRET, people["lea@example.com"], "lea@example.com"),
        tokens.make(SECRET, 999, "lea@example.com"),  # nobody
        tokens.make(SECRET, people["max@example.com"], "lea@example.com"),  # someone else
        "bGVhQGV4YW1wbGUuY29t",  # an older format: the address in base64
        "AQ",
        "%00",
    ]
    answers = set()
    for token in bad:
        page = client.get(f"/unsubscribe/{token}")
        post = client.post(
            f"/unsubscribe/{token}", content="List-Unsubscribe=One-Click", headers=ONE_CLICK
        )
        assert (page.status_code, post.status_code) == (404, 404), token
        assert "example.com" not in page.text
        answers.add(page.text)
    assert len(answers) == 1
    assert status_of(project_settings, "lea@example.com") == (Status.ACTIVE, "")
    assert status_of(project_settings, "max@example.com") == (Status.ACTIVE, "")


def test_a_send_in_progress_skips_who_unsubscribed(
    client: TestClient,
    people: dict[str, int],
    project_settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("QANT_SECRET_KEY", SECRET.decode())
    prepared = prepare_send(project_settings.issues_dir / "2023-11-20.yaml", project_settings)
    transport = MemoryTransport()
    send_to_list(prepared, project_settings, transport, limit=0)  # planned, nothing sent
    client.post(
        link(people, "max@example.com"), content="List-Unsubscribe=One-Click", headers=ONE_CLICK
    )
    report = send_to_list(prepared, project_settings, transport)
    assert [recipient for _, recipient, _ in transport.messages] == ["lea@example.com"]
    assert report.done[State.SKIPPED] == 1
    # The unsubscribe link in the message works against this very application.
    (_, _, data) = transport.messages[0]
    url = data.split(b"List-Unsubscribe:\r\n <", 1)[1].split(b">", 1)[0].decode()
    path = url.removeprefix(project_settings.newsletter.base_url)
    assert (
        client.post(path, content="List-Unsubscribe=One-Click", headers=ONE_CLICK).status_code
        == 200
    )
    assert status_of(project_settings, "lea@example.com")[0] is Status.UNSUBSCRIBED
    ledger = Ledger(project_settings.store_path)
    found = ledger.find("2023-11-20")
    assert found is not None
    assert ledger.counts(found)[State.SENT] == 1


def test_a_hundred_concurrent_unsubscribes_are_all_recorded(project_settings: Settings) -> None:
    with Subscribers.open(project_settings.store_path) as store:
        rows = "email\n" + "".join(f"reader{n}@example.com\n" for n in range(100))
        store.import_rows(rows, "test")
        ids = {s.email: s.id for s in store.all()}
    app = create_app(Context(project_settings, secret=SECRET), None)
    with BackgroundServer(app) as server, ThreadPoolExecutor(max_workers=100) as pool:
        statuses = list(pool.map(lambda e: one_click(server.port, ids[e], e), ids))
    assert statuses == [200] * 100
    with Subscribers.open(project_settings.store_path) as store:
        counts = store.count()
        assert counts[Status.UNSUBSCRIBED] == 100
        assert counts[Status.ACTIVE] == 0
        if store.db.dialect == "sqlite":
            assert store.db.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_health_check(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}


def test_archive_is_served(client: TestClient) -> None:
    index = client.get("/")
    assert index.status_code == 200
    assert "D’OpenAI à Kyutai" in index.text
    issue = client.get("/2023-11-20/")
    assert issue.status_code == 200
    assert client.get("/2023-11-20/images/gouvernance-openai.png").status_code == 200
    assert client.get("/feed.xml").status_code == 200
    assert client.get("/../qant.toml").status_code == 404


@needs_chromium
def test_confirmation_page_in_a_browser(
    browser: Browser, project_settings: Settings, people: dict[str, int]
) -> None:
    app = create_app(Context(project_settings, secret=SECRET), None)
    with BackgroundServer(app) as server:
        page = browser.new_page(viewport={"width": 375, "height": 700})
        page.goto(server.url.rstrip("/") + link(people, "lea@example.com"))
        assert "Ne plus recevoir Qant à l’adresse lea@example.com" in page.inner_text("body")
        assert page.evaluate("document.documentElement.scrollWidth") <= 375
        page.click("button")
        page.wait_for_selector("text=C’est fait")
        page.close()
    assert status_of(project_settings, "lea@example.com") == (Status.UNSUBSCRIBED, "page")


def test_serve_needs_the_secret(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from qant_mail.cli import app

    monkeypatch.chdir(project)
    monkeypatch.delenv("QANT_SECRET_KEY", raising=False)
    result = CliRunner().invoke(app, ["serve", "--port", "0"])
    assert result.exit_code == 1
    assert "QANT_SECRET_KEY is not set" in result.stderr


def test_mailto_unsubscription_from_a_message(
    project: Path,
    people: dict[str, int],
    project_settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from typer.testing import CliRunner

    from qant_mail.cli import app

    monkeypatch.chdir(project)
    message = (
        b"From: Max <max@example.com>\r\nTo: unsubscribe@qant.example\r\n"
        b"Subject: unsubscribe\r\n\r\n"
    )
    result = CliRunner().invoke(
        app, ["subscribers", "unsubscribe", "--from-message"], input=message
    )
    assert result.exit_code == 0, result.output
    assert status_of(project_settings, "max@example.com") == (Status.UNSUBSCRIBED, "mailto")


@pytest.mark.postgresql_only
def test_a_hundred_unsubscribes_to_two_serve_processes_during_a_send(
    project: Path, project_settings: Settings, smtp_server: SmtpServer
) -> None:
    """Two `serve` processes (as behind a proxy, on their own host) write to the store a
    send on another host uses: each reader who unsubscribed before their turn is skipped."""
    from tests.smtp_server import free_port

    with Subscribers.open(project_settings.store_path) as store:
        rows = "email\n" + "".join(f"reader{n:03}@example.com\n" for n in range(200))
        store.import_rows(rows, "test")
        ids = {s.email: s.id for s in store.all()}
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("QANT_")}
    env |= {
        "QANT_CONFIG": str(project / "qant.toml"),
        "QANT_SECRET_KEY": SECRET.decode(),
        "QANT_SMTP_HOST": smtp_server.host,
        "QANT_SMTP_PORT": str(smtp_server.port),
        "QANT_SMTP_SECURITY": "none",
        "QANT_SMTP_CONNECTIONS": "2",
    }
    (project / "empty-site").mkdir()
    ports = [free_port(), free_port()]
    command = [sys.executable, "-m", "qant_mail", "serve", "--archive", "empty-site"]
    servers = [
        subprocess.Popen([*command, "--port", str(port)], cwd=project, env=env) for port in ports
    ]
    try:
        for port in ports:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                try:
                    connection.request("GET", "/healthz")
                    if connection.getresponse().status == 200:
                        break
                except OSError:
                    time.sleep(0.1)
                finally:
                    connection.close()
        smtp_server.handler.hold_after = 6  # the send waits, mid-way, while they leave
        sender = subprocess.Popen(
            [sys.executable, "-m", "qant_mail", "send", "issues/2023-11-20.yaml", "--yes"],
            cwd=project,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 30
        while len(smtp_server.handler.received) < 6 and time.monotonic() < deadline:
            time.sleep(0.01)
        leaving = [f"reader{n:03}@example.com" for n in range(100, 200)]
        with ThreadPoolExecutor(max_workers=50) as pool:
            statuses = list(  # half to each server
                pool.map(
                    lambda n_e: one_click(ports[n_e[0] % 2], ids[n_e[1]], n_e[1]),
                    enumerate(leaving),
                )
            )
        assert statuses == [200] * 100
        smtp_server.handler.release.set()
        _, err = sender.communicate(timeout=120)
        assert sender.returncode == 0, err
    finally:
        for server in servers:
            server.terminate()
            server.wait(timeout=30)
    received = smtp_server.handler.recipients()
    assert not set(received) & set(leaving)
    assert received == dict.fromkeys((f"reader{n:03}@example.com" for n in range(100)), 1)
    ledger = Ledger(project_settings.store_path)
    found = ledger.find("2023-11-20")
    assert found is not None
    assert ledger.counts(found)[State.SKIPPED] == 100
    ledger.close()


def test_a_store_that_cannot_be_used_answers_503_and_names_nothing(
    project_settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A store whose folder is a file: it cannot even be created.
    (tmp_path / "blocked").write_text("not a folder")
    broken = Context(project_settings, secret=SECRET, store=tmp_path / "blocked" / "s.db")
    client = TestClient(create_app(broken, None, drain=False))
    token = tokens.make(SECRET, 1, "lea@example.com")
    for method, path in (("GET", f"/unsubscribe/{token}"), ("POST", f"/unsubscribe/{token}")):
        answer = client.request(method, path, content=b"List-Unsubscribe=One-Click")
        assert answer.status_code == 503
        assert answer.headers["retry-after"] == "60"
        assert "Traceback" not in answer.text
        assert "blocked" not in answer.text
    assert client.get("/healthz").status_code == 503
    assert "blocked" in caplog.text  # the operator's log says which store
    assert token not in caplog.text


# ---- the log --------------------------------------------------------------------------

PASSWORD = "right password"  # the scripted SMTP server's login
NEWCOMER = "new.reader@example.com"
_PAIR = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')


def parse_log(output: str, log_format: str) -> list[dict[str, object]]:
    """Return each line of a log as a dict: JSON as it is; text as time, level, event and
    its key=value pairs (or its message)."""
    entries: list[dict[str, object]] = []
    for line in output.splitlines():
        if log_format == "json":
            entries.append(json.loads(line))
            continue
        when, level, event, rest = [*line.split(" ", 3), ""][:4]
        entry: dict[str, object] = {"time": when, "level": level.lower(), "event": event}
        for key, value in _PAIR.findall(rest):
            entry[key] = json.loads(value) if value.startswith('"') else value
        entries.append(entry)
    for entry in entries:
        assert dt.datetime.fromisoformat(str(entry["time"])).utcoffset() == dt.timedelta(0)
    return entries


def serve_and_visit(
    project: Path, smtp_server: SmtpServer, log_format: str, visit: Callable[[int], None]
) -> tuple[str, str]:
    """Run `qant-mail serve --log-format FORMAT` as its own process, `visit` it (given its
    port), stop it as systemd does; return what it wrote on stdout and stderr."""
    from tests.smtp_server import free_port

    env = {k: v for k, v in os.environ.items() if not k.startswith("QANT_")}
    env |= {
        "QANT_SECRET_KEY": SECRET.decode(),
        "QANT_SMTP_HOST": smtp_server.host,
        "QANT_SMTP_PORT": str(smtp_server.port),
        "QANT_SMTP_SECURITY": "none",
        "QANT_SMTP_USERNAME": "qant",
        "QANT_SMTP_PASSWORD": PASSWORD,
    }
    (project / "empty-site").mkdir(exist_ok=True)
    port = free_port()
    command = [sys.executable, "-m", "qant_mail", "serve", "--archive", "empty-site"]
    command += ["--port", str(port), "--log-format", log_format]
    server = subprocess.Popen(
        command, cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 30
        while True:  # listening: a connection without a request, which is not logged
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert server.poll() is None, "serve stopped"
                assert time.monotonic() < deadline, "serve did not start"
                time.sleep(0.05)
        visit(port)
    finally:
        server.terminate()
        out, err = server.communicate(timeout=30)
    return out, err


def request(
    port: int, method: str, path: str, body: str = "", headers: dict[str, str] | None = None
) -> tuple[int, str]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request(method, path, body=body or None, headers=headers or {})
        answer = connection.getresponse()
        return answer.status, answer.read().decode()
    finally:
        connection.close()


@pytest.mark.sqlite_only
@pytest.mark.parametrize("log_format", ["text", "json"])
def test_serve_logs_each_request_with_no_token_secret_or_readers_address(
    log_format: str, project: Path, people: dict[str, int], smtp_server: SmtpServer
) -> None:
    lea = tokens.make(SECRET, people["lea@example.com"], "lea@example.com")
    max_ = tokens.make(SECRET, people["max@example.com"], "max@example.com")
    seen: list[str] = [lea, max_]  # every token the server was shown

    def visit(port: int) -> None:
        assert request(port, "GET", f"/unsubscribe/{lea}")[0] == 200
        one_click = "List-Unsubscribe=One-Click"
        assert request(port, "POST", f"/unsubscribe/{max_}", one_click, ONE_CLICK)[0] == 200
        form = f"email={NEWCOMER}&name=Nina&form=all&website=&newsletter=default"
        assert request(port, "POST", "/subscribe", form, ONE_CLICK)[0] == 200
        deadline = time.monotonic() + 30
        while not smtp_server.handler.recipients()[NEWCOMER]:  # the confirmation
            assert time.monotonic() < deadline, "no confirmation was sent"
            time.sleep(0.05)
        (mail,) = (
            message_from_bytes(r.data, policy=policy.default) for r in smtp_server.handler.received
        )
        text = mail.get_body(("plain",)).get_content()  # type: ignore[union-attr]
        confirm = re.search(r"/confirm/([\w.-]+)", text)
        assert confirm is not None
        assert request(port, "GET", f"/confirm/{confirm[1]}")[0] == 200
        status, page = request(port, "POST", f"/confirm/{confirm[1]}")
        reader = re.search(r"/subscriptions/([\w.-]+)", page)
        assert status == 200
        assert reader is not None
        seen.extend([confirm[1], reader[1]])
        assert request(port, "GET", f"/subscriptions/{reader[1]}?saved=1")[0] == 200
        assert request(port, "GET", "/subscribe?email=lea%40example.com")[0] == 200
        # A mangled link, and a client that says it is someone else (no proxy is trusted).
        forged = {"X-Forwarded-For": "203.0.113.9"}
        assert request(port, "GET", f"/Unsubscribe/{lea}/", headers=forged)[0] == 404
        assert request(port, "GET", "/max@example.com")[0] == 404

    out, err = serve_and_visit(project, smtp_server, log_format, visit)
    entries = parse_log(out, log_format)
    requests = [e for e in entries if e["event"] == "request"]
    assert [(e["method"], e["path"], int(str(e["status"]))) for e in requests] == [
        ("GET", "/unsubscribe/…", 200),
        ("POST", "/unsubscribe/…", 200),
        ("POST", "/subscribe", 200),
        ("GET", "/confirm/…", 200),
        ("POST", "/confirm/…", 200),
        ("GET", "/subscriptions/…?…", 200),
        ("GET", "/subscribe?…", 200),
        ("GET", "/Unsubscribe/…", 404),
        ("GET", "/…@example.com", 404),
    ]
    for entry in requests:
        assert set(entry) == {"time", "level", "event", "method", "path", "status"} | {
            "duration_ms",
            "client",
        }
        assert entry["level"] == "info"
        assert entry["client"] == "127.0.0.1"
        assert 0 <= float(str(entry["duration_ms"])) < 30_000
    whole = out + err
    for secret in [*seen, SECRET.decode(), PASSWORD]:
        assert secret not in whole
    for address in ("lea@", "lea%40", "max@", NEWCOMER, "new.reader%40"):
        assert address not in whole
    assert "203.0.113.9" not in whole


def test_the_log_shows_paths_without_token_or_query() -> None:
    shown = {
        "/unsubscribe/AAAAAQ.xxxx": "/unsubscribe/…",
        "/confirm/AQ.yyyy": "/confirm/…",
        "/subscriptions/AQ.finance.zzzz": "/subscriptions/…",
        "/UNSUBSCRIBE/AQ.xxxx/": "/UNSUBSCRIBE/…",
        "/archive/unsubscribe/AQ.xxxx": "/archive/unsubscribe/…",
        "/2023-11-20/images/gouvernance-openai.png": "/2023-11-20/images/gouvernance-openai.png",
        "/subscribe/finance": "/subscribe/finance",
    }
    for path, expected in shown.items():
        assert shown_path({"path": path, "query_string": b""}) == expected
    assert shown_path({"path": "/subscribe", "query_string": b"email=a%40b.fr"}) == "/subscribe?…"


def test_every_route_that_takes_a_token_is_hidden_in_the_log(project_settings: Settings) -> None:
    app = create_app(Context(project_settings, secret=SECRET), None, drain=False)
    taking = [r.path for r in app.routes if isinstance(r, Route) and "{token}" in r.path]
    assert taking
    for path in taking:
        assert path.startswith(TOKEN_PATHS), path
