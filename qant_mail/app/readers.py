"""The use cases of readers: those who join and choose by themselves (a signup, its
confirmation, the welcome, the reader's page), those who leave (a link, a one-click
POST, an email to the unsubscribe address), and the list an editor keeps (import, add,
remove, list, count, export). What the public side (`serve`) and the command line call."""

from __future__ import annotations

import enum
import hashlib
import hmac
import io
import logging
import secrets
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TextIO

from qant_mail.app import issues
from qant_mail.app.context import Context
from qant_mail.audience import messages, tokens
from qant_mail.base.addresses import AddressChecker, AddressError, check_display_name
from qant_mail.base.config import Settings
from qant_mail.base.errors import ConfigError, ExitCode, QantError
from qant_mail.base.files import write_all
from qant_mail.delivery.compose import Prepared, Recipient, notice, reader_page_url
from qant_mail.store.db import Db, StoreError, now_text, transaction
from qant_mail.store.mailqueue import MailQueue
from qant_mail.store.subscribers import (
    READER_STATUSES,
    Consent,
    ImportReport,
    PendingSignup,
    Signups,
    Status,
    Subscriber,
    SubscriberError,
    Subscribers,
)

log = logging.getLogger(__name__)

MAX_NAME = 200
MAX_MESSAGE = messages.MAX_MESSAGE  # an unsubscription by email longer is not read
__all__ = ["ImportReport", "Status", "Subscriber"]


class _NumberTaken(Exception):
    """A request number drawn at random is another request's (once in billions)."""


class Asked(enum.Enum):
    """What became of a signup request."""

    QUEUED = "queued"  # kept, its confirmation queued
    TRAPPED = "trapped"  # a bot filled the hidden field: nothing kept
    LIMITED = "limited"  # a limit was reached: nothing kept, no mail


class SignupError(QantError):
    """A signup form filled in wrongly: said on the form, the same for any address."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class Request:
    """What a signup form sent."""

    email: str
    name: str
    newsletters: tuple[str, ...]
    form: str  # which form: a newsletter's key, or "all"
    client: str  # the client's address, as the server saw it
    trap: str = ""  # the field people never see and bots fill in


@dataclass(frozen=True)
class ReaderPage:
    """A reader's page: who, and each newsletter offered with their status for it."""

    subscriber_id: int
    email: str
    stopped: bool  # bounced or complained: nothing goes to them
    newsletters: list[tuple[Settings, Status | None]]  # None: never subscribed


class Signup:
    """The signup, confirmation and choice of newsletters of one installation. Every
    mail it causes is queued in the outbox in the transaction of what caused it, before
    the page answers; `queued` is told, so that the queue is drained soon."""

    def __init__(self, ctx: Context, *, queued: Callable[[], None] = lambda: None) -> None:
        self.ctx = ctx
        self.settings = ctx.settings
        self.queued = queued
        self._welcomes: dict[str, tuple[tuple[float, str], Prepared]] = {}
        self._lock = threading.Lock()

    # -- the form ----------------------------------------------------------------------

    def offered(self) -> list[Settings]:
        """Return the newsletters the forms offer (the public ones), the main one first."""
        return [s for s in self.settings.all_newsletters() if s.newsletter.public]

    def validate(
        self, email: str, name: str, newsletters: Sequence[str], form: str, client: str, trap: str
    ) -> Request:
        """Return the request a form sent, or raise SignupError for what the reader must
        correct. The answer depends on what was typed only, never on who is subscribed."""
        offered = {s.newsletter.id for s in self.offered()}
        chosen = tuple(dict.fromkeys(k for k in newsletters if k in offered))
        labels = self.settings.labels
        try:
            address = AddressChecker().check(email)
        except AddressError as err:
            raise SignupError(labels.subscribe_invalid_email, "email") from err
        try:
            name = check_display_name(name.strip())[:MAX_NAME]
        except QantError:
            name = ""
        if not chosen:
            raise SignupError(labels.subscribe_no_choice, "newsletter")
        return Request(address, name, chosen, form[:40], client, trap)

    def request(
        self,
        request: Request,
        *,
        client: str | None = None,
        per_client_hour: int | None = None,
    ) -> Asked:
        """Deal with a valid request: a trap filled or a limit reached ends it (the form
        says nothing of it; the API answers 429); else the request is kept and its
        confirmation queued, in one transaction. Every request takes the same steps up to
        that transaction (the confirmation is rendered, for nothing if need be): how long
        the answer takes says nothing. `client`: who asks, as the limits count it (default:
        a digest of the request's client); `per_client_hour`: that client's limit."""
        ctx, config = self.ctx, self.settings.signup
        now = ctx.clock()
        expires = int(now + config.confirm_hours * 3600)
        secret = ctx.secret()
        for _ in range(3):
            # A number drawn at random, not the next one: the link is made before the
            # row, outside the transaction, and says nothing of how many asked.
            number = secrets.randbelow(2**62) + 1
            token = tokens.make_confirm(secret, number, request.email, expires)
            message = self.confirmation(
                request, f"{self.settings.newsletter.base_url}/confirm/{token}"
            )
            if request.trap:
                log.info("signup: the trap field was filled in; ignored")
                return Asked.TRAPPED
            who = client if client is not None else self._client(request.client)
            limit = config.per_client_per_hour if per_client_hour is None else per_client_hour
            try:
                return self._record(request, number, message, now, expires, who, limit)
            except _NumberTaken:
                continue  # that number was drawn already: another one
        raise QantError("signup: no free request number after three draws")

    def _record(
        self,
        request: Request,
        number: int,
        message: bytes,
        now: float,
        expires: int,
        client: str,
        per_client_hour: int,
    ) -> Asked:
        """Count the attempt and, if the limits allow, keep the request and queue its
        confirmation: all of it or nothing."""
        config = self.settings.signup
        with self.ctx.db() as db, transaction(db):
            signups = Signups(db)
            allowed = signups.attempt(
                client,
                request.email,
                now,
                per_client_hour=per_client_hour,
                per_address_day=config.per_address_per_day,
            )
            if not allowed:
                log.info("signup: rate limit reached; no confirmation sent")
                return Asked.LIMITED
            signups.purge(now)
            kept = signups.add(
                request.email,
                request.name,
                request.newsletters,
                request.form,
                now_text(),
                expires,
                number=number,
            )
            if kept is None:
                raise _NumberTaken  # nothing of this transaction is kept
            MailQueue(db).add(
                kind="confirm",
                newsletter=request.newsletters[0],
                recipient=request.email,
                message=message,
                expires_at=expires,
            )
        self.queued()
        return Asked.QUEUED

    def confirmation(self, request: Request, url: str) -> bytes:
        """Return the confirmation email of a request, in the look of its first newsletter."""
        renderer = self.ctx.renderer.for_newsletter(request.newsletters[0])
        settings = renderer.settings
        names = renderer.format_list([self._name(key) for key in request.newsletters])
        subject = settings.labels.confirm_subject.format(newsletter=names)
        html, text = renderer.render_notice(
            "confirm",
            subject=subject,
            email=request.email,
            names=names,
            confirm_url=url,
            hours=renderer.format_number(round(self.settings.signup.confirm_hours)),
        )
        recipient = Recipient(request.email, request.name)
        return notice(settings, recipient, renderer.typeset_text(subject), html, text)

    # -- the confirmation link -----------------------------------------------------------

    def pending(self, token: str, db: Db | None = None) -> PendingSignup | None:
        """Return the request a genuine, unexpired confirmation link names; None for
        anything else (forged, altered, expired, purged)."""
        claimed = tokens.read_confirm(token)
        if claimed is None or claimed[1] < self.ctx.clock():
            return None
        if db is None:
            with self.ctx.db() as own:
                return self.pending(token, own)
        signup = Signups(db).get(claimed[0])
        if signup is None or not tokens.verify_confirm(self.ctx.secret(), token, signup.email):
            return None
        return signup

    def confirm(self, token: str) -> tuple[PendingSignup, str] | None:
        """Confirm the request a link names (twice is once); return it and the link to
        the reader's page. The first time, each newsletter's welcome is queued in the
        same transaction as the subscriptions."""
        ctx = self.ctx
        with ctx.db() as db:  # one connection for the whole request
            signup = self.pending(token, db)
            if signup is None:
                return None
            return self._confirm(db, signup)

    def _confirm(self, db: Db, signup: PendingSignup) -> tuple[PendingSignup, str]:
        ctx = self.ctx
        known = [k for k in signup.newsletters if k in self.settings.editions]
        welcomes = {key: self._welcome(key) for key in known}
        expires = ctx.clock() + self.settings.signup.confirm_hours * 3600
        with transaction(db):
            chosen = replace(signup, newsletters=tuple(known))
            subscribed, first = Signups(db).confirm(chosen, signup.form)
            reader = subscribed[0] if subscribed else None
            if reader is None:
                return signup, ""
            recipient = Recipient(reader.email, reader.name, reader.id)
            for key, welcome in welcomes.items():
                if first and welcome is not None:
                    MailQueue(db).add(
                        kind="welcome",
                        newsletter=key,
                        recipient=reader.email,
                        message=welcome.template.personalise(recipient),
                        expires_at=expires,
                    )
        if first:
            self.queued()
        return signup, reader_page_url(self.settings, ctx.secret(), recipient)

    def _welcome(self, key: str) -> Prepared | None:
        """Return the welcome of newsletter `key`, dated today, prepared once a day and
        again when its file changes; None if it has none, or one that cannot go out (the
        subscription stands; the operator is told)."""
        settings = self.settings.for_newsletter(key)
        if not settings.newsletter.welcome:
            return None
        path = settings.root / settings.newsletter.welcome
        try:
            stamp = (path.stat().st_mtime, issues.today(self.ctx).isoformat())
            with self._lock:
                cached = self._welcomes.get(key)
                if cached is None or cached[0] != stamp:
                    renderer = self.ctx.renderer.for_newsletter(key)
                    prepared = issues.prepare(self.ctx, path, occasion=True, renderer=renderer)
                    self._welcomes[key] = cached = (stamp, prepared)
            return cached[1]
        except (QantError, OSError) as err:
            log.error("signup: the welcome of %s cannot be sent: %s", key, err)
            return None

    # -- the reader's page ---------------------------------------------------------------

    def reader(self, token: str) -> ReaderPage | None:
        """Return the page a genuine reader link opens; None for anything else."""
        number = tokens.subscriber_id(token)
        if number is None or tokens.newsletter_of(token):
            return None
        with self.ctx.db() as db:
            store = Subscribers(db, self.settings.main_id)
            found = store.by_id(number)
            if found is None or not tokens.verify(
                self.ctx.secret(), token, number, found.email, tokens.READER
            ):
                return None
            statuses = store.subscriptions(number)
            status = store.reader_status(number)
        shown = [
            s
            for s in self.settings.all_newsletters()
            if s.newsletter.public or s.newsletter.id in statuses
        ]
        return ReaderPage(
            number,
            found.email,
            status in READER_STATUSES,
            [(s, statuses.get(s.newsletter.id)) for s in shown],
        )

    def choose(self, token: str, key: str, receive: bool) -> ReaderPage | None:
        """Subscribe the reader of a genuine link to newsletter `key`, or unsubscribe
        them from it; return their page after the change."""
        page = self.reader(token)
        if (
            page is None
            or page.stopped
            or key not in {s.newsletter.id for s, _ in page.newsletters}
        ):
            return page
        with self.ctx.db() as db:
            store = Subscribers(db, key)
            if receive:
                now = now_text()
                found = store.by_id(page.subscriber_id)
                assert found is not None
                consent = Consent(now, "reader page", now)
                store.confirm(found.email, found.name, consent, "reader page")
            else:
                store.set_status_by_id(page.subscriber_id, Status.UNSUBSCRIBED, "reader page")
        return self.reader(token)

    # -- helpers -------------------------------------------------------------------------

    def _name(self, key: str) -> str:
        return self.settings.for_newsletter(key).newsletter.name

    def _client(self, client: str) -> str:
        # Kept hashed: the limits need to tell clients apart, not to know who they are.
        digest = hmac.digest(self.ctx.secret(), b"client\0" + client.encode(), hashlib.sha256)
        return digest[:12].hex()


# -- leaving ---------------------------------------------------------------------------


def token_newsletter(ctx: Context, token: str) -> str:
    """Return the key of the newsletter an unsubscribe token is about (unverified)."""
    return tokens.newsletter_of(token) or ctx.settings.main_id


def unsubscribing(ctx: Context, token: str) -> Subscriber | None:
    """Return the reader a genuine unsubscribe token names; None for anything else."""
    with ctx.db() as db:
        return _named(ctx, Subscribers(db, token_newsletter(ctx, token)), token)


def unsubscribe_by_link(ctx: Context, token: str, reason: str) -> Subscriber | None:
    """Unsubscribe whom a genuine token names from the newsletter it names (`reason`:
    page, one-click); twice keeps the first date and reason. None for a bad token. The
    probe of `qant-mail doctor` is answered as a success, and changes nobody."""
    if tokens.is_probe(token, ctx.secret):
        return PROBE_READER
    with ctx.db() as db:
        store = Subscribers(db, token_newsletter(ctx, token))
        subscriber = _named(ctx, store, token)
        if subscriber is None or subscriber.status is not Status.ACTIVE:
            return subscriber
        changed = store.set_status_by_id(subscriber.id, Status.UNSUBSCRIBED, reason)
        return changed or subscriber


# Whom the probe of `qant-mail doctor` names: nobody, already gone; never stored.
PROBE_READER = Subscriber(
    id=tokens.PROBE_ID,
    email=tokens.PROBE_ADDRESS,
    name="",
    status=Status.UNSUBSCRIBED,
    status_changed_at="",
    status_reason="doctor",
    created_at="",
    source="doctor",
)


def _named(ctx: Context, store: Subscribers, token: str) -> Subscriber | None:
    number = tokens.subscriber_id(token)
    if number is None:
        return None
    subscriber = store.by_id(number)
    if subscriber is None or not tokens.verify(ctx.secret(), token, number, subscriber.email):
        return None
    return subscriber


@dataclass(frozen=True)
class PipeOutcome:
    """What an unsubscription by email came to, and the status a mail server reads:
    OK (done, or nothing to do), DATAERR (unusable: returned to its sender), TEMPFAIL
    (try again later: the message stays queued, nothing is lost)."""

    exit_code: ExitCode
    message: str

    @property
    def ok(self) -> bool:
        """Return whether the message was dealt with (nothing for the server to do)."""
        return self.exit_code == ExitCode.OK


def unsubscribe_by_mail(
    context: Callable[[], Context], message: bytes, newsletter: str | None
) -> PipeOutcome:
    """Unsubscribe the sender of `message` (from a mail alias): from the newsletter its
    subject names ("unsubscribe KEY", as the List-Unsubscribe mailto of each newsletter
    but the main one writes it), else from `newsletter`. A message that cannot be read
    is refused for good; a store or settings in trouble, for now (the server retries)."""
    try:
        address = messages.sender_of(message)
        newsletter = messages.newsletter_asked(message) or newsletter
    except SubscriberError as err:
        return PipeOutcome(ExitCode.DATAERR, str(err))
    try:
        ctx = context()
        key = ctx.settings.for_newsletter(newsletter).newsletter.id
        with ctx.db() as db:
            store = Subscribers(db, key)
            if store.get(address) is None:
                # Not a reader (or not any more): nothing to do, and nothing to bounce back.
                return PipeOutcome(ExitCode.OK, f"{address}: not on the list; nothing to do")
            subscriber = store.unsubscribe(address, "mailto")
    except (StoreError, ConfigError) as err:
        return PipeOutcome(ExitCode.TEMPFAIL, f"{err} (the mail server will try again later)")
    return PipeOutcome(
        ExitCode.OK, f"{subscriber.email}: {subscriber.status} ({subscriber.status_reason})"
    )


# -- the list, as the editors keep it -------------------------------------------------


def _list(ctx: Context, newsletter: str | None) -> Subscribers:
    """Open the list of `newsletter` (None: the main one); refuse an unknown key."""
    key = ctx.settings.for_newsletter(newsletter).newsletter.id
    return Subscribers.open(ctx.store, key)


def import_csv(
    ctx: Context,
    path: Path,
    source: str | None = None,
    *,
    test_domains: bool = False,
    newsletter: str | None = None,
) -> ImportReport:
    """Import readers from a CSV file (`email`, optional `name`); re-importing changes
    nothing."""
    with _list(ctx, newsletter) as store:
        return store.import_csv(path, source, test_domains=test_domains)


def add(
    ctx: Context,
    address: str,
    name: str = "",
    *,
    resubscribe: bool = False,
    test_domains: bool = False,
    newsletter: str | None = None,
) -> Subscriber:
    """Add one reader."""
    with _list(ctx, newsletter) as store:
        return store.add(address, name, resubscribe=resubscribe, test_domains=test_domains)


def remove(ctx: Context, address: str) -> Subscriber:
    """Delete a reader and their data, from every newsletter."""
    with _list(ctx, None) as store:
        return store.remove(address)


def unsubscribe(
    ctx: Context, address: str, reason: str = "command line", *, newsletter: str | None = None
) -> Subscriber:
    """Mark a reader unsubscribed from one newsletter (kept, so that no import brings
    them back)."""
    with _list(ctx, newsletter) as store:
        return store.unsubscribe(address, reason)


def listing(
    ctx: Context, status: Status | None = None, *, newsletter: str | None = None
) -> Iterator[Subscriber]:
    """Yield the readers of a newsletter (of `status`, when given), streamed."""
    with _list(ctx, newsletter) as store:
        yield from store.all(status)


def count(ctx: Context, *, newsletter: str | None = None) -> dict[Status, int]:
    """Count the readers of a newsletter by status."""
    with _list(ctx, newsletter) as store:
        return store.count()


def export(
    ctx: Context, out: TextIO, status: Status | None = None, *, newsletter: str | None = None
) -> int:
    """Write the readers of a newsletter as CSV to `out`; return how many."""
    with _list(ctx, newsletter) as store:
        return store.export(out, status)


def export_file(
    ctx: Context, path: Path, status: Status | None = None, *, newsletter: str | None = None
) -> int:
    """Write the readers of a newsletter as CSV to the file `path`, whole or not at all;
    return how many."""
    buffer = io.StringIO()
    written = export(ctx, buffer, status, newsletter=newsletter)
    write_all({path: buffer.getvalue().encode("utf-8")})
    return written


def parse_status(value: str) -> Status:
    """Return the status `value` names; raise ValueError naming the choices."""
    try:
        return Status(value)
    except ValueError as err:
        choices = ", ".join(s.value for s in Status)
        raise ValueError(f"{value!r} is not one of {choices}") from err


def rename_newsletter(ctx: Context, old: str, new: str) -> int:
    """Move a newsletter's subscriptions and sends to a new key; return how many moved."""
    with Subscribers.open(ctx.store) as store:
        return store.rename_newsletter(old, new)


@dataclass(frozen=True)
class Newsletters:
    """The newsletters of the settings with their active readers, and the keys the
    store has subscriptions to that the settings no longer name."""

    known: list[tuple[str, str, bool, int]]  # key, name, main, active readers
    unknown: dict[str, int]  # key → subscriptions


def newsletters(ctx: Context) -> Newsletters:
    """Return each newsletter with its active readers, and the store's unknown keys."""
    settings = ctx.settings
    with Subscribers.open(ctx.store) as store:
        in_store = store.newsletters()
        known = [
            (
                edition.newsletter.id,
                edition.newsletter.name,
                edition.newsletter.id == settings.main_id,
                store.of(edition.newsletter.id).count()[Status.ACTIVE],
            )
            for edition in settings.editions.values()
        ]
    unknown = {key: in_store[key] for key in sorted(set(in_store) - set(settings.editions))}
    return Newsletters(known, unknown)


def health(ctx: Context) -> str | None:
    """Return what keeps the store from being used now, or None when it answers."""
    try:
        with Subscribers.open(ctx.store) as store:
            store.count()
    except (StoreError, OSError) as err:
        return str(err)
    return None
