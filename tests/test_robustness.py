"""What issue #9 found, each a test: a row that cannot be sent does not stall the rest,
one mailbox is one row, removal sticks, exports are inert, SIGTERM stops cleanly, failed
rows can be re-queued, and a store that cannot be written says so."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import smtplib
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from qant_mail.app import sending
from qant_mail.app.context import Context
from qant_mail.base.config import Settings
from qant_mail.base.errors import ExitCode
from qant_mail.delivery.inbox import Inbox
from qant_mail.delivery.transport import MaildirTransport
from qant_mail.store import schema
from qant_mail.store.db import StoreUnavailable, open_store
from qant_mail.store.ledger import Ledger, State
from qant_mail.store.subscribers import Status, SubscriberError, Subscribers
from tests.conftest import prepare_send
from tests.smtp_server import SmtpServer
from tests.test_send import (
    SAMPLE,
    cli_env,
    ledger_counts,
    run_cli,
    send,
    start_send,
    stopped_cleanly_by,
    subscribe,
    wait_until_received,
)

pytestmark = pytest.mark.usefixtures("secret")


@pytest.fixture
def secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QANT_SECRET_KEY", "a-test-secret-that-is-long-enough")


def test_an_international_domain_is_stored_and_sent_in_ascii(
    local: Settings, smtp_server: SmtpServer
) -> None:
    store = Subscribers.open(local.store_path)
    report = store.import_rows("email\nlea@bücher.example\nLEA@XN--BCHER-KVA.EXAMPLE\n", "t")
    store.close()
    assert (report.added, report.duplicates) == (1, 1)
    assert send(local).exit_code == ExitCode.OK
    assert smtp_server.handler.recipients() == {"lea@xn--bcher-kva.example": 1}


def test_a_row_that_cannot_be_composed_fails_alone(
    local: Settings, smtp_server: SmtpServer
) -> None:
    addresses = subscribe(local, 5)
    # A row from before addresses were checked this way, written behind the tool's back.
    with sqlite3.connect(local.store_path) as db:
        cursor = db.execute(
            "INSERT INTO subscribers (email, status_changed_at, created_at)"
            " VALUES ('jérôme@example.com', 'x', 'x')"
        )
        db.execute(
            "INSERT INTO subscriptions (subscriber_id, newsletter, status_changed_at,"
            " created_at) VALUES (?, 'default', 'x', 'x')",
            (cursor.lastrowid,),
        )
    report = send(local)
    assert report.exit_code == ExitCode.PARTIAL
    assert smtp_server.handler.recipients() == dict.fromkeys(addresses, 1)
    ledger = Ledger(local.store_path)
    found = ledger.find("2023-11-20")
    assert found is not None
    (failed,) = ledger.deliveries(found, State.FAILED)
    assert failed.email == "jérôme@example.com"
    assert "cannot be put in a To header" in failed.last_reply
    assert failed.attempts == 0


def test_a_removed_reader_is_not_brought_back_by_an_old_csv(tmp_path: Path) -> None:
    store = Subscribers.open(tmp_path / "s.db")
    store.import_rows("email\nlea@example.com\nmax@example.com\n", "first")
    store.remove("Lea@Example.com")
    report = store.import_rows("email\nlea@example.com\nmax@example.com\n", "old list")
    assert (report.added, report.suppressed) == (0, 1)
    assert store.get("lea@example.com") is None
    # Nothing of the address is kept in clear.
    assert isinstance(store.db, sqlite3.Connection)
    dump = "\n".join(store.db.iterdump())
    assert "lea@example.com" not in dump.lower()
    with pytest.raises(SubscriberError, match="removed from the list on request"):
        store.add("lea@example.com")
    assert store.add("lea@example.com", resubscribe=True).status is Status.ACTIVE
    store.close()


def test_an_export_holds_no_formula_and_imports_back_the_same(tmp_path: Path) -> None:
    store = Subscribers.open(tmp_path / "s.db")
    rows = (
        "email,name\na@example.com,=cmd|' /C calc'!A0\nb@example.com,+1+1\nc@example.com,@SUM(A1)\n"
    )
    store.import_rows(rows, "t")
    out = io.StringIO()
    store.export(out)
    exported = out.getvalue()
    for inert in (",'=cmd", ",'+1+1", ",'@SUM"):
        assert inert in exported
    again = Subscribers.open(tmp_path / "t.db")
    again.import_rows(exported, "round trip")
    assert [s.name for s in again.all()] == ["=cmd|' /C calc'!A0", "+1+1", "@SUM(A1)"]
    store.close()
    again.close()


def test_the_migration_folds_international_domains_into_one_row(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    old = sqlite3.connect(path)
    for step in schema.SQLITE[:2]:
        assert isinstance(step, str)
        old.executescript(step)
    old.execute("PRAGMA user_version = 2")
    old.executemany(
        "INSERT INTO subscribers (email, status, status_changed_at, created_at)"
        " VALUES (?, ?, 'x', 'x')",
        [
            ("lea@xn--bcher-kva.example", "active"),
            ("lea@bücher.example", "unsubscribed"),
            ("max@café.example", "active"),
        ],
    )
    old.commit()
    old.close()
    store = Subscribers(open_store(path))
    assert [(s.email, s.status.value) for s in store.all()] == [
        ("lea@xn--bcher-kva.example", "unsubscribed"),
        ("max@xn--caf-dma.example", "active"),
    ]
    store.close()


def test_sigterm_stops_a_send_like_ctrl_c(
    local: Settings, smtp_server: SmtpServer, project: Path
) -> None:
    stopped_cleanly_by(signal.SIGTERM, local, smtp_server, project)


def test_status_explains_rows_left_sending_by_a_killed_run(
    local: Settings, smtp_server: SmtpServer, project: Path
) -> None:
    subscribe(local, 40)
    smtp_server.handler.delay = 0.05
    env = cli_env(local, smtp_server)
    process = start_send(env, project)
    wait_until_received(smtp_server, 3)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    status = run_cli(["status", SAMPLE], env, project)
    assert status.returncode == ExitCode.OK
    assert "were in flight when a run stopped without finishing" in status.stderr
    assert "may arrive twice" in status.stderr


def test_failed_rows_are_requeued_by_reason_or_address_but_not_bounces(
    local: Settings, smtp_server: SmtpServer, project: Path
) -> None:
    addresses = subscribe(local, 5)
    answers = smtp_server.handler.answers
    answers[addresses[0]] = ["552 5.2.2 Mailbox full"]
    answers[addresses[1]] = ["552 5.2.2 Mailbox full"]
    answers[addresses[2]] = ["550 5.1.1 User unknown"]
    answers[addresses[3]] = ["554 5.7.1 Rejected as spam"]
    env = cli_env(local, smtp_server)
    first = run_cli(["send", SAMPLE, "--yes"], env, project)
    assert first.returncode == ExitCode.PARTIAL
    assert "2 × 552 5.2.2 Mailbox full" in first.stderr
    by_reason = run_cli(
        ["status", SAMPLE, "--requeue-failed", "--reason", "mailbox full"], env, project
    )
    assert "2 failed re-queued" in by_reason.stderr
    bounce = run_cli(
        ["status", SAMPLE, "--requeue-failed", "--address", addresses[2]], env, project
    )
    assert "0 failed re-queued" in bounce.stderr
    assert "the subscriber is bounced (--force sends it anyway)" in bounce.stderr
    assert run_cli(["send", SAMPLE, "--yes"], env, project).returncode == ExitCode.PARTIAL
    received = smtp_server.handler.recipients()
    assert received[addresses[0]] == received[addresses[1]] == 1
    forced = run_cli(
        ["status", SAMPLE, "--requeue-failed", "--address", addresses[2], "--force"], env, project
    )
    assert "1 failed re-queued" in forced.stderr
    assert run_cli(["send", SAMPLE, "--yes"], env, project).returncode == ExitCode.PARTIAL
    assert smtp_server.handler.recipients()[addresses[2]] == 1
    assert ledger_counts(local)[State.FAILED] == 1  # the spam refusal, left alone


def test_a_dry_run_after_the_real_send_composes_every_message(
    local: Settings, smtp_server: SmtpServer, tmp_path: Path
) -> None:
    subscribe(local, 4)
    send(local)
    ctx = Context(local)
    report = sending.dry_run(ctx, prepare_send(local.root / SAMPLE, local), tmp_path / "dry")
    assert report.done[State.SENT] == 4
    assert len(list((tmp_path / "dry" / "new").glob("*.eml"))) == 4
    assert ledger_counts(local)[State.SENT] == 4  # the real ledger is untouched


def test_a_limited_run_that_sent_its_share_exits_0(
    local: Settings, smtp_server: SmtpServer
) -> None:
    subscribe(local, 5)
    assert send(local, limit=2).exit_code == ExitCode.OK
    assert ledger_counts(local)[State.PENDING] == 3


# ---- a store that cannot be written ------------------------------------------------------


class Disk:
    """A small file system of our own (tmpfs), that a test can fill or make read-only."""

    def __init__(self, mount: Path) -> None:
        self.mount = mount

    def read_only(self) -> None:
        subprocess.run(["mount", "-o", "remount,ro", str(self.mount)], check=True)


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Disk]:
    """A 1 MB tmpfs; skipped, visibly, where mounting is not allowed."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    try:
        yield Disk(mount)
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def project_on(disk: Disk, project: Path) -> Path:
    """Write settings whose database lives on `disk`; return them."""
    settings = project / "qant.toml"
    text = settings.read_text().replace(
        'path = "data/subscribers.db"', f'path = "{disk.mount / "subscribers.db"}"'
    )
    settings.write_text(text)
    store = Subscribers.open(disk.mount / "subscribers.db")
    store.add("lea@example.com")
    store.close()
    return settings


def test_a_store_that_cannot_be_written_is_an_error_naming_it(disk: Disk, project: Path) -> None:
    settings = project_on(disk, project)
    disk.read_only()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "qant_mail",
            "--config",
            str(settings),
            "subscribers",
            "add",
            "m@x.fr",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == ExitCode.UNAVAILABLE, result.stderr
    assert "subscribers.db: cannot write the database: it is read-only" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_mail_alias_pipe_applies_the_request_or_asks_to_retry(
    disk: Disk, project: Path
) -> None:
    """As a user who can write the database (Postfix runs an alias's pipe as the owner
    of the alias file, README) the request is applied; when the database cannot be
    written, the exit status is EX_TEMPFAIL (75): the message waits in the mail queue
    instead of bouncing back to the reader."""
    settings = project_on(disk, project)
    message = b"From: Lea <lea@example.com>\nSubject: unsubscribe\n\n"
    command = [sys.executable, "-m", "qant_mail", "--config", str(settings)]
    command += ["subscribers", "unsubscribe", "--from-message"]
    done = subprocess.run(command, input=message, capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert b"lea@example.com: unsubscribed (mailto)" in done.stdout
    disk.read_only()
    again = subprocess.run(command, input=message, capture_output=True, timeout=60)
    assert again.returncode == 75, again.stderr
    assert b"try again later" in again.stderr


def test_a_full_disk_is_an_error_and_changes_nothing(disk: Disk) -> None:
    path = disk.mount / "subscribers.db"
    store = Subscribers.open(path)
    store.import_rows("email\nfirst@example.com\n", "t")
    ballast = disk.mount / "ballast"
    with ballast.open("wb", buffering=0) as out, contextlib.suppress(OSError):
        while out.write(b"x" * 4096):
            pass  # until the disk is full
    os.truncate(ballast, max(ballast.stat().st_size - 24 * 1024, 0))  # room for a little
    rows = "email,name\n" + "".join(f"r{n}@example.com,{'n' * 60}\n" for n in range(5000))
    with pytest.raises(StoreUnavailable, match="the disk is full"):
        store.import_rows(rows, "too many")
    assert [s.email for s in store.all()] == ["first@example.com"]
    store.close()


def test_the_local_inbox_answers_a_full_disk_with_a_temporary_452(disk: Disk) -> None:
    """A full disk is temporary: the sender keeps the message and tries again, and no
    copy is left for half of the recipients (all copies or none)."""
    line = b"texte " * 16 + b"\r\n"  # 98 bytes: 1,300 lines make a 127 kB message
    message = b"From: a@qant.example\r\nSubject: x\r\n\r\n" + line * 1300
    folder = disk.mount / "inbox"
    with Inbox(folder, port=0) as inbox:
        filler = disk.mount / "filler"
        _fill(filler, leaving=180 * 1024)  # room for one copy, not two
        with smtplib.SMTP("127.0.0.1", inbox.port, timeout=10) as client:
            with pytest.raises(smtplib.SMTPDataError) as refused:
                client.sendmail("a@qant.example", ["r1@example.com", "r2@example.com"], message)
            assert refused.value.smtp_code == 452
            assert "4.3.1" in str(refused.value.smtp_error)
        assert not any((folder / "new").iterdir())
        assert not any((folder / "tmp").iterdir())
        filler.unlink()
        with smtplib.SMTP("127.0.0.1", inbox.port, timeout=10) as client:
            client.sendmail("a@qant.example", ["r1@example.com", "r2@example.com"], message)
        assert len(list((folder / "new").iterdir())) == 2
    connection = MaildirTransport(folder).connect()
    _fill(filler, leaving=60 * 1024)
    reply = connection.send("a@qant.example", "r3@example.com", message)
    assert (reply.code, reply.text[:5]) == (452, "4.3.1")


def _fill(path: Path, *, leaving: int) -> None:
    """Write `path` so that its file system has `leaving` bytes left."""
    stats = os.statvfs(path.parent)
    path.write_bytes(b"\0" * (stats.f_bavail * stats.f_frsize - leaving))
