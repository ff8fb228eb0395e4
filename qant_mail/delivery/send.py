"""Sending an issue: plan the recipients, personalise, hand to the transport, record.

Each recipient's row goes `pending → sending → sent | deferred | failed | unknown` in the
ledger: `sending` is written before MAIL FROM, the outcome right after the server's
reply, so that a re-run after a crash resends only what may not have gone out (at most
one message per open connection, the one in flight)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from qant_mail.audience import tokens
from qant_mail.base.config import Settings
from qant_mail.base.errors import ExitCode, QantError, SendError
from qant_mail.delivery import dkim
from qant_mail.delivery.compose import ComposeError, Prepared, Recipient
from qant_mail.delivery.transport import (
    Connection,
    ConnectionLost,
    MaildirTransport,
    RateLimiter,
    Reply,
    Transport,
    TransportUnavailable,
)
from qant_mail.store.db import is_postgres
from qant_mail.store.ledger import (
    Delivery,
    Ledger,
    LedgerError,
    Send,
    State,
    copy_without_send,
    left,
)
from qant_mail.store.subscribers import Status, Subscribers

CLAIM_SIZE = 8
# How often a sender whose work is done looks again at the rows other senders hold.
HELD_POLL = 0.5
MAX_RETRY_DELAY = 3600.0
# A server that goes silent after the data this many times in a row is broken, not
# slow: stop (the run resumes later) rather than pay a timeout per message forever.
SILENCES_BEFORE_STOP = 3
# The distinct reasons of failure a run keeps for its report (they may name addresses).
MAX_REASONS = 50
# Permanent failures that mean the mailbox does not exist (RFC 3463): the address is
# marked bounced, and later issues skip it.
BOUNCE_CODES = {"5.1.1", "5.1.2", "5.1.3", "5.1.6", "5.1.10", "5.2.1"}
_NO_MAILBOX = re.compile(
    r"user unknown|unknown user|no such (user|mailbox)|mailbox (unavailable|not found)|"
    r"does not exist|recipient (rejected|unknown)|invalid recipient|address rejected",
    re.IGNORECASE,
)


class Progress(Protocol):
    """What the sender tells whoever shows its progress."""

    def start(self, total: int) -> None:
        """Announce how many messages this run will try."""

    def advance(self, state: State) -> None:
        """Count one message done, in its final state for this run."""

    def note(self, message: str) -> None:
        """Say something worth knowing (slowing down, waiting for retries)."""


class NoProgress:
    """Shows nothing."""

    def start(self, total: int) -> None:
        """Show nothing."""

    def advance(self, state: State) -> None:
        """Show nothing."""

    def note(self, message: str) -> None:
        """Show nothing."""


@dataclass(frozen=True)
class Plan:
    """What a send to the list is about to do."""

    subject: str
    recipients: int
    resuming: bool
    server: str
    already: dict[State, int]
    signing: str = ""
    joined: int = 0  # active subscribers who joined after the send was planned

    def nothing_left(self, file: Path) -> tuple[str, ExitCode]:
        """Say why there is nothing to send, and with what status to end."""
        counts = self.already
        if not counts:
            return "no active subscriber: nothing to send", ExitCode.OK
        text = (
            f"nothing left to send for {file.stem}: sent {counts[State.SENT]}, "
            f"failed {counts[State.FAILED]}, unknown {counts[State.UNKNOWN]}, "
            f"skipped {counts[State.SKIPPED]} (`qant-mail status {file}`)"
        )
        if self.joined:
            text += "\n" + joined_hint(self.joined, file)
        unsettled = counts[State.FAILED] or counts[State.UNKNOWN]
        return text, ExitCode.PARTIAL if unsettled else ExitCode.OK


@dataclass
class SendReport:
    """What a run did (each recipient counted once, in the state it ended this run in),
    and where the whole send stands."""

    issue: str
    done: Counter[State] = field(default_factory=Counter)
    totals: dict[State, int] = field(default_factory=dict)
    elapsed: float = 0.0
    stopped: str | None = None
    exit_code: ExitCode = ExitCode.OK
    limited: bool = False  # the run stopped at --limit, by request
    failures: Counter[str] = field(default_factory=Counter)  # why, for the rows failed now
    joined: int = 0  # active subscribers who joined after the send was planned

    @property
    def rate(self) -> float:
        """Return the messages handled per second in this run."""
        handled = sum(
            self.done[s] for s in (State.SENT, State.DEFERRED, State.FAILED, State.UNKNOWN)
        )
        return handled / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def remaining(self) -> int:
        """Return the rows of the send not settled yet (pending, deferred, unknown…)."""
        unsettled = (State.PENDING, State.SENDING, State.DEFERRED, State.UNKNOWN)
        return sum(self.totals.get(s, 0) for s in unsettled)

    def summary(self) -> str:
        """Return the one line a run ends with."""
        shown = (State.SENT, State.DEFERRED, State.FAILED, State.UNKNOWN, State.SKIPPED)
        parts = [f"{state.value} {self.done[state]}" for state in shown]
        line = f"{', '.join(parts)} in {self.elapsed:.1f} s ({self.rate:.0f} messages/s)"
        return line + (f"; stopped: {self.stopped}" if self.stopped else "")

    def hints(self, file: Path) -> str:
        """Return what to do next after a run that did not settle everything."""
        totals = self.totals
        hints = []
        waiting = left(totals)
        if waiting:
            hints.append(f"{waiting} still to send: run `qant-mail send {file}` again to go on")
        if totals.get(State.FAILED):
            hints.append(f"{totals[State.FAILED]} failed for good")
        if totals.get(State.UNKNOWN):
            hints.append(f"{totals[State.UNKNOWN]} unknown (maybe delivered)")
        hints.append(f"`qant-mail status {file}` lists them")
        # Why this run's failures failed, the most common first: the server's own words.
        reasons = [f"  {n} × {reply}" for reply, n in self.failures.most_common(3)]
        return "\n".join(["; ".join(hints), *reasons])


def joined_hint(joined: int, file: Path) -> str:
    """Say that readers joined after a send, and how to send the issue to them."""
    who = "reader joined" if joined == 1 else "readers joined"
    return f"{joined} {who} since this send was planned: `qant-mail send {file} --new-subscribers`"


def require_signature(
    settings: Settings, keys: Sequence[dkim.DkimKey], transport: Transport
) -> str:
    """Say how messages will be signed; refuse an unsigned send to a relay elsewhere
    unless `dkim.required` is off."""
    if not keys:
        if getattr(transport, "remote", False) and settings.dkim.required:
            raise SendError(
                f"messages to {transport.description} would not be DKIM-signed: Gmail and "
                "Yahoo treat unsigned bulk mail as suspect and ignore its one-click "
                "unsubscribe. Create a key (`qant-mail dkim keygen`), publish its record, "
                "set dkim.selector and QANT_DKIM_PRIVATE_KEY; or set dkim.required = false"
            )
        return "none (unsigned)"
    from_domain = settings.sender_domain.lower()
    described = []
    for key in keys:
        domain = key.domain.lower()
        aligned = domain == from_domain or from_domain.endswith("." + domain)
        aligned |= domain.endswith("." + from_domain)
        alignment = "aligned with From" if aligned else f"NOT aligned with From ({from_domain})"
        described.append(f"{key.algorithm} by {key.selector}._domainkey.{key.domain}, {alignment}")
    return "; ".join(described)


def plan(
    prepared: Prepared, settings: Settings, transport: Transport, *, new_subscribers: bool = False
) -> Plan:
    """Say what `send` would do now (`new_subscribers`: with the readers who joined since
    the send was planned), without changing anything."""
    signing = require_signature(settings, prepared.template.keys, transport)
    ledger = Ledger(settings.store_path)
    try:
        send = ledger.find(prepared.issue_key)
        subject, server = prepared.rendered.subject, transport.description
        if send is None:
            active = Subscribers(ledger.db, prepared.newsletter).count()[Status.ACTIVE]
            return Plan(subject, active, False, server, {}, signing)
        counts = ledger.counts(send)
        todo = left(counts)
        joined = ledger.joined_since(send)
        todo += joined if new_subscribers else 0
        return Plan(subject, todo, True, server, counts, signing, joined)
    finally:
        ledger.close()


def send_to_list(
    prepared: Prepared,
    settings: Settings,
    transport: Transport,
    *,
    progress: Progress | None = None,
    limit: int | None = None,
    wait_for_retries: bool = True,
    accept_changes: bool = False,
    stop: threading.Event | None = None,
    store_path: Path | str | None = None,
    new_subscribers: bool = False,
) -> SendReport:
    """Send the issue to every active subscriber not sent it yet; resume after a crash.
    `new_subscribers`: an issue sent before goes to the readers who joined since, too."""
    ledger = Ledger(store_path or settings.store_path)
    try:
        # SQLite: one process per send, by its lock. PostgreSQL: each `send` joins the
        # run, claiming rows the others do not hold.
        exclusive = contextlib.nullcontext() if ledger.shared else ledger.lock(prepared.issue_key)
        with exclusive:
            send = ledger.find(prepared.issue_key)
            if send is None:
                try:
                    send = ledger.plan(
                        prepared.issue_key,
                        prepared.content_hash,
                        prepared.rendered.subject,
                        prepared.newsletter,
                    )
                except LedgerError:
                    send = ledger.find(prepared.issue_key) if ledger.shared else None
                    if send is None:
                        raise
            elif send.newsletter != prepared.newsletter:
                raise SendError(
                    f"{prepared.issue_key} was sent as an issue of {send.newsletter}, and this "
                    f"one is of {prepared.newsletter}: issue files of the newsletters need "
                    "names of their own (rename this file)"
                )
            elif send.content_hash != prepared.content_hash and not accept_changes:
                raise SendError(
                    f"{prepared.issue_key} changed since its send started ({send.created_at}); "
                    "re-run with --accept-changes to send this version to those not served yet"
                )
            if new_subscribers:
                ledger.add_joined(send)
            ledger.recover(send)
            run = _Run(
                prepared, settings, transport, ledger, send, progress or NoProgress(), limit, stop
            )
            report = run.run(wait_for_retries)
            report.totals = ledger.counts(send)
            report.joined = ledger.joined_since(send)
            if not report.remaining and report.totals[State.FAILED] == 0:
                ledger.finish(send)
            report.exit_code = _exit_code(report)
    finally:
        ledger.close()
    return report


def dry_run(
    prepared: Prepared,
    settings: Settings,
    folder: Path,
    *,
    progress: Progress | None = None,
    limit: int | None = None,
) -> SendReport:
    """Run the same send into `folder` (a Maildir), on a copy of the database."""
    with tempfile.TemporaryDirectory(prefix="qant-dry-run-") as scratch:
        copy = Path(scratch) / "store.db"
        source = settings.store_path
        if is_postgres(source) or Path(source).exists():
            # A dry run shows the whole send, even of an issue already (partly) sent.
            copy_without_send(source, copy, prepared.issue_key)
        if folder.exists():
            shutil.rmtree(folder)
        return send_to_list(
            prepared,
            settings,
            MaildirTransport(folder),
            progress=progress,
            limit=limit,
            wait_for_retries=False,
            accept_changes=True,
            store_path=copy,
        )


def send_test(
    prepared: Prepared, settings: Settings, transport: Transport, addresses: list[str]
) -> list[tuple[str, Reply]]:
    """Send the issue (subject marked [TEST]) to `addresses`; nothing goes in the ledger."""
    connection = transport.connect()
    sender = settings.smtp.return_path or settings.sender.address
    results: list[tuple[str, Reply]] = []
    try:
        for address in addresses:
            data = prepared.template.personalise(Recipient(address))
            try:
                reply = connection.send(sender, address, data, dot_safe=True)
            except ConnectionLost as lost:
                raise TransportUnavailable(f"{transport.description}: {lost}") from lost
            results.append((address, reply))
    finally:
        connection.close()
    return results


def _exit_code(report: SendReport) -> ExitCode:
    if report.stopped == "interrupted":
        return ExitCode.INTERRUPTED
    if report.stopped == "unavailable":
        return ExitCode.UNAVAILABLE
    if report.totals.get(State.FAILED, 0):
        return ExitCode.PARTIAL
    troubled = report.done[State.DEFERRED] + report.done[State.UNKNOWN]
    if report.limited and not troubled:
        return ExitCode.OK  # what was asked for (the next N) went out
    if report.remaining:
        return ExitCode.PARTIAL
    return ExitCode.OK


class _Run:
    """One run of a send: workers, each with its connection, share a rate limiter."""

    def __init__(
        self,
        prepared: Prepared,
        settings: Settings,
        transport: Transport,
        ledger: Ledger,
        send: Send,
        progress: Progress,
        limit: int | None,
        stop: threading.Event | None,
    ) -> None:
        self.prepared, self.settings, self.transport = prepared, settings, transport
        self.ledger, self.send, self.progress = ledger, send, progress
        self.budget = limit
        self.stop = stop or threading.Event()
        self.lock = threading.Lock()
        self.report = SendReport(send.issue)
        self.sender = settings.smtp.return_path or settings.sender.address
        rules = settings.sending
        history = ledger.quota_since(int(time.time() // 60) - 24 * 60)
        self.limiter = RateLimiter(rules.per_second, rules.per_hour, rules.per_day, history)
        self.connected = 0
        self.failures: list[str] = []
        self.gave_up = 0
        self.running = 0
        self.finished = threading.Condition(self.lock)
        # Each recipient counted once, in the state it ended this run in: only the rows
        # that may come back in this run (deferred) are remembered, so that memory does
        # not grow with the list.
        self.done: Counter[State] = Counter()
        self.deferred: set[int] = set()
        self.reasons: Counter[str] = Counter()
        self.silences = 0  # consecutive messages lost after their data
        # Quota counts go to the database about once a second, with an outcome: a killed
        # run forgets at most a second's worth, against a commit per message saved.
        self.unflushed: Counter[int] = Counter()
        self.flushed_at = time.monotonic()
        # Who this sender is among those of the send, and how long its hold on a row
        # lasts without being renewed.
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.lease = rules.lease_seconds

    def run(self, wait_for_retries: bool) -> SendReport:
        self.ledger.join(self.send, self.worker)
        self._share()  # before the first message: the others may be at work already
        beating = threading.Event()
        heart = threading.Thread(target=self._heartbeat, args=(beating,), daemon=True)
        heart.start()
        try:
            return self._run(wait_for_retries)
        finally:
            beating.set()
            heart.join()
            self.ledger.leave(self.send, self.worker)

    def _heartbeat(self, done: threading.Event) -> None:
        """Renew this sender's hold on its rows, and share the limits with the senders
        of the send, every third of a lease."""
        try:
            while not done.wait(self.lease / 3):
                try:
                    self._share()
                except (QantError, OSError) as err:
                    # A missed beat costs at most a row sent twice, after the lease: go on.
                    self.progress.note(f"could not renew the lease: {err}")
        finally:
            self.ledger.close()  # this thread's connection

    def _share(self) -> None:
        """Renew this sender's leases and take its part of the limits."""
        senders = self.ledger.renew(self.send, self.worker, self.lease)
        minute = int(time.time() // 60)
        self.limiter.share(senders, self.ledger.quota_since(minute - 24 * 60))

    def _run(self, wait_for_retries: bool) -> SendReport:
        start = time.monotonic()
        counts = self.ledger.counts(self.send)
        total = counts[State.PENDING] + counts[State.DEFERRED]
        self.progress.start(min(total, self.budget) if self.budget is not None else total)
        try:
            while not self.stop.is_set():
                self._round()
                if self.report.stopped:
                    break
                due = self.ledger.next_retry(self.send)
                # Rows other senders hold: done by them, or, if one died, ours after
                # its lease runs out.
                held = self.ledger.next_release(self.send, self.worker)
                wake = min((t for t in (due, held) if t is not None), default=None)
                if wake is None or not wait_for_retries or self.budget == 0:
                    break
                delay = max(0.0, wake - time.time())
                if due is not None and wake == due:
                    waiting = self.ledger.counts(self.send)[State.DEFERRED]
                    self.progress.note(f"{waiting} deferred; next try in {delay:.0f} s")
                if held is not None:
                    # Another sender's lease is renewed while it lives: look again soon,
                    # for the end of its work (or of it).
                    delay = min(delay, HELD_POLL)
                self.stop.wait(delay)
        except KeyboardInterrupt:
            self.stop.set()
            self.report.stopped = "interrupted"
            self._join()
        if self.stop.is_set() and self.report.stopped is None:
            self.report.stopped = "interrupted"
        for minute, messages in self._quota_to_flush(None).items():
            self.ledger.count_quota(minute, messages)
        self.report.elapsed = time.monotonic() - start
        self.report.done = +self.done
        self.report.failures = self.reasons
        self.report.limited = self.budget == 0
        return self.report

    def _round(self) -> None:
        counts = self.ledger.counts(self.send)
        due = counts[State.PENDING] + counts[State.DEFERRED]
        workers = max(1, min(self.settings.smtp.connections, due))
        self.gave_up = 0
        for number in range(workers):
            with self.lock:
                self.running += 1
            threading.Thread(target=self._worker, name=f"qant-send-{number}", daemon=True).start()
        self._join()
        if self.failures and self.connected == 0:
            self.report.stopped = "unavailable"
            raise TransportUnavailable(self.failures[0])
        if self.gave_up == workers and not self.stop.is_set():
            # Every connection went away and could not come back: stop, resumable.
            self.report.stopped = "unavailable"
            self.progress.note(f"the server went away: {self.failures[-1]}")

    def _join(self) -> None:
        # Not Thread.join(): on Python 3.11, a Ctrl-C that interrupts it can mark a thread
        # still running as finished (bpo-45274), and its messages would go unrecorded.
        with self.finished:
            while self.running:
                self.finished.wait(0.2)

    def _worker(self) -> None:
        connection: Connection | None = None
        claimed: list[Delivery] = []
        try:
            connection = self._connect()
            if connection is None:
                return
            while not self.stop.is_set():
                size = self._take_budget(CLAIM_SIZE)
                if size == 0:
                    return
                claimed, skipped = self.ledger.claim(
                    self.send, size, worker=self.worker, lease=self.lease
                )
                self._give_back_budget(size - len(claimed) - len(skipped))
                for position in skipped:
                    self._count(position, State.SKIPPED, "left the list")
                if not claimed and not skipped:
                    return
                while claimed and not self.stop.is_set():
                    connection = self._deliver(connection, claimed[0])
                    claimed.pop(0)
                    if connection is None:
                        return
        finally:
            try:
                if claimed:
                    self.ledger.release(self.send, [d.position for d in claimed])
                if connection is not None:
                    connection.close()
                self.ledger.close()
            finally:
                with self.finished:
                    self.running -= 1
                    self.finished.notify_all()

    def _deliver(self, connection: Connection, row: Delivery) -> Connection | None:
        """Send one row; return the connection to go on with (None: give up)."""
        try:
            data = self.prepared.template.personalise(
                Recipient(row.email, row.name, row.subscriber_id or 0)
            )
        except ComposeError as err:
            # This row cannot become a message; the others can.
            self._record(row, State.FAILED, f"not sent: {err}", None, attempt=False)
            return connection
        minute = self.limiter.acquire(self.stop)
        if minute is None:
            if not self.stop.is_set():
                self.report.stopped = "daily quota reached"
                self.progress.note(
                    f"daily quota of {self.settings.sending.per_day} reached; "
                    "run again tomorrow to go on"
                )
                self.stop.set()
            self.ledger.release(self.send, [row.position])
            return connection
        try:
            reply = connection.send(self._return_path(row), row.email, data, dot_safe=True)
        except ConnectionLost as lost:
            connection.close()
            if lost.after_data:
                self._record(row, State.UNKNOWN, f"connection lost after the data: {lost}", minute)
                if self._silent_again():
                    return None
            else:
                self._record_temporary(row, f"connection lost: {lost}", minute)
            return self._connect(again=True)
        with self.lock:
            self.silences = 0
        self._settle(row, reply, minute)
        if reply.slow_down:
            self.limiter.slow_down()
            self.progress.note(f"the server asks to slow down ({reply}); slowing down")
        elif reply.ok:
            self.limiter.speed_up()
        if reply.code == 421 or getattr(connection, "worn", False):
            # 421: the server is closing this connection. Worn: it has refused enough
            # here that a fresh connection keeps us under its error limits.
            connection.close()
            return self._connect(again=True)
        return connection

    def _return_path(self, row: Delivery) -> str:
        """Return the envelope sender: a VERP address naming this row, when bounces have
        an address of their own, so that a bounce says which message it is about."""
        verp = self.settings.bounces.address
        if not verp:
            return self.sender
        local, _, domain = verp.partition("@")
        token = tokens.make_return(self.prepared.template.secret, self.send.id, row.position)
        return f"{local}+{token}@{domain}"

    def _silent_again(self) -> bool:
        """Count a message lost after its data; stop the run when it keeps happening."""
        with self.lock:
            self.silences += 1
            if self.silences < SILENCES_BEFORE_STOP or self.report.stopped:
                return False
            self.report.stopped = "unavailable"
        self.progress.note(
            f"the server stopped answering after the data {SILENCES_BEFORE_STOP} times in a "
            "row; stopping (the next run goes on)"
        )
        self.stop.set()
        return True

    def _settle(self, row: Delivery, reply: Reply, minute: int) -> None:
        if reply.ok:
            self._record(row, State.SENT, str(reply), minute)
        elif reply.temporary:
            self._record_temporary(row, str(reply), minute)
        else:
            bounced = reply.enhanced in BOUNCE_CODES or (
                reply.code in (550, 551, 553) and bool(_NO_MAILBOX.search(reply.text))
            )
            self._record(row, State.FAILED, str(reply), minute, bounce=bounced)

    def _record_temporary(self, row: Delivery, reply: str, minute: int) -> None:
        attempts = row.attempts + 1
        rules = self.settings.sending
        if attempts >= rules.max_attempts:
            self._record(row, State.FAILED, f"gave up after {attempts} attempts: {reply}", minute)
            return
        delay = min(rules.retry_after_seconds * 2 ** (attempts - 1), MAX_RETRY_DELAY)
        self._record(row, State.DEFERRED, reply, minute, retry_at=time.time() + delay)

    def _record(
        self,
        row: Delivery,
        state: State,
        reply: str,
        minute: int | None,
        *,
        retry_at: float = 0,
        bounce: bool = False,
        attempt: bool = True,
    ) -> None:
        self.ledger.record(
            self.send,
            row.position,
            state,
            reply,
            attempt=attempt,
            retry_at=retry_at,
            quota=self._quota_to_flush(minute) if minute is not None else None,
            bounce=row.subscriber_id if bounce else None,
        )
        self._count(row.position, state, reply)

    def _quota_to_flush(self, minute: int | None) -> dict[int, int]:
        with self.lock:
            if minute is not None:
                self.unflushed[minute] += 1
            now = time.monotonic()
            if minute is not None and now - self.flushed_at < 1.0:
                return {}
            self.flushed_at = now
            flush, self.unflushed = dict(self.unflushed), Counter()
            return flush

    def _count(self, position: int, state: State, reply: str) -> None:
        with self.lock:
            if position in self.deferred:
                self.deferred.discard(position)
                self.done[State.DEFERRED] -= 1
            self.done[state] += 1
            if state is State.DEFERRED:
                self.deferred.add(position)
            elif state is State.FAILED and (
                reply in self.reasons or len(self.reasons) < MAX_REASONS
            ):
                self.reasons[reply] += 1
        self.progress.advance(state)

    def _connect(self, *, again: bool = False) -> Connection | None:
        delays = (0.0, 1.0, 2.0, 4.0) if again else (0.0,)
        last = "no attempt"
        for delay in delays:
            if self.stop.wait(delay):
                return None
            try:
                connection = self.transport.connect()
            except TransportUnavailable as err:
                last = str(err)
                continue
            with self.lock:
                self.connected += 1
            return connection
        with self.lock:
            self.failures.append(last)
            self.gave_up += 1
        self.progress.note(f"a connection gave up: {last}")
        return None

    def _take_budget(self, wanted: int) -> int:
        with self.lock:
            if self.budget is None:
                return wanted
            granted = min(wanted, self.budget)
            self.budget -= granted
            return granted

    def _give_back_budget(self, unused: int) -> None:
        with self.lock:
            if self.budget is not None and unused > 0:
                self.budget += unused
