"""Scheduled sends: set for a time, checked again then, sent once by `run-due`."""

from __future__ import annotations

import dataclasses
import datetime as dt
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import Result

from qant_mail.app import schedule as schedules
from qant_mail.app.context import Context
from qant_mail.app.schedule import ScheduleError
from qant_mail.audience.tokens import SECRET_VARIABLE
from qant_mail.base.config import Settings
from qant_mail.base.errors import ExitCode, SendError
from qant_mail.store.ledger import Ledger
from tests.smtp_server import SmtpServer, free_port
from tests.test_send import SAMPLE, SECRET, subscribe

Cli = Callable[..., Result]
NOW = dt.datetime(2026, 12, 1, 7, 0, tzinfo=dt.UTC)
HOUR = dt.timedelta(hours=1)


@pytest.fixture(autouse=True)
def secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRET_VARIABLE, SECRET)


def scheduled(settings: Settings, at: dt.datetime = NOW + HOUR) -> Path:
    path = settings.root / SAMPLE
    schedules.schedule(Context(settings), path, at, now=NOW)
    return path


def test_a_scheduled_issue_goes_out_at_its_time_and_only_once(
    local: Settings, smtp_server: SmtpServer
) -> None:
    readers = subscribe(local, 3)
    scheduled(local)
    assert schedules.run_due(Context(local), now=NOW + HOUR - dt.timedelta(minutes=1)) == []
    assert smtp_server.handler.received == []
    outcomes = schedules.run_due(Context(local), now=NOW + HOUR + dt.timedelta(minutes=1))
    assert outcomes is not None
    assert [(o.schedule.issue, o.state, o.exit_code) for o in outcomes] == [
        ("2023-11-20", "sent", ExitCode.OK)
    ]
    assert schedules.run_due(Context(local), now=NOW + 2 * HOUR) == []
    assert smtp_server.handler.recipients() == dict.fromkeys(readers, 1)
    [item] = schedules.schedules(Context(local))
    assert item.state == "sent"
    assert "sent 3" in item.outcome


def test_two_run_dues_at_once_send_once(local: Settings, smtp_server: SmtpServer) -> None:
    readers = subscribe(local, 4)
    scheduled(local)
    smtp_server.handler.hold_after = 1  # the first run is surely still sending
    results: list[list[schedules.DueOutcome] | None] = []
    first = threading.Thread(
        target=lambda: results.append(schedules.run_due(Context(local), now=NOW + 2 * HOUR))
    )
    first.start()
    while not smtp_server.handler.received:
        first.join(0.01)
    second = schedules.run_due(Context(local), now=NOW + 2 * HOUR)  # meanwhile
    smtp_server.handler.release.set()
    first.join()
    assert second is None  # it left the work to the first
    [outcomes] = results
    assert outcomes is not None
    assert [o.state for o in outcomes] == ["sent"]
    assert smtp_server.handler.recipients() == dict.fromkeys(readers, 1)


def test_an_issue_broken_before_its_time_is_not_sent_and_the_operator_is_told(
    local: Settings, smtp_server: SmtpServer
) -> None:
    subscribe(local, 2)
    path = scheduled(local)
    path.write_text(path.read_text(encoding="utf-8") + "\nsubjet: typo\n", encoding="utf-8")
    outcomes = schedules.run_due(Context(local), now=NOW + 2 * HOUR)
    assert outcomes is not None
    [outcome] = outcomes
    assert outcome.state == "failed"
    assert outcome.exit_code == ExitCode.INVALID
    assert "was not sent at its time" in outcome.message
    assert "subjet" in outcome.message
    assert "qant-mail schedule" in outcome.message
    assert smtp_server.handler.received == []
    assert schedules.run_due(Context(local), now=NOW + 3 * HOUR) == []  # failed stays failed


def test_a_relay_down_at_its_time_leaves_it_due_for_the_next_run(
    local: Settings, smtp_server: SmtpServer
) -> None:
    readers = subscribe(local, 2)
    scheduled(local)
    down = dataclasses.replace(local, smtp=local.smtp.model_copy(update={"port": free_port()}))
    outcomes = schedules.run_due(Context(down), now=NOW + 2 * HOUR)
    assert outcomes is not None
    assert [(o.state, o.exit_code) for o in outcomes] == [("scheduled", ExitCode.UNAVAILABLE)]
    assert "tried again at the next run" in outcomes[0].message
    outcomes = schedules.run_due(Context(local), now=NOW + 2 * HOUR)
    assert outcomes is not None
    assert [o.state for o in outcomes] == ["sent"]
    assert smtp_server.handler.recipients() == dict.fromkeys(readers, 1)


def test_a_run_due_that_stopped_midway_is_resumed_by_the_next(
    local: Settings, smtp_server: SmtpServer
) -> None:
    readers = subscribe(local, 3)
    path = scheduled(local)
    ledger = Ledger(local.store_path)
    ledger.take_due(NOW + 2 * HOUR)  # a run took it, then died before sending anything
    ledger.close()
    outcomes = schedules.run_due(Context(local), now=NOW + 2 * HOUR)
    assert outcomes is not None
    assert [(o.schedule.path, o.state) for o in outcomes] == [(path.resolve(), "sent")]
    assert smtp_server.handler.recipients() == dict.fromkeys(readers, 1)


def test_what_cannot_be_scheduled(local: Settings, smtp_server: SmtpServer) -> None:
    path = local.root / SAMPLE
    with pytest.raises(ScheduleError, match="is past"):
        schedules.schedule(Context(local), path, NOW - HOUR, now=NOW)
    draft = path.with_name("2023-11-21.yaml")
    draft.write_text(path.read_text(encoding="utf-8") + "\ndraft: true\n", encoding="utf-8")
    with pytest.raises(SendError, match="draft"):
        schedules.schedule(Context(local), draft, NOW + HOUR, now=NOW)
    subscribe(local, 1)
    scheduled(local)
    assert schedules.run_due(Context(local), now=NOW + 2 * HOUR)
    with pytest.raises(ScheduleError, match="sent already"):
        schedules.schedule(Context(local), path, NOW + 3 * HOUR, now=NOW)


def test_times_are_read_in_the_newsletters_time_zone(project_settings: Settings) -> None:
    paris = dataclasses.replace(
        project_settings,
        newsletter=project_settings.newsletter.model_copy(update={"timezone": "Europe/Paris"}),
    )
    moment = schedules.parse_time(Context(paris), "2026-12-01 08:00")
    assert moment.astimezone(dt.UTC) == dt.datetime(2026, 12, 1, 7, 0, tzinfo=dt.UTC)
    there = schedules.parse_time(Context(paris), "2026-12-01 08:00", "America/Los_Angeles")
    assert there.astimezone(dt.UTC) == dt.datetime(2026, 12, 1, 16, 0, tzinfo=dt.UTC)
    own = schedules.parse_time(Context(paris), "2026-07-01T08:00+00:00")
    assert own.astimezone(dt.UTC).hour == 8  # a time with its own offset keeps it
    with pytest.raises(ScheduleError, match="YYYY-MM-DD HH:MM"):
        schedules.parse_time(Context(paris), "demain 8h")


def test_schedule_list_cancel_and_run_due_on_the_command_line(
    project_settings: Settings, cli: Cli
) -> None:
    assert cli("schedule").stdout == "Nothing scheduled.\n"
    later = (dt.datetime.now(dt.UTC) + dt.timedelta(days=2)).strftime("%Y-%m-%d %H:%M")
    result = cli("schedule", SAMPLE, "--at", later)
    assert result.exit_code == 0, result.stderr
    assert "goes to the list at" in result.stdout
    listed = cli("schedule").stdout
    assert listed.startswith("2023-11-20  ")
    assert "scheduled" in listed
    assert cli("run-due").stdout == "nothing due\n"
    assert cli("schedule", SAMPLE, "--cancel").exit_code == 0
    assert "cancelled" in cli("schedule").stdout
    again = cli("schedule", SAMPLE, "--cancel")
    assert again.exit_code == ExitCode.INVALID
    assert "cannot be cancelled" in again.stderr
    assert cli("schedule", SAMPLE).exit_code == ExitCode.USAGE
