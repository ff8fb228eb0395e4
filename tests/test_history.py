"""Sends as history (`qant-mail sends`), and when a running send will be done."""

from __future__ import annotations

import datetime as dt
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import Result

from qant_mail.app import sending
from qant_mail.app.context import Context
from qant_mail.audience.tokens import SECRET_VARIABLE
from qant_mail.base.config import Settings
from qant_mail.delivery.transport import SmtpTransport
from qant_mail.store.ledger import Ledger, State
from qant_mail.store.subscribers import Subscribers
from tests.conftest import prepare_send, send_to_list
from tests.smtp_server import SmtpServer
from tests.test_send import SAMPLE, SECRET, send, subscribe

Cli = Callable[..., Result]


@pytest.fixture(autouse=True)
def secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRET_VARIABLE, SECRET)


def second_issue(settings: Settings) -> Path:
    """A copy of the sample under another name: a second issue to send."""
    path = settings.root / "issues" / "2023-11-27.yaml"
    shutil.copy(settings.root / SAMPLE, path)
    return path


def test_the_history_lists_each_send_latest_first_with_its_aftermath(
    local: Settings, smtp_server: SmtpServer
) -> None:
    readers = subscribe(local, 6)
    smtp_server.handler.answers[readers[5]] = ["550 5.1.1 user unknown"]
    send(local)
    store = Subscribers.open(local.store_path)
    store.unsubscribe(readers[0], "link")  # after the first send: counted against it
    store.close()
    prepared = prepare_send(second_issue(local), local)
    send_to_list(prepared, local, SmtpTransport(local, env={}))
    found = sending.history(Context(local)).sends
    assert [s.send.issue for s in found] == ["2023-11-27", "2023-11-20"]
    latest, first = found
    assert first.recipients == 6
    assert first.counts[State.SENT] == 5
    assert first.counts[State.FAILED] == 1
    assert first.unsubscribed == 1
    assert first.send.finished_at is None  # a failure is left for the operator to see
    # The second send went to the readers still active: not the one who left, not the
    # one whose address bounced.
    assert latest.recipients == 4
    assert latest.counts[State.SENT] == 4
    assert latest.unsubscribed == 0
    assert not latest.running


def test_sends_prints_a_table_and_json(local: Settings, smtp_server: SmtpServer, cli: Cli) -> None:
    subscribe(local, 3)
    assert cli("sends").stdout == "No send yet.\n"
    send(local)
    table = cli("sends").stdout.splitlines()
    zone = f"({local.newsletter.timezone})"  # the newsletter's, each time with its offset
    assert table[0].split() == [
        *("issue", "started", zone, "finished", zone, "readers", "sent", "failed", "unknown"),
        *("left", "bounced", "complaints", "unsubscribed", "carried", "by", "approved", "by"),
    ]
    relay = f"{smtp_server.host}:{smtp_server.port}"
    assert table[1].split()[0] == "2023-11-20"
    assert table[1].split()[-11:] == ["3", "3", "0", "0", "0", "0", "0", "0", relay, "3", "-"]
    data = json.loads(cli("sends", "--json").stdout)
    assert data[0]["issue"] == "2023-11-20"
    assert data[0]["counts"]["sent"] == 3
    assert data[0]["relays"] == {relay: 3}
    assert data[0]["finished_at"] is not None


def test_a_running_send_says_when_it_should_be_done(local: Settings) -> None:
    subscribe(local, 30)
    ledger = Ledger(local.store_path)
    send_row = ledger.plan("2023-11-20", "hash", "Sujet")
    for position in range(1, 11):  # ten done within the last minute, twenty to go
        ledger.record(send_row, position, State.SENT, "250 ok")
    if ledger.shared:  # a sender at work on another host
        ledger.join(send_row, "elsewhere:1")
        found = sending.status(Context(local), "2023-11-20")
        assert [(n, alive) for n, _, alive, _ in found.senders] == [("elsewhere:1", True)]
    else:
        with ledger.lock("2023-11-20"):  # as a `send` running in another process holds it
            found = sending.status(Context(local), "2023-11-20")
    ledger.close()
    assert found.running
    assert found.rate == pytest.approx(10 / 60)
    assert found.expected_finish is not None
    left = found.expected_finish - dt.datetime.now(dt.UTC)
    assert dt.timedelta(seconds=110) < left <= dt.timedelta(seconds=121)


def test_a_send_that_is_not_running_has_no_expected_finish(local: Settings) -> None:
    subscribe(local, 3)
    ledger = Ledger(local.store_path)
    send_row = ledger.plan("2023-11-20", "hash", "Sujet")
    ledger.record(send_row, 1, State.SENT, "250 ok")
    ledger.close()
    found = sending.status(Context(local), "2023-11-20")
    assert not found.running
    assert found.expected_finish is None


def test_catch_up_reaches_only_those_who_joined_since_and_only_once(
    local: Settings, smtp_server: SmtpServer
) -> None:
    first = subscribe(local, 4)
    send(local)
    store = Subscribers.open(local.store_path)
    store.unsubscribe(first[0], "link")  # gone since: not a new reader
    store.close()
    joined = subscribe(local, 3, prefix="new")
    prepared = prepare_send(local.root / SAMPLE, local)
    plain = send_to_list(prepared, local, SmtpTransport(local, env={}))
    assert plain.done[State.SENT] == 0  # a plain re-run serves nobody new
    assert plain.joined == 3
    caught_up = send_to_list(prepared, local, SmtpTransport(local, env={}), new_subscribers=True)
    assert caught_up.done[State.SENT] == 3
    assert caught_up.joined == 0
    again = send_to_list(prepared, local, SmtpTransport(local, env={}), new_subscribers=True)
    assert again.done[State.SENT] == 0
    assert smtp_server.handler.recipients() == dict.fromkeys([*first, *joined], 1)
    ledger = Ledger(local.store_path)
    found = ledger.find("2023-11-20")
    assert found is not None
    assert found.finished_at is not None  # closed again once the newcomers were served
    assert ledger.counts(found)[State.SENT] == 7
    ledger.close()


def test_send_says_who_joined_and_new_subscribers_needs_a_first_send(
    local: Settings, smtp_server: SmtpServer, cli: Cli
) -> None:
    subscribe(local, 2)
    env = {"QANT_SMTP_HOST": smtp_server.host, "QANT_SMTP_PORT": str(smtp_server.port)}

    def run(*args: str) -> Result:
        return cli("send", SAMPLE, "--yes", *args, env=env)

    refused = run("--new-subscribers")
    assert refused.exit_code == 2
    assert "has not been sent yet" in refused.stderr
    assert run().exit_code == 0
    subscribe(local, 2, prefix="new")
    nothing = run()
    assert "2 readers joined since this send was planned" in nothing.stdout
    assert "--new-subscribers" in nothing.stdout
    caught_up = run("--new-subscribers")
    assert caught_up.exit_code == 0, caught_up.stderr
    assert "2 not served yet, 2 of them joined since it was planned" in caught_up.stderr
    assert len(smtp_server.handler.received) == 4


def test_the_history_says_which_send_is_running_now(local: Settings) -> None:
    subscribe(local, 3)
    ledger = Ledger(local.store_path)
    send_row = ledger.plan("2023-11-20", "hash", "Sujet")
    assert [s.running for s in sending.history(Context(local)).sends] == [False]
    if ledger.shared:  # a sender at work on another host
        ledger.join(send_row, "elsewhere:1")
        summaries = sending.history(Context(local)).sends
    else:
        with ledger.lock("2023-11-20"):  # a `send` running in another process
            summaries = sending.history(Context(local)).sends
    ledger.close()
    assert [s.running for s in summaries] == [True]


@pytest.mark.postgresql_only
def test_two_senders_adding_the_new_readers_at_once_add_them_once(local: Settings) -> None:
    from concurrent.futures import ThreadPoolExecutor

    subscribe(local, 3)
    ledger = Ledger(local.store_path)
    send_row = ledger.plan("2023-11-20", "hash", "Sujet")
    ledger.close()
    subscribe(local, 50, prefix="late")

    def add() -> int:
        other = Ledger(local.store_path)
        try:
            return other.add_joined(send_row)
        finally:
            other.close()

    with ThreadPoolExecutor(max_workers=4) as pool:
        added = sorted(pool.map(lambda _: add(), range(4)))
    assert added == [0, 0, 0, 50]
