"""Readers who sign up by themselves: the form, double opt-in through a real SMTP server,
the welcome email, the reader's page, and the abuse a public form gets."""

from __future__ import annotations

import dataclasses
import email
import re
import time
from email import policy
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from starlette.testclient import TestClient

from qant_mail.app.context import Context
from qant_mail.audience import tokens
from qant_mail.base.config import Settings, Signup, load_settings
from qant_mail.base.errors import QantError
from qant_mail.store.db import IntegrityError, open_store
from qant_mail.store.subscribers import Status, Subscribers
from qant_mail.web.serve import create_app
from tests.browser import needs_chromium
from tests.smtp_server import SmtpServer

if TYPE_CHECKING:
    from playwright.sync_api import Browser

SECRET = b"the-site-secret-for-these-tests"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
FINANCE = """
[newsletters.finance]
name = "Qant Finance"
title = "Qant Finance"
description = "Chaque lundi."
welcome = "issues/welcome/finance.yaml"
"""
WELCOME = """\
date: 2024-01-08
newsletter: finance
subject: Bienvenue dans Qant Finance
sections:
  - text: "Merci de votre confiance."
"""


class Clock:
    """A clock the test moves."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def site(local: Settings, project: Path) -> Settings:
    """The project's settings with a second newsletter that has a welcome email, sending
    to the scripted SMTP server."""
    path = project / "qant.toml"
    path.write_text(path.read_text() + FINANCE, encoding="utf-8")
    (project / "issues" / "welcome" / "finance.yaml").write_text(WELCOME, encoding="utf-8")
    loaded = load_settings(path, env={})
    return dataclasses.replace(loaded, smtp=local.smtp)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def ctx(site: Settings, clock: Clock) -> Context:
    """The installation of `site`, on the test's clock."""
    return Context(site, secret=SECRET, clock=clock)


@pytest.fixture
def client(ctx: Context) -> TestClient:
    """The public application; what it queues is delivered when a test reads `mails`."""
    return TestClient(create_app(ctx, None, drain=False), follow_redirects=False)


def ask(client: TestClient, address: str, *newsletters: str, **extra: str) -> str:
    fields = [("email", address), ("form", "all"), ("website", "")]
    fields += [("newsletter", key) for key in newsletters or ("default",)]
    fields += list(extra.items())
    answer = client.post("/subscribe", data=_multi(fields), headers=FORM)
    assert answer.status_code == 200, answer.text
    return answer.text


def _multi(fields: list[tuple[str, str]]) -> dict[str, list[str] | str]:
    out: dict[str, list[str] | str] = {}
    for key, value in fields:
        if key in out:
            previous = out[key]
            out[key] = [*previous, value] if isinstance(previous, list) else [previous, value]
        else:
            out[key] = value
    return out


def mails(
    ctx: Context | None, server: SmtpServer, address: str
) -> list[email.message.EmailMessage]:
    """Deliver what the outbox of `ctx` holds (None: a server's worker does), then
    return what `address` received."""
    while ctx is not None and ctx.outbox.drain().tried:
        pass
    return [
        email.message_from_bytes(r.data, policy=policy.default)
        for r in server.handler.received
        if r.recipient == address
    ]


def confirm_link(message: email.message.EmailMessage) -> str:
    text = message.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    found = re.search(r"https://lettre\.qant\.example(/confirm/\S+)", text)
    assert found, text
    return found.group(1)


def test_the_form_works_without_javascript_and_sets_no_cookie(client: TestClient) -> None:
    page = client.get("/subscribe")
    assert page.status_code == 200
    assert "set-cookie" not in page.headers
    assert "<script" not in page.text
    assert 'name="newsletter" value="default" checked' in page.text
    assert 'name="newsletter" value="finance">' in page.text
    assert 'tabindex="-1"' in page.text  # the trap is out of the keyboard's way
    one = client.get("/subscribe/finance")
    assert 'type="hidden" name="newsletter" value="finance"' in one.text
    assert client.get("/subscribe/sport").status_code == 404


def test_signup_confirm_and_welcome_through_a_real_smtp_server(
    client: TestClient, ctx: Context, site: Settings, smtp_server: SmtpServer
) -> None:
    ask(client, "lea@example.com", "default", "finance", name="Léa")
    (confirmation,) = mails(ctx, smtp_server, "lea@example.com")
    assert confirmation["Subject"] == "Confirmez votre abonnement à Qant et Qant Finance"
    assert confirmation["Auto-Submitted"] == "auto-generated"
    link = confirm_link(confirmation)
    with Subscribers.open(site.store_path) as store:
        assert store.get("lea@example.com") is None  # nothing before the confirmation
    question = client.get(link)
    assert "Confirmer l’abonnement de lea@example.com à Qant et Qant Finance" in question.text
    assert len(mails(ctx, smtp_server, "lea@example.com")) == 1  # a GET confirms nothing
    done = client.post(link)
    assert "C’est confirmé" in done.text
    with Subscribers.open(site.store_path) as store:
        for key in ("default", "finance"):
            reader = store.of(key).get("lea@example.com")
            assert reader is not None
            assert reader.status is Status.ACTIVE
            assert reader.name == "Léa"
            consent = store.of(key).consent(reader.id)
            assert consent is not None
            assert consent.form == "all"
            assert consent.confirmed_at
    welcome = mails(ctx, smtp_server, "lea@example.com")[1:]
    assert [m["Subject"] for m in welcome] == ["Bienvenue dans Qant", "Bienvenue dans Qant Finance"]
    assert welcome[1]["List-Id"] == "Qant Finance <finance.lettre.qant.example>"
    # Twice is once: no second welcome.
    client.post(link)
    assert len(mails(ctx, smtp_server, "lea@example.com")) == 3


def test_the_answer_is_the_same_for_new_pending_and_subscribed_addresses(
    client: TestClient, site: Settings
) -> None:
    with Subscribers.open(site.store_path) as store:
        store.add("active@example.com")
    ask(client, "pending@example.com")
    answers = {
        ask(client, a) for a in ("new@example.com", "pending@example.com", "active@example.com")
    }
    assert len(answers) == 1


def test_a_thousand_requests_send_at_most_the_limits_worth_of_mails(
    site: Settings, smtp_server: SmtpServer, clock: Clock
) -> None:
    limits = Signup(per_address_per_day=3, per_client_per_hour=10)
    limited = dataclasses.replace(site, signup=limits)
    ctx = Context(limited, secret=SECRET, clock=clock)
    client = TestClient(create_app(ctx, None, drain=False))
    for _ in range(500):
        ask(client, "victim@example.com")
    assert len(mails(ctx, smtp_server, "victim@example.com")) == 3
    # From one client, many addresses: its hourly limit, counted over every request.
    clock.now += 3601
    for number in range(500):
        ask(client, f"reader{number}@example.com")
    mails(ctx, smtp_server, "victim@example.com")
    assert sum(1 for r in smtp_server.handler.received if r.recipient != "victim@example.com") <= 10
    # A day later, the address may be asked for again.
    clock.now += 86400
    ask(client, "victim@example.com")
    assert len(mails(ctx, smtp_server, "victim@example.com")) == 4


def test_the_trap_field_filled_in_sends_nothing_and_answers_the_same(
    client: TestClient, ctx: Context, smtp_server: SmtpServer
) -> None:
    same = ask(client, "bot@example.com")
    assert ask(client, "bot2@example.com", website="http://spam.example") == same
    assert len(mails(ctx, smtp_server, "bot@example.com")) == 1
    assert smtp_server.handler.recipients()["bot2@example.com"] == 0


def test_a_forged_or_expired_link_changes_nothing_and_names_nobody(
    client: TestClient, ctx: Context, site: Settings, smtp_server: SmtpServer, clock: Clock
) -> None:
    ask(client, "lea@example.com")
    link = confirm_link(mails(ctx, smtp_server, "lea@example.com")[0])
    token = link.rsplit("/", 1)[1]
    forged = [
        token[:-1] + ("A" if token[-1] != "A" else "B"),
        tokens.make_confirm(b"another secret, another site", 1, "lea@example.com", 2**40),
        tokens.make_confirm(SECRET, 1, "max@example.com", 2**40),  # another address
        "x",
        "%00",
    ]
    for bad in forged:
        answer = client.post(f"/confirm/{bad}")
        assert answer.status_code == 404
        assert "lea@example.com" not in answer.text
    clock.now += 48 * 3600 + 1
    expired = client.post(link)
    assert expired.status_code == 404
    assert "lea@example.com" not in expired.text
    with Subscribers.open(site.store_path) as store:
        assert store.get("lea@example.com") is None


def test_a_bad_form_is_said_on_the_form_and_sends_nothing(
    client: TestClient, smtp_server: SmtpServer
) -> None:
    bad = client.post(
        "/subscribe", data={"email": "not an address", "newsletter": "default"}, headers=FORM
    )
    assert bad.status_code == 400
    assert "n’est pas valide" in bad.text
    none = client.post(
        "/subscribe", data={"email": "a@example.com", "newsletter": "sport"}, headers=FORM
    )
    assert none.status_code == 400
    assert "Choisissez au moins une lettre" in none.text
    big = client.post("/subscribe", content=b"email=" + b"a" * 10_000, headers=FORM)
    assert big.status_code == 413
    assert not smtp_server.handler.received


def test_the_readers_page_leaves_one_newsletter_and_keeps_the_other(
    client: TestClient, site: Settings
) -> None:
    with Subscribers.open(site.store_path) as store:
        reader = store.add("lea@example.com")
        store.of("finance").add("lea@example.com")
    token = tokens.make(SECRET, reader.id, "lea@example.com", purpose=tokens.READER)
    page = client.get(f"/subscriptions/{token}")
    assert "Les lettres envoyées à l’adresse lea@example.com" in page.text
    assert page.text.count("Vous la recevez.") == 2
    left = client.post(
        f"/subscriptions/{token}", data={"newsletter": "finance", "action": "leave"}, headers=FORM
    )
    assert left.status_code == 303
    after = client.get(left.headers["location"])
    assert "C’est enregistré." in after.text
    with Subscribers.open(site.store_path) as store:
        assert store.get("lea@example.com").status is Status.ACTIVE  # type: ignore[union-attr]
        assert store.of("finance").get("lea@example.com").status is Status.UNSUBSCRIBED  # type: ignore[union-attr]
    client.post(
        f"/subscriptions/{token}", data={"newsletter": "finance", "action": "join"}, headers=FORM
    )
    with Subscribers.open(site.store_path) as store:
        assert store.of("finance").get("lea@example.com").status is Status.ACTIVE  # type: ignore[union-attr]
    # An unsubscribe token does not open the page, nor a page token unsubscribe.
    unsubscribe = tokens.make(SECRET, reader.id, "lea@example.com")
    assert client.get(f"/subscriptions/{unsubscribe}").status_code == 404
    assert (
        client.post(f"/unsubscribe/{token}", content=b"List-Unsubscribe=One-Click").status_code
        == 404
    )


def test_every_email_links_to_the_readers_page(site: Settings) -> None:
    from qant_mail.delivery.compose import Recipient
    from tests.conftest import SAMPLE, prepare_send

    prepared = prepare_send(SAMPLE, site, secret=SECRET)
    message = email.message_from_bytes(
        prepared.template.personalise(Recipient("lea@example.com", "", 7)), policy=policy.default
    )
    token = tokens.make(SECRET, 7, "lea@example.com", purpose=tokens.READER)
    for part in ("plain", "html"):
        body = message.get_body((part,)).get_content()  # type: ignore[union-attr]
        assert f"https://lettre.qant.example/subscriptions/{token}" in body


def test_unconfirmed_requests_are_deleted_once_expired(
    client: TestClient, site: Settings, clock: Clock
) -> None:
    ask(client, "lea@example.com")
    clock.now += 49 * 3600
    ask(client, "max@example.com")
    db = open_store(site.store_path)
    kept = [row[0] for row in db.execute("SELECT email FROM signups")]
    db.close()
    assert kept == ["max@example.com"]


@needs_chromium
def test_the_whole_flow_in_a_browser(
    browser: Browser, project: Path, local: Settings, smtp_server: SmtpServer
) -> None:
    """Subscribe on the form, confirm from the mail, get the welcome, leave one
    newsletter on the reader's page and keep the other; the next issue of each reaches
    exactly the right readers."""
    from qant_mail.delivery.transport import MemoryTransport
    from qant_mail.web.webserver import BackgroundServer
    from tests.conftest import SAMPLE, prepare_send, send_to_list
    from tests.smtp_server import free_port

    port = free_port()
    path = project / "qant.toml"
    text = path.read_text().replace("https://lettre.qant.example", f"http://127.0.0.1:{port}")
    path.write_text(text + FINANCE, encoding="utf-8")
    (project / "issues" / "welcome" / "finance.yaml").write_text(WELCOME, encoding="utf-8")
    site = dataclasses.replace(load_settings(path, env={}), smtp=local.smtp)
    with Subscribers.open(site.store_path) as store:
        store.of("finance").add("max@example.com")  # a reader of finance only
    with BackgroundServer(create_app(Context(site, secret=SECRET), None), port) as server:
        page = browser.new_page(viewport={"width": 375, "height": 740})
        page.goto(f"{server.url}subscribe")
        page.get_by_label("Votre adresse email").fill("lea@example.com")
        page.get_by_label("Qant Finance").check()
        page.get_by_role("button", name="S’abonner").click()
        page.wait_for_selector("text=Vérifiez votre boîte de réception")
        assert page.evaluate("document.documentElement.scrollWidth") <= 375
        # The mail leaves after the answer: wait for it.
        deadline = time.monotonic() + 10
        while not mails(None, smtp_server, "lea@example.com") and time.monotonic() < deadline:
            time.sleep(0.02)
        (confirmation,) = mails(None, smtp_server, "lea@example.com")
        text = confirmation.get_body(("plain",)).get_content()  # type: ignore[union-attr]
        link = re.search(r"http://127\.0\.0\.1:\d+/confirm/\S+", text)
        assert link, text
        page.goto(link.group(0))
        page.get_by_role("button", name="Confirmer mon abonnement").click()
        page.wait_for_selector("text=C’est confirmé")
        while (
            len(mails(None, smtp_server, "lea@example.com")) < 3
            and time.monotonic() < deadline + 10
        ):
            time.sleep(0.02)
        subjects = [m["Subject"] for m in mails(None, smtp_server, "lea@example.com")[1:]]
        assert subjects == ["Bienvenue dans Qant", "Bienvenue dans Qant Finance"]
        page.get_by_role("link", name="Gérer mes abonnements").click()
        page.get_by_role("button", name="Ne plus la recevoir : Qant Finance").click()
        page.wait_for_selector("text=C’est enregistré.")
        assert "La recevoir" in page.inner_text("body")
        page.close()
    transport = MemoryTransport()
    finance = project / "issues" / "2024-01-15-finance.yaml"
    finance.write_text(
        SAMPLE.read_text().replace("subject:", "newsletter: finance\nsubject:", 1), "utf-8"
    )
    send_to_list(prepare_send(SAMPLE, site, secret=SECRET), site, transport)
    send_to_list(prepare_send(finance, site, secret=SECRET), site, transport)
    got = sorted((r, b"Qant Finance" in data) for _, r, data in transport.messages)
    assert got == [("lea@example.com", False), ("max@example.com", True)]


@pytest.mark.sqlite_only  # the fault is injected with a SQLite trigger
def test_a_confirmation_subscribes_to_all_its_newsletters_or_to_none(site: Settings) -> None:
    from qant_mail.store.subscribers import Signups

    db = open_store(site.store_path)
    db.execute(
        "CREATE TRIGGER fail_finance BEFORE INSERT ON subscriptions"
        " WHEN NEW.newsletter = 'finance' BEGIN SELECT RAISE(ABORT, 'disk trouble'); END"
    )
    signups = Signups(db)
    number = signups.add("lea@example.com", "", ["default", "finance"], "all", "t", 2e9)
    assert number is not None
    pending = signups.get(number)
    assert pending is not None
    with pytest.raises(IntegrityError, match="disk trouble"):
        signups.confirm(pending, "all")
    assert Subscribers(db).get("lea@example.com") is None  # not half-subscribed
    again = signups.get(number)
    assert again is not None
    assert again.confirmed_at is None
    db.execute("DROP TRIGGER fail_finance")
    subscribed, first = signups.confirm(again, "all")
    assert first
    assert [s.status for s in subscribed] == [Status.ACTIVE, Status.ACTIVE]
    _, second = signups.confirm(again, "all")
    assert not second  # a second confirmation is no first one: no second welcome
    db.close()


def _post_form(port: int, fields: dict[str, str], client: str) -> int:
    """POST a signup form to the server on `port`, as `client` behind our proxy."""
    import http.client
    from urllib.parse import urlencode

    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        body = urlencode(fields)
        headers = {**FORM, "X-Forwarded-For": client}
        connection.request("POST", "/subscribe", body=body, headers=headers)
        return connection.getresponse().status
    finally:
        connection.close()


def _queued(ctx: Context) -> list[str]:
    from qant_mail.store.mailqueue import Mail, MailQueue

    with ctx.db() as db:
        return [e.recipient for e in MailQueue(db).entries([Mail.PENDING], limit=1000)]


def test_concurrent_floods_hold_each_signup_limit_exactly(site: Settings) -> None:
    """Requests that arrive together are counted one after the other: the limits hold
    as exactly under a flood from many clients at once as one request at a time."""
    from concurrent.futures import ThreadPoolExecutor

    from qant_mail.web.webserver import BackgroundServer

    limits = Signup(per_address_per_day=3, per_client_per_hour=10, trust_proxy=True)
    ctx = Context(dataclasses.replace(site, signup=limits), secret=SECRET)
    fields = {"email": "victim@example.com", "newsletter": "default", "form": "all"}
    with (
        BackgroundServer(create_app(ctx, None, drain=False)) as server,
        ThreadPoolExecutor(max_workers=24) as pool,
    ):
        # One address, from 120 clients at once: its daily limit.
        statuses = list(
            pool.map(
                lambda n: _post_form(server.port, fields, f"10.0.{n // 250}.{n % 250}"), range(120)
            )
        )
        assert set(statuses) == {200}
        assert _queued(ctx).count("victim@example.com") == 3

        # One client, 120 addresses at once: its hourly limit.
        def one(number: int) -> int:
            asked = {**fields, "email": f"reader{number}@example.com"}
            return _post_form(server.port, asked, "192.0.2.7")

        assert set(pool.map(one, range(120))) == {200}
    assert len([r for r in _queued(ctx) if r.startswith("reader")]) == 10


def test_concurrent_adds_of_one_address_make_one_reader(site: Settings) -> None:
    from concurrent.futures import ThreadPoolExecutor

    def add(_: int) -> str:
        with Subscribers.open(site.store_path) as store:
            try:
                return store.add("lea@example.com").status.value
            except QantError as err:
                return str(err)

    with ThreadPoolExecutor(max_workers=16) as pool:
        outcomes = list(pool.map(add, range(32)))
    assert outcomes.count("active") == 1
    assert all(o == "active" or "already subscribed" in o for o in outcomes)
    with Subscribers.open(site.store_path) as store:
        assert store.count()[Status.ACTIVE] == 1
