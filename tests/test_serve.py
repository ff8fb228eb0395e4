"""The public application: one-click unsubscription over real HTTP, and the archive."""

from __future__ import annotations

import http.client
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from starlette.testclient import TestClient

from qant_mail.app.context import Context
from qant_mail.audience import tokens
from qant_mail.authoring.archive import build_archive
from qant_mail.base.config import Settings
from qant_mail.delivery.transport import MemoryTransport
from qant_mail.store.ledger import Ledger, State
from qant_mail.store.subscribers import Status, Subscribers
from qant_mail.web.serve import ONE_CLICK_DONE, create_app
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
    import subprocess
    import sys
    import time

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
