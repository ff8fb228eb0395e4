"""The use cases of scheduled sends: set an issue to go to its list at a time, list and
cancel what is set, and run what is due (from cron or a systemd timer), which also
delivers what waits in the outbox's queue, for installations without `serve`."""

from __future__ import annotations

import datetime as dt
import zoneinfo
from dataclasses import dataclass
from pathlib import Path

from qant_mail.app import issues, sending
from qant_mail.app.context import Context
from qant_mail.authoring.load import load
from qant_mail.base.errors import ExitCode, IssueError, QantError
from qant_mail.delivery.outbox import Progress
from qant_mail.delivery.transport import TransportUnavailable
from qant_mail.store.ledger import Ledger, Schedule


class ScheduleError(QantError):
    """A send that cannot be scheduled (a time past, an issue sent already) or cancelled."""


@dataclass(frozen=True)
class DueOutcome:
    """What `run_due` did with one scheduled send."""

    schedule: Schedule
    state: str  # sent, failed, or scheduled (to try again at the next run)
    message: str
    exit_code: ExitCode


def time_zone(ctx: Context, path: Path) -> str:
    """Return the time zone of the newsletter the issue at `path` belongs to, which its
    send's times are read and shown in (the main newsletter's, for a file that cannot be
    read or names no newsletter of the settings)."""
    try:
        wanted = load(path).issue.newsletter
        return ctx.settings.for_newsletter(wanted).newsletter.timezone
    except QantError:  # `schedule` and `run-due` say what is wrong with it
        return ctx.settings.newsletter.timezone


def parse_time(ctx: Context, text: str, zone: str | None = None) -> dt.datetime:
    """Return the moment `text` names ("2026-12-01 08:00", ISO 8601), read in `zone`
    (default: the main newsletter's time zone) unless it gives its own offset."""
    zone = zone or ctx.settings.newsletter.timezone
    try:
        moment = dt.datetime.fromisoformat(text.strip())
    except ValueError as err:
        raise ScheduleError(f"{text!r} is not a time written YYYY-MM-DD HH:MM (in {zone})") from err
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=zoneinfo.ZoneInfo(zone))
    return moment


def schedule(
    ctx: Context, path: Path, at: dt.datetime, *, now: dt.datetime | None = None
) -> Schedule:
    """Set the issue at `path` to go to its list at `at`, once it passes its checks now
    (they run again at its time)."""
    now = now or dt.datetime.now(dt.UTC)
    if at <= now:
        raise ScheduleError(
            f"{at.isoformat(' ', 'minutes')} is past: give a time to come, or send it now"
        )
    # Its errors (and a draft) are refused now, not found at its time. The secret and the
    # keys are the sender's business then: a schedule can be set where they are not.
    issues.sendable(ctx, path)
    ledger = Ledger(ctx.store)
    try:
        if ledger.find(path.stem) is not None:
            raise ScheduleError(
                f"{path.stem} has been sent already (`qant-mail status {path}`); "
                "`qant-mail send FILE --new-subscribers` serves those who joined since"
            )
        return ledger.schedule(path.stem, path.resolve(), at)
    finally:
        ledger.close()


def schedules(ctx: Context) -> list[Schedule]:
    """Return every scheduled send, the next due first."""
    ledger = Ledger(ctx.store)
    try:
        return ledger.schedules()
    finally:
        ledger.close()


def cancel(ctx: Context, issue: str) -> None:
    """Cancel the scheduled send of `issue`."""
    ledger = Ledger(ctx.store)
    try:
        if not ledger.cancel(issue):
            found = ledger.scheduled(issue)
            state = f"it is {found.state}" if found else "it is not scheduled"
            raise ScheduleError(f"{issue} cannot be cancelled: {state}")
    finally:
        ledger.close()


def run_due(
    ctx: Context, *, now: dt.datetime | None = None, progress: Progress | None = None
) -> list[DueOutcome] | None:
    """Send every scheduled issue whose time has come, each checked again first, then
    deliver what waits in the outbox's queue; None when another `run-due` is running
    (it will do them)."""
    ledger = Ledger(ctx.store)
    try:
        with ledger.run_lock() as held:
            if not held:
                return None
            outcomes = [
                _run_one(ctx, ledger, due, progress)
                for due in ledger.take_due(now or dt.datetime.now(dt.UTC))
            ]
            sending.deliver_queued(ctx, quietly=True)
            return outcomes
    finally:
        ledger.close()


def _run_one(ctx: Context, ledger: Ledger, due: Schedule, progress: Progress | None) -> DueOutcome:
    """Check one scheduled issue again, send it, and write down how that went."""
    try:
        prepared = issues.prepare(ctx, due.path)
        # What the rules forbid (unsigned to a relay elsewhere) is refused before the
        # send starts: it is a failure of this schedule, not of the relay.
        ctx.outbox.check(ctx.outbox.rules(prepared.newsletter))
    except QantError as err:  # its errors, a draft, no secret or key where it runs
        problems = err.problems if isinstance(err, IssueError) else []
        why = "\n".join([str(err), *map(str, problems)])
        message = (
            f"{due.issue} was not sent at its time: {why}\nfix it, then "
            f"`qant-mail schedule {due.path} --at …` again (or `qant-mail send`)"
        )
        return _settled(ledger, due, "failed", message, err.exit_code)
    try:
        report = sending.send(ctx, prepared, progress=progress)
    except TransportUnavailable as err:
        # The relay is down: the send stays due, and the next run tries again.
        message = f"{due.issue}: {err}; tried again at the next run"
        return _settled(ledger, due, "scheduled", message, err.exit_code)
    except QantError as err:  # an issue changed mid-send, a lock held by a manual send…
        return _settled(ledger, due, "failed", f"{due.issue} was not sent: {err}", err.exit_code)
    summary = f"{due.issue}: {report.summary()}"
    if report.exit_code != ExitCode.OK:
        summary += "\n" + sending.hints(report, due.path)
    return _settled(ledger, due, "sent", summary, report.exit_code)


def _settled(ledger: Ledger, due: Schedule, state: str, message: str, code: ExitCode) -> DueOutcome:
    ledger.settle(due.issue, state, message)
    return DueOutcome(due, state, message, code)
