"""Readers who join and choose by themselves: a signup request and its confirmation
email (double opt-in), the welcome email once confirmed, and the reader's page of
subscriptions. What the public side (`serve`) calls; no HTTP here."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from qant_mail.audience import tokens
from qant_mail.authoring.render import Renderer
from qant_mail.base.addresses import AddressChecker, AddressError, check_display_name
from qant_mail.base.config import Settings
from qant_mail.base.errors import QantError
from qant_mail.delivery.compose import Prepared, Recipient, dkim_keys, notice, reader_page_url
from qant_mail.store.db import Db, now_text, open_store
from qant_mail.store.subscribers import (
    READER_STATUSES,
    Consent,
    PendingSignup,
    Signups,
    Status,
    Subscribers,
)

log = logging.getLogger(__name__)

MAX_NAME = 200


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


class Mailer(Protocol):
    """Delivers one message to one address."""

    def deliver(self, address: str, data: bytes) -> None:
        """Hand the message over; raise QantError if it cannot be."""


class SmtpMailer:
    """Delivers through the relay of the settings, one connection per message (signups
    are few)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.lock = threading.Lock()

    def deliver(self, address: str, data: bytes) -> None:
        """Send `data` to `address` through the relay; raise QantError if refused."""
        from qant_mail.delivery.transport import SmtpTransport

        sender = self.settings.smtp.return_path or self.settings.sender.address
        with self.lock:
            connection = SmtpTransport(self.settings).connect()
            try:
                reply = connection.send(sender, address, data)
            finally:
                connection.close()
        if not reply.ok:
            raise QantError(f"the relay refused the message to {address}: {reply}")


@dataclass(frozen=True)
class ReaderPage:
    """A reader's page: who, and each newsletter offered with their status for it."""

    subscriber_id: int
    email: str
    stopped: bool  # bounced or complained: nothing goes to them
    newsletters: list[tuple[Settings, Status | None]]  # None: never subscribed


class Signup:
    """The signup, confirmation and choice of newsletters of one installation."""

    def __init__(
        self,
        settings: Settings,
        secret: bytes,
        mailer: Mailer,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.secret = secret
        self.mailer = mailer
        self.clock = clock
        self.renderer = Renderer(settings)
        self._welcomes: dict[str, tuple[float, Prepared]] = {}
        self._keys = dkim_keys(settings)

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

    def request(self, request: Request) -> None:
        """Deal with a valid request, after the answer is sent: a trap filled or a limit
        reached ends it silently; else the request is kept, and the confirmation mailed."""
        if request.trap:
            log.info("signup: the trap field was filled in; ignored")
            return
        now = self.clock()
        config = self.settings.signup
        expires = int(now + config.confirm_hours * 3600)
        with _store(self.settings) as db:
            signups = Signups(db)
            allowed = signups.attempt(
                self._client(request.client),
                request.email,
                now,
                per_client_hour=config.per_client_per_hour,
                per_address_day=config.per_address_per_day,
            )
            if not allowed:
                log.info("signup: rate limit reached; no confirmation sent")
                return
            signups.purge(now)
            number = signups.add(
                request.email, request.name, request.newsletters, request.form, now_text(), expires
            )
        token = tokens.make_confirm(self.secret, number, request.email, expires)
        url = f"{self.settings.newsletter.base_url}/confirm/{token}"
        self.mailer.deliver(request.email, self.confirmation(request, url))

    def confirmation(self, request: Request, url: str) -> bytes:
        """Return the confirmation email of a request, in the look of its first newsletter."""
        renderer = self.renderer.for_newsletter(request.newsletters[0])
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
        return notice(
            settings, recipient, renderer.typeset_text(subject), html, text, keys=self._keys
        )

    # -- the confirmation link -----------------------------------------------------------

    def pending(self, token: str) -> PendingSignup | None:
        """Return the request a genuine, unexpired confirmation link names; None for
        anything else (forged, altered, expired, purged)."""
        claimed = tokens.read_confirm(token)
        if claimed is None or claimed[1] < self.clock():
            return None
        with _store(self.settings) as db:
            signup = Signups(db).get(claimed[0])
        if signup is None or not tokens.verify_confirm(self.secret, token, signup.email):
            return None
        return signup

    def confirm(self, token: str) -> tuple[PendingSignup, str] | None:
        """Confirm the request a link names (twice is once); return it and the link to
        the reader's page, and mail each newsletter's welcome on the first time."""
        signup = self.pending(token)
        if signup is None:
            return None
        with _store(self.settings) as db:
            known = [k for k in signup.newsletters if k in self.settings.editions]
            chosen = replace(signup, newsletters=tuple(known))
            subscribed, first = Signups(db).confirm(chosen, signup.form)
        reader = subscribed[0] if subscribed else None
        page = ""
        if reader is not None:
            recipient = Recipient(reader.email, reader.name, reader.id)
            page = reader_page_url(self.settings, self.secret, recipient)
            if first:
                for key in known:
                    self._welcome(key, recipient)
        return signup, page

    def _welcome(self, key: str, recipient: Recipient) -> None:
        settings = self.settings.for_newsletter(key)
        if not settings.newsletter.welcome:
            return
        try:
            prepared = self._welcome_message(settings)
            self.mailer.deliver(recipient.address, prepared.template.personalise(recipient))
        except QantError as err:
            # The subscription stands; the operator is told, the reader sees nothing.
            log.error("signup: the welcome of %s could not be sent: %s", key, err)

    def _welcome_message(self, settings: Settings) -> Prepared:
        """Return the newsletter's welcome, prepared once and again when its file changes."""
        from qant_mail.app.pipeline import prepare_send

        path = settings.root / settings.newsletter.welcome
        key = settings.newsletter.id
        stamp = path.stat().st_mtime if path.exists() else 0.0
        cached = self._welcomes.get(key)
        if cached is None or cached[0] != stamp:
            renderer = self.renderer.for_newsletter(key)
            prepared = prepare_send(path, settings, renderer=renderer, secret=self.secret)
            self._welcomes[key] = cached = (stamp, prepared)
        return cached[1]

    # -- the reader's page ---------------------------------------------------------------

    def reader(self, token: str) -> ReaderPage | None:
        """Return the page a genuine reader link opens; None for anything else."""
        number = tokens.subscriber_id(token)
        if number is None or tokens.newsletter_of(token):
            return None
        with _store(self.settings) as db:
            store = Subscribers(db, self.settings.main_id)
            found = store.by_id(number)
            if found is None or not tokens.verify(
                self.secret, token, number, found.email, tokens.READER
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
        with _store(self.settings) as db:
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
        digest = hmac.digest(self.secret, b"client\0" + client.encode(), hashlib.sha256)
        return digest[:12].hex()


def _store(settings: Settings) -> contextlib.closing[Db]:
    """Open the database for one step, closed however that ends."""
    return contextlib.closing(open_store(settings.store_path))
