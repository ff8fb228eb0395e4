"""The use cases of readers as another program asks for them (the API of `serve`): add a
reader (double opt-in, or already confirmed with a record of their consent), read one,
change their name and newsletters, unsubscribe them, list a newsletter's readers a page
at a time. Every answer depends on what was asked and what the store holds; what is
wrong with a request is said field by field (`Invalid`)."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import ipaddress
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from qant_mail.app.context import Context
from qant_mail.app.readers import MAX_NAME, Asked, Request, Signup
from qant_mail.base.addresses import AddressChecker, AddressError, check_display_name
from qant_mail.base.errors import QantError
from qant_mail.store.db import Db, now_text, transaction
from qant_mail.store.subscribers import (
    READER_STATUSES,
    Consent,
    Status,
    Subscriber,
    SubscriberError,
    Subscribers,
)

log = logging.getLogger(__name__)

# What the requests of the API are recorded as: the consent form of a confirmed
# request, the source of a reader it adds, the reason of a change it makes.
ORIGIN = "api"
MAX_SOURCE = 200
MAX_NEWSLETTERS = 50
# A consent dated this far ahead of our clock is a clock out of step, not the future.
_CLOCK_SKEW = dt.timedelta(minutes=5)
# The API's client is one program, whose requests the limits of its token count: the
# hourly limit of a signup form's client does not apply to it.
_NO_CLIENT_LIMIT = 2**31 - 1
_ASK_THEM = 'only their own confirmation brings them back: send it without "confirmed"'


class Invalid(QantError):
    """A request the store cannot act on as it stands: each field with what is wrong."""

    def __init__(self, problems: Sequence[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{field}: {message}" for field, message in problems))
        self.problems = list(problems)


class TooMany(QantError):
    """A limit that protects a reader's mailbox is reached (the confirmations a day)."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class ConsentRecord:
    """How a reader added as already confirmed gave their consent, as the caller kept it."""

    source: str  # where they gave it: a form, a checkout page
    at: str  # when they asked (ISO 8601, with its offset)
    confirmed_at: str = ""  # when they confirmed their address, if they did
    ip: str = ""  # from where they asked, if known


@dataclass(frozen=True)
class Subscription:
    """A reader's standing for one newsletter."""

    newsletter: str
    status: Status
    since: str
    reason: str
    source: str
    consent: Consent | None


@dataclass(frozen=True)
class Reader:
    """A reader with each newsletter they have had a subscription to."""

    id: int
    email: str
    name: str
    status: Status  # their own: active, or bounced or complained (every newsletter stops)
    created_at: str
    subscriptions: list[Subscription]


@dataclass(frozen=True)
class Created:
    """What adding a reader did: their confirmation queued (`reader` None: nobody is
    added before they confirm), or the reader added (`new`: not known before)."""

    reader: Reader | None
    new: bool
    newsletters: tuple[str, ...]


@dataclass(frozen=True)
class Page:
    """One page of a newsletter's readers, and the number to ask the next one after."""

    readers: list[Subscriber]
    next_after: int | None  # None: this was the last page


def create(
    ctx: Context,
    email: str,
    name: str,
    newsletters: Sequence[str] | None,
    *,
    consent: ConsentRecord | None = None,
    client: str,
    queued: Callable[[], None] = lambda: None,
) -> Created:
    """Add a reader to `newsletters` (None: the main one): without `consent`, mail them
    the confirmation of a signup (double opt-in) and add nothing until they confirm; with
    it, subscribe them now and keep it. `client` names the caller for the limits (never
    stored as it is)."""
    address, name, keys = _checked(ctx, email, name, newsletters)
    if consent is None:
        _request_confirmation(ctx, Request(address, name, keys, ORIGIN, client), queued)
        return Created(None, False, keys)
    kept = _consent(consent)
    with ctx.db() as db, transaction(db):
        main = Subscribers(db, ctx.settings.main_id)
        existing = main.get(address)
        # Their own confirmation only brings back whom a reader asked to be removed, or
        # whose mailbox refused or complained: a caller's record of consent does not.
        if existing is None and main.suppressed_since(address):
            raise Invalid([("email", f"removed from the list on request; {_ASK_THEM}")])
        if existing is not None and existing.status in READER_STATUSES:
            raise Invalid(
                [("email", f"{existing.status} ({existing.status_changed_at}); {_ASK_THEM}")]
            )
        for key in keys:
            Subscribers(db, key).confirm(address, name, kept, ORIGIN)
        found = main.get(address)
        assert found is not None
        reader = _reader(ctx, db, found.id)
    assert reader is not None
    return Created(reader, existing is None, keys)


def get(ctx: Context, subscriber_id: int) -> Reader | None:
    """Return reader number `subscriber_id`, if there is one."""
    with ctx.db() as db:
        return _reader(ctx, db, subscriber_id)


def find(ctx: Context, email: str) -> Reader | None:
    """Return the reader with the address `email` (any case), if there is one."""
    with ctx.db() as db:
        found = Subscribers(db, ctx.settings.main_id).get(email)
        return None if found is None else _reader(ctx, db, found.id)


def change(
    ctx: Context,
    subscriber_id: int,
    *,
    name: str | None = None,
    newsletters: Sequence[str] | None = None,
) -> Reader | None:
    """Give a reader another name, or the newsletters they get (all of them: those left
    out are unsubscribed, those added subscribed, as asked by the caller who holds their
    consent); None if there is no such reader."""
    problems: list[tuple[str, str]] = []
    keys: tuple[str, ...] = ()
    if name is not None:
        name = _name(name, problems)
    if newsletters is not None:
        keys = _newsletters(ctx, newsletters, problems, empty_ok=True)
    if problems:
        raise Invalid(problems)
    with ctx.db() as db, transaction(db):
        main = Subscribers(db, ctx.settings.main_id)
        found = main.by_id(subscriber_id)
        if found is None:
            return None
        if name is not None:
            main.rename(subscriber_id, name)
        if newsletters is not None:
            _choose(ctx, db, found, keys)
        return _reader(ctx, db, subscriber_id)


def leave(ctx: Context, subscriber_id: int, newsletter: str | None = None) -> Reader | None:
    """Unsubscribe a reader from `newsletter`, or from every one (kept, so that no
    import brings them back); None if there is no such reader."""
    if newsletter is not None and newsletter not in ctx.settings.editions:
        raise Invalid([("newsletter", f"no newsletter {newsletter!r}")])
    with ctx.db() as db, transaction(db):
        main = Subscribers(db, ctx.settings.main_id)
        if main.by_id(subscriber_id) is None:
            return None
        for key, status in main.subscriptions(subscriber_id).items():
            if (newsletter is None or key == newsletter) and status is Status.ACTIVE:
                Subscribers(db, key).set_status_by_id(subscriber_id, Status.UNSUBSCRIBED, ORIGIN)
        return _reader(ctx, db, subscriber_id)


def page(
    ctx: Context,
    newsletter: str | None,
    *,
    status: Status | None = None,
    after: int = 0,
    limit: int = 100,
    email: str | None = None,
) -> Page:
    """Return the readers of `newsletter` (None: the main one) numbered above `after`,
    `limit` at most, by number; or, given `email`, the reader with that address as the
    newsletter sees them (whatever `status`), if there is one."""
    key = newsletter or ctx.settings.main_id
    if key not in ctx.settings.editions:
        raise Invalid([("newsletter", f"no newsletter {key[:60]!r}")])
    with ctx.db() as db:
        if email is not None:
            one = Subscribers(db, key).get(email)
            return Page([] if one is None or one.id <= after else [one], None)
        found = Subscribers(db, key).page(after, limit + 1, status)
    more = len(found) > limit
    found = found[:limit]
    return Page(found, found[-1].id if more else None)


# -- adding --------------------------------------------------------------------------


def _checked(
    ctx: Context, email: str, name: str, newsletters: Sequence[str] | None
) -> tuple[str, str, tuple[str, ...]]:
    """Return the address, the name and the newsletters of a new reader, or raise
    Invalid with every field that is wrong."""
    problems: list[tuple[str, str]] = []
    address = ""
    try:
        address = AddressChecker().check(email)
    except AddressError as err:
        problems.append(("email", str(err)))
    name = _name(name, problems)
    asked = [ctx.settings.main_id] if newsletters is None else newsletters
    keys = _newsletters(ctx, asked, problems, empty_ok=False)
    if problems:
        raise Invalid(problems)
    return address, name, keys


def _name(name: str, problems: list[tuple[str, str]]) -> str:
    try:
        checked = check_display_name(name)
    except QantError as err:
        problems.append(("name", str(err)))
        return ""
    if len(checked) > MAX_NAME:
        problems.append(("name", f"longer than {MAX_NAME} characters"))
    return checked


def _newsletters(
    ctx: Context, keys: Sequence[str], problems: list[tuple[str, str]], *, empty_ok: bool
) -> tuple[str, ...]:
    if len(keys) > MAX_NEWSLETTERS:
        problems.append(("newsletters", f"more than {MAX_NEWSLETTERS}"))
        return ()
    unknown = [key for key in keys if key not in ctx.settings.editions]
    for key in unknown:
        problems.append(("newsletters", f"no newsletter {key[:60]!r}"))
    if not keys and not empty_ok:
        problems.append(("newsletters", "at least one newsletter"))
    return tuple(dict.fromkeys(keys))


def _consent(consent: ConsentRecord) -> Consent:
    """Return the consent to keep, or raise Invalid for what is wrong with it."""
    problems: list[tuple[str, str]] = []
    source = " ".join(consent.source.split())
    if not source:
        problems.append(("consent.source", "say where the reader gave their consent"))
    elif len(source) > MAX_SOURCE:
        problems.append(("consent.source", f"longer than {MAX_SOURCE} characters"))
    elif not source.isprintable():
        problems.append(("consent.source", "contains a control character"))
    asked = _time(consent.at, "consent.at", problems)
    confirmed = _time(consent.confirmed_at, "consent.confirmed_at", problems, optional=True)
    if consent.ip:
        try:
            ipaddress.ip_address(consent.ip)
        except ValueError:
            problems.append(("consent.ip", "not an IPv4 or IPv6 address"))
    if problems:
        raise Invalid(problems)
    # The store keeps where and when; where from goes with where, as evidence of it.
    form = f"{ORIGIN}: {source}" + (f" (from {consent.ip})" if consent.ip else "")
    return Consent(asked, form, confirmed or now_text())


def _time(
    value: str, field: str, problems: list[tuple[str, str]], *, optional: bool = False
) -> str:
    """Return an ISO 8601 time with its offset as the store keeps times (UTC)."""
    if not value and optional:
        return ""
    try:
        when = dt.datetime.fromisoformat(value)
    except ValueError:
        problems.append((field, "not an ISO 8601 time, such as 2024-05-01T09:30:00+02:00"))
        return ""
    if when.tzinfo is None:
        problems.append((field, "give its offset from UTC (Z, +02:00)"))
        return ""
    if when - _CLOCK_SKEW > dt.datetime.now(dt.UTC):
        problems.append((field, "in the future"))
        return ""
    return when.astimezone(dt.UTC).replace(microsecond=0).isoformat()


def _request_confirmation(ctx: Context, request: Request, queued: Callable[[], None]) -> None:
    """Keep a signup request and queue its confirmation, as the signup form does (the
    same use case); raise TooMany when the address has had its confirmations for the day."""
    # The API's callers are counted apart from the forms' clients, and not per hour:
    # a token has limits of its own.
    digest = hmac.digest(ctx.secret(), b"api client\0" + request.client.encode(), hashlib.sha256)
    asked = Signup(ctx, queued=queued).request(
        request, client=digest[:12].hex(), per_client_hour=_NO_CLIENT_LIMIT
    )
    if asked is Asked.LIMITED:
        limit = ctx.settings.signup.per_address_per_day
        raise TooMany(
            f"this address has had {limit} confirmation mails in a day: it gets no more "
            "before tomorrow",
            retry_after=86400,
        )


# -- reading and changing ------------------------------------------------------------


def _reader(ctx: Context, db: Db, subscriber_id: int) -> Reader | None:
    main = Subscribers(db, ctx.settings.main_id)
    found = main.by_id(subscriber_id)
    own = main.reader_status(subscriber_id)
    if found is None or own is None:
        return None
    subscriptions = []
    first = found.created_at
    for key in main.subscriptions(subscriber_id):
        view = main.of(key)
        seen = view.by_id(subscriber_id)
        assert seen is not None
        subscriptions.append(
            Subscription(
                key,
                seen.status,
                seen.status_changed_at,
                seen.status_reason,
                seen.source,
                view.consent(subscriber_id),
            )
        )
        first = min(first, seen.created_at)
    return Reader(found.id, found.email, found.name, own, first, subscriptions)


def _choose(ctx: Context, db: Db, reader: Subscriber, keys: tuple[str, ...]) -> None:
    """Make `keys` the newsletters the reader gets, inside the caller's transaction."""
    main = Subscribers(db, ctx.settings.main_id)
    current = main.subscriptions(reader.id)
    joining = [k for k in keys if current.get(k) is not Status.ACTIVE]
    if joining and main.reader_status(reader.id) in READER_STATUSES:
        raise Invalid(
            [("newsletters", "this reader bounced or complained: nothing can be sent to them")]
        )
    now = now_text()
    for key in joining:
        try:
            Subscribers(db, key).confirm(
                reader.email, reader.name, Consent(now, ORIGIN, now), ORIGIN
            )
        except SubscriberError as err:
            raise Invalid([("newsletters", str(err))]) from err
    for key, status in current.items():
        if key not in keys and status is Status.ACTIVE:
            Subscribers(db, key).set_status_by_id(reader.id, Status.UNSUBSCRIBED, ORIGIN)
