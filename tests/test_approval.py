"""Approval of exactly what goes out: `approve` names an issue's message (its render,
composed, before personalisation) by a digest; with [review] required a send to the list
goes only if its message is that one; and each reader's copy is made again, byte for
byte, from the message its send kept."""

from __future__ import annotations

import dataclasses
import datetime as dt
import email
import json
import re
import time
from collections.abc import Callable
from email import policy
from pathlib import Path

import pytest
from typer.testing import Result

from qant_mail.app import approval, issues, schedule, sending
from qant_mail.app.context import Context
from qant_mail.audience.tokens import SECRET_VARIABLE
from qant_mail.base.config import Review, Settings, load_settings
from qant_mail.base.errors import ExitCode, SendError
from qant_mail.delivery import dkim
from qant_mail.delivery.outbox import SendReport
from qant_mail.delivery.transport import SmtpTransport
from qant_mail.store.ledger import State
from tests.smtp_server import SmtpServer
from tests.test_send import SAMPLE, subscribe

SECRET = "a-test-secret-that-is-long-enough"
Cli = Callable[..., Result]


@pytest.fixture(autouse=True)
def secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRET_VARIABLE, SECRET)


@pytest.fixture
def reviewed(local: Settings) -> Settings:
    """The project's settings with [review] required, sending to the scripted server."""
    return dataclasses.replace(local, review=Review(required=True))


def context(settings: Settings) -> Context:
    return Context(settings, transport=SmtpTransport(settings, env={}))


def send(settings: Settings, **options: object) -> SendReport:
    ctx = context(settings)
    return sending.send(ctx, issues.prepare(ctx, settings.root / SAMPLE), **options)  # type: ignore[arg-type]


def edit(settings: Settings, old: str, new: str) -> None:
    path = settings.root / SAMPLE
    text = path.read_text(encoding="utf-8")
    assert old in text
    path.write_text(text.replace(old, new, 1), encoding="utf-8")


def test_a_send_to_the_list_waits_for_an_approval_and_names_the_command(
    reviewed: Settings, smtp_server: SmtpServer
) -> None:
    subscribe(reviewed, 3)
    with pytest.raises(SendError, match=r"not approved.*qant-mail approve"):
        send(reviewed)
    assert smtp_server.handler.received == []
    approval.approve(context(reviewed), reviewed.root / SAMPLE, "Marie (rédactrice en chef)")
    report = send(reviewed)
    assert report.done[State.SENT] == 3


def test_an_edit_after_the_approval_stops_the_send_and_points_at_diff(
    reviewed: Settings, smtp_server: SmtpServer
) -> None:
    subscribe(reviewed, 3)
    approval.approve(context(reviewed), reviewed.root / SAMPLE, "Marie")
    edit(reviewed, "Kyutai", "Kyutaï")
    with pytest.raises(SendError, match=r"changed since Marie approved it.*diff approved:"):
        send(reviewed)
    assert smtp_server.handler.received == []


def test_yaml_that_changes_only_in_layout_keeps_its_approval(
    reviewed: Settings, smtp_server: SmtpServer
) -> None:
    subscribe(reviewed, 2)
    approval.approve(context(reviewed), reviewed.root / SAMPLE, "Marie")
    path = reviewed.root / SAMPLE
    path.write_text("# relu par Marie\n" + path.read_text(encoding="utf-8"), encoding="utf-8")
    assert send(reviewed).done[State.SENT] == 2


def test_a_test_send_needs_no_approval(reviewed: Settings, smtp_server: SmtpServer) -> None:
    ctx = context(reviewed)
    tested = sending.send_test(ctx, sending.prepare_test(ctx, reviewed.root / SAMPLE), ["a@ex.com"])
    assert not tested.failed
    assert smtp_server.handler.recipients() == {"a@ex.com": 1}


def test_a_scheduled_send_waits_for_an_approval_too(
    reviewed: Settings, smtp_server: SmtpServer
) -> None:
    # The rule is the outbox's: every road to the list applies it, run-due's too.
    subscribe(reviewed, 2)
    ctx = context(reviewed)
    now = dt.datetime.now(dt.UTC)
    schedule.schedule(ctx, reviewed.root / SAMPLE, now + dt.timedelta(minutes=5), now=now)
    outcomes = schedule.run_due(ctx, now=now + dt.timedelta(minutes=6))
    assert outcomes is not None
    assert smtp_server.handler.received == []
    assert [o.state for o in outcomes] == ["failed"]
    assert "not approved" in outcomes[0].message


def test_a_newsletter_of_its_own_may_require_no_review(
    project: Path, reviewed: Settings, smtp_server: SmtpServer
) -> None:
    relaxed = dataclasses.replace(
        reviewed,
        newsletter=reviewed.newsletter.model_copy(update={"review_required": False}),
    )
    assert relaxed.review_required is False
    assert reviewed.review_required is True
    subscribe(relaxed, 1)
    assert send(relaxed).done[State.SENT] == 1


def test_status_and_sends_say_who_approved_what_and_when(
    cli: Cli, project: Path, local: Settings, smtp_server: SmtpServer
) -> None:
    with (project / "qant.toml").open("a", encoding="utf-8") as settings_file:
        settings_file.write("\n[review]\nrequired = true\n")
    env = {
        "QANT_SMTP_HOST": smtp_server.host,
        "QANT_SMTP_PORT": str(smtp_server.port),
        "QANT_SMTP_SECURITY": "none",
    }
    subscribe(load_settings(project / "qant.toml", env={}), 2)
    before = cli("status", SAMPLE, env=env)
    assert "not approved: `qant-mail approve" in before.stdout
    refused = cli("send", SAMPLE, "--yes", env=env)
    assert refused.exit_code == ExitCode.INVALID
    assert "error: 2023-11-20 is not approved" in refused.stderr
    approved = cli("approve", SAMPLE, "--by", "Marie Curie", env=env)
    assert approved.exit_code == ExitCode.OK, approved.output
    assert re.search(
        r"2023-11-20: approved by Marie Curie .*\(message [0-9a-f]{12}", approved.stdout
    )
    assert cli("send", SAMPLE, "--yes", env=env).exit_code == ExitCode.OK
    status = cli("status", SAMPLE, env=env)
    assert "approved by Marie Curie" in status.stdout
    history = cli("sends", env=env)
    assert "approved by" in history.stdout
    assert "Marie Curie" in history.stdout
    listed = cli("sends", "--json", env=env)
    assert '"approver": "Marie Curie"' in listed.stdout


def test_an_approval_needs_a_name_and_an_issue_without_errors(cli: Cli, project: Path) -> None:
    unnamed = cli("approve", SAMPLE, "--by", "  ")
    assert unnamed.exit_code == ExitCode.INVALID
    assert unnamed.stderr.startswith("error: --by")
    missing = cli("approve", "issues/nothing.yaml", "--by", "Marie")
    assert missing.exit_code == ExitCode.INVALID
    assert "Traceback" not in missing.output


def test_a_readers_copy_is_made_again_byte_for_byte_but_the_signatures_timestamp(
    cli: Cli,
    project: Path,
    local: Settings,
    smtp_server: SmtpServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pem, _ = dkim.generate("rsa")
    monkeypatch.setenv(dkim.RSA_VARIABLE, pem.decode())
    signed = dataclasses.replace(local, dkim=local.dkim.model_copy(update={"selector": "s1"}))
    addresses = subscribe(signed, 5)
    # Sent in two runs: the second goes on with the first run's message and date.
    assert send(signed, limit=2).done[State.SENT] == 2
    time.sleep(1.1)  # the second run is prepared a second later: its own Date at first
    assert send(signed).done[State.SENT] == 3
    received = {r.recipient: r.data for r in smtp_server.handler.received}
    dates = {email.message_from_bytes(d, policy=policy.default)["Date"] for d in received.values()}
    assert len(dates) == 1
    env = {"QANT_DKIM_SELECTOR": "s1"}
    for address in addresses:
        copy = cli("sends", "show", SAMPLE, "--eml", address, "-o", f"{address}.eml", env=env)
        assert copy.exit_code == ExitCode.OK, copy.output
        made = (project / f"{address}.eml").read_bytes()
        assert without_signature_times(made) == without_signature_times(received[address])
    stranger = cli("sends", "show", SAMPLE, "--eml", "nobody@example.com", env=env)
    assert stranger.exit_code == ExitCode.INVALID
    assert "nobody@example.com is not among the readers" in stranger.stderr


def without_signature_times(message: bytes) -> bytes:
    """The message with each DKIM signature's t= and b= (which depend on the second it
    was made) blanked."""
    message = re.sub(rb"t=\d+;", b"t=;", message)
    return re.sub(rb"b=[A-Za-z0-9+/=\r\n\t ]+(?=\r\n[^\t ])", b"b=", message)


def test_an_editor_approves_without_the_secret_or_the_keys_that_the_send_uses(
    reviewed: Settings, smtp_server: SmtpServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The digest leaves out the signatures and each reader's links: the editor-in-chief
    # approves on a machine that holds neither the signing keys nor the links' secret.
    signed = dataclasses.replace(reviewed, dkim=reviewed.dkim.model_copy(update={"selector": "s1"}))
    subscribe(signed, 2)
    monkeypatch.delenv(SECRET_VARIABLE)
    approval.approve(Context(signed, env={}), signed.root / SAMPLE, "Marie")
    monkeypatch.setenv(SECRET_VARIABLE, SECRET)
    monkeypatch.setenv(dkim.RSA_VARIABLE, dkim.generate("rsa")[0].decode())
    assert send(signed).done[State.SENT] == 2


def test_send_stops_before_it_starts_on_a_check_that_needs_no_network(
    cli: Cli, project: Path, local: Settings, smtp_server: SmtpServer
) -> None:
    # `send` runs doctor's offline checks: a relay that said it takes 10 KB stops a send
    # of a message of a hundred, with what to do, and nothing leaves.
    env = {
        "QANT_SMTP_HOST": smtp_server.host,
        "QANT_SMTP_PORT": str(smtp_server.port),
        "QANT_SMTP_SECURITY": "none",
    }
    subscribe(load_settings(project / "qant.toml", env={}), 2)
    cache = load_settings(project / "qant.toml", env={}).cache_dir
    cache.mkdir(parents=True, exist_ok=True)
    relay = f"{smtp_server.host}:{smtp_server.port}"
    (cache / "doctor-relays.json").write_text(json.dumps({relay: 10_000}), encoding="utf-8")
    refused = cli("send", SAMPLE, "--yes", env=env)
    assert refused.exit_code == ExitCode.BLOCKING, refused.output
    assert "error: message size: the message is" in refused.stderr
    assert "nothing sent" in refused.stderr
    assert smtp_server.handler.received == []
