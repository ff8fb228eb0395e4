"""The one road out. Every message, whatever asked for it (an issue to the list, a
scheduled send, a test, a signup's confirmation, a welcome), leaves through an `Outbox`,
which applies the sending rules once, for the newsletter the message belongs to:

- the DKIM keys, and the refusal to send unsigned to a relay elsewhere;
- an envelope sender (VERP when bounces have an address) aligned with the From domain;
- the rate limits and quotas, counted in the store for every sender;
- retries with bounded backoff, and a record of each message: the ledger's row for an
  issue's reader, the queue's row for a message to one reader.

An issue goes to its list from the ledger: each recipient's row goes `pending → sending
→ sent | deferred | failed | unknown`, `sending` written before MAIL FROM and the
outcome right after the reply, so that a re-run after a crash resends only what may not
have gone out (at most one message per open connection, the one in flight). A message to
one reader is queued (`store.mailqueue`) in the transaction of what caused it, then
delivered by whoever drains the queue: `serve`, `run-due`, a `send`."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import functools
import math
import os
import re
import select
import socket
import threading
import time
import zoneinfo
from collections import Counter
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, TypeVar

from qant_mail.audience import tokens
from qant_mail.base.config import Settings
from qant_mail.base.errors import ExitCode, QantError, SendError
from qant_mail.delivery.compose import (
    ComposeError,
    MessageTemplate,
    Prepared,
    Recipient,
    lone_ed25519,
)
from qant_mail.delivery.transport import (
    Connection,
    ConnectionLost,
    Exchange,
    RateLimiter,
    Reply,
    Transport,
    TransportUnavailable,
    Wait,
    exchange_of,
    finish,
    relay_transport,
)
from qant_mail.store.approvals import Approvals
from qant_mail.store.clicks import Clicks
from qant_mail.store.db import Db, StoreError, StoreTarget, StoreUnavailable, open_store
from qant_mail.store.ledger import (
    CLAIM_MOST,
    Delivery,
    Ledger,
    LedgerError,
    Outcome,
    Send,
    State,
    quota_since,
)
from qant_mail.store.mailqueue import Mail, MailQueue, QueuedMail

if TYPE_CHECKING:
    # Imported where a key is used: `cryptography` is a tenth of a render's start-up.
    from qant_mail.authoring.render import RenderedIssue
    from qant_mail.delivery import dkim

_T = TypeVar("_T")

# Rows a connection claims at a time: each claim is a transaction of its own (two
# searches and an update), so a larger claim costs less a message; rows claimed and not
# yet tried are given back on a stop, or taken back by a re-run, never sent twice.
CLAIM_SIZE = CLAIM_MOST
# How often a sender whose work is done looks again at the rows other senders hold.
HELD_POLL = 0.5
MAX_RETRY_DELAY = 3600.0
# A reader waits for a confirmation: a message to one reader is tried again at least
# every five minutes, until it expires.
NOTICE_MAX_DELAY = 300.0
NOTICE_MIN_DELAY = 1.0
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


def aligned(domain: str, other: str) -> bool:
    """Return whether two domains align as DMARC's relaxed mode asks: the same, or one
    below the other (without a list of public suffixes, the careful reading)."""
    a, b = domain.lower().rstrip("."), other.lower().rstrip(".")
    return a == b or a.endswith("." + b) or b.endswith("." + a)


def _domain(address: str) -> str:
    return address.rpartition("@")[2]


@dataclass(frozen=True)
class Rules:
    """The sending rules of one newsletter, decided once: its settings, the keys that
    sign its messages, and its envelope sender (on a domain aligned with its From)."""

    settings: Settings
    keys: tuple[dkim.DkimKey, ...]
    envelope: str
    verp: tuple[str, str] | None  # (local part, domain) of the VERP return paths
    notes: tuple[str, ...] = ()  # settings set aside or unwise, and why

    @classmethod
    def of(cls, settings: Settings, env: Mapping[str, str]) -> Rules:
        """Decide the rules of the newsletter `settings` are seen by."""
        from_domain = settings.sender_domain
        notes: list[str] = []
        verp: tuple[str, str] | None = None
        envelope = settings.sender.address
        bounces = settings.bounces.address
        if bounces and aligned(_domain(bounces), from_domain):
            local, _, domain = bounces.partition("@")
            verp, envelope = (local, domain), bounces
        elif bounces:
            notes.append(
                f"bounces.address {bounces} is not on the domain of {settings.sender.address}: "
                f"the messages of {settings.newsletter.name} come back to their From address, "
                "without VERP (SPF must align with From for DMARC)"
            )
        return_path = settings.smtp.return_path
        if return_path and not verp:
            if aligned(_domain(return_path), from_domain):
                envelope = return_path
            else:
                notes.append(
                    f"smtp.return_path {return_path} is not on the domain of "
                    f"{settings.sender.address}: {settings.newsletter.name} uses its From "
                    "address as the envelope sender (SPF must align with From for DMARC)"
                )
        keys: tuple[dkim.DkimKey, ...] = ()
        config = settings.dkim
        if config.selector or config.ed25519_selector:
            from qant_mail.delivery import dkim

            domain = config.domain or from_domain
            keys = tuple(
                dkim.keys_from_settings(config.selector, config.ed25519_selector, domain, env)
            )
        if warning := lone_ed25519(settings):
            notes.append(warning)
        return cls(settings, keys, envelope, verp, tuple(notes))

    @property
    def newsletter(self) -> str:
        """Return the key of the newsletter these rules are for."""
        return self.settings.newsletter.id

    def return_path(self, secret: bytes, send_id: int, position: int) -> str:
        """Return the envelope sender of one message of a send: a VERP address naming it,
        when bounces have an address of their own, so that a bounce says which it is."""
        if self.verp is None:
            return self.envelope
        local, domain = self.verp
        return f"{local}+{tokens.make_return(secret, send_id, position)}@{domain}"

    @property
    def signing(self) -> str:
        """Say how the newsletter's messages are signed, and whether that aligns."""
        if not self.keys:
            return "none (unsigned)"
        from_domain = self.settings.sender_domain
        described = []
        for key in self.keys:
            alignment = (
                "aligned with From"
                if aligned(key.domain, from_domain)
                else f"NOT aligned with From ({from_domain})"
            )
            described.append(
                f"{key.algorithm} by {key.selector}._domainkey.{key.domain}, {alignment}"
            )
        return "; ".join(described)


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
    cause: str = ""  # why the run stopped, when a dependency failed (the database)

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
        if self.stopped:
            line += f"; stopped: {self.stopped}" + (f" ({self.cause})" if self.cause else "")
        return line


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


@dataclass
class DrainReport:
    """What a drain of the queue did."""

    sent: int = 0
    deferred: int = 0  # tried, and waiting for another try
    failed: int = 0  # refused for good, expired, or maybe delivered (unknown)
    problems: list[str] = field(default_factory=list)  # why, for the operator's log
    # Newsletters whose messages this host leaves in the queue, and why (no key here for
    # a relay elsewhere: a host that can sign them delivers them).
    left: dict[str, str] = field(default_factory=dict)

    @property
    def tried(self) -> int:
        """Return how many messages were tried."""
        return self.sent + self.deferred + self.failed


class Outbox:
    """The road every message takes out of the installation of `settings`: to the relay
    of the settings (or `transport`), recorded in the store (or `store`)."""

    def __init__(
        self,
        settings: Settings,
        *,
        transport: Transport | None = None,
        store: StoreTarget | None = None,
        env: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.store = store if store is not None else settings.store_path
        self.env = os.environ if env is None else env
        self.clock = clock
        self._transport = transport  # given: it carries every newsletter's messages
        self._transports: dict[tuple[tuple[str, int], ...], Transport] = {}
        self._rules: dict[str, Rules] = {}
        self._lock = threading.Lock()
        # Who drains, among the processes that share the store.
        self.worker = f"{socket.gethostname()}:{os.getpid()}"

    # -- the rules -------------------------------------------------------------------

    @property
    def transport(self) -> Transport:
        """Return what carries the main newsletter's messages."""
        return self.transport_for(None)

    def transport_for(self, newsletter: str | None) -> Transport:
        """Return what carries the messages of `newsletter` (None: the main one): its
        relays in order ([smtp] host and fallback, or its own), one Transport for each
        set of relays, so that all its messages share which relay rests."""
        if self._transport is not None:
            return self._transport
        settings = self.settings.for_newsletter(newsletter or self.settings.main_id)
        with self._lock:
            found = self._transports.get(settings.relays)
            if found is None:
                found = relay_transport(settings, self.env)
                self._transports[settings.relays] = found
        return found

    def rules(self, newsletter: str | None) -> Rules:
        """Return the sending rules of newsletter `newsletter` (None: the main one)."""
        key = newsletter or self.settings.main_id
        with self._lock:
            found = self._rules.get(key)
            if found is None:
                found = Rules.of(self.settings.for_newsletter(key), self.env)
                self._rules[key] = found
        return found

    def check(self, rules: Rules) -> str:
        """Say how the newsletter's messages will be signed; refuse, with a SendError,
        to send them unsigned to a relay elsewhere unless `dkim.required` is off."""
        transport = self.transport_for(rules.newsletter)
        remote = getattr(transport, "remote", False)
        if not rules.keys and remote and rules.settings.dkim.required:
            raise SendError(
                f"messages to {transport.description} would not be DKIM-signed: "
                "Gmail and Yahoo treat unsigned bulk mail as suspect and ignore its "
                "one-click unsubscribe. Create a key (`qant-mail dkim keygen`), publish "
                "its record, set dkim.selector and QANT_DKIM_PRIVATE_KEY; or set "
                "dkim.required = false"
            )
        return rules.signing

    def template(
        self,
        rendered: RenderedIssue,
        newsletter: str,
        *,
        secret: bytes,
        issue_key: str,
        test: bool = False,
        unique: bool = False,
        signed: bool = True,
    ) -> MessageTemplate:
        """Compose an issue's message once, for its newsletter: signed as it is
        personalised (the list), or left for the outbox to sign as it leaves (`signed`
        false: messages to one reader, which go through the queue)."""
        rules = self.rules(newsletter)
        return MessageTemplate(
            rendered,
            rules.settings,
            secret=secret,
            issue_key=issue_key,
            test=test,
            unique=unique,
            keys=rules.keys if signed else (),
        )

    # -- handing over ------------------------------------------------------------------

    def connect(self, newsletter: str | None = None) -> Connection:
        """Open a connection to a relay of `newsletter` (or raise TransportUnavailable)."""
        return self.transport_for(newsletter).connect()

    @staticmethod
    def hand_over(connection: Connection, envelope: str, recipient: str, data: bytes) -> Reply:
        """Give one message to the relay and wait for its verdict."""
        return finish(Outbox.handing_over(connection, envelope, recipient, data))

    @staticmethod
    def handing_over(
        connection: Connection, envelope: str, recipient: str, data: bytes
    ) -> Exchange[Reply]:
        """Give one message to the relay: the one place where a message leaves. An
        exchange: it yields each time it waits for the connection's socket."""
        # Composed here, no line starts with "." (quoted-printable, headers): no stuffing.
        return exchange_of(connection, envelope, recipient, data, dot_safe=True)

    def sendable(self) -> tuple[list[str], dict[str, str]]:
        """Return the newsletters whose messages may leave from here, and why the others
        may not (their rules refuse: no key for a relay elsewhere, a key that cannot be
        read)."""
        allowed: list[str] = []
        refused: dict[str, str] = {}
        for key in self.settings.editions or [self.settings.newsletter.id]:
            try:
                self.check(self.rules(key))
            except QantError as err:
                refused[key] = str(err)
            else:
                allowed.append(key)
        return allowed, refused

    def _limiter(self, db: Db) -> RateLimiter:
        """Return a limiter of the settings' limits, which counts the day's messages of
        every sender and road (the store's `quota`) as they are now."""
        limits = self.settings.sending
        history = quota_since(db, int(self.clock() // 60) - 24 * 60)
        return RateLimiter(limits.per_second, limits.per_hour, limits.per_day, history)

    # -- messages to one reader ------------------------------------------------------

    def send_now(
        self, kind: str, newsletter: str, messages: Sequence[tuple[str, bytes]]
    ) -> list[tuple[str, Reply]]:
        """Deliver messages at once, each tried once, signed as they leave, and record
        each: what an editor waits for (a test). A relay that cannot be reached, or a
        connection lost, raises TransportUnavailable."""
        rules = self.rules(newsletter)
        self.check(rules)
        db = open_store(self.store)
        try:
            queue = MailQueue(db)

            def note(
                address: str, state: Mail, reply: str, minute: int | None = None, relay: str = ""
            ) -> None:
                queue.note(
                    kind=kind,
                    newsletter=rules.newsletter,
                    recipient=address,
                    state=state,
                    reply=reply,
                    minute=minute,
                    relay=relay,
                )

            limiter = self._limiter(db)
            try:
                connection = self.connect(newsletter)
            except TransportUnavailable as err:
                for address, _ in messages:
                    note(address, Mail.FAILED, str(err))
                raise
            results: list[tuple[str, Reply]] = []
            try:
                for address, data in messages:
                    minute = limiter.acquire(threading.Event())
                    if minute is None:
                        reply = Reply(
                            451, "4.7.0 not sent: the daily quota of the settings is used"
                        )
                        note(address, Mail.FAILED, str(reply))
                        results.append((address, reply))
                        continue
                    try:
                        reply = self._hand_over_one(connection, rules, address, data)
                    except ConnectionLost as lost:
                        state = Mail.UNKNOWN if lost.after_data else Mail.FAILED
                        note(address, state, f"connection lost: {lost}", minute, connection.relay)
                        raise TransportUnavailable(f"{connection.relay}: {lost}") from lost
                    state = Mail.SENT if reply.ok else Mail.FAILED
                    note(address, state, str(reply), minute, connection.relay)
                    results.append((address, reply))
            finally:
                connection.close()
        finally:
            db.close()
        return results

    def _hand_over_one(
        self, connection: Connection, rules: Rules, recipient: str, data: bytes
    ) -> Reply:
        """Sign a message composed whole with the rules' keys, and hand it over."""
        from qant_mail.delivery import dkim

        return self.hand_over(
            connection, rules.envelope, recipient, dkim.sign_message(rules.keys, data)
        )

    def drain(
        self, *, limit: int = 200, ids: Sequence[int] = (), stop: threading.Event | None = None
    ) -> DrainReport:
        """Deliver the queued messages that are due (only those numbered `ids`, when
        given), one claimed at a time: a temporary refusal, or a relay that cannot be
        reached, tries again later with backoff, until the message expires. Messages of a
        newsletter whose rules refuse here stay queued for a host where they do not.
        Never raises for a relay down."""
        report = DrainReport()
        newsletters, report.left = self.sendable()
        if not newsletters:
            return report
        stop = stop or threading.Event()
        smtp = self.settings.smtp
        # Long enough for one message, the relay's slowest answer included.
        lease = smtp.message_timeout + smtp.timeout + 30
        # One connection a set of relays: newsletters may each have their own.
        connections: dict[int, Connection] = {}
        limiter: RateLimiter | None = None
        db = open_store(self.store)
        try:
            queue = MailQueue(db)
            while report.tried < limit and not stop.is_set():
                mail = queue.claim(
                    self.clock(), worker=self.worker, lease=lease, newsletters=newsletters, ids=ids
                )
                if mail is None:
                    break
                transport = self.transport_for(mail.newsletter)
                connection = connections.pop(id(transport), None)
                if connection is None:
                    try:
                        connection = transport.connect()
                    except TransportUnavailable as err:
                        # The others wait, untouched, for the next drain.
                        self._later(queue, mail, str(err), report)
                        break
                connections[id(transport)] = connection
                limiter = limiter or self._limiter(db)
                minute = limiter.acquire(stop)
                if minute is None:  # the day's quota is used, or the drain is stopping
                    queue.release(mail.id, worker=self.worker)
                    break
                if self._try(queue, connection, mail, minute, report) is None:
                    del connections[id(transport)]  # closed: the next opens another
        finally:
            for connection in connections.values():
                connection.close()
            db.close()
        return report

    def _try(
        self,
        queue: MailQueue,
        connection: Connection,
        mail: QueuedMail,
        minute: int,
        report: DrainReport,
    ) -> Connection | None:
        """Hand one queued message over and record how it went; return the connection
        to go on with (None: open a new one for the next)."""
        rules = self.rules(mail.newsletter)
        relay = connection.relay
        try:
            reply = self._hand_over_one(connection, rules, mail.recipient, mail.message)
        except ConnectionLost as lost:
            connection.close()
            if lost.after_data:
                why = f"connection lost after the data: {lost}"
                self._done(queue, mail, Mail.UNKNOWN, why, report, minute, relay)
            else:
                self._later(queue, mail, f"connection lost: {lost}", report, relay=relay)
            return None
        if reply.ok:
            self._done(queue, mail, Mail.SENT, str(reply), report, minute, relay)
        elif reply.temporary:
            self._later(queue, mail, str(reply), report, minute, relay)
        else:
            self._done(queue, mail, Mail.FAILED, str(reply), report, minute, relay)
        if reply.code == 421 or getattr(connection, "worn", False):
            # 421: the relay closes this connection; worn: it has refused enough here.
            connection.close()
            return None
        return connection

    def _done(
        self,
        queue: MailQueue,
        mail: QueuedMail,
        state: Mail,
        reply: str,
        report: DrainReport,
        minute: int | None,
        relay: str = "",
    ) -> None:
        """Record a message done (sent, refused for good, or maybe delivered)."""
        if not queue.record(mail.id, state, reply, worker=self.worker, minute=minute, relay=relay):
            report.problems.append(f"{mail.kind} to {mail.recipient}: taken over by another drain")
        if state is Mail.SENT:
            report.sent += 1
        else:
            report.failed += 1
            report.problems.append(f"{mail.kind} to {mail.recipient}: {reply}")

    def _later(
        self,
        queue: MailQueue,
        mail: QueuedMail,
        reply: str,
        report: DrainReport,
        minute: int | None = None,
        relay: str = "",
    ) -> None:
        """Put a message back for a later try, with backoff, or give it up if it will
        have expired by then."""
        base = max(self.settings.sending.retry_after_seconds, NOTICE_MIN_DELAY)
        delay = min(base * 2 ** min(mail.attempts, 16), NOTICE_MAX_DELAY)
        retry_at = self.clock() + delay
        if retry_at > mail.expires_at:
            why = f"expired; last try: {reply}"
            self._done(queue, mail, Mail.EXPIRED, why, report, minute, relay)
            return
        if not queue.record(
            mail.id,
            Mail.PENDING,
            reply,
            worker=self.worker,
            retry_at=retry_at,
            minute=minute,
            relay=relay,
        ):
            report.problems.append(f"{mail.kind} to {mail.recipient}: taken over by another drain")
        report.deferred += 1
        report.problems.append(f"{mail.kind} to {mail.recipient}: {reply}")

    def next_due(self) -> float | None:
        """Return when the next queued message is due, if one waits."""
        db = open_store(self.store)
        try:
            return MailQueue(db).next_due()
        finally:
            db.close()

    # -- an issue to its list -----------------------------------------------------------

    def send_list(
        self,
        prepared: Prepared,
        *,
        progress: Progress | None = None,
        limit: int | None = None,
        wait_for_retries: bool = True,
        accept_changes: bool = False,
        stop: threading.Event | None = None,
        new_subscribers: bool = False,
    ) -> SendReport:
        """Send the issue to every active reader of its newsletter not sent it yet;
        resume after a crash. `new_subscribers`: an issue sent before goes to the
        readers who joined since, too."""
        rules = self.rules(prepared.newsletter)
        self.check(rules)
        ledger = Ledger(self.store)
        try:
            own = self.settings.for_newsletter(prepared.newsletter)
            zone = own.newsletter.timezone
            digest = prepared.template.digest()  # of what every reader gets
            if own.review_required:
                _approved(Approvals(ledger.db), prepared, digest, zone)
            # SQLite: one process per send, by its lock. PostgreSQL: each `send` joins the
            # run, claiming rows the others do not hold.
            exclusive = (
                contextlib.nullcontext() if ledger.shared else ledger.lock(prepared.issue_key)
            )
            with exclusive:
                send = self._send_of(ledger, prepared, accept_changes, zone)
                prepared = _as_first_sent(Approvals(ledger.db), send, prepared, digest)
                if prepared.template.links:  # counted: where each number leads
                    Clicks(ledger.db).register(
                        prepared.newsletter, prepared.issue_key, prepared.template.links
                    )
                if new_subscribers:
                    ledger.add_joined(send)
                ledger.recover(send, starting=self.worker)
                run = _Run(
                    self, rules, prepared, ledger, send, progress or NoProgress(), limit, stop
                )
                report = run.run(wait_for_retries)
                try:
                    report.totals = ledger.counts(send)
                    report.joined = ledger.joined_since(send)
                    if not report.remaining and report.totals[State.FAILED] == 0:
                        ledger.finish(send)
                except StoreUnavailable:
                    if not report.cause:
                        raise
                    # The run stopped for the database: where the send stands is for
                    # `qant-mail status` to say once it is back.
                report.exit_code = _exit_code(report)
        finally:
            ledger.close()
        return report

    @staticmethod
    def _send_of(ledger: Ledger, prepared: Prepared, accept_changes: bool, zone: str) -> Send:
        """Return the issue's send: planned now (its readers frozen), or the one that
        started before, if it is the same issue."""
        send = ledger.find(prepared.issue_key)
        if send is None:
            try:
                return ledger.plan(
                    prepared.issue_key,
                    prepared.content_hash,
                    prepared.rendered.subject,
                    prepared.newsletter,
                )
            except LedgerError:
                send = ledger.find(prepared.issue_key) if ledger.shared else None
                if send is None:
                    raise
                return send
        if send.newsletter != prepared.newsletter:
            raise SendError(
                f"{prepared.issue_key} was sent as an issue of {send.newsletter}, and this "
                f"one is of {prepared.newsletter}: issue files of the newsletters need "
                "names of their own (rename this file)"
            )
        if send.content_hash != prepared.content_hash and not accept_changes:
            raise SendError(
                f"{prepared.issue_key} changed since its send started "
                f"({_local(send.created_at, zone)}); "
                "re-run with --accept-changes to send this version to those not served yet"
            )
        return send


def _local(stamp: str, zone: str) -> str:
    """Return a stored time (ISO 8601, UTC) as the newsletter's editors read it: in its
    time zone, to the minute, with the offset."""
    try:
        when = dt.datetime.fromisoformat(stamp).astimezone(zoneinfo.ZoneInfo(zone))
    except (ValueError, zoneinfo.ZoneInfoNotFoundError):
        return stamp
    return when.isoformat(" ", "minutes")


def _approved(approvals: Approvals, prepared: Prepared, digest: str, zone: str) -> None:
    """Refuse a send to the list of an issue nobody approved, or whose message changed
    since its approval ([review] required)."""
    key = prepared.issue_key
    approval = approvals.latest(prepared.newsletter, key)
    if approval is None:
        raise SendError(
            f"{key} is not approved, and review.required is set: an editor approves "
            f"exactly what goes out with `qant-mail approve issues/{key}.yaml --by NAME`"
        )
    if approval.digest != digest:
        raise SendError(
            f"{key} changed since {approval.approver} approved it "
            f"({_local(approval.approved_at, zone)}): "
            f"`qant-mail diff approved:{key} issues/{key}.yaml` shows what readers would "
            "see change; approve it again to send it"
        )


def _as_first_sent(approvals: Approvals, send: Send, prepared: Prepared, digest: str) -> Prepared:
    """Keep the message of a send as its first run sends it, for `sends show --eml`;
    a resumed run of the same message goes on with its date, so that every reader of
    one send gets the same message."""
    template = prepared.template
    kept_digest, kept = approvals.keep_sent(send.id, digest, template.frozen)
    if kept_digest != digest:
        return prepared  # a changed issue (--accept-changes) goes as it is now
    date = MessageTemplate.thaw(kept, secret=template.secret).date
    if date == template.date:
        return prepared
    return dataclasses.replace(prepared, template=template.dated(date))


@dataclass(frozen=True, slots=True)
class _Sleep:
    """A slot waits until `until` (time.monotonic()), or until the run is stopping."""

    until: float


@dataclass(frozen=True, slots=True)
class _Record:
    """A slot's outcome, to be made durable before the slot goes on."""

    outcome: Outcome


class _Background:
    """A call made in a thread of its own (opening a connection: DNS, TCP, TLS and login
    take round trips that must not hold the other connections), whose end wakes the
    send loop."""

    def __init__(self, call: Callable[[], Connection], wake: socket.socket) -> None:
        self.done = False
        self._lock = threading.Lock()
        self._abandoned = False
        self._value: Connection | None = None
        self._error: BaseException | None = None
        threading.Thread(target=self._run, args=(call, wake), daemon=True).start()

    def _run(self, call: Callable[[], Connection], wake: socket.socket) -> None:
        value: Connection | None = None
        try:
            value = call()
        except BaseException as err:  # noqa: BLE001 - raised again in the slot that waits
            self._error = err
        with self._lock:
            self._value, self.done = value, True
            abandoned = self._abandoned
        if abandoned and value is not None:
            value.close()  # nobody waits for it any more
        with contextlib.suppress(OSError):
            wake.send(b"\0")

    def result(self) -> Connection:
        if self._error is not None:
            raise self._error
        assert self._value is not None
        return self._value

    def abandon(self) -> None:
        """Say that nobody will take the result (its slot is gone): a connection opened
        is closed, now or when it is."""
        with self._lock:
            self._abandoned = True
            value, self._value = self._value, None
        if value is not None:
            value.close()


@dataclass(frozen=True, slots=True)
class _Connecting:
    """A slot waits for its connection to be opened."""

    work: _Background


_Step = Wait | _Sleep | _Record | _Connecting
_Slot = Generator[_Step, None, None]
# How long the loop waits at most before it looks at the stop and the clock again.
_LOOK_AGAIN = 0.25


class _Run:
    """One run of a send: one thread carries the messages over all the connections,
    which share a rate limiter.

    Each connection is a slot, a generator that claims rows and sends them one after
    the other, yielding whenever it must wait: for its socket (a `Wait` of the
    transport's exchange), for the rate limiter (`_Sleep`), for its connection to be
    opened (`_Connecting`), or for its outcome to be durable (`_Record`). The loop
    (`_carry`) waits on all the sockets at once and commits together the outcomes that
    come in together, before each of their slots goes on. One thread, not one a
    connection: threads that hand the interpreter's lock to each other a few times a
    message cost more than the message (the figures are in docs/architecture.md)."""

    def __init__(
        self,
        outbox: Outbox,
        rules: Rules,
        prepared: Prepared,
        ledger: Ledger,
        send: Send,
        progress: Progress,
        limit: int | None,
        stop: threading.Event | None,
    ) -> None:
        self.outbox, self.rules, self.prepared = outbox, rules, prepared
        self.settings = settings = outbox.settings
        self.ledger, self.send, self.progress = ledger, send, progress
        self.budget = limit
        self.stop = stop or threading.Event()
        self.lock = threading.Lock()
        self.report = SendReport(send.issue)
        limits = settings.sending
        history = ledger.quota_since(int(time.time() // 60) - 24 * 60)
        self.limiter = RateLimiter(limits.per_second, limits.per_hour, limits.per_day, history)
        self.connected = 0
        self.failures: list[str] = []
        self.gave_up = 0
        self.running = 0
        self.finished = threading.Condition(self.lock)
        self.crash: BaseException | None = None  # what broke the send loop, for the caller
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
        self.worker = outbox.worker
        self.lease = limits.lease_seconds
        # How long the run waits for the database to come back before it stops.
        self.patience = settings.store.reconnect_seconds
        self.store_trouble: str | None = None  # said once an outage
        # The send loop's wake-up call: a connection opened in the background rings it.
        self.wake: socket.socket | None = None
        self.closing: list[threading.Thread] = []
        self.store_gone = False  # the run stops for the database: one try a step, no more
        # The rows handed over to the relay whose outcome is not written yet, and the
        # outcomes waiting for their commit: a slot that ends abruptly must neither give
        # such a row back to be sent again nor forget what the relay said.
        self.handed: set[int] = set()
        self.unwritten: dict[int, Outcome] = {}

    def run(self, wait_for_retries: bool) -> SendReport:
        try:
            self._stored(lambda: self.ledger.join(self.send, self.worker))
            self._stored(self._share)  # first: the others may be at work already
        except StoreUnavailable as err:
            self._store_gone(err)
            return self.report
        beating = threading.Event()
        heart = threading.Thread(target=self._heartbeat, args=(beating,), daemon=True)
        heart.start()
        try:
            return self._run(wait_for_retries)
        finally:
            beating.set()
            heart.join()
            # Not noted, if the database is gone: the lease runs out, the same.
            with contextlib.suppress(StoreUnavailable):
                self.ledger.leave(self.send, self.worker)

    def _stored(self, step: Callable[[], _T]) -> _T:
        """Do a step that needs the store. While the store cannot be used (a server
        restarting, a connection cut, a full disk), connect again and retry, waiting
        longer each time, for up to `store.reconnect_seconds`; then raise."""
        first_failure: float | None = None
        delay = 0.25
        while True:
            try:
                result = step()
            except StoreUnavailable as err:
                self.ledger.close()  # this thread's connection: a new one next time
                now = time.monotonic()
                first_failure = first_failure or now
                if self.store_gone or now - first_failure >= self.patience:
                    raise
                with self.lock:
                    said, self.store_trouble = self.store_trouble, str(err)
                if said is None:
                    self.progress.note(
                        f"the database cannot be used now ({err}); trying again for up to "
                        f"{self.patience:.0f} s"
                    )
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            if first_failure is not None:
                with self.lock:
                    back, self.store_trouble = self.store_trouble is not None, None
                if back:
                    self.progress.note("the database is back; going on")
            return result

    def _store_gone(self, err: StoreUnavailable) -> None:
        """Stop the run: the database has been out of reach for too long. Its rows are
        left as they are, for the other senders or a re-run."""
        with self.lock:
            self.store_gone = True
            if self.report.stopped is None:
                self.report.stopped = "unavailable"
                self.report.cause = str(err)
        self.stop.set()

    def _heartbeat(self, done: threading.Event) -> None:
        """Renew this sender's hold on its rows, and share the limits with the senders
        of the send, every third of a lease."""
        try:
            while not done.wait(self.lease / 3):
                try:
                    self._share()
                except (QantError, OSError) as err:
                    # A missed beat costs at most a row sent twice, after the lease; the
                    # next beat connects anew.
                    self.ledger.close()
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
        try:
            self._rounds(wait_for_retries)
        except KeyboardInterrupt:
            self.stop.set()
            self.report.stopped = "interrupted"
            self._join()
        except StoreUnavailable as err:
            self._store_gone(err)
            self._join()
        if self.stop.is_set() and self.report.stopped is None:
            self.report.stopped = "interrupted"
        with contextlib.suppress(StoreUnavailable):  # a second's counts, when it is gone
            for minute, messages in self._quota_to_flush(None).items():
                self._stored(functools.partial(self.ledger.count_quota, minute, messages))
        self.report.elapsed = time.monotonic() - start
        self.report.done = +self.done
        self.report.failures = self.reasons
        self.report.limited = self.budget == 0
        return self.report

    def _rounds(self, wait_for_retries: bool) -> None:
        """Send what is due, round after round, until nothing is left or waits."""
        counts = self._stored(lambda: self.ledger.counts(self.send))
        total = counts[State.PENDING] + counts[State.DEFERRED]
        self.progress.start(min(total, self.budget) if self.budget is not None else total)
        while not self.stop.is_set():
            self._round()
            if self.report.stopped:
                break
            due = self._stored(lambda: self.ledger.next_retry(self.send))
            # Rows other senders hold: done by them, or, if one died, ours after its
            # lease runs out.
            held = self._stored(lambda: self.ledger.next_release(self.send, self.worker))
            wake = min((t for t in (due, held) if t is not None), default=None)
            if wake is None or not wait_for_retries or self.budget == 0:
                break
            delay = max(0.0, wake - time.time())
            if due is not None and wake == due:
                waiting = self._stored(lambda: self.ledger.counts(self.send))[State.DEFERRED]
                self.progress.note(f"{waiting} deferred; next try in {delay:.0f} s")
            if held is not None:
                # Another sender's lease is renewed while it lives: look again soon, for
                # the end of its work (or of it).
                delay = min(delay, HELD_POLL)
            self.stop.wait(delay)

    def _round(self) -> None:
        counts = self._stored(lambda: self.ledger.counts(self.send))
        due = counts[State.PENDING] + counts[State.DEFERRED]
        slots = max(1, min(self.settings.smtp.connections, due))
        self.gave_up = 0
        with self.lock:
            self.running += 1
        threading.Thread(target=self._carry, args=(slots,), name="qant-send", daemon=True).start()
        self._join()
        if self.crash is not None:
            raise self.crash
        if self.failures and self.connected == 0:
            self.report.stopped = "unavailable"
            raise TransportUnavailable(self.failures[0])
        if self.gave_up == slots and not self.stop.is_set():
            # Every connection went away and could not come back: stop, resumable.
            self.report.stopped = "unavailable"
            self.progress.note(f"the server went away: {self.failures[-1]}")

    def _join(self) -> None:
        # Not Thread.join(): on Python 3.11, a Ctrl-C that interrupts it can mark a thread
        # still running as finished (bpo-45274), and its messages would go unrecorded.
        with self.finished:
            while self.running:
                self.finished.wait(0.2)

    def _carry(self, count: int) -> None:
        """Carry the round's messages over `count` connections, from this one thread
        (not the main thread: a Ctrl-C there stops the run between two messages, never
        between a message's reply and its record)."""
        wake: socket.socket | None = None
        try:
            wake, self.wake = socket.socketpair()
            self._loop([self._slot() for _ in range(count)], wake)
        except BaseException as err:  # noqa: BLE001 - a bug: raised again by the caller
            self._crashed(err)
        finally:
            for end in (wake, self.wake):
                if end is not None:
                    end.close()
            for closer in self.closing:
                closer.join()
            self.closing.clear()
            self.ledger.close()  # this thread's connection
            with self.finished:
                self.running -= 1
                self.finished.notify_all()

    def _loop(self, slots: list[_Slot], wake: socket.socket) -> None:
        """Run `slots` until they end: resume each when what it waits for has come,
        commit the outcomes that came together in one transaction."""
        poller = select.poll()
        wake.setblocking(False)
        ringing = wake.fileno()
        poller.register(ringing, select.POLLIN)
        waiting_on: dict[int, _Slot] = {}  # a socket's fd: the slot waiting on it
        fd_of: dict[_Slot, tuple[int, int]] = {}  # a slot: the fd and events it waits on
        waits: dict[_Slot, _Step] = {}  # what each waiting slot waits for
        # The slots to resume, each with what to tell it: None, or an exception to raise.
        ready: list[tuple[_Slot, BaseException | None]] = [(slot, None) for slot in slots]
        alive = set(slots)
        try:
            while alive:
                records: list[tuple[_Slot, Outcome]] = []
                for slot, error in ready:
                    try:
                        step = slot.throw(error) if error is not None else slot.send(None)
                    except StopIteration:
                        alive.discard(slot)
                        step = None
                    except Exception as err:  # noqa: BLE001 - a bug, raised after the run
                        # Its own rows were seen to as it ended; the others go on to
                        # record what they have sent, then stop.
                        self._crashed(err)
                        alive.discard(slot)
                        step = None
                    if type(step) is Wait:
                        fd = step.sock.fileno()
                        events = select.POLLOUT if step.writable else select.POLLIN
                        if fd_of.get(slot) != (fd, events):
                            self._forget(poller, waiting_on, fd_of, slot)
                            poller.register(fd, events)
                            waiting_on[fd], fd_of[slot] = slot, (fd, events)
                        waits[slot] = step
                        continue
                    if type(step) is _Record:
                        # Written before the next poll: the socket may stay registered.
                        records.append((slot, step.outcome))
                        continue
                    # Not a socket: while the slot does not wait on it, a word the server
                    # says (a 421 before closing) must not wake the loop again and again.
                    self._forget(poller, waiting_on, fd_of, slot)
                    if step is not None:
                        waits[slot] = step
                ready = []
                if records:
                    ready = self._commit(records)
                    continue
                if not alive:
                    break
                now = time.monotonic()
                soonest = now + _LOOK_AGAIN
                for step in waits.values():
                    if type(step) is Wait and step.deadline < soonest:
                        soonest = step.deadline
                    elif type(step) is _Sleep and step.until < soonest:
                        soonest = step.until
                timeout = max(0, math.ceil((soonest - now) * 1000))
                for fd, _ in poller.poll(timeout):
                    if fd == ringing:
                        with contextlib.suppress(OSError):
                            wake.recv(4096)
                        continue
                    slot = waiting_on[fd]
                    if type(waits.get(slot)) is Wait:
                        del waits[slot]
                        ready.append((slot, None))
                # Resumed when its time has come (an exchange then tries its socket once
                # more before it judges: after a long commit, its reply may be there).
                now = time.monotonic()
                stopping = self.stop.is_set()
                for slot, step in list(waits.items()):
                    if (
                        (type(step) is Wait and step.deadline <= now)
                        or (type(step) is _Sleep and (step.until <= now or stopping))
                        or (type(step) is _Connecting and step.work.done)
                    ):
                        del waits[slot]
                        ready.append((slot, None))
        finally:
            for slot in alive:  # after a bug only: each gives its rows back
                slot.close()

    def _crashed(self, err: BaseException) -> None:
        """Note the first bug met, for the caller to raise once the run is over; stop."""
        with self.lock:
            self.crash = self.crash or err
        self.stop.set()

    @staticmethod
    def _forget(
        poller: select.poll,
        waiting_on: dict[int, _Slot],
        fd_of: dict[_Slot, tuple[int, int]],
        slot: _Slot,
    ) -> None:
        held = fd_of.pop(slot, None)
        # Only if the number is still its own: a socket closed in the background frees
        # its number for the next one opened.
        if held is not None and waiting_on.get(held[0]) is slot:
            del waiting_on[held[0]]
            with contextlib.suppress(KeyError, ValueError):
                poller.unregister(held[0])

    def _commit(
        self, records: list[tuple[_Slot, Outcome]]
    ) -> list[tuple[_Slot, BaseException | None]]:
        """Write the outcomes that came in together, in one transaction; return their
        slots, to go on (each told of the failure, if the write failed). A slot's next
        message waits for its record to be durable, as exactly-once requires."""
        outcomes = [outcome for _, outcome in records]
        try:
            self._stored(lambda: self.ledger.record_many(self.send, outcomes))
        except Exception as err:  # noqa: BLE001 - each slot meets it where it waits
            return [(slot, err) for slot, _ in records]
        return [(slot, None) for slot, _ in records]

    def _slot(self) -> _Slot:
        """One connection's work: claim rows, send them one after the other."""
        connection: Connection | None = None
        claimed: list[Delivery] = []
        row: Delivery | None = None  # the row under way
        try:
            connection = yield from self._connect()
            if connection is None:
                return
            while not self.stop.is_set():
                size = self._take_budget(CLAIM_SIZE)
                if size == 0:
                    return
                claim = functools.partial(
                    self.ledger.claim, self.send, size, worker=self.worker, lease=self.lease
                )
                claimed, skipped = self._stored(claim)
                self._give_back_budget(size - len(claimed) - len(skipped))
                for position in skipped:
                    self._count(position, State.SKIPPED, "left the list")
                if not claimed and not skipped:
                    return
                while claimed and not self.stop.is_set():
                    row = claimed.pop(0)
                    connection = yield from self._deliver(connection, row)
                    row = None
                    if connection is None:
                        return
        except StoreUnavailable as err:
            self._store_gone(err)
        finally:
            self._settle_abruptly(claimed, row)
            if connection is not None:
                self._close(connection)

    def _settle_abruptly(self, claimed: list[Delivery], row: Delivery | None) -> None:
        """Leave a slot's rows right when it ends before its work: the rows not tried
        are given back; the row under way, if the relay had it, keeps its hold (a re-run
        takes it as a killed run's message in flight) unless the relay's answer can
        still be written now. With the database gone, the rows stay held: the lease, or
        the re-run's recovery, gives them back."""
        back = [d.position for d in claimed]
        if row is not None:
            outcome = self.unwritten.pop(row.position, None)
            if outcome is not None:
                with contextlib.suppress(StoreError):
                    self.ledger.record_many(self.send, [outcome])
            elif row.position not in self.handed:
                back.append(row.position)
            self.handed.discard(row.position)
        if back:
            with contextlib.suppress(StoreError):
                self.ledger.release(self.send, back)

    def _close(self, connection: Connection) -> None:
        """Close `connection` in the background: a QUIT's round trip must not hold the
        other connections."""
        closer = threading.Thread(target=connection.close, daemon=True)
        closer.start()
        self.closing.append(closer)

    def _deliver(
        self, connection: Connection, row: Delivery
    ) -> Generator[_Step, None, Connection | None]:
        """Send one row; return the connection to go on with (None: give up)."""
        try:
            data = self.prepared.template.personalise(
                Recipient(row.email, row.name, row.subscriber_id or 0)
            )
        except ComposeError as err:
            # This row cannot become a message; the others can.
            yield from self._record(row, State.FAILED, f"not sent: {err}", None, attempt=False)
            return connection
        minute = yield from self._permit()
        if minute is None:
            if not self.stop.is_set():
                self.report.stopped = "daily quota reached"
                self.progress.note(
                    f"daily quota of {self.settings.sending.per_day} reached; "
                    "run again tomorrow to go on"
                )
                self.stop.set()
            self._stored(lambda: self.ledger.release(self.send, [row.position]))
            return connection
        try:
            envelope = self.rules.return_path(
                self.prepared.template.secret, self.send.id, row.position
            )
            self.handed.add(row.position)
            reply = yield from self.outbox.handing_over(connection, envelope, row.email, data)
        except ConnectionLost as lost:
            self._close(connection)
            if lost.after_data:
                why = f"connection lost after the data: {lost}"
                yield from self._record(row, State.UNKNOWN, why, minute, relay=connection.relay)
                if self._silent_again():
                    return None
            else:
                why = f"connection lost: {lost}"
                yield from self._record_temporary(row, why, minute, connection.relay)
            return (yield from self._connect(again=True))
        self.silences = 0
        yield from self._settle(row, reply, minute, connection.relay)
        if reply.slow_down:
            self.limiter.slow_down()
            self.progress.note(f"the server asks to slow down ({reply}); slowing down")
        elif reply.ok:
            self.limiter.speed_up()
        if reply.code == 421 or getattr(connection, "worn", False):
            # 421: the server is closing this connection. Worn: it has refused enough
            # here that a fresh connection keeps us under its error limits.
            self._close(connection)
            return (yield from self._connect(again=True))
        return connection

    def _permit(self) -> Generator[_Step, None, int | None]:
        """Wait for the rate limiter's leave to send one message; return its minute, or
        None when the day's quota is used or the run is stopping."""
        while not self.stop.is_set():
            minute, wait = self.limiter.poll()
            if minute is not None:
                return minute
            if wait == math.inf:
                return None
            yield _Sleep(time.monotonic() + min(wait, 1.0))
        return None

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

    def _settle(
        self, row: Delivery, reply: Reply, minute: int, relay: str
    ) -> Generator[_Step, None, None]:
        if reply.ok:
            yield from self._record(row, State.SENT, str(reply), minute, relay=relay)
        elif reply.temporary:
            yield from self._record_temporary(row, str(reply), minute, relay)
        else:
            bounced = reply.enhanced in BOUNCE_CODES or (
                reply.code in (550, 551, 553) and bool(_NO_MAILBOX.search(reply.text))
            )
            yield from self._record(
                row, State.FAILED, str(reply), minute, bounce=bounced, relay=relay
            )

    def _record_temporary(
        self, row: Delivery, reply: str, minute: int, relay: str
    ) -> Generator[_Step, None, None]:
        attempts = row.attempts + 1
        limits = self.settings.sending
        if attempts >= limits.max_attempts:
            why = f"gave up after {attempts} attempts: {reply}"
            yield from self._record(row, State.FAILED, why, minute, relay=relay)
            return
        delay = min(limits.retry_after_seconds * 2 ** (attempts - 1), MAX_RETRY_DELAY)
        retry_at = time.time() + delay
        yield from self._record(row, State.DEFERRED, reply, minute, retry_at=retry_at, relay=relay)

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
        relay: str = "",
    ) -> Generator[_Step, None, None]:
        """Write the row's outcome (the loop returns here once it is durable); count it."""
        quota = self._quota_to_flush(minute) if minute is not None else {}
        outcome = Outcome(
            row.position,
            state,
            reply,
            attempt=attempt,
            retry_at=retry_at,
            quota=quota,
            bounce=row.subscriber_id if bounce else None,
            relay=relay,
        )
        self.unwritten[row.position] = outcome
        yield _Record(outcome)
        del self.unwritten[row.position]
        self.handed.discard(row.position)
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
            # Under the lock: the progress is read by the main thread too.
            self.progress.advance(state)

    def _connect(self, *, again: bool = False) -> Generator[_Step, None, Connection | None]:
        """Open a connection (in the background); `again`: after one was lost, with up
        to three more tries, 1, 2 and 4 s apart. Return None when it cannot be had."""
        delays = (0.0, 1.0, 2.0, 4.0) if again else (0.0,)
        last = "no attempt"
        for delay in delays:
            if delay:
                yield _Sleep(time.monotonic() + delay)
            if self.stop.is_set():
                return None
            assert self.wake is not None
            work = _Background(
                functools.partial(self.outbox.connect, self.rules.newsletter), self.wake
            )
            try:
                yield _Connecting(work)
            except GeneratorExit:  # the loop is closing every slot, after a bug
                work.abandon()
                raise
            try:
                connection = work.result()
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
