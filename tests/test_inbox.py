"""The local test inbox and the demo that sends the sample through it."""

from __future__ import annotations

import email
import smtplib
from collections.abc import Callable
from email import policy
from pathlib import Path

import pytest
from typer.testing import Result

from qant_mail.app.context import Context
from qant_mail.app.demo import run_demo
from qant_mail.base.config import Settings
from qant_mail.base.errors import ExitCode
from qant_mail.delivery.inbox import Inbox, InboxError

Cli = Callable[..., Result]


def test_inbox_stores_one_eml_per_recipient(tmp_path: Path) -> None:
    with Inbox(tmp_path / "inbox", port=0) as inbox:
        with smtplib.SMTP(inbox.host, inbox.port) as client:
            client.sendmail(
                "a@example.com",
                ["b@example.com", "c@example.com"],
                b"Subject: bonjour\r\n\r\nHello\r\n",
            )
        assert inbox.received == 2
    files = sorted((tmp_path / "inbox" / "new").glob("*.eml"))
    assert len(files) == 2
    message = email.message_from_bytes(files[0].read_bytes(), policy=policy.default)
    assert message["Subject"] == "bonjour"
    assert message["Return-Path"] == "<a@example.com>"
    assert {str(email.message_from_bytes(f.read_bytes())["Delivered-To"]) for f in files} == {
        "b@example.com",
        "c@example.com",
    }


def test_a_taken_port_is_a_clear_error(tmp_path: Path) -> None:
    with Inbox(tmp_path / "one", port=0) as first, pytest.raises(InboxError, match="in use"):
        Inbox(tmp_path / "two", port=first.port).start()


def test_demo_delivers_the_sample_to_the_demo_list(project_settings: Settings) -> None:
    result = run_demo(Context(project_settings), project_settings.issues_dir / "2023-11-20.yaml")
    assert result.report.exit_code == ExitCode.OK
    assert result.imported.added == 5
    assert [line for line, _ in result.imported.rejected] == [7]
    assert len(result.delivered) == 5
    recipients = set()
    for path in result.delivered:
        message = email.message_from_bytes(path.read_bytes(), policy=policy.default)
        assert message["Subject"] == "D’OpenAI à Kyutai, une question de gouvernance"
        assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        recipients.add(message["To"].addresses[0].addr_spec)
    assert "camille.lecteur@example.com" in recipients
    assert not Path(project_settings.store_path).exists()  # the real list is left alone


def test_demo_command_says_where_the_messages_are(cli: Cli) -> None:
    result = cli("demo")
    assert result.exit_code == ExitCode.OK, result.output
    assert "sent 5, deferred 0, failed 0" in result.stdout
    assert "5 messages delivered to the test inbox" in result.stdout
    assert "out/demo/inbox/new/" in result.stdout
