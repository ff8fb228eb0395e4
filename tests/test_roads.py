"""Every road out obeys the sending rules: the four defects of "One road out", each
reproduced in-process through the application layer, then every road walked with the
relay counted as elsewhere, without a key (each refuses) and with one (each signs)."""

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

import dkim as dkimpy
import pytest
from aiosmtpd.controller import Controller
from starlette.testclient import TestClient
from typer.testing import Result

from qant_mail.app import issues, sending
from qant_mail.app import schedule as schedules
from qant_mail.app.context import Context
from qant_mail.app.readers import Request, Signup
from qant_mail.audience import tokens
from qant_mail.authoring.render import Renderer
from qant_mail.base.config import Dkim, Settings, load_settings
from qant_mail.base.errors import SendError
from qant_mail.delivery import dkim
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
NOW = dt.datetime(2026, 12, 1, 7, 0, tzinfo=dt.UTC)


@pytest.fixture(autouse=True)
def secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QANT_SECRET_KEY", SECRET)
    for variable in (dkim.RSA_VARIABLE, dkim.ED25519_VARIABLE):
        monkeypatch.delenv(variable, raising=False)
        monkeypatch.delenv(f"{variable}_FILE", raising=False)


def elsewhere(settings: Settings) -> SmtpTransport:
    """A transport to the test's SMTP server on loopback, counted as a relay elsewhere."""
    transport = SmtpTransport(settings, env={})
    transport.remote = True
    return transport


def readers(settings: Settings, count: int = 3, newsletter: str = "default") -> None:
    with Subscribers.open(settings.store_path, newsletter) as store:
        for number in range(count):
            store.add(f"reader{number}@example.com")


# -- the four defects ----------------------------------------------------------------


def test_a_scheduled_send_to_a_relay_elsewhere_without_a_key_is_refused(
    local: Settings, smtp_server: SmtpServer
) -> None:
    readers(local)
    ctx = Context(local, transport=elsewhere(local))
    schedules.schedule(
        ctx, local.root / "issues" / SAMPLE.name, NOW + dt.timedelta(hours=1), now=NOW
    )
    outcomes = schedules.run_due(ctx, now=NOW + dt.timedelta(hours=2))
    assert smtp_server.handler.received == []
    assert outcomes is not None
    (outcome,) = outcomes
    assert outcome.state == "failed"
    assert "would not be DKIM-signed" in outcome.message


def test_a_second_newsletters_issue_leaves_with_an_envelope_on_its_own_domain(
    cli: Callable[..., Result], project: Path, smtp_server: SmtpServer
) -> None:
    path = project / "qant.toml"
    path.write_text(path.read_text() + FINANCE, encoding="utf-8")
    issue = project / "issues" / "2024-01-15-finance.yaml"
    text = SAMPLE.read_text(encoding="utf-8")
    issue.write_text(text.replace("subject:", "newsletter: finance\nsubject:", 1), "utf-8")
    readers(load_settings(path, env={}), 1, "finance")
    env = {"QANT_SMTP_HOST": smtp_server.host, "QANT_SMTP_PORT": str(smtp_server.port)}
    assert cli("send", str(issue), "--yes", env=env).exit_code == 0
    assert cli("send", str(issue), "--to", "ed@example.com", env=env).exit_code == 0
    senders = {r.sender for r in smtp_server.handler.received}
    assert senders == {"finance@qant-finance.example"}


def test_a_bounce_address_on_another_domain_is_set_aside_for_an_aligned_envelope(
    local: Settings,
) -> None:
    bounces = local.bounces.model_copy(update={"address": "bounces@qant.example"})
    path = local.path
    path.write_text(path.read_text() + FINANCE, encoding="utf-8")
    two = dataclasses.replace(load_settings(path, env={}), bounces=bounces, smtp=local.smtp)
    outbox = Context(two).outbox
    main, finance = outbox.rules(None), outbox.rules("finance")
    assert main.return_path(b"s" * 32, 1, 2).startswith("bounces+")
    assert main.return_path(b"s" * 32, 1, 2).endswith("@qant.example")
    assert finance.return_path(b"s" * 32, 1, 2) == "finance@qant-finance.example"
    assert "not on the domain" in finance.notes[0]


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


def _wait(found: Callable[[], bool], seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not found() and time.monotonic() < deadline:
        time.sleep(0.02)


def test_a_signup_made_while_the_relay_is_down_is_confirmed_once_it_is_back(
    relay_later: tuple[Settings, ScriptedHandler, Controller],
) -> None:
    settings, handler, controller = relay_later
    ctx = Context(settings)
    with TestClient(create_app(ctx, None)) as client:
        answer = client.post(
            "/subscribe", data={"email": "lea@example.com", "newsletter": "default"}, headers=FORM
        )
        assert answer.status_code == 200
        # Queued before the answer, tried, and waiting for the relay.
        _wait(lambda: sending.queue(ctx).waiting.last_reply != "")
        assert "Connection refused" in sending.queue(ctx).waiting.last_reply
        controller.start()
        _wait(lambda: bool(handler.received))
    assert [r.recipient for r in handler.received] == ["lea@example.com"]
    assert sending.queue(ctx).waiting.total == 0


def test_run_due_delivers_what_waits_in_the_outbox(
    relay_later: tuple[Settings, ScriptedHandler, Controller],
) -> None:
    settings, handler, controller = relay_later
    ctx = Context(settings)
    signup = Signup(ctx)
    signup.request(signup.validate("lea@example.com", "", ["default"], "all", "1.2.3.4", ""))
    assert schedules.run_due(ctx) == []  # the relay is down: it waits
    assert sending.queue(ctx).waiting.total == 1
    controller.start()
    later = Context(settings, clock=lambda: time.time() + 3600)  # past its backoff
    assert schedules.run_due(later) == []
    assert [r.recipient for r in handler.received] == ["lea@example.com"]


def test_the_welcome_carries_the_day_it_is_sent_and_links_that_resolve(
    local: Settings, smtp_server: SmtpServer, tmp_path: Path
) -> None:
    site = issues.build_archive(Context(local), tmp_path / "site").folder
    with TestClient(create_app(Context(local), site)) as client:
        client.post(
            "/subscribe", data={"email": "lea@example.com", "newsletter": "default"}, headers=FORM
        )
        _wait(lambda: bool(_messages(smtp_server.handler, "lea@example.com")))
        (confirmation,) = _messages(smtp_server.handler, "lea@example.com")
        text = confirmation.get_body(("plain",)).get_content()  # type: ignore[union-attr]
        found = re.search(r"https://lettre\.qant\.example(/confirm/\S+)", text)
        assert found
        client.post(found.group(1))
        _wait(lambda: len(_messages(smtp_server.handler, "lea@example.com")) == 2)
        welcome = _messages(smtp_server.handler, "lea@example.com")[1]
        body = welcome.get_body(("plain",)).get_content()  # type: ignore[union-attr]
        assert "8 janvier 2024" not in body
        zone = zoneinfo.ZoneInfo(local.newsletter.timezone)
        assert Renderer(local).format_date(dt.datetime.now(zone).date()) in body
        html = welcome.get_body(("html",)).get_content()  # type: ignore[union-attr]
        links = set(re.findall(r'href="https://lettre\.qant\.example(/[^"]*)"', html))
        assert links
        for link in links:
            assert client.get(link).status_code == 200, link


# -- every road, walked --------------------------------------------------------------

ROADS = ["list", "test", "scheduled", "confirmation", "welcome", "preview"]


def _walk(road: str, ctx: Context, issue: Path) -> None:
    """Send something down `road`, as its users do."""
    if road == "list":
        sending.send(ctx, issues.prepare(ctx, issue))
    elif road == "test":
        sending.send_test(ctx, sending.prepare_test(ctx, issue), ["editor@example.com"])
    elif road == "scheduled":
        schedules.schedule(ctx, issue, NOW + dt.timedelta(hours=1), now=NOW)
        outcomes = schedules.run_due(ctx, now=NOW + dt.timedelta(hours=2))
        assert outcomes is not None
        for outcome in outcomes:
            if outcome.state == "failed":
                raise SendError(outcome.message)
    elif road in ("confirmation", "welcome"):
        signup = Signup(ctx)
        request = Request("lea@example.com", "", ("default",), "all", "1.2.3.4")
        signup.request(request)
        ctx.outbox.drain()
        if road == "welcome":
            with ctx.db() as db:
                number = int(db.execute("SELECT max(id) FROM signups").fetchone()[0])
            expires = int(ctx.clock() + 3600)
            with ctx.db() as db:
                db.execute("UPDATE signups SET expires_at = $1 WHERE id = $2", (expires, number))
            token = tokens.make_confirm(ctx.secret(), number, "lea@example.com", expires)
            assert signup.confirm(token) is not None
            ctx.outbox.drain()
    elif road == "preview":
        from qant_mail.web.preview import Preview, _send_test

        answer = _send_test(Preview(issue, ctx.settings.path), "editor@example.com")
        if not answer["ok"]:
            raise SendError(answer["message"])


@pytest.mark.parametrize("road", ROADS)
def test_every_road_refuses_to_send_unsigned_to_a_relay_elsewhere(
    road: str, local: Settings, smtp_server: SmtpServer, project: Path
) -> None:
    readers(local)
    # The preview reads the settings file: its relay is elsewhere there, by name.
    path = project / "qant.toml"
    path.write_text(
        path.read_text().replace('host = "127.0.0.1"', 'host = "relay.elsewhere.example"')
    )
    ctx = Context(local, transport=elsewhere(local))
    issue = local.root / "issues" / SAMPLE.name
    if road in ("confirmation", "welcome"):
        _walk(road, ctx, issue)
        # Left in the queue, untouched, for a host that can sign them.
        assert "would not be DKIM-signed" in ctx.outbox.drain().left["default"]
        waiting = sending.queue(ctx).waiting.by_kind
        assert waiting == ({"confirm": 1, "welcome": 1} if road == "welcome" else {"confirm": 1})
    else:
        with pytest.raises(SendError, match="would not be DKIM-signed"):
            _walk(road, ctx, issue)
    assert smtp_server.handler.received == []


@pytest.fixture(scope="module")
def rsa_key() -> tuple[bytes, str]:
    return dkim.generate("rsa")


@pytest.mark.parametrize("road", ROADS)
def test_every_road_signs_with_the_key_when_there_is_one(
    road: str,
    local: Settings,
    smtp_server: SmtpServer,
    project: Path,
    rsa_key: tuple[bytes, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    readers(local)
    pem, public = rsa_key
    monkeypatch.setenv(dkim.RSA_VARIABLE, pem.decode())
    path = project / "qant.toml"
    path.write_text(path.read_text() + '\n[dkim]\nselector = "road2026"\n')
    monkeypatch.setenv("QANT_SMTP_PORT", str(smtp_server.port))  # the preview's settings
    signed = dataclasses.replace(local, dkim=Dkim(selector="road2026"))
    ctx = Context(signed, transport=elsewhere(signed))
    _walk(road, ctx, signed.root / "issues" / SAMPLE.name)
    received = smtp_server.handler.received
    assert received
    record = dkim.dns_record("rsa", public).encode()

    def lookup(name: bytes, timeout: int = 5) -> bytes:
        assert name == b"road2026._domainkey.qant.example."
        return record

    for message in received:
        assert message.data.startswith(b"DKIM-Signature:")
        assert dkimpy.DKIM(message.data).verify(dnsfunc=lookup), road
        assert message.sender.endswith("@qant.example")
