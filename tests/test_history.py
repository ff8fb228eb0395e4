"""Sends as history (`qant-mail sends`), and when a running send will be done."""

from __future__ import annotations

import datetime as dt
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import Result

from qant_mail import pipeline
from qant_mail.config import Settings
from qant_mail.ledger import Ledger, State
from qant_mail.send import send_to_list
from qant_mail.subscribers import Subscribers
from qant_mail.tokens import SECRET_VARIABLE
from qant_mail.transport import SmtpTransport
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
    prepared = pipeline.prepare_send(second_issue(local), local)
    send_to_list(prepared, local, SmtpTransport(local, env={}))
    found = pipeline.history(local)
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
    assert table[0].split() == [
        *("issue", "started", "(UTC)", "finished", "readers", "sent", "failed", "unknown"),
        *("left", "bounced", "complaints", "unsubscribed"),
    ]
    assert table[1].split()[0] == "2023-11-20"
    assert table[1].split()[-8:] == ["3", "3", "0", "0", "0", "0", "0", "0"]
    data = json.loads(cli("sends", "--json").stdout)
    assert data[0]["issue"] == "2023-11-20"
    assert data[0]["counts"]["sent"] == 3
    assert data[0]["finished_at"] is not None


def test_a_running_send_says_when_it_should_be_done(local: Settings) -> None:
    subscribe(local, 30)
    ledger = Ledger(local.store_path)
    send_row = ledger.plan("2023-11-20", "hash", "Sujet")
    for position in range(1, 11):  # ten done within the last minute, twenty to go
        ledger.record(send_row, position, State.SENT, "250 ok")
    with ledger.lock("2023-11-20"):  # as a `send` running in another process holds it
        found = pipeline.status(local, "2023-11-20")
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
    found = pipeline.status(local, "2023-11-20")
    assert not found.running
    assert found.expected_finish is None
