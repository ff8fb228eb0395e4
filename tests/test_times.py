"""Every time a command shows is in its newsletter's time zone, with its offset from UTC;
`--json` keeps UTC, ISO 8601. Run on both stores: SQLite keeps times as ISO text,
PostgreSQL as timestamptz."""

from __future__ import annotations

import datetime as dt
import json
import re
import zoneinfo
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import Result

from qant_mail.app import schedule as schedules
from qant_mail.app.context import Context
from qant_mail.audience.tokens import SECRET_VARIABLE
from qant_mail.base.config import Settings, load_settings
from qant_mail.store.ledger import Ledger, Send, State
from qant_mail.store.mailqueue import MailQueue
from qant_mail.store.subscribers import Subscribers
from tests.test_send import SAMPLE, SECRET, subscribe

Cli = Callable[..., Result]

pytestmark = pytest.mark.parametrize("store_kind", ["sqlite", "postgresql"], indirect=True)

# Far from UTC, and from Paris, the zone of the shipped settings: 13 hours ahead in
# December, so that a time shown in another zone shows another hour, or another day.
ZONE = "Pacific/Auckland"
PLANNED = "2026-12-05T02:42:00+00:00"  # 15:42 in Auckland
FINISHED = "2026-12-05T03:10:00+00:00"  # 16:10 in Auckland
FINANCE = """
[newsletters.finance]
name = "Qant Finance"
timezone = "America/Los_Angeles"

[newsletters.finance.sender]
address = "finance@qant.example"
"""


@pytest.fixture
def auckland(
    project: Path, project_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> Settings:
    """The project's settings, its newsletter in Auckland (in its qant.toml, which the
    commands read, too)."""
    monkeypatch.setenv(SECRET_VARIABLE, SECRET)
    path = project / "qant.toml"
    text = path.read_text(encoding="utf-8")
    assert 'timezone = "Europe/Paris"' in text
    path.write_text(text.replace("Europe/Paris", ZONE), encoding="utf-8")
    return load_settings(path, env={})


@pytest.fixture
def finance(auckland: Settings, project: Path) -> Settings:
    """The Auckland settings with a second newsletter, `finance`, in Los Angeles."""
    path = project / "qant.toml"
    path.write_text(path.read_text(encoding="utf-8") + FINANCE, encoding="utf-8")
    return load_settings(path, env={})


def finance_issue(project: Path) -> Path:
    """Write an issue of the finance newsletter; return its path."""
    text = (project / SAMPLE).read_text(encoding="utf-8")
    path = project / "issues" / "2024-01-15-finance.yaml"
    path.write_text(text.replace("subject:", "newsletter: finance\nsubject:", 1), encoding="utf-8")
    return path


def planned(
    settings: Settings,
    *,
    sent: int,
    of: int,
    issue: str = "2023-11-20",
    newsletter: str = "default",
) -> Send:
    """Plan a send of `issue` to `of` readers, `sent` of them served; dated PLANNED (and
    FINISHED, once all are served)."""
    readers = Subscribers.open(settings.store_path)
    rows = "email\n" + "".join(f"{issue}-{n}@example.com\n" for n in range(of))
    readers.of(newsletter).import_rows(rows, "test")
    readers.close()
    ledger = Ledger(settings.store_path)
    try:
        send = ledger.plan(issue, "hash", "Sujet", newsletter)
        for position in range(1, sent + 1):
            ledger.record(send, position, State.SENT, "250 ok")
        if sent == of:
            ledger.finish(send)
    finally:
        ledger.close()
    with Context(settings).db() as db:
        db.execute("UPDATE sends SET created_at = $1 WHERE id = $2", (PLANNED, send.id))
        if sent == of:
            db.execute("UPDATE sends SET finished_at = $1 WHERE id = $2", (FINISHED, send.id))
    return send


def shown(text: str) -> dt.datetime:
    """Read back a time as the commands show it ("2026-12-05 15:42 +13:00")."""
    return dt.datetime.strptime(text, "%Y-%m-%d %H:%M %z")


def test_status_of_a_finished_send_says_when_it_was_sent_in_the_newsletters_time(
    auckland: Settings, cli: Cli
) -> None:
    planned(auckland, sent=3, of=3)
    result = cli("status", SAMPLE)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == (
        "2023-11-20: “Sujet”, planned 2026-12-05 15:42 +13:00, "
        "sent 2026-12-05 16:10 +13:00 (finished)"
    )
    data = json.loads(cli("status", SAMPLE, "--json").stdout)
    assert (data["created_at"], data["finished_at"]) == (PLANNED, FINISHED)  # UTC, as kept


def test_status_of_a_send_stopped_midway_says_it_is_unfinished(
    auckland: Settings, cli: Cli
) -> None:
    planned(auckland, sent=1, of=3)
    first = cli("status", SAMPLE).stdout.splitlines()[0]
    assert first == (
        "2023-11-20: “Sujet”, planned 2026-12-05 15:42 +13:00, stopped unfinished, "
        "2 left (`qant-mail send issues/2023-11-20.yaml` goes on)"
    )
    assert "sent 2" not in first


def test_status_of_a_running_send_says_so_and_when_it_should_end_in_the_newsletters_time(
    auckland: Settings, cli: Cli
) -> None:
    send = planned(auckland, sent=10, of=30)  # ten within the last minute, twenty to go
    ledger = Ledger(auckland.store_path)
    if ledger.shared:  # a sender at work on another host
        ledger.join(send, "elsewhere:1")
        status = cli("status", SAMPLE).stdout
    else:
        with ledger.lock(send.issue):  # as a `send` running in another process holds it
            status = cli("status", SAMPLE).stdout
    ledger.close()
    now = dt.datetime.now(dt.UTC)
    lines = status.splitlines()
    assert lines[0] == "2023-11-20: “Sujet”, planned 2026-12-05 15:42 +13:00, running now"
    [expected] = re.findall(r"expected to finish around (.+)$", status, re.MULTILINE)
    end = shown(expected)
    assert end.utcoffset() == now.astimezone(zoneinfo.ZoneInfo(ZONE)).utcoffset()
    # Twenty left at ten a minute: two minutes from now, shown to the minute.
    assert now + dt.timedelta(seconds=50) < end
    assert end <= now + dt.timedelta(seconds=120)
    for line in lines:
        if line.startswith("  sender "):  # PostgreSQL: the sender at work elsewhere
            since = shown(re.findall(r"since (.+?),", line)[0])
            assert since.utcoffset() == end.utcoffset()
            assert abs(since - now) < dt.timedelta(minutes=2)


def test_sends_shows_its_times_in_the_newsletters_zone_and_says_so(
    auckland: Settings, cli: Cli
) -> None:
    planned(auckland, sent=2, of=2)
    table = cli("sends").stdout.splitlines()
    assert "started (Pacific/Auckland)  finished (Pacific/Auckland)" in table[0]
    assert "UTC" not in table[0]
    assert re.split(r"\s{2,}", table[1])[:3] == [
        *("2023-11-20", "2026-12-05 15:42 +13:00", "2026-12-05 16:10 +13:00")
    ]
    [data] = json.loads(cli("sends", "--json").stdout)
    assert (data["created_at"], data["finished_at"]) == (PLANNED, FINISHED)


def test_each_send_is_shown_in_its_own_newsletters_zone(
    finance: Settings, project: Path, cli: Cli
) -> None:
    planned(finance, sent=1, of=1)
    planned(finance, sent=1, of=1, issue="2024-01-15-finance", newsletter="finance")
    table = cli("sends").stdout.splitlines()
    assert "started (newsletter's zone)" in table[0]
    rows = {cells[0]: cells[2:4] for cells in (re.split(r"\s{2,}", t) for t in table[1:])}
    # 02:42 UTC: 15:42 the same day in Auckland, 18:42 the day before in Los Angeles.
    assert rows["2023-11-20"] == ["2026-12-05 15:42 +13:00", "2026-12-05 16:10 +13:00"]
    assert rows["2024-01-15-finance"] == ["2026-12-04 18:42 -08:00", "2026-12-04 19:10 -08:00"]
    status = cli("status", "2024-01-15-finance").stdout
    assert "planned 2026-12-04 18:42 -08:00, sent 2026-12-04 19:10 -08:00 (finished)" in status


def test_schedule_reads_and_shows_times_in_the_zone_of_the_issues_newsletter(
    finance: Settings, project: Path, cli: Cli
) -> None:
    main = cli("schedule", SAMPLE, "--at", "2030-12-05 15:42")
    assert main.exit_code == 0, main.output
    assert "at 2030-12-05 15:42 +13:00 (Pacific/Auckland)" in main.stdout
    other = finance_issue(project).relative_to(project)
    theirs = cli("schedule", str(other), "--at", "2030-12-05 15:42")
    assert theirs.exit_code == 0, theirs.output
    assert "at 2030-12-05 15:42 -08:00 (America/Los_Angeles)" in theirs.stdout
    due = {item.issue: item.due_at for item in schedules.schedules(Context(finance))}
    assert due == {
        "2023-11-20": dt.datetime(2030, 12, 5, 2, 42, tzinfo=dt.UTC),
        "2024-01-15-finance": dt.datetime(2030, 12, 5, 23, 42, tzinfo=dt.UTC),
    }
    listed = cli("schedule").stdout.splitlines()
    assert listed == [
        "2023-11-20  2030-12-05 15:42 +13:00 (Pacific/Auckland)  scheduled",
        "2024-01-15-finance  2030-12-05 15:42 -08:00 (America/Los_Angeles)  scheduled",
    ]


def test_the_outbox_and_what_waits_in_it_show_the_newsletters_time(
    auckland: Settings, cli: Cli
) -> None:
    planned(auckland, sent=1, of=1)
    next_try = dt.datetime.fromisoformat(FINISHED).timestamp()
    with Context(auckland).db() as db:
        number = MailQueue(db).add(
            kind="confirmation",
            newsletter="default",
            recipient="lea@example.com",
            message=b"Subject: x\r\n\r\nx\r\n",
            expires_at=next_try + 86400,
        )
        db.execute(
            "UPDATE outbox SET next_attempt_at = $1, created_at = $2 WHERE id = $3",
            (next_try, PLANNED, number),
        )
    listed = cli("outbox").stdout
    assert "pending (0 tries, next try 2026-12-05 16:10 +13:00)" in listed
    waiting = "outbox: 1 waiting (confirmation 1), the oldest since 2026-12-05 15:42 +13:00"
    assert waiting in cli("status", SAMPLE).stdout
    assert waiting in cli("sends").stdout


def test_the_subscriber_list_shows_since_when_in_the_newsletters_time(
    auckland: Settings, cli: Cli
) -> None:
    subscribe(auckland, 1)
    with Context(auckland).db() as db:
        db.execute("UPDATE subscribers SET status_changed_at = $1", (PLANNED,))
        db.execute("UPDATE subscriptions SET status_changed_at = $1", (PLANNED,))
    listed = cli("subscribers", "list").stdout
    assert listed == "reader0@example.com\tLecteur 0\tactive\t2026-12-05 15:42 +13:00\n"
    [row] = [json.loads(line) for line in cli("subscribers", "list", "--json").stdout.splitlines()]
    assert row["since"] == PLANNED
