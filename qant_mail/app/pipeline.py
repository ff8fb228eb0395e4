"""The use cases, each one walk through the stages: check an issue, render it for the
sample reader, make it ready to send, say where a send stands, list past sends, schedule
a send and run what is due. The command line, the preview and the public side call
these; the stages below know nothing of each other's callers.

    load (YAML → Issue) → render (HTML, text) → lint (the email) → compose (MIME) → send
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import os
import zoneinfo
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

from qant_mail.audience import tokens
from qant_mail.authoring.lint import lint
from qant_mail.authoring.load import Document, load
from qant_mail.authoring.render import Asset, RenderedIssue, Renderer
from qant_mail.base.config import Settings
from qant_mail.base.errors import ExitCode, IssueError, Problem, QantError, SendError, Severity
from qant_mail.base.files import write_all
from qant_mail.delivery.compose import MessageTemplate, Prepared, Recipient, dkim_keys

if TYPE_CHECKING:
    from qant_mail.delivery.send import Progress
    from qant_mail.delivery.transport import Transport
    from qant_mail.store.ledger import (
        Delivery,
        Ledger,
        Requeued,
        Schedule,
        Send,
        SendSummary,
        State,
    )


@contextlib.contextmanager
def _ledger(settings: Settings) -> Iterator[Ledger]:
    """Open the send ledger for one use case, and close it however that ends."""
    # Imported here, not above: `render`, `check` and the preview never open it, and
    # start a little sooner without SQLite and the sender.
    from qant_mail.store.ledger import Ledger

    ledger = Ledger(settings.store_path)
    try:
        yield ledger
    finally:
        ledger.close()


class ScheduleError(QantError):
    """A send that cannot be scheduled (a time past, an issue sent already) or cancelled."""


@dataclass(frozen=True)
class CheckReport:
    """What `check` found in an issue file; the document and render when it loaded."""

    path: Path
    problems: list[Problem]
    document: Document | None = None
    rendered: RenderedIssue | None = None
    settings: Settings | None = None  # those of the issue's newsletter

    @property
    def errors(self) -> list[Problem]:
        """Return the problems that stop a render or a send."""
        return [p for p in self.problems if p.severity is Severity.ERROR]

    @property
    def warnings(self) -> list[Problem]:
        """Return the problems worth a look that stop nothing."""
        return [p for p in self.problems if p.severity is Severity.WARNING]


def check(path: Path, renderer: Renderer) -> CheckReport:
    """Validate the issue at `path`, render it (with the settings of the newsletter it
    belongs to) and lint the email: every problem at once."""
    try:
        document = load(path)
    except IssueError as err:
        return CheckReport(path, err.problems)
    wanted = document.issue.newsletter
    if wanted is not None and wanted not in renderer.settings.editions:
        known = ", ".join(renderer.settings.editions)
        problem = document.problem(
            ("newsletter",),
            f"no newsletter {wanted!r} in the settings (known: {known})",
            Severity.ERROR,
        )
        return CheckReport(path, [problem], document)
    if wanted is not None:  # else the renderer given: the main newsletter's, or a welcome's
        renderer = renderer.for_newsletter(wanted)
    rendered = renderer.render(document.issue, key=document.key)
    problems = lint(document, rendered, renderer.settings)
    return CheckReport(path, problems, document, rendered, renderer.settings)


def render_sample(path: Path, settings: Settings, out_dir: Path) -> list[Path]:
    """Render the issue at `path` for the sample reader: write NAME.html, .txt and .eml,
    all of them or none."""
    document = load(path)
    settings = settings.for_newsletter(document.issue.newsletter)
    rendered = Renderer(settings).render(document.issue, key=document.key)
    template = MessageTemplate(
        rendered, settings, secret=tokens.secret_or_sample(), issue_key=document.key
    )
    recipient = Recipient(settings.preview.sample_email, settings.preview.sample_name)
    target = out_dir.resolve()

    def local_url(asset: Asset) -> str:
        # The HTML file shows the images from where they are, so that it opens in a browser.
        return quote(Path(os.path.relpath(asset.source, target)).as_posix())

    page, text = rendered.fill(template.values(recipient), asset_url=local_url)
    files = {
        target / f"{document.key}.html": page.encode("utf-8"),
        target / f"{document.key}.txt": text.encode("utf-8"),
        target / f"{document.key}.eml": template.personalise(recipient),
    }
    write_all(files)
    return list(files)


def sendable(path: Path, renderer: Renderer, *, test: bool = False) -> CheckReport:
    """Check the issue at `path`; raise what keeps it from going out: its errors, or a
    draft (unless for a test)."""
    report = check(path, renderer)
    if report.document is None or report.rendered is None:
        raise IssueError(path, report.problems)
    if report.errors:
        raise IssueError(path, report.errors)
    if report.document.issue.draft and not test:
        raise SendError(
            f"{path}: the issue is marked `draft: true`; remove that line when it is ready "
            "(test sends with --to work on drafts)"
        )
    return report


def prepare_send(
    path: Path,
    settings: Settings,
    *,
    test: bool = False,
    renderer: Renderer | None = None,
    secret: bytes | None = None,
) -> Prepared:
    """Check, render and compose the issue at `path` for a send; refuse what must not
    go out (errors, a draft to the list)."""
    report = sendable(path, renderer or Renderer(settings), test=test)
    assert report.document is not None
    assert report.rendered is not None
    assert report.settings is not None
    settings = report.settings
    key = report.document.key
    rendered = report.rendered
    template = MessageTemplate(
        rendered,
        settings,
        secret=secret or tokens.secret_from_env(),
        issue_key=key,
        test=test,
        keys=dkim_keys(settings),
    )
    digest = hashlib.sha256()
    for part in (rendered.subject, rendered.html, rendered.text):
        digest.update(part.encode("utf-8"))
    warnings = [str(p) for p in report.warnings]
    if settings.images.mode == "host" and rendered.assets:
        warnings.append(
            f"the pictures are linked from {settings.archive_url}/{key}/images/: "
            "publish the archive (`qant-mail archive`) before readers open the issue"
        )
    return Prepared(
        key, rendered, template, digest.hexdigest()[:16], warnings, settings.newsletter.id
    )


@dataclass
class SendStatus:
    """Where the send of an issue stands, and what the operator may want to know."""

    issue: str
    send: Send | None
    counts: dict[State, int] = field(default_factory=dict)
    rows: dict[State, list[Delivery]] = field(default_factory=dict)
    bounced: int = 0
    soft_bounced: int = 0
    complaints: int = 0
    running: bool = False
    # Each sender of the send (PostgreSQL: several may join): name, started, at work
    # now, rows it holds.
    senders: list[tuple[str, str, bool, int]] = field(default_factory=list)
    rate: float = 0.0  # messages a second over the last minute, while it runs
    expected_finish: dt.datetime | None = None  # at that rate, while it runs

    @property
    def notes(self) -> list[str]:
        """Return what the counts mean, where they need explaining."""
        from qant_mail.store.ledger import State

        notes = []
        in_flight = self.counts.get(State.SENDING, 0)
        if in_flight and self.running:
            notes.append(f"sending: {in_flight} in flight in a `send` running now")
        elif in_flight:
            notes.append(
                f"sending: {in_flight} were in flight when a run stopped without finishing "
                "(killed?); the next `send` sends them again, and each may arrive twice"
            )
        if self.counts.get(State.UNKNOWN):
            notes.append(
                "unknown: the connection broke after the message was sent, so it may have "
                "arrived; --requeue-unknown sends them again, --mark-unknown-sent does not"
            )
        if self.counts.get(State.FAILED):
            notes.append(
                "failed: --requeue-failed [--reason TEXT] [--address A] sends them again "
                "(after a full mailbox, a size limit, a server that gave up)"
            )
        return notes


def status(settings: Settings, issue: str) -> SendStatus:
    """Return where the send of `issue` (its file's name) stands."""
    from qant_mail.store.ledger import State, left

    with _ledger(settings) as ledger:
        send = ledger.find(issue)
        if send is None:
            return SendStatus(issue, None)
        rows = {
            state: ledger.deliveries(send, state)
            for state in (State.FAILED, State.UNKNOWN, State.DEFERRED)
        }
        hard, soft, complaints = ledger.feedback_counts(send)
        counts = ledger.counts(send)
        lease = settings.sending.lease_seconds
        found = SendStatus(
            issue, send, counts, rows, hard, soft, complaints, ledger.running(issue, lease)
        )
        if ledger.shared:
            found.senders = ledger.workers(send, lease)
        if found.running:
            found.rate = ledger.recent_rate(send)
            if found.rate > 0:
                found.expected_finish = dt.datetime.now(dt.UTC) + dt.timedelta(
                    seconds=left(counts) / found.rate
                )
        return found


def history(settings: Settings) -> list[SendSummary]:
    """Return every send of the store, the latest first (see `Ledger.history`), those
    a `send` is at work on now marked running."""
    lease = settings.sending.lease_seconds
    with _ledger(settings) as ledger:
        return [
            dataclasses.replace(summary, running=True)
            if summary.send.finished_at is None and ledger.running(summary.send.issue, lease)
            else summary
            for summary in ledger.history()
        ]


def resolve_unknown(settings: Settings, issue: str, *, sent: bool) -> int:
    """Mark the unknown rows of a send sent, or put them back in the queue; say how many."""
    from qant_mail.store.ledger import State

    with _ledger(settings) as ledger:
        send = _planned(ledger, issue)
        return ledger.resolve_unknown(send, State.SENT if sent else State.PENDING)


def requeue_failed(
    settings: Settings,
    issue: str,
    *,
    containing: str = "",
    addresses: Sequence[str] = (),
    force: bool = False,
) -> Requeued:
    """Put a send's failed rows back in the queue (see `Ledger.requeue_failed`)."""
    with _ledger(settings) as ledger:
        send = _planned(ledger, issue)
        return ledger.requeue_failed(send, containing=containing, addresses=addresses, force=force)


def _planned(ledger: Ledger, issue: str) -> Send:
    send = ledger.find(issue)
    if send is None:
        raise SendError(f"{issue} has not been sent (no send planned)")
    return send


@dataclass(frozen=True)
class DueOutcome:
    """What `run_due` did with one scheduled send."""

    schedule: Schedule
    state: str  # sent, failed, or scheduled (to try again at the next run)
    message: str
    exit_code: ExitCode


def parse_time(text: str, settings: Settings) -> dt.datetime:
    """Return the moment `text` names ("2026-12-01 08:00", ISO 8601), read in the
    newsletter's time zone unless it gives its own offset."""
    try:
        moment = dt.datetime.fromisoformat(text.strip())
    except ValueError as err:
        raise ScheduleError(
            f"{text!r} is not a time written YYYY-MM-DD HH:MM (in {settings.newsletter.timezone})"
        ) from err
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=zoneinfo.ZoneInfo(settings.newsletter.timezone))
    return moment


def schedule(
    path: Path, settings: Settings, at: dt.datetime, *, now: dt.datetime | None = None
) -> Schedule:
    """Set the issue at `path` to go to the list at `at`, once it passes its checks now
    (they run again at its time)."""

    now = now or dt.datetime.now(dt.UTC)
    if at <= now:
        raise ScheduleError(f"{at.isoformat()} is past: give a time to come, or send it now")
    # Its errors (and a draft) are refused now, not found at its time. The secret and the
    # keys are the sender's business then: a schedule can be set where they are not.
    sendable(path, Renderer(settings))
    with _ledger(settings) as ledger:
        if ledger.find(path.stem) is not None:
            raise ScheduleError(
                f"{path.stem} has been sent already (`qant-mail status {path}`); "
                "`qant-mail send FILE --new-subscribers` serves those who joined since"
            )
        return ledger.schedule(path.stem, path.resolve(), at)


def schedules(settings: Settings) -> list[Schedule]:
    """Return every scheduled send, the next due first."""
    with _ledger(settings) as ledger:
        return ledger.schedules()


def cancel(settings: Settings, issue: str) -> None:
    """Cancel the scheduled send of `issue`."""
    with _ledger(settings) as ledger:
        if not ledger.cancel(issue):
            found = ledger.scheduled(issue)
            state = f"it is {found.state}" if found else "it is not scheduled"
            raise ScheduleError(f"{issue} cannot be cancelled: {state}")


def run_due(
    settings: Settings,
    *,
    now: dt.datetime | None = None,
    transport: Transport | None = None,
    progress: Progress | None = None,
) -> list[DueOutcome] | None:
    """Send every scheduled issue whose time has come, each checked again first; None
    when another `run-due` is running (it will do them)."""
    from qant_mail.delivery.transport import SmtpTransport

    with _ledger(settings) as ledger, ledger.run_lock() as held:
        if not held:
            return None
        return [
            _run_one(ledger, due, settings, transport or SmtpTransport(settings), progress)
            for due in ledger.take_due(now or dt.datetime.now(dt.UTC))
        ]


def _run_one(
    ledger: Ledger,
    due: Schedule,
    settings: Settings,
    transport: Transport,
    progress: Progress | None,
) -> DueOutcome:
    """Check one scheduled issue again, send it, and write down how that went."""
    from qant_mail.delivery.send import send_to_list
    from qant_mail.delivery.transport import TransportUnavailable

    try:
        prepared = prepare_send(due.path, settings)
    except QantError as err:  # its errors, a draft, no secret where it runs
        problems = err.problems if isinstance(err, IssueError) else []
        why = "\n".join([str(err), *map(str, problems)])
        message = (
            f"{due.issue} was not sent at its time: {why}\nfix it, then "
            f"`qant-mail schedule {due.path} --at …` again (or `qant-mail send`)"
        )
        return _settled(ledger, due, "failed", message, err.exit_code)
    try:
        report = send_to_list(prepared, settings, transport, progress=progress)
    except TransportUnavailable as err:
        # The relay is down: the send stays due, and the next run tries again.
        message = f"{due.issue}: {err}; tried again at the next run"
        return _settled(ledger, due, "scheduled", message, err.exit_code)
    except QantError as err:  # an issue changed mid-send, a lock held by a manual send…
        return _settled(ledger, due, "failed", f"{due.issue} was not sent: {err}", err.exit_code)
    summary = f"{due.issue}: {report.summary()}"
    if report.exit_code != ExitCode.OK:
        summary += "\n" + report.hints(due.path)
    return _settled(ledger, due, "sent", summary, report.exit_code)


def _settled(ledger: Ledger, due: Schedule, state: str, message: str, code: ExitCode) -> DueOutcome:
    ledger.settle(due.issue, state, message)
    return DueOutcome(due, state, message, code)
