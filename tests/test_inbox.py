"""The local test inbox and the demo that sends the sample through it."""

from __future__ import annotations

import email
import shutil
import signal
import smtplib
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from email import policy
from pathlib import Path

import pytest
from typer.testing import Result

from qant_mail.app.context import Context
from qant_mail.app.demo import run_demo
from qant_mail.base.config import Settings
from qant_mail.base.errors import ExitCode
from qant_mail.delivery.inbox import Inbox, InboxError
from tests.smtp_server import free_port
from tests.test_serve import parse_log

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


def run_inbox(project: Path, log_format: str, deliver: Callable[[int, Path], None]) -> str:
    """Run `qant-mail inbox --log-format FORMAT` as its own process, `deliver` to it (given
    its port and folder), stop it with Ctrl-C; return its log (stdout)."""
    port = free_port()
    folder = project / "inbox"
    command = [sys.executable, "-m", "qant_mail", "inbox", "--port", str(port)]
    command += ["--folder", str(folder), "--log-format", log_format]
    inbox = subprocess.Popen(
        command, cwd=project, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                smtplib.SMTP("127.0.0.1", port, timeout=5).quit()
                break
            except OSError:
                assert inbox.poll() is None, "the inbox stopped"
                assert time.monotonic() < deadline, "the inbox did not start"
                time.sleep(0.05)
        deliver(port, folder)
    finally:
        inbox.send_signal(signal.SIGINT)
        out, err = inbox.communicate(timeout=30)
    assert "stopped; 3 messages received" in err, err
    return out


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_inbox_logs_each_message_with_its_envelope_size_and_files(
    log_format: str, project: Path
) -> None:
    first = b"Subject: one\r\n\r\nHello\r\n"
    second = b"Subject: two\r\n\r\n" + (b"x" * 70 + b"\r\n") * 20

    def deliver(port: int, folder: Path) -> None:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.sendmail("editor@example.com", ["b@example.com", "c@example.com"], first)
            client.sendmail("editor@example.com", ["d@example.com"], second)
            # The disk fails (tmp/ is no folder now): the message is refused, for later.
            shutil.rmtree(folder / "tmp")
            (folder / "tmp").write_text("not a folder")
            with pytest.raises(smtplib.SMTPDataError) as refused:
                client.sendmail("editor@example.com", ["e@example.com"], first)
            assert refused.value.smtp_code == 451

    out = run_inbox(project, log_format, deliver)
    messages = [entry for entry in parse_log(out, log_format) if entry["event"] == "message"]
    assert len(messages) == 3
    for entry in messages:
        assert set(entry) == {"time", "level", "event", "sender", "recipients", "bytes"} | {
            "stored",
            "reply",
        }
        assert entry["sender"] == "editor@example.com"
    one, two, refused = (Logged.of(m) for m in messages)
    assert (one.level, one.recipients, one.size) == (
        "info",
        ["b@example.com", "c@example.com"],
        len(first),
    )
    assert (two.recipients, two.size) == (["d@example.com"], len(second))
    assert len(one.stored) == 2
    assert len(two.stored) == 1
    assert {path.name for path in (project / "inbox" / "new").iterdir()} == {
        *one.stored,
        *two.stored,
    }
    assert one.reply.startswith("250 2.0.0 stored as ")
    assert (refused.level, refused.recipients, refused.stored) == ("warning", ["e@example.com"], [])
    assert refused.reply.startswith("451 4.3.0 ")


@dataclass(frozen=True)
class Logged:
    """A message as the inbox's log tells it, whichever the format."""

    level: str
    recipients: list[str]
    size: int
    stored: list[str]
    reply: str

    @classmethod
    def of(cls, entry: dict[str, object]) -> Logged:
        """Read a log entry (text shows a list as "a,b", and none as "-")."""

        def listed(value: object) -> list[str]:
            if isinstance(value, str):
                return [] if value == "-" else value.split(",")
            assert isinstance(value, list)
            return [str(item) for item in value]

        return cls(
            str(entry["level"]),
            listed(entry["recipients"]),
            int(str(entry["bytes"])),
            listed(entry["stored"]),
            str(entry["reply"]),
        )
