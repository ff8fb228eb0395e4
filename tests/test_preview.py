"""The live preview, in Debian's headless Chromium against a real server on loopback."""

from __future__ import annotations

import http.client
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from qant_mail.web.preview import Preview, create_app
from qant_mail.web.webserver import BackgroundServer
from tests.browser import needs_chromium
from tests.conftest import own_template
from tests.smtp_server import SmtpServer

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page


@pytest.fixture
def issue(project: Path) -> Path:
    return project / "issues" / "2023-11-20.yaml"


@pytest.fixture
def server(issue: Path, project: Path) -> Iterator[BackgroundServer]:
    preview = Preview(issue, project / "qant.toml")
    with BackgroundServer(create_app(preview)) as running:
        yield running


@pytest.fixture
def page(browser: Browser, server: BackgroundServer) -> Iterator[Page]:
    tab = browser.new_page(viewport={"width": 1280, "height": 900})
    tab.goto(server.url)
    tab.wait_for_function("document.body.dataset.version !== undefined")
    yield tab
    tab.close()


def raw_get(server: BackgroundServer, path: str) -> int:
    """GET `path` exactly as written (clients normalise "..")."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    connection.putrequest("GET", path, skip_host=True)
    connection.putheader("Host", f"127.0.0.1:{server.port}")
    connection.endheaders()
    status = connection.getresponse().status
    connection.close()
    return status


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    assert old in text
    path.write_text(text.replace(old, new, 1), encoding="utf-8")


@needs_chromium
def test_page_shows_the_email_at_desktop_and_phone_width(page: Page) -> None:
    assert page.locator("#subject").inner_text() == (
        "D’OpenAI à Kyutai, une question de gouvernance"
    )
    assert page.locator("#reading").inner_text().startswith("7 mn à lire")
    assert "sur 102,0 Ko" in page.locator("#size").inner_text()
    widths = page.evaluate(
        "[...document.querySelectorAll('iframe')].map(f => [f.id, f.clientWidth])"
    )
    assert widths == [["desktop", 600], ["phone", 375]]
    phone = page.frame_locator("#phone")
    phone.locator("p.kicker").first.wait_for()
    overflow = page.evaluate(
        """() => { const d = document.getElementById('phone').contentDocument;
                   return [d.documentElement.scrollWidth, d.documentElement.clientWidth]; }"""
    )
    assert overflow[0] <= overflow[1] <= 375
    page.click("#tab-text")
    assert "L’ÉVÉNEMENT" in page.locator("#text").inner_text()


@needs_chromium
def test_editing_the_issue_updates_the_page_within_a_second(page: Page, issue: Path) -> None:
    page.evaluate("window.notReloaded = true")
    edit(issue, "subject: \"D'OpenAI à Kyutai", 'subject: "Nouveau sujet : Kyutai')
    started = time.monotonic()
    page.wait_for_function(
        "document.getElementById('subject').textContent.startsWith('Nouveau sujet')",
        timeout=1000,
    )
    assert time.monotonic() - started < 1.0
    assert page.evaluate("window.notReloaded") is True
    page.wait_for_function(
        "document.getElementById('desktop').contentDocument.title.startsWith('Nouveau sujet')",
        timeout=2000,
    )


@needs_chromium
def test_scroll_position_survives_a_reload(page: Page, issue: Path) -> None:
    desktop = page.frame_locator("#desktop")
    desktop.locator("p.kicker").first.wait_for()
    page.evaluate("document.getElementById('desktop').contentWindow.scrollTo(0, 1500)")
    version = page.evaluate("document.body.dataset.version")
    edit(issue, "Sacré week-end pour OpenAI.", "Sacré, sacré week-end pour OpenAI.")
    page.wait_for_function(f"document.body.dataset.version !== '{version}'", timeout=2000)
    page.wait_for_function(
        "document.getElementById('desktop').dataset.version === document.body.dataset.version",
        timeout=2000,
    )
    scroll = page.evaluate("document.getElementById('desktop').contentWindow.scrollY")
    assert abs(scroll - 1500) < 5


@needs_chromium
def test_a_broken_file_shows_its_errors_and_recovers(page: Page, issue: Path) -> None:
    good = issue.read_text(encoding="utf-8")
    edit(issue, "      title: ", "      titel: ")  # the event's title, line 27
    overlay = page.locator("#overlay")
    overlay.wait_for(state="visible", timeout=2000)
    errors = page.locator("#errors").inner_text()
    assert "27:7: sections.3.event.titel: unknown key 'titel'; did you mean 'title'?" in errors
    assert "sections.3.event.title: required, but missing" in errors
    # The last good render stays underneath.
    assert page.locator("#subject").inner_text().startswith("D’OpenAI")
    issue.write_text(good, encoding="utf-8")
    overlay.wait_for(state="hidden", timeout=2000)
    issue.write_text("subject: [unclosed\n", encoding="utf-8")
    overlay.wait_for(state="visible", timeout=2000)
    assert page.locator("#errors").inner_text().startswith("2:1: (file): YAML syntax:")
    issue.write_text(good, encoding="utf-8")
    overlay.wait_for(state="hidden", timeout=2000)


@needs_chromium
def test_a_template_change_reloads_the_page(page: Page, project: Path) -> None:
    edit(own_template(project, "styles.css.j2"), "font-size: 30px", "font-size: 31px")
    page.frame_locator("#desktop").locator("h1.headline[style*='font-size: 31px']").wait_for(
        state="attached", timeout=2000
    )


def test_nothing_but_the_issue_folder_and_the_newsletters_pictures_is_served(
    server: BackgroundServer, project: Path
) -> None:
    (project / "issues" / "escape.png").symlink_to(project / "qant.toml")
    assert raw_get(server, "/assets/issue/2023-11-20/gouvernance-openai.png") == 200
    assert raw_get(server, "/assets/newsletter/assets/logo.png") == 200
    for path in (
        "/assets/issue/../../etc/passwd",
        "/assets/issue/%2e%2e/%2e%2e/etc/passwd",
        "/assets/issue/..%2f..%2fetc%2fpasswd",
        "/assets/issue//etc/passwd",
        "/assets/newsletter/qant.toml",
        "/assets/newsletter/data/subscribers.db",
        "/assets/newsletter/assets/../qant.toml",
        "/assets/issue/escape.png",
        "/assets/root/qant.toml",
        "/assets/issue/2023-11-20.yaml%00.png",
    ):
        assert raw_get(server, path) in (400, 404), path


def test_the_server_survives_any_file(server: BackgroundServer, issue: Path) -> None:
    for content in (b"", b"\xff\xfe\x00garbage", b"subject: S\nsections: [text: T]\n" * 3):
        issue.write_bytes(content)
        time.sleep(0.3)
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        connection.request("GET", "/state.json")
        state = json.loads(connection.getresponse().read())
        connection.close()
        assert state["errors"] >= 1
    issue.unlink()
    time.sleep(0.3)
    assert raw_get(server, "/") == 200
    assert raw_get(server, "/email.html") == 200  # the last good render


def test_other_hosts_and_forged_requests_are_refused(server: BackgroundServer) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    connection.request("GET", "/state.json", headers={"Host": "evil.example"})
    assert connection.getresponse().status == 400
    connection.close()
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    connection.request("POST", "/send-test", body='{"address": "x@example.com"}')
    assert connection.getresponse().status == 403
    connection.close()


@needs_chromium
def test_test_send_button_sends_the_current_render(
    browser: Browser,
    issue: Path,
    project: Path,
    smtp_server: SmtpServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("QANT_SMTP_HOST", smtp_server.host)
    monkeypatch.setenv("QANT_SMTP_PORT", str(smtp_server.port))
    monkeypatch.setenv("QANT_SMTP_SECURITY", "none")
    monkeypatch.setenv("QANT_SECRET_KEY", "a-secret-for-the-preview-test")
    preview = Preview(issue, project / "qant.toml")
    with BackgroundServer(create_app(preview)) as running:
        tab = browser.new_page()
        tab.goto(running.url)
        tab.fill("#address", "relecture@example.com")
        tab.click("#send button")
        tab.wait_for_function("document.getElementById('sent').textContent.startsWith('envoyé')")
        tab.close()
    (message,) = smtp_server.handler.received
    assert message.recipient == "relecture@example.com"
    assert b"[TEST]" in message.data.split(b"\r\n\r\n")[0].replace(b"=5B", b"[").replace(
        b"=5D", b"]"
    )
    assert os.environ["QANT_SMTP_SECURITY"] == "none"


def test_a_test_send_without_the_secret_says_what_to_do_in_the_pages_language(
    issue: Path, project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from qant_mail.web.preview import _send_test

    for name in ("QANT_SECRET_KEY", "QANT_SECRET_KEYS", "QANT_SECRET_KEY_FILE"):
        monkeypatch.delenv(name, raising=False)
    answer = _send_test(Preview(issue, project / "qant.toml"), "relecture@example.com")
    assert answer["ok"] is False
    assert answer["message"].startswith("QANT_SECRET_KEY n’est pas défini pour l’aperçu")
    assert "relancez qant-mail preview" in answer["message"]
