"""Counted links ([audience] count_clicks, off by default): each link of an issue goes
through base_url/l/ISSUE/N, which counts it and leads on; nothing is kept of who."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from email import message_from_bytes, policy
from email.message import EmailMessage

import pytest
from starlette.testclient import TestClient

from qant_mail.app import approval, issues, sending, stats
from qant_mail.app.context import Context
from qant_mail.audience.tokens import SECRET_VARIABLE
from qant_mail.base.config import Audience, Review, Settings
from qant_mail.delivery.transport import SmtpTransport
from qant_mail.store.clicks import Clicks
from qant_mail.store.db import open_store
from qant_mail.store.ledger import State
from qant_mail.web.serve import create_app, request_log
from tests.smtp_server import SmtpServer
from tests.test_send import SAMPLE, subscribe

SECRET = "a-test-secret-that-is-long-enough"
_HREF = re.compile(r'href="([^"]+)"')


@pytest.fixture(autouse=True)
def secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRET_VARIABLE, SECRET)


@pytest.fixture
def counting(local: Settings) -> Settings:
    return dataclasses.replace(local, audience=Audience(count_clicks=True))


def send(settings: Settings) -> None:
    ctx = Context(settings, transport=SmtpTransport(settings, env={}))
    report = sending.send(ctx, issues.prepare(ctx, settings.root / SAMPLE))
    assert report.done[State.SENT] > 0


def html_of(data: bytes) -> str:
    message = message_from_bytes(data, policy=policy.default)
    assert isinstance(message, EmailMessage)
    part = message.get_body(("html",))
    assert part is not None
    return str(part.get_content())


@pytest.fixture
def client(counting: Settings) -> Iterator[TestClient]:
    app = create_app(Context(counting, secret=SECRET.encode()), None, drain=False)
    with TestClient(app, follow_redirects=False) as test_client:
        yield test_client


def test_links_are_left_as_they_are_unless_counting_is_turned_on(
    local: Settings, smtp_server: SmtpServer
) -> None:
    subscribe(local, 1)
    send(local)
    links = _HREF.findall(html_of(smtp_server.handler.received[0].data))
    assert "https://kyutai.org/" in links
    assert not any("/l/" in link for link in links)
    db = open_store(local.store_path)
    try:
        assert Clicks(db).counts() == []
    finally:
        db.close()


def test_each_link_goes_through_its_counter_and_leads_where_it_did(
    counting: Settings, smtp_server: SmtpServer, client: TestClient
) -> None:
    subscribe(counting, 2)
    send(counting)
    base = counting.newsletter.base_url
    links = _HREF.findall(html_of(smtp_server.handler.received[0].data))
    counted = [link for link in links if link.startswith(f"{base}/l/2023-11-20/")]
    assert counted
    # Only a reader's own links (unsubscribe, their page) and mailto: stay as they are.
    others = {link for link in links if link not in counted}
    assert all(
        link.startswith(("mailto:", f"{base}/unsubscribe/", f"{base}/subscriptions/"))
        for link in others
    ), others
    first = counted[0].removeprefix(base)
    answer = client.get(first)
    assert answer.status_code == 302
    assert answer.headers["location"].startswith("https://")
    assert "set-cookie" not in answer.headers
    assert answer.headers["referrer-policy"] == "no-referrer"
    assert client.head(first).status_code == 302  # a link checker: not counted
    client.get(first)
    assert client.get("/l/2023-11-20/9999").status_code == 404
    assert client.get("/l/nothing/1").status_code == 404
    found = stats.stats(Context(counting))
    (news,) = found.newsletters
    (sent,) = news.sends
    assert sent.clicks == 2
    assert news.links[0].clicks == 2
    assert found.to_json()["newsletters"][0]["sends"][0]["clicks"] == 2


def test_nothing_of_who_followed_a_link_is_kept(
    counting: Settings, smtp_server: SmtpServer, client: TestClient
) -> None:
    subscribe(counting, 1)
    send(counting)
    client.get("/l/2023-11-20/1", headers={"X-Forwarded-For": "203.0.113.9"})
    db = open_store(counting.store_path)
    try:
        columns = {
            str(row[1])
            for row in db.execute("SELECT * FROM pragma_table_info('clicks')").fetchall()
        }
        assert columns == {"issue", "n", "day", "clicks"}
    finally:
        db.close()
    describe = request_log(counting)
    scope = {"type": "http", "path": "/l/2023-11-20/1", "query_string": b"", "headers": []}
    assert describe(scope) == ("/l/2023-11-20/1", "-")  # the log shows no client


def test_an_approval_names_the_message_with_its_counted_links(
    counting: Settings, smtp_server: SmtpServer
) -> None:
    reviewed = dataclasses.replace(counting, review=Review(required=True))
    subscribe(reviewed, 1)
    approval.approve(Context(reviewed), reviewed.root / SAMPLE, "Marie")
    send(reviewed)
    assert smtp_server.handler.recipients() == {"reader0@example.com": 1}


def test_a_test_send_is_not_counted(counting: Settings, smtp_server: SmtpServer) -> None:
    ctx = Context(counting, transport=SmtpTransport(counting, env={}))
    prepared = sending.prepare_test(ctx, counting.root / SAMPLE)
    sending.send_test(ctx, prepared, ["editor@example.com"])
    links = _HREF.findall(html_of(smtp_server.handler.received[0].data))
    assert not any("/l/" in link for link in links)
