"""Sending to the list over real SMTP on loopback: exactly once, resumable, throttled."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from qant_mail.app import issues, sending
from qant_mail.app.context import Context
from qant_mail.audience.tokens import SECRET_VARIABLE
from qant_mail.base.config import Sending, Settings
from qant_mail.base.errors import ConfigError, ExitCode, SendError
from qant_mail.delivery.outbox import SendReport
from qant_mail.delivery.transport import SmtpTransport, Transport, TransportUnavailable
from qant_mail.store.ledger import Ledger, LedgerError, State
from qant_mail.store.subscribers import Status, Subscribers
from tests.smtp_server import SmtpServer

SECRET = "a-test-secret-that-is-long-enough"
SAMPLE = "issues/2023-11-20.yaml"


@pytest.fixture(autouse=True)
def secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRET_VARIABLE, SECRET)


def subscribe(settings: Settings, count: int, *, prefix: str = "reader") -> list[str]:
    """Add `count` active subscribers; return their addresses."""
    store = Subscribers.open(settings.store_path)
    rows = "email,name\n" + "".join(f"{prefix}{n}@example.com,Lecteur {n}\n" for n in range(count))
    store.import_rows(rows, "test")
    store.close()
    return [f"{prefix}{n}@example.com" for n in range(count)]


def context(settings: Settings, transport: Transport | None = None) -> Context:
    """The installation of `settings`, sending through `transport` (default: its relay)."""
    return Context(settings, transport=transport or SmtpTransport(settings, env={}))


def send(
    settings: Settings, *, limit: int | None = None, stop: threading.Event | None = None
) -> SendReport:
    ctx = context(settings)
    prepared = issues.prepare(ctx, settings.root / SAMPLE)
    return sending.send(ctx, prepared, limit=limit, stop=stop)


def ledger_counts(settings: Settings) -> dict[State, int]:
    ledger = Ledger(settings.store_path)
    found = ledger.find("2023-11-20")
    assert found is not None
    return ledger.counts(found)


def test_every_active_subscriber_gets_exactly_one_message(
    local: Settings, smtp_server: SmtpServer
) -> None:
    active = subscribe(local, 25)
    store = Subscribers.open(local.store_path)
    store.add("parti@example.com")
    store.unsubscribe("parti@example.com")
    store.add("rebond@example.com")
    store.set_status("rebond@example.com", Status.BOUNCED, "550 5.1.1")
    store.close()
    report = send(local)
    assert report.exit_code == ExitCode.OK
    assert smtp_server.handler.recipients() == dict.fromkeys(active, 1)
    assert ledger_counts(local)[State.SENT] == 25
    message = smtp_server.handler.received[0]
    assert message.sender == "lettre@qant.example"
    assert b"List-Unsubscribe-Post: List-Unsubscribe=One-Click" in message.data


def test_a_second_run_sends_nothing_more(local: Settings, smtp_server: SmtpServer) -> None:
    subscribe(local, 5)
    send(local)
    report = send(local)
    assert sum(report.done.values()) == 0
    assert sum(smtp_server.handler.recipients().values()) == 5


def test_temporary_refusals_are_retried_until_delivered(
    local: Settings, smtp_server: SmtpServer
) -> None:
    addresses = subscribe(local, 6)
    slow = addresses[1:3]
    for address in slow:
        smtp_server.handler.answers[address] = ["451 4.3.0 greylisted, try later"]
    report = send(local)
    assert report.exit_code == ExitCode.OK
    assert smtp_server.handler.recipients() == dict.fromkeys(addresses, 1)
    assert all(smtp_server.handler.attempts[a] == 2 for a in slow)
    ledger = Ledger(local.store_path)
    found = ledger.find("2023-11-20")
    assert found is not None
    sent = {d.email: d.attempts for d in ledger.deliveries(found, State.SENT)}
    assert sent[slow[0]] == 2


def test_too_many_temporary_refusals_fail(local: Settings, smtp_server: SmtpServer) -> None:
    (address,) = subscribe(local, 1)
    smtp_server.handler.answers[address] = ["452 4.2.2 mailbox full"] * 5
    report = send(local)
    assert report.exit_code == ExitCode.PARTIAL
    assert smtp_server.handler.attempts[address] == 3  # max_attempts
    assert ledger_counts(local)[State.FAILED] == 1


def test_permanent_refusal_is_recorded_not_retried_and_bounces(
    local: Settings, smtp_server: SmtpServer
) -> None:
    addresses = subscribe(local, 3)
    smtp_server.handler.answers[addresses[0]] = ["550 5.1.1 user unknown"]
    smtp_server.handler.answers[addresses[1]] = ["554 5.7.1 message rejected as spam"]
    report = send(local)
    assert report.exit_code == ExitCode.PARTIAL
    send(local)
    assert smtp_server.handler.attempts[addresses[0]] == 1
    assert smtp_server.handler.attempts[addresses[1]] == 1
    ledger = Ledger(local.store_path)
    found = ledger.find("2023-11-20")
    assert found is not None
    failed = {d.email: d.last_reply for d in ledger.deliveries(found, State.FAILED)}
    assert failed == {
        addresses[0]: "550 5.1.1 user unknown",
        addresses[1]: "554 5.7.1 message rejected as spam",
    }
    store = Subscribers.open(local.store_path)
    first, second = store.get(addresses[0]), store.get(addresses[1])
    assert first is not None
    assert second is not None
    assert first.status is Status.BOUNCED  # the mailbox does not exist
    assert second.status is Status.ACTIVE  # a refusal of this message, not of the address


def test_connection_lost_after_the_data_is_unknown_and_not_resent(
    local: Settings, smtp_server: SmtpServer
) -> None:
    addresses = subscribe(local, 4)
    smtp_server.handler.drop_after_data.add(addresses[2])
    report = send(local)
    assert report.exit_code == ExitCode.PARTIAL
    assert ledger_counts(local)[State.UNKNOWN] == 1
    smtp_server.handler.drop_after_data.clear()
    send(local)
    assert smtp_server.handler.attempts[addresses[2]] == 1  # not re-sent on its own
    ledger = Ledger(local.store_path)
    found = ledger.find("2023-11-20")
    assert found is not None
    assert ledger.resolve_unknown(found, State.PENDING) == 1
    send(local)
    assert smtp_server.handler.recipients()[addresses[2]] == 1
    assert ledger_counts(local)[State.SENT] == 4


def test_unsubscribed_after_the_start_is_skipped(local: Settings, smtp_server: SmtpServer) -> None:
    addresses = subscribe(local, 6)
    first = send(local, limit=2)
    assert first.exit_code == ExitCode.OK  # the two asked for went out
    store = Subscribers.open(local.store_path)
    store.unsubscribe(addresses[4], "one-click")
    store.add("nouveau@example.com")  # joined after the start: not in this issue's plan
    store.close()
    report = send(local)
    assert report.done[State.SKIPPED] == 1
    received = smtp_server.handler.recipients()
    assert addresses[4] not in received
    assert "nouveau@example.com" not in received
    assert len(received) == 5


@pytest.mark.sqlite_only  # on PostgreSQL a second `send` joins the run (below)
def test_two_sends_of_one_issue_cannot_run_at_once(local: Settings) -> None:
    subscribe(local, 2)
    ledger = Ledger(local.store_path)
    with ledger.lock("2023-11-20"), pytest.raises(LedgerError, match="another `qant-mail send`"):
        send(local)


def test_rate_limit_holds_over_a_run(local: Settings, smtp_server: SmtpServer) -> None:
    subscribe(local, 30)
    limited = dataclasses.replace(local, sending=Sending(per_second=15))
    started = time.monotonic()
    send(limited)
    times = sorted(r.at for r in smtp_server.handler.received)
    assert len(times) == 30
    assert time.monotonic() - started >= (30 - 1) / 15 * 0.9
    busiest = max(sum(1 for t in times if start <= t < start + 1) for start in times)
    assert busiest <= 16


def test_daily_quota_survives_a_restart(local: Settings, smtp_server: SmtpServer) -> None:
    subscribe(local, 8)
    daily = dataclasses.replace(local, sending=Sending(per_day=5))
    first = send(daily)
    assert first.exit_code == ExitCode.PARTIAL
    assert first.stopped == "daily quota reached"
    second = send(daily)
    assert second.done[State.SENT] == 0
    assert sum(smtp_server.handler.recipients().values()) == 5
    assert ledger_counts(local)[State.PENDING] == 3


def test_a_slow_down_reply_is_deferred_and_slows_everyone(
    local: Settings, smtp_server: SmtpServer
) -> None:
    addresses = subscribe(local, 3)
    smtp_server.handler.answers[addresses[0]] = ["421 4.7.0 too many messages, slow down"]
    report = send(local)
    assert report.exit_code == ExitCode.OK
    assert smtp_server.handler.recipients() == dict.fromkeys(addresses, 1)


def test_unreachable_server_is_an_error_and_loses_nothing(
    local: Settings, smtp_server: SmtpServer
) -> None:
    subscribe(local, 3)
    closed = local.smtp.model_copy(update={"port": 1})
    with pytest.raises(TransportUnavailable, match=r"cannot connect to 127\.0\.0\.1:1"):
        send(dataclasses.replace(local, smtp=closed))
    counts = ledger_counts(local)
    assert counts[State.PENDING] == 3
    assert send(local).exit_code == ExitCode.OK


def test_wrong_password_is_an_error_that_does_not_show_it(
    local: Settings, smtp_server: SmtpServer
) -> None:
    subscribe(local, 1)
    with_login = dataclasses.replace(local, smtp=local.smtp.model_copy(update={"username": "qant"}))
    transport = SmtpTransport(with_login, env={"QANT_SMTP_PASSWORD": "hunter2-wrong"})
    prepared = issues.prepare(context(with_login, transport), local.root / SAMPLE)
    with pytest.raises(TransportUnavailable) as caught:
        sending.send(context(with_login, transport), prepared)
    assert "refused the login of 'qant'" in str(caught.value)
    assert "hunter2" not in str(caught.value)
    assert "hunter2" not in repr(transport)
    right = SmtpTransport(with_login, env={"QANT_SMTP_PASSWORD": "right password"})
    assert sending.send(context(with_login, right), prepared).exit_code == ExitCode.OK


def test_a_login_in_clear_to_another_host_is_refused_unless_allowed(local: Settings) -> None:
    remote = local.smtp.model_copy(
        update={"host": "smtp.example.com", "username": "qant", "security": "none"}
    )
    settings = dataclasses.replace(local, smtp=remote)
    with pytest.raises(ConfigError, match="in clear") as caught:
        SmtpTransport(settings, env={"QANT_SMTP_PASSWORD": "hunter2"})
    assert "hunter2" not in str(caught.value)
    allowed = remote.model_copy(update={"allow_plaintext_login": True})
    SmtpTransport(dataclasses.replace(local, smtp=allowed), env={"QANT_SMTP_PASSWORD": "x"})
    # On this machine (the local inbox, a relay on loopback) nothing crosses a network.
    SmtpTransport(local, env={"QANT_SMTP_PASSWORD": "x"})


def test_missing_secret_is_an_error_before_anything_is_planned(
    local: Settings, monkeypatch: pytest.MonkeyPatch, smtp_server: SmtpServer
) -> None:
    subscribe(local, 2)
    monkeypatch.delenv(SECRET_VARIABLE)
    with pytest.raises(Exception, match=SECRET_VARIABLE):
        send(local)
    assert Ledger(local.store_path).find("2023-11-20") is None
    assert smtp_server.handler.received == []


def test_drafts_are_not_sent_to_the_list(local: Settings, project: Path) -> None:
    path = project / "issues" / "2024-01-15.yaml"
    path.write_text("draft: true\nsubject: S\npreheader: P\nsections: [text: T]\n")
    with pytest.raises(SendError, match="draft"):
        issues.prepare(context(local), path)
    assert issues.prepare(context(local), path, test=True).template.subject == "[TEST] S"


def test_test_send_marks_the_subject_and_skips_the_ledger(
    local: Settings, smtp_server: SmtpServer
) -> None:
    ctx = context(local)
    prepared = sending.prepare_test(ctx, local.root / SAMPLE)
    tested = sending.send_test(ctx, prepared, ["relecture@example.com"])
    assert [(a, r.code) for a, r in tested.results] == [("relecture@example.com", 250)]
    (message,) = smtp_server.handler.received
    assert b"Subject: =?utf-8?q?=5BTEST=5D" in message.data
    assert Ledger(local.store_path).find("2023-11-20") is None


def test_dry_run_writes_every_message_and_changes_nothing(
    local: Settings, smtp_server: SmtpServer, tmp_path: Path
) -> None:
    subscribe(local, 7)
    ctx = context(local)
    report = sending.dry_run(ctx, issues.prepare(ctx, local.root / SAMPLE), tmp_path / "dry")
    assert report.done[State.SENT] == 7
    assert len(list((tmp_path / "dry" / "new").glob("*.eml"))) == 7
    assert Ledger(local.store_path).find("2023-11-20") is None
    assert smtp_server.handler.received == []


def test_interrupted_send_releases_its_rows_and_resumes(
    local: Settings, smtp_server: SmtpServer
) -> None:
    subscribe(local, 40)
    # The server holds the sixth message on until the stop is given: however slow or
    # busy the machine, the send is interrupted mid-way, never after it ended.
    smtp_server.handler.hold_after = 5
    stop = threading.Event()

    def stop_after_five() -> None:
        wait_until_received(smtp_server, 5)
        stop.set()
        smtp_server.handler.release.set()

    threading.Thread(target=stop_after_five, daemon=True).start()
    report = send(local, stop=stop)
    assert report.stopped == "interrupted"
    assert report.exit_code == ExitCode.INTERRUPTED
    counts = ledger_counts(local)
    assert counts[State.SENDING] == 0
    assert 5 <= counts[State.SENT] <= 5 + local.smtp.connections
    send(local)
    assert smtp_server.handler.recipients() == {f"reader{n}@example.com": 1 for n in range(40)}


def cli_env(settings: Settings, server: SmtpServer) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QANT_")}
    env.update(
        QANT_CONFIG=str(settings.path),
        QANT_SMTP_HOST=server.host,
        QANT_SMTP_PORT=str(server.port),
        QANT_SMTP_SECURITY="none",
        QANT_SMTP_CONNECTIONS="3",
        QANT_SECRET_KEY=SECRET,
    )
    return env


def run_cli(
    args: list[str], env: dict[str, str], cwd: Path, answer: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qant_mail", *args],
        cwd=cwd,
        env=env,
        input=answer,
        capture_output=True,
        text=True,
        timeout=120,
    )


def start_send(env: dict[str, str], project: Path) -> subprocess.Popen[str]:
    """Start `qant-mail send SAMPLE --yes` in its own process."""
    return subprocess.Popen(
        [sys.executable, "-m", "qant_mail", "send", SAMPLE, "--yes"],
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_until_received(server: SmtpServer, count: int) -> None:
    deadline = time.monotonic() + 30
    while len(server.handler.received) < count and time.monotonic() < deadline:
        time.sleep(0.01)


def test_sender_killed_mid_send_resumes_without_losing_anyone(
    local: Settings, smtp_server: SmtpServer, project: Path
) -> None:
    addresses = subscribe(local, 60)
    smtp_server.handler.hold_after = 15  # killed while the 16th and next wait
    env = cli_env(local, smtp_server)
    process = start_send(env, project)
    wait_until_received(smtp_server, 15)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    smtp_server.handler.release.set()
    killed_at = len(smtp_server.handler.received)
    assert 15 <= killed_at < 60
    resumed = run_cli(["send", SAMPLE, "--yes"], env, project)
    assert resumed.returncode == ExitCode.OK, resumed.stderr
    received = smtp_server.handler.recipients()
    assert set(received) == set(addresses)
    duplicates = sum(n - 1 for n in received.values())
    assert duplicates <= 3  # at most one per open connection (3 here)
    assert ledger_counts(local)[State.SENT] == 60


def test_ctrl_c_stops_cleanly_and_a_rerun_goes_on(
    local: Settings, smtp_server: SmtpServer, project: Path
) -> None:
    stopped_cleanly_by(signal.SIGINT, local, smtp_server, project)


def stopped_cleanly_by(
    signal_number: int, local: Settings, smtp_server: SmtpServer, project: Path
) -> None:
    """Stop a `send` process with `signal_number` mid-way: it records what it did, says
    so, exits INTERRUPTED; a re-run serves the rest, each reader once."""
    addresses = subscribe(local, 40)
    smtp_server.handler.hold_after = 5  # the signal comes while the sixth and next wait
    env = cli_env(local, smtp_server)
    process = start_send(env, project)
    wait_until_received(smtp_server, 5)
    process.send_signal(signal_number)
    time.sleep(0.5)  # the signal lands while the server still holds the messages
    smtp_server.handler.release.set()
    out, err = process.communicate(timeout=30)
    assert process.returncode == ExitCode.INTERRUPTED, err
    assert "Traceback" not in err
    assert "stopped: interrupted" in out
    counts = ledger_counts(local)
    assert counts[State.SENDING] == 0
    assert counts[State.SENT] == len(smtp_server.handler.received)
    assert run_cli(["send", SAMPLE, "--yes"], env, project).returncode == ExitCode.OK
    assert smtp_server.handler.recipients() == dict.fromkeys(addresses, 1)


def test_send_command_reports_and_exits_by_outcome(
    local: Settings, smtp_server: SmtpServer, project: Path
) -> None:
    addresses = subscribe(local, 3)
    smtp_server.handler.answers[addresses[0]] = ["550 5.1.1 user unknown"]
    env = cli_env(local, smtp_server)
    refused = run_cli(["send", SAMPLE], env, project, answer="n\n")
    assert refused.returncode == ExitCode.OK
    assert "Recipients: 3 active subscribers" in refused.stderr
    assert "nothing sent" in refused.stderr
    unanswered = run_cli(["send", SAMPLE], env, project)
    assert unanswered.returncode == ExitCode.INVALID
    assert "add --yes" in unanswered.stderr
    assert smtp_server.handler.received == []
    assert Ledger(local.store_path).find("2023-11-20") is None
    result = run_cli(["send", SAMPLE, "--yes"], env, project)
    assert result.returncode == ExitCode.PARTIAL
    assert "sent 2, deferred 0, failed 1" in result.stdout
    assert "qant-mail status issues/2023-11-20.yaml" in result.stderr
    status = run_cli(["status", SAMPLE], env, project)
    assert f"{addresses[0]}: 550 5.1.1 user unknown" in status.stdout


def test_unreachable_server_exits_4_from_the_command(
    local: Settings, smtp_server: SmtpServer, project: Path
) -> None:
    subscribe(local, 2)
    env = cli_env(local, smtp_server) | {"QANT_SMTP_PORT": "1"}
    result = run_cli(["send", SAMPLE, "--yes"], env, project)
    assert result.returncode == ExitCode.UNAVAILABLE
    assert result.stderr.strip().endswith("cannot connect to 127.0.0.1:1: Connection refused")
    assert "Traceback" not in result.stderr


def test_bad_test_address_is_an_error(
    local: Settings, smtp_server: SmtpServer, project: Path
) -> None:
    result = run_cli(
        ["send", SAMPLE, "--to", "pas une adresse"], cli_env(local, smtp_server), project
    )
    assert result.returncode == ExitCode.INVALID
    assert "is not a valid address" in result.stderr
    assert smtp_server.handler.received == []


@pytest.mark.postgresql_only
def test_three_senders_share_a_send_and_finish_the_rows_of_a_killed_one(
    local: Settings, smtp_server: SmtpServer, project: Path
) -> None:
    addresses = subscribe(local, 300)
    smtp_server.handler.delay = 0.02  # the run lasts long enough to kill a sender in it
    env = cli_env(local, smtp_server) | {"QANT_SENDING_LEASE_SECONDS": "1.5"}
    senders = [start_send(env, project) for _ in range(3)]
    wait_until_received(smtp_server, 40)
    senders[0].send_signal(signal.SIGKILL)
    senders[0].communicate()
    assert len(smtp_server.handler.received) < 300  # killed mid-way
    for sender in senders[1:]:
        _out, err = sender.communicate(timeout=120)
        assert sender.returncode in (ExitCode.OK, ExitCode.PARTIAL), err
        assert "Traceback" not in err
    received = smtp_server.handler.recipients()
    assert set(received) == set(addresses)  # nobody lost
    duplicates = sum(n - 1 for n in received.values())
    assert duplicates <= 3  # at most the killed sender's open connections
    counts = ledger_counts(local)
    assert counts[State.SENT] == 300
    assert counts[State.SENDING] == 0
    ledger = Ledger(local.store_path)
    send_row = ledger.find("2023-11-20")
    assert send_row is not None
    workers = ledger.workers(send_row, lease=1.5)
    ledger.close()
    assert len(workers) == 3  # all three joined the one run
    assert not any(alive for _, _, alive, _ in workers)
    status = run_cli(["status", "2023-11-20"], env, project)
    assert status.stdout.count("  sender ") == 3, status.stdout


@pytest.mark.postgresql_only
def test_two_senders_share_the_rate_a_second_of_the_run(
    local: Settings, smtp_server: SmtpServer, project: Path
) -> None:
    subscribe(local, 60)
    env = cli_env(local, smtp_server) | {
        "QANT_SENDING_PER_SECOND": "15",
        "QANT_SENDING_LEASE_SECONDS": "1.5",
    }
    started = time.monotonic()
    senders = [start_send(env, project) for _ in range(2)]
    for sender in senders:
        _out, err = sender.communicate(timeout=120)
        assert sender.returncode == ExitCode.OK, err
    times = sorted(r.at for r in smtp_server.handler.received)
    assert len(times) == 60
    # Two senders at 15 a second each would take 2 s; together they keep to 15.
    assert time.monotonic() - started >= (60 - 1) / 15 * 0.85
    busiest = max(sum(1 for t in times if start <= t < start + 1) for start in times)
    assert busiest <= 20  # 15, and the moment before a sender learns of the other


def test_a_reply_carrying_nul_and_terminal_controls_is_recorded_without_them(
    local: Settings, smtp_server: SmtpServer
) -> None:
    # A relay's reply is the server's text: a NUL would not go into PostgreSQL's text
    # (the record would fail), and escape sequences would reach the editor's terminal.
    (address,) = subscribe(local, 1)
    smtp_server.handler.answers[address] = ["550 5.1.1 user\x00 unknown\x1b[2J\x07"]
    report = send(local)
    assert report.exit_code == ExitCode.PARTIAL
    ledger = Ledger(local.store_path)
    found = ledger.find("2023-11-20")
    assert found is not None
    (failed,) = ledger.deliveries(found, State.FAILED)
    ledger.close()
    assert failed.last_reply == "550 5.1.1 user unknown[2J"
