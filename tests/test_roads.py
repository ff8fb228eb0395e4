"""Every road out obeys the sending rules: the four defects of "One road out", each
reproduced first, in-process."""

from __future__ import annotations

import dataclasses
import datetime as dt
import email
import re
import time
import zoneinfo
from collections.abc import Callable, Iterator
from email import policy
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from starlette.testclient import TestClient
from typer.testing import Result

from qant_mail.app import pipeline
from qant_mail.authoring.render import Renderer
from qant_mail.base.config import Settings, load_settings
from qant_mail.delivery.transport import SmtpTransport
from qant_mail.store.subscribers import Subscribers
from qant_mail.web.serve import create_app
from tests.conftest import SAMPLE
from tests.smtp_server import ScriptedHandler, SmtpServer, free_port

SECRET = "a-test-secret-that-is-long-enough"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
FINANCE = """
[newsletters.finance]
name = "Qant Finance"
title = "Qant Finance"

[newsletters.finance.sender]
address = "finance@qant-finance.example"
"""


@pytest.fixture(autouse=True)
def secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QANT_SECRET_KEY", SECRET)
    for variable in ("QANT_DKIM_PRIVATE_KEY", "QANT_DKIM_ED25519_PRIVATE_KEY"):
        monkeypatch.delenv(variable, raising=False)
        monkeypatch.delenv(f"{variable}_FILE", raising=False)


def elsewhere(settings: Settings) -> SmtpTransport:
    """A transport to the test's SMTP server on loopback, counted as a relay elsewhere."""
    transport = SmtpTransport(settings, env={})
    transport.remote = True
    return transport


@pytest.mark.xfail(strict=True, reason="defect 1: run-due sends unsigned to a relay elsewhere")
def test_a_scheduled_send_to_a_relay_elsewhere_without_a_key_is_refused(
    local: Settings, smtp_server: SmtpServer
) -> None:
    with Subscribers.open(local.store_path) as store:
        for number in range(3):
            store.add(f"reader{number}@example.com")
    issue = local.root / "issues" / SAMPLE.name
    now = dt.datetime.now(dt.UTC)
    pipeline.schedule(issue, local, now + dt.timedelta(minutes=1), now=now)
    outcomes = pipeline.run_due(
        local, now=now + dt.timedelta(minutes=2), transport=elsewhere(local)
    )
    assert smtp_server.handler.received == []
    assert outcomes is not None
    (outcome,) = outcomes
    assert outcome.state == "failed"
    assert "DKIM" in outcome.message


@pytest.mark.xfail(strict=True, reason="defect 2: a second newsletter's envelope sender")
def test_a_second_newsletters_issue_leaves_with_an_envelope_on_its_own_domain(
    cli: Callable[..., Result], project: Path, smtp_server: SmtpServer
) -> None:
    path = project / "qant.toml"
    path.write_text(path.read_text() + FINANCE, encoding="utf-8")
    issue = project / "issues" / "2024-01-15-finance.yaml"
    text = SAMPLE.read_text(encoding="utf-8")
    issue.write_text(text.replace("subject:", "newsletter: finance\nsubject:", 1), "utf-8")
    with Subscribers.open(load_settings(path, env={}).store_path, "finance") as store:
        store.add("lea@example.com")
    env = {"QANT_SMTP_HOST": smtp_server.host, "QANT_SMTP_PORT": str(smtp_server.port)}
    assert cli("send", str(issue), "--yes", env=env).exit_code == 0
    assert cli("send", str(issue), "--to", "ed@example.com", env=env).exit_code == 0
    senders = {r.sender for r in smtp_server.handler.received}
    assert senders == {"finance@qant-finance.example"}


@pytest.fixture
def relay_later(local: Settings) -> Iterator[tuple[Settings, ScriptedHandler, Controller]]:
    """Settings whose relay is down until the test starts it."""
    port = free_port()
    smtp = local.smtp.model_copy(update={"port": port})
    handler = ScriptedHandler()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    yield dataclasses.replace(local, smtp=smtp), handler, controller
    if getattr(controller, "_thread", None) is not None:
        controller.stop()


def _messages(handler: ScriptedHandler, address: str) -> list[email.message.EmailMessage]:
    return [
        email.message_from_bytes(r.data, policy=policy.default)
        for r in handler.received
        if r.recipient == address
    ]


@pytest.mark.xfail(strict=True, reason="defect 3: a signup is lost when the relay is down")
def test_a_signup_made_while_the_relay_is_down_is_confirmed_once_it_is_back(
    relay_later: tuple[Settings, ScriptedHandler, Controller],
) -> None:
    settings, handler, controller = relay_later
    with TestClient(create_app(settings, None, SECRET.encode())) as client:
        answer = client.post(
            "/subscribe", data={"email": "lea@example.com", "newsletter": "default"}, headers=FORM
        )
        assert answer.status_code == 200
        controller.start()
        deadline = time.monotonic() + 20
        while not handler.received and time.monotonic() < deadline:
            time.sleep(0.05)
    assert [r.recipient for r in handler.received] == ["lea@example.com"]


@pytest.mark.xfail(strict=True, reason="defect 4: the welcome's date and its browser link")
def test_the_welcome_carries_the_day_it_is_sent_and_links_that_resolve(
    local: Settings, smtp_server: SmtpServer, tmp_path: Path
) -> None:
    from qant_mail.authoring.archive import build_archive

    site = tmp_path / "site"
    build_archive(local, site)
    with TestClient(create_app(local, site, SECRET.encode())) as client:
        client.post(
            "/subscribe", data={"email": "lea@example.com", "newsletter": "default"}, headers=FORM
        )
        deadline = time.monotonic() + 10
        while not _messages(smtp_server.handler, "lea@example.com") and (
            time.monotonic() < deadline
        ):
            time.sleep(0.05)
        (confirmation,) = _messages(smtp_server.handler, "lea@example.com")
        text = confirmation.get_body(("plain",)).get_content()  # type: ignore[union-attr]
        found = re.search(r"https://lettre\.qant\.example(/confirm/\S+)", text)
        assert found
        client.post(found.group(1))
        while len(_messages(smtp_server.handler, "lea@example.com")) < 2 and (
            time.monotonic() < deadline
        ):
            time.sleep(0.05)
        welcome = _messages(smtp_server.handler, "lea@example.com")[1]
        body = welcome.get_body(("plain",)).get_content()  # type: ignore[union-attr]
        assert "8 janvier 2024" not in body
        zone = zoneinfo.ZoneInfo(local.newsletter.timezone)
        today = Renderer(local).format_date(dt.datetime.now(zone).date())
        assert today in body
        html = welcome.get_body(("html",)).get_content()  # type: ignore[union-attr]
        links = set(re.findall(r'href="https://lettre\.qant\.example(/[^"]*)"', html))
        assert links
        for link in links:
            assert client.get(link).status_code == 200, link
