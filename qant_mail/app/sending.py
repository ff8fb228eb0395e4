"""The use cases of sending: plan an issue's send to its list and make it, a test, a
dry run; where a send stands and the history of sends; the outbox's queue of messages to
one reader (a signup's confirmation, a welcome), and the worker that drains it."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import shutil
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from qant_mail.app import doctor, issues
from qant_mail.app.context import Context
from qant_mail.base.addresses import normalise_address
from qant_mail.base.errors import ExitCode, QantError, SendError
from qant_mail.delivery.compose import Prepared, Recipient
from qant_mail.delivery.outbox import DrainReport, Progress, SendReport
from qant_mail.delivery.transport import MaildirTransport, Reply
from qant_mail.store.approvals import Approval, Approvals
from qant_mail.store.db import is_postgres
from qant_mail.store.ledger import (
    Delivery,
    Ledger,
    Requeued,
    Send,
    SendSummary,
    State,
    copy_without_send,
    left,
)
from qant_mail.store.mailqueue import DONE, Mail, MailQueue, QueueEntry, Waiting
from qant_mail.store.subscribers import Status, Subscribers

log = logging.getLogger(__name__)

# What the edges show of sends and of the outbox's queue.
__all__ = ["SendSummary", "State", "Waiting", "left"]


# -- a send to the list ------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What a send to the list is about to do."""

    subject: str
    recipients: int
    resuming: bool
    server: str
    already: dict[State, int]
    signing: str = ""
    joined: int = 0  # active readers who joined after the send was planned
    # What `qant-mail doctor` checks without the network (keys, alignment, base_url, the
    # size the relay takes): a blocking one stops the send before it starts.
    checks: tuple[doctor.Check, ...] = ()

    @property
    def blocking(self) -> list[doctor.Check]:
        """Return the checks that would make the send fail."""
        return [c for c in self.checks if c.status is doctor.Status.BLOCKING]

    @property
    def warnings(self) -> list[doctor.Check]:
        """Return the checks that let the send go, worse than it could."""
        return [c for c in self.checks if c.status is doctor.Status.WARNING]


def plan(ctx: Context, prepared: Prepared, *, new_subscribers: bool = False) -> Plan:
    """Say what `send` would do now (`new_subscribers`: with the readers who joined since
    the send was planned), without changing anything; refuse what the rules forbid."""
    outbox = ctx.outbox
    signing = outbox.check(outbox.rules(prepared.newsletter))
    subject = prepared.rendered.subject
    server = outbox.transport_for(prepared.newsletter).description
    checks = tuple(doctor.offline_checks(ctx, prepared))
    ledger = Ledger(ctx.store)
    try:
        send = ledger.find(prepared.issue_key)
        if send is None:
            active = Subscribers(ledger.db, prepared.newsletter).count()[Status.ACTIVE]
            return Plan(subject, active, False, server, {}, signing, checks=checks)
        counts = ledger.counts(send)
        todo = left(counts)
        joined = ledger.joined_since(send)
        todo += joined if new_subscribers else 0
        return Plan(subject, todo, True, server, counts, signing, joined, checks)
    finally:
        ledger.close()


def nothing_left(found: Plan, file: Path) -> tuple[str, ExitCode]:
    """Say why a plan has nothing to send, and with what status to end."""
    counts = found.already
    if not counts:
        return "no active subscriber: nothing to send", ExitCode.OK
    text = (
        f"nothing left to send for {file.stem}: sent {counts[State.SENT]}, "
        f"failed {counts[State.FAILED]}, unknown {counts[State.UNKNOWN]}, "
        f"skipped {counts[State.SKIPPED]} (`qant-mail status {file}`)"
    )
    if found.joined:
        text += "\n" + joined_hint(found.joined, file)
    unsettled = counts[State.FAILED] or counts[State.UNKNOWN]
    return text, ExitCode.PARTIAL if unsettled else ExitCode.OK


def joined_hint(joined: int, file: Path) -> str:
    """Say that readers joined after a send, and how to send the issue to them."""
    who = "reader joined" if joined == 1 else "readers joined"
    return f"{joined} {who} since this send was planned: `qant-mail send {file} --new-subscribers`"


def hints(report: SendReport, file: Path) -> str:
    """Return what to do next after a run that did not settle everything."""
    if report.cause:
        # The database went away mid-send: its counts are for `status` to say once back.
        return (
            f"the database could not be used: run `qant-mail send {file}` again once it "
            f"is back (it goes on where this run stopped); `qant-mail status {file}` then "
            "says where the send stands"
        )
    totals = report.totals
    said = []
    waiting = left(totals)
    if waiting:
        said.append(f"{waiting} still to send: run `qant-mail send {file}` again to go on")
    if totals.get(State.FAILED):
        said.append(f"{totals[State.FAILED]} failed for good")
    if totals.get(State.UNKNOWN):
        said.append(f"{totals[State.UNKNOWN]} unknown (maybe delivered)")
    said.append(f"`qant-mail status {file}` lists them")
    # Why this run's failures failed, the most common first: the server's own words.
    reasons = [f"  {n} × {reply}" for reply, n in report.failures.most_common(3)]
    return "\n".join(["; ".join(said), *reasons])


def send(
    ctx: Context,
    prepared: Prepared,
    *,
    progress: Progress | None = None,
    limit: int | None = None,
    wait_for_retries: bool = True,
    accept_changes: bool = False,
    stop: threading.Event | None = None,
    new_subscribers: bool = False,
) -> SendReport:
    """Send the issue to every active reader of its newsletter not sent it yet (resuming
    after a crash); then deliver what waits in the outbox's queue."""
    report = ctx.outbox.send_list(
        prepared,
        progress=progress,
        limit=limit,
        wait_for_retries=wait_for_retries,
        accept_changes=accept_changes,
        stop=stop,
        new_subscribers=new_subscribers,
    )
    if report.stopped is None:
        deliver_queued(ctx, quietly=True)
    return report


@dataclass(frozen=True)
class TestSend:
    """What a test send did: the server's answer for each address."""

    results: list[tuple[str, Reply]]
    warnings: list[str]

    @property
    def failed(self) -> int:
        """Return how many addresses the server refused."""
        return sum(not reply.ok for _, reply in self.results)


def prepare_test(ctx: Context, path: Path) -> Prepared:
    """Prepare the issue at `path` for a test: its subject marked [TEST], drafts too."""
    return issues.prepare(ctx, path, test=True)


def send_test(ctx: Context, prepared: Prepared, addresses: Sequence[str]) -> TestSend:
    """Send a test of a prepared issue (`prepare_test`) to `addresses`, at once; nothing
    goes in its send's ledger."""
    recipients = [normalise_address(a) for a in addresses]
    messages = [(a, prepared.template.personalise(Recipient(a))) for a in recipients]
    results = ctx.outbox.send_now("test", prepared.newsletter, messages)
    return TestSend(results, prepared.warnings)


def dry_run(
    ctx: Context,
    prepared: Prepared,
    folder: Path,
    *,
    progress: Progress | None = None,
    limit: int | None = None,
) -> SendReport:
    """Run the same send into `folder` (a Maildir), on a copy of the store."""
    with tempfile.TemporaryDirectory(prefix="qant-dry-run-") as scratch:
        copy = Path(scratch) / "store.db"
        source = ctx.store
        if is_postgres(source) or Path(source).exists():
            # A dry run shows the whole send, even of an issue already (partly) sent.
            copy_without_send(source, copy, prepared.issue_key)
        if folder.exists():
            shutil.rmtree(folder)
        rehearsal = Context(
            ctx.settings,
            env=ctx.env,
            clock=ctx.clock,
            transport=MaildirTransport(folder),
            store=copy,
            secret=ctx.secret(),
        )
        return rehearsal.outbox.send_list(
            prepared,
            progress=progress,
            limit=limit,
            wait_for_retries=False,
            accept_changes=True,
        )


# -- where sends stand -----------------------------------------------------------------


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
    waiting: Waiting = field(default_factory=Waiting)  # the outbox's queue
    relays: dict[str, int] = field(default_factory=dict)  # messages each relay took
    approval: Approval | None = None  # the last approval of the issue, if any
    review_required: bool = False  # whether its newsletter's sends need one

    @property
    def notes(self) -> list[str]:
        """Return what the counts mean, where they need explaining."""
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


def status(ctx: Context, issue: str) -> SendStatus:
    """Return where the send of `issue` (its file's name) stands."""
    ledger = Ledger(ctx.store)
    try:
        waiting = MailQueue(ledger.db).waiting()
        send = ledger.find(issue)
        newsletter = send.newsletter if send is not None else ctx.settings.main_id
        approval = Approvals(ledger.db).latest(newsletter, issue)
        required = ctx.settings.for_newsletter(newsletter).review_required
        if send is None:
            return SendStatus(
                issue, None, waiting=waiting, approval=approval, review_required=required
            )
        rows = {
            state: ledger.deliveries(send, state)
            for state in (State.FAILED, State.UNKNOWN, State.DEFERRED)
        }
        hard, soft, complaints = ledger.feedback_counts(send)
        counts = ledger.counts(send)
        lease = ctx.settings.sending.lease_seconds
        found = SendStatus(
            issue,
            send,
            counts,
            rows,
            hard,
            soft,
            complaints,
            ledger.running(issue, lease),
            waiting=waiting,
            approval=approval,
            review_required=required,
        )
        found.relays = ledger.relays(send)
        if ledger.shared:
            found.senders = ledger.workers(send, lease)
        if found.running:
            found.rate = ledger.recent_rate(send)
            if found.rate > 0:
                found.expected_finish = dt.datetime.now(dt.UTC) + dt.timedelta(
                    seconds=left(counts) / found.rate
                )
        return found
    finally:
        ledger.close()


@dataclass(frozen=True)
class History:
    """Every send, the latest first, and what waits in the outbox's queue."""

    sends: list[SendSummary]
    waiting: Waiting
    # The last approval of each approved issue, by (newsletter, issue).
    approvals: dict[tuple[str, str], Approval] = field(default_factory=dict)


def send_json(send: Send) -> dict[str, object]:
    """Return what names a send, as JSON values: its number, issue, newsletter,
    subject, and when it started and finished."""
    return {
        "id": send.id,
        "issue": send.issue,
        "newsletter": send.newsletter,
        "subject": send.subject,
        "created_at": send.created_at,
        "finished_at": send.finished_at,
    }


def summary_json(summary: SendSummary) -> dict[str, object]:
    """Return one send of the history as JSON values: what `sends --json` and the API
    show of it."""
    return {
        **send_json(summary.send),
        "running": summary.running,
        "recipients": summary.recipients,
        "counts": {state.value: n for state, n in summary.counts.items()},
        "bounced": summary.bounced,
        "soft_bounced": summary.soft_bounced,
        "complaints": summary.complaints,
        "unsubscribed": summary.unsubscribed,
        "relays": summary.relays,
    }


def history(ctx: Context) -> History:
    """Return every send of the store, the latest first (see `Ledger.history`), those a
    `send` is at work on now marked running; and what the outbox's queue holds."""
    lease = ctx.settings.sending.lease_seconds
    ledger = Ledger(ctx.store)
    try:
        sends = [
            dataclasses.replace(summary, running=True)
            if summary.send.finished_at is None and ledger.running(summary.send.issue, lease)
            else summary
            for summary in ledger.history()
        ]
        approvals = Approvals(ledger.db).latest_of_each()
        return History(sends, MailQueue(ledger.db).waiting(), approvals)
    finally:
        ledger.close()


def resolve_unknown(ctx: Context, issue: str, *, sent: bool) -> int:
    """Mark the unknown rows of a send sent, or put them back in the queue; say how many."""
    ledger = Ledger(ctx.store)
    try:
        return ledger.resolve_unknown(
            _planned(ledger, issue), State.SENT if sent else State.PENDING
        )
    finally:
        ledger.close()


def requeue_failed(
    ctx: Context,
    issue: str,
    *,
    containing: str = "",
    addresses: Sequence[str] = (),
    force: bool = False,
) -> Requeued:
    """Put a send's failed rows back in the queue (see `Ledger.requeue_failed`)."""
    ledger = Ledger(ctx.store)
    try:
        send = _planned(ledger, issue)
        return ledger.requeue_failed(send, containing=containing, addresses=addresses, force=force)
    finally:
        ledger.close()


def _planned(ledger: Ledger, issue: str) -> Send:
    send = ledger.find(issue)
    if send is None:
        raise SendError(f"{issue} has not been sent (no send planned)")
    return send


# -- the outbox's queue ----------------------------------------------------------------


@dataclass(frozen=True)
class Queue:
    """The outbox's queue as `qant-mail outbox` shows it."""

    waiting: Waiting
    counts: dict[Mail, int]
    entries: list[QueueEntry]


def queue(ctx: Context, *, everything: bool = False, limit: int = 100) -> Queue:
    """Return what waits in the outbox's queue (`everything`: what was done too)."""
    with ctx.db() as db:
        found = MailQueue(db)
        states = [Mail.PENDING, Mail.SENDING, *(DONE if everything else ())]
        return Queue(found.waiting(), found.counts(), found.entries(states, limit))


def deliver_queued(
    ctx: Context, *, quietly: bool = False, stop: threading.Event | None = None
) -> DrainReport:
    """Deliver the messages of the outbox's queue that are due (until `stop` is set).
    `quietly`: as the last step of another use case, whose outcome a store or a relay in
    trouble must not spoil (the next drain tries again)."""
    try:
        report = ctx.outbox.drain(stop=stop)
    except QantError as err:
        if not quietly:
            raise
        log.warning("outbox: the queue could not be delivered now: %s", err)
        return DrainReport(problems=[str(err)])
    for problem in report.problems:
        log.warning("outbox: %s", problem)
    return report


class QueueWorker:
    """Drains the outbox's queue from a thread of its own: at once when woken (a message
    was queued), and every `poll` seconds for retries and for messages other processes
    queued. What goes wrong is logged; the worker goes on."""

    def __init__(self, ctx: Context, *, poll: float = 5.0) -> None:
        self.ctx = ctx
        self.poll = poll
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start draining (a worker started twice runs once)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="qant-outbox", daemon=True)
            self._thread.start()

    def wake(self) -> None:
        """Drain now: something was queued."""
        self._wake.set()

    def stop(self) -> None:
        """Stop after the message in hand, if any."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            wait = self.poll
            try:
                report = deliver_queued(self.ctx, stop=self._stop)
                if report.tried:
                    log.info(
                        "outbox: %d sent, %d to try again, %d failed",
                        report.sent,
                        report.deferred,
                        report.failed,
                    )
                due = self.ctx.outbox.next_due()
                if due is not None:
                    # Never a busy loop: a message due now that another process holds.
                    wait = min(wait, max(0.05, due - self.ctx.clock()))
            except QantError as err:
                log.error("outbox: %s", err)
            except Exception:
                log.exception("outbox: the drain failed")
            self._wake.wait(wait)
