"""The subscriber list (SQLite): readers, their subscriptions to each newsletter,
statuses, suppressions, CSV import and export.

A reader is one row of `subscribers` whatever they read; `subscriptions` says which
newsletters they get. Leaving a newsletter is a subscription's status; a hard bounce or
a complaint is the reader's, and stops every newsletter at once."""

from __future__ import annotations

import csv
import enum
import hashlib
import io
import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from qant_mail.base.addresses import AddressChecker, AddressError, canonical, check_display_name
from qant_mail.base.config import DEFAULT_NEWSLETTER
from qant_mail.base.errors import QantError
from qant_mail.base.files import first_bad_utf8_line, open_text
from qant_mail.store.db import Db, StoreTarget, now_text, open_store, transaction
from qant_mail.store.sql import one_at_a_time

MAX_NAME = 200
# Rows go to the database this many at a time, so that memory does not grow with the file.
BATCH = 5000
# An import reports this many rejected lines, and counts the rest.
MAX_REPORTED = 1000
# Spreadsheets run a cell that starts with one of these as a formula (CSV injection).
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


class Status(enum.StrEnum):
    """Where a subscriber stands for one newsletter; only `active` ones get its issues.
    `bounced` and `complained` belong to the reader, and hold for every newsletter."""

    ACTIVE = "active"
    UNSUBSCRIBED = "unsubscribed"
    BOUNCED = "bounced"
    COMPLAINED = "complained"


class SubscriberError(QantError):
    """A subscriber operation that cannot be done (unknown address, refused change)."""


# A reader's own statuses: they stop every newsletter.
READER_STATUSES = (Status.BOUNCED, Status.COMPLAINED)


@dataclass(frozen=True)
class Subscriber:
    """A reader as one newsletter's list shows them: the status is the reader's when
    they bounced or complained, else that of their subscription."""

    id: int
    email: str
    name: str
    status: Status
    status_changed_at: str
    status_reason: str
    created_at: str
    source: str


@dataclass
class ImportReport:
    """What an import did: counts, and each rejected line with its reason (the first
    `MAX_REPORTED`; `rejected_count` counts them all)."""

    added: int = 0
    renamed: int = 0
    unchanged: int = 0
    inactive: int = 0  # already known and not active: left as they are
    suppressed: int = 0  # removed on request earlier: never added back by an import
    duplicates: int = 0
    rejected: list[tuple[int, str]] = field(default_factory=list)
    rejected_count: int = 0

    def reject(self, line: int, reason: str) -> None:
        """Note a line that was not imported."""
        self.rejected_count += 1
        if len(self.rejected) < MAX_REPORTED:
            self.rejected.append((line, reason))


# A reader seen from one newsletter (the first parameter): without a subscription to it,
# they count as unsubscribed from it.
_VIEW = (
    "SELECT s.id, s.email, s.name,"
    " CASE WHEN s.status != 'active' THEN s.status ELSE coalesce(b.status, 'unsubscribed') END,"
    " CASE WHEN s.status != 'active' OR b.status IS NULL THEN s.status_changed_at"
    " ELSE b.status_changed_at END,"
    " CASE WHEN s.status != 'active' THEN s.status_reason"
    " ELSE coalesce(b.status_reason, 'not subscribed') END,"
    " coalesce(b.created_at, s.created_at), coalesce(b.source, s.source)"
    " FROM subscribers s LEFT JOIN subscriptions b"
    " ON b.subscriber_id = s.id AND b.newsletter = $1"
)
# The same, for the readers who have a subscription to it only.
_LIST = _VIEW.replace("LEFT JOIN", "JOIN")
_COMBINED_STATUS = "CASE WHEN s.status != 'active' THEN s.status ELSE b.status END"
_INSERT = (
    "INSERT INTO subscribers (email, name, status, status_changed_at, created_at, source)"
    " VALUES ($1, $2, 'active', $3, $4, $5) ON CONFLICT (email) DO NOTHING"
)
_SUBSCRIBE = (
    "INSERT INTO subscriptions (subscriber_id, newsletter, status, status_changed_at,"
    " status_reason, created_at, source, consent_at, consent_form, confirmed_at)"
    " VALUES ($1, $2, 'active', $3, $4, $5, $6, $7, $8, $9)"
    " ON CONFLICT (newsletter, subscriber_id) DO UPDATE SET status = 'active',"
    " status_changed_at = excluded.status_changed_at, status_reason = excluded.status_reason,"
    " consent_at = coalesce(excluded.consent_at, subscriptions.consent_at),"
    " consent_form = CASE WHEN excluded.consent_form != '' THEN excluded.consent_form"
    " ELSE subscriptions.consent_form END,"
    " confirmed_at = coalesce(excluded.confirmed_at, subscriptions.confirmed_at)"
)


@dataclass(frozen=True)
class Consent:
    """How a reader asked for a newsletter: when, on which form, confirmed when."""

    requested_at: str
    form: str
    confirmed_at: str


EXPORT_HEADER = [
    "email",
    "name",
    "status",
    "status_changed_at",
    "status_reason",
    "created_at",
    "source",
]


class Subscribers:
    """The list of one newsletter (`newsletter`, its key) in a SQLite database; the
    readers and their erasure are shared by every newsletter."""

    def __init__(self, connection: Db, newsletter: str = DEFAULT_NEWSLETTER):
        self.db = connection
        self.newsletter = newsletter

    @classmethod
    def open(cls, path: StoreTarget, newsletter: str = DEFAULT_NEWSLETTER) -> Subscribers:
        """Open the list stored at `path`, creating it if needed."""
        return cls(open_store(path), newsletter)

    def of(self, newsletter: str) -> Subscribers:
        """Return the list of another newsletter, on the same connection."""
        return Subscribers(self.db, newsletter)

    def close(self) -> None:
        """Close the database."""
        self.db.close()

    def __enter__(self) -> Subscribers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def get(self, email: str) -> Subscriber | None:
        """Return the reader with this address (any case), if any."""
        row = self.db.execute(
            f"{_VIEW} WHERE s.email = $2", (self.newsletter, canonical(email))
        ).fetchone()
        return _subscriber(row) if row else None

    def by_id(self, subscriber_id: int) -> Subscriber | None:
        """Return reader number `subscriber_id`, if any."""
        row = self.db.execute(
            f"{_VIEW} WHERE s.id = $2", (self.newsletter, subscriber_id)
        ).fetchone()
        return _subscriber(row) if row else None

    def subscriptions(self, subscriber_id: int) -> dict[str, Status]:
        """Return each newsletter the reader has a subscription to, with its status for
        them (a bounced or complained reader is that for every one)."""
        return {
            str(newsletter): Status(str(status))
            for newsletter, status in self.db.execute(
                f"SELECT b.newsletter, {_COMBINED_STATUS} FROM subscriptions b"
                " JOIN subscribers s ON s.id = b.subscriber_id WHERE s.id = $1"
                " ORDER BY b.created_at, b.newsletter",
                (subscriber_id,),
            )
        }

    def reader_status(self, subscriber_id: int) -> Status | None:
        """Return the reader's own status (active, bounced, complained), if they exist."""
        row = self.db.execute(
            "SELECT status FROM subscribers WHERE id = $1", (subscriber_id,)
        ).fetchone()
        return Status(str(row[0])) if row else None

    def newsletters(self) -> dict[str, int]:
        """Return every newsletter key the store has subscriptions to, with their number
        (those of a newsletter no longer in the settings included)."""
        return {
            str(key): int(number)
            for key, number in self.db.execute(
                "SELECT newsletter, count(*) FROM subscriptions GROUP BY newsletter"
            )
        }

    def confirm(self, email: str, name: str, consent: Consent, source: str) -> Subscriber:
        """Subscribe `email` to this newsletter on their confirmed request (double
        opt-in): their consent is recorded, and it brings back an address that had
        bounced, complained or been erased, since they asked again and proved the
        mailbox theirs."""
        with transaction(self.db):
            address = self._confirm(email, name, consent, source)
        found = self.get(address)
        assert found is not None
        return found

    def _confirm(self, email: str, name: str, consent: Consent, source: str) -> str:
        """`confirm`, inside the caller's transaction; return the address as stored."""
        address = AddressChecker(test_domains=True).check(email)
        name = _name(name)
        now = now_text()
        db = self.db
        db.execute("DELETE FROM suppressions WHERE email_hash = $1", (_hash(address),))
        db.execute(_INSERT, (address, name, now, now, source))
        db.execute(
            "UPDATE subscribers SET status = 'active', status_changed_at = $1,"
            " status_reason = 'confirmed again', soft_bounces = 0,"
            " name = CASE WHEN $2 != '' THEN $2 ELSE name END"
            " WHERE email = $3 AND status != 'active'",
            (now, name, address),
        )
        (reader,) = db.execute("SELECT id FROM subscribers WHERE email = $1", (address,)).fetchone()
        db.execute(
            _SUBSCRIBE,
            (
                reader,
                self.newsletter,
                now,
                "confirmed",
                now,
                source,
                consent.requested_at,
                consent.form,
                consent.confirmed_at,
            ),
        )
        return address

    def consent(self, subscriber_id: int) -> Consent | None:
        """Return the recorded consent of a reader to this newsletter, if any."""
        row = self.db.execute(
            "SELECT consent_at, consent_form, confirmed_at FROM subscriptions"
            " WHERE subscriber_id = $1 AND newsletter = $2 AND consent_at IS NOT NULL",
            (subscriber_id, self.newsletter),
        ).fetchone()
        return Consent(str(row[0]), str(row[1]), str(row[2] or "")) if row else None

    def add(
        self,
        email: str,
        name: str = "",
        source: str = "command line",
        *,
        resubscribe: bool = False,
        test_domains: bool = False,
    ) -> Subscriber:
        """Add an active subscriber; an inactive or removed one comes back only with
        `resubscribe` (with their consent)."""
        address = AddressChecker(test_domains=test_domains).check(email)
        name = _name(name)
        with transaction(self.db) as db:
            one_at_a_time(db, f"reader {_hash(address)}")
            self._add(db, address, name, source, resubscribe)
        found = self.get(address)
        assert found is not None
        return found

    def _add(self, db: Db, address: str, name: str, source: str, resubscribe: bool) -> None:
        """Add `address` (the transaction's lock on it held): decide on what the store
        says of it now, then write."""
        existing = self.get(address)
        subscribed = existing is not None and self._subscribed(existing.id)
        now = now_text()
        if existing is None:
            suppressed = self.suppressed_since(address)
            if suppressed and not resubscribe:
                raise SubscriberError(
                    f"{address} was removed from the list on request ({suppressed}); add it "
                    "again with --resubscribe, and only with their consent"
                )
        elif existing.status is Status.ACTIVE:
            raise SubscriberError(f"{existing.email} is already subscribed")
        elif (subscribed or existing.status in READER_STATUSES) and not resubscribe:
            raise SubscriberError(
                f"{existing.email} is {existing.status} (since {existing.status_changed_at}); "
                "re-activate it with --resubscribe, and only with their consent"
            )
        db.execute("DELETE FROM suppressions WHERE email_hash = $1", (_hash(address),))
        db.execute(_INSERT, (address, name, now, now, source))
        reason = "resubscribed" if subscribed or existing is not None else ""
        if existing is not None and existing.status in READER_STATUSES:
            db.execute(
                "UPDATE subscribers SET status = 'active', status_changed_at = $1,"
                " status_reason = 'resubscribed' WHERE id = $2",
                (now, existing.id),
            )
        if existing is not None and name:
            db.execute("UPDATE subscribers SET name = $1 WHERE id = $2", (name, existing.id))
        (reader,) = db.execute("SELECT id FROM subscribers WHERE email = $1", (address,)).fetchone()
        db.execute(_SUBSCRIBE, (reader, self.newsletter, now, reason, now, source, None, "", None))

    def remove(self, email: str) -> Subscriber:
        """Delete a reader and their data (the right to erasure), from every newsletter.
        What remains is a one-way hash of the address, so that no later import adds them
        back."""
        subscriber = self._require(email)
        with transaction(self.db) as db:
            db.execute("DELETE FROM subscriptions WHERE subscriber_id = $1", (subscriber.id,))
            db.execute("DELETE FROM subscribers WHERE id = $1", (subscriber.id,))
            db.execute(
                "INSERT INTO suppressions (email_hash, reason, created_at) VALUES ($1, $2, $3)"
                " ON CONFLICT (email_hash) DO NOTHING",
                (_hash(subscriber.email), "removed on request", now_text()),
            )
        return subscriber

    def suppressed_since(self, email: str) -> str | None:
        """Return when `email` was removed on request, if it was."""
        row = self.db.execute(
            "SELECT created_at FROM suppressions WHERE email_hash = $1", (_hash(email),)
        ).fetchone()
        return str(row[0]) if row else None

    def set_status(self, email: str, status: Status, reason: str) -> Subscriber:
        """Change a subscriber's status, recording when and why."""
        subscriber = self._require(email)
        return self.set_status_by_id(subscriber.id, status, reason) or subscriber

    def set_status_by_id(
        self, subscriber_id: int, status: Status, reason: str
    ) -> Subscriber | None:
        """Change the status of reader `subscriber_id`; None if there is no such one.

        `bounced` and `complained` are the reader's, for every newsletter; `unsubscribed`
        is their subscription to this one; `active` undoes the reader's own status if
        they have one, else it subscribes them to this newsletter again."""
        # One UPDATE, and no transaction of its own: the ledger calls this inside its own.
        db = self.db
        now = now_text()
        current = db.execute(
            "SELECT status FROM subscribers WHERE id = $1", (subscriber_id,)
        ).fetchone()
        if current is None:
            return None
        if status in READER_STATUSES or (status is Status.ACTIVE and current[0] != Status.ACTIVE):
            db.execute(
                "UPDATE subscribers SET status = $1, status_changed_at = $2, status_reason = $3"
                " WHERE id = $4 AND status != $5",
                (status.value, now, reason, subscriber_id, status.value),
            )
        else:
            db.execute(
                "UPDATE subscriptions SET status = $1, status_changed_at = $2,"
                " status_reason = $3 WHERE subscriber_id = $4 AND newsletter = $5"
                " AND status != $6",
                (status.value, now, reason, subscriber_id, self.newsletter, status.value),
            )
        return self.by_id(subscriber_id)

    def unsubscribe(self, email: str, reason: str = "command line") -> Subscriber:
        """Unsubscribe a reader from this newsletter (the others are not touched)."""
        subscriber = self._require(email)
        if not self._subscribed(subscriber.id):
            raise SubscriberError(f"{subscriber.email} does not get {self.newsletter}")
        return self.set_status_by_id(subscriber.id, Status.UNSUBSCRIBED, reason) or subscriber

    def all(self, status: Status | None = None) -> Iterator[Subscriber]:
        """Yield this newsletter's subscribers in the order they joined, of one status or
        all."""
        for row in self.db.stream(*self._listing(status)):
            yield _subscriber(row)

    def page(self, after: int, limit: int, status: Status | None = None) -> list[Subscriber]:
        """Return at most `limit` of this newsletter's subscribers numbered above `after`
        (of one status or all), by number: a page that stays put while readers join."""
        if status is None:
            query = f"{_LIST} WHERE s.id > $2 ORDER BY s.id LIMIT $3"
            return [_subscriber(r) for r in self.db.execute(query, (self.newsletter, after, limit))]
        query = f"{_LIST} WHERE s.id > $2 AND {_COMBINED_STATUS} = $3 ORDER BY s.id LIMIT $4"
        rows = self.db.execute(query, (self.newsletter, after, status.value, limit))
        return [_subscriber(row) for row in rows]

    def rename(self, subscriber_id: int, name: str) -> Subscriber | None:
        """Give reader `subscriber_id` the display name `name` (empty: none); None if
        there is no such reader."""
        self.db.execute(
            "UPDATE subscribers SET name = $1 WHERE id = $2", (_name(name), subscriber_id)
        )
        return self.by_id(subscriber_id)

    def _listing(self, status: Status | None) -> tuple[str, tuple[str, ...]]:
        """Return the query of this newsletter's subscribers (of one status or all), in
        the order they joined, and its parameters."""
        if status is None:
            return f"{_LIST} ORDER BY s.id", (self.newsletter,)
        where = f"{_LIST} WHERE {_COMBINED_STATUS} = $2 ORDER BY s.id"
        return where, (self.newsletter, status.value)

    def count(self) -> dict[Status, int]:
        """Return the number of this newsletter's subscribers in each status."""
        counts = dict.fromkeys(Status, 0)
        for status, number in self.db.execute(
            f"SELECT {_COMBINED_STATUS}, count(*) FROM subscriptions b"
            " JOIN subscribers s ON s.id = b.subscriber_id WHERE b.newsletter = $1"
            f" GROUP BY {_COMBINED_STATUS}",
            (self.newsletter,),
        ):
            counts[Status(status)] = number
        return counts

    def _subscribed(self, subscriber_id: int) -> bool:
        row = self.db.execute(
            "SELECT 1 FROM subscriptions WHERE subscriber_id = $1 AND newsletter = $2",
            (subscriber_id, self.newsletter),
        ).fetchone()
        return row is not None

    def export(self, out: TextIO, status: Status | None = None) -> int:
        """Write the list as CSV (with a header); return the number of rows. The rows
        come through the database's bulk path (COPY on PostgreSQL)."""
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(EXPORT_HEADER)
        written = 0
        for subscriber in map(_subscriber, self.db.copy_out(*self._listing(status))):
            writer.writerow(
                _inert(cell)
                for cell in (
                    subscriber.email,
                    subscriber.name,
                    subscriber.status.value,
                    subscriber.status_changed_at,
                    subscriber.status_reason,
                    subscriber.created_at,
                    subscriber.source,
                )
            )
            written += 1
        return written

    def import_csv(
        self, path: Path, source: str | None = None, *, test_domains: bool = False
    ) -> ImportReport:
        """Add the addresses of a CSV file (`email`, optional `name`); idempotent. The
        file is read as a stream: a million rows take the memory of a few thousand."""
        try:
            stream = open_text(path)
        except OSError as err:
            raise SubscriberError(f"{path}: cannot read: {err.strerror or err}") from err
        with stream:
            try:
                return self._import(
                    stream, source or f"import {path.name}", str(path), test_domains
                )
            except UnicodeDecodeError as err:
                # Nothing was imported: the transaction is rolled back.
                line = first_bad_utf8_line(path)
                raise SubscriberError(f"{path}:{line}: not UTF-8; save the file as UTF-8") from err

    def import_rows(
        self, text: str, source: str, where: str = "(csv)", *, test_domains: bool = False
    ) -> ImportReport:
        """Import CSV text; see `import_csv`."""
        return self._import(io.StringIO(text, newline=""), source, where, test_domains)

    def _import(self, stream: TextIO, source: str, where: str, test_domains: bool) -> ImportReport:
        report = ImportReport()
        checker = AddressChecker(test_domains=test_domains)
        rows = _read_csv(stream, where)
        bulk = self.db.dialect == "postgresql"
        with transaction(self.db) as db:
            db.execute(_INCOMING[db.dialect])
            db.execute("DELETE FROM incoming")
            if bulk:
                db.execute(_INCOMING_RAW)
                db.execute("DELETE FROM incoming_raw")
            for batch in _batches(rows, BATCH):
                valid = []
                for line, email, name in batch:
                    try:
                        address = checker.check(_uncell(email))
                        valid.append((address, _name(_uncell(name)), line, _hash(address)))
                    except (AddressError, SubscriberError) as err:
                        report.reject(line, str(err))
                if bulk:  # COPY, the bulk path; duplicates are dropped below
                    db.copy_in("incoming_raw", ("email", "name", "line", "email_hash"), valid)
                    continue
                inserted = db.executemany(
                    "INSERT INTO incoming (email, name, line, email_hash)"
                    " VALUES ($1, $2, $3, $4) ON CONFLICT (email) DO NOTHING",
                    valid,
                ).rowcount
                report.duplicates += len(valid) - inserted
            if bulk:
                (loaded,) = db.execute("SELECT count(*) FROM incoming_raw").fetchone()
                # (PostgreSQL only: its words.) The first line of each address wins.
                kept = db.execute(
                    "INSERT INTO incoming (email, name, line, email_hash)"
                    " SELECT DISTINCT ON (email) email, name, line, email_hash"
                    " FROM incoming_raw ORDER BY email, line"
                ).rowcount
                report.duplicates += int(loaded) - int(kept)
                db.execute("DELETE FROM incoming_raw")
            newsletter = (self.newsletter,)
            # Known readers who left this newsletter, bounced or complained: left as
            # they are, since a list someone kept is no consent to write again.
            report.inactive = _count(
                db,
                "SELECT count(*) FROM incoming i JOIN subscribers s ON s.email = i.email"
                " LEFT JOIN subscriptions b ON b.subscriber_id = s.id AND b.newsletter = $1"
                " WHERE s.status != 'active' OR b.status = 'unsubscribed'",
                newsletter,
            )
            report.suppressed = _count(
                db,
                "SELECT count(*) FROM incoming i"
                " JOIN suppressions p ON p.email_hash = i.email_hash"
                " WHERE NOT EXISTS (SELECT 1 FROM subscribers s WHERE s.email = i.email)",
            )
            known_active = _count(
                db,
                "SELECT count(*) FROM incoming i JOIN subscribers s ON s.email = i.email"
                " JOIN subscriptions b ON b.subscriber_id = s.id AND b.newsletter = $1"
                " WHERE s.status = 'active' AND b.status = 'active'",
                newsletter,
            )
            report.renamed = db.execute(
                "UPDATE subscribers SET name = i.name FROM incoming i"
                " WHERE subscribers.email = i.email AND subscribers.status = 'active'"
                " AND i.name != '' AND i.name != subscribers.name AND EXISTS (SELECT 1"
                " FROM subscriptions b WHERE b.subscriber_id = subscribers.id"
                " AND b.newsletter = $1 AND b.status = 'active')",
                newsletter,
            ).rowcount
            report.unchanged = known_active - report.renamed
            now = now_text()
            db.execute(
                "INSERT INTO subscribers (email, name, status, status_changed_at, created_at,"
                " source) SELECT i.email, i.name, 'active', $1, $1, $2 FROM incoming i"
                " WHERE NOT EXISTS (SELECT 1 FROM subscribers s WHERE s.email = i.email)"
                " AND NOT EXISTS (SELECT 1 FROM suppressions p WHERE p.email_hash = i.email_hash)"
                " ORDER BY i.line",
                (now, source),
            )
            # New readers, and active readers of other newsletters who had none of this one.
            report.added = db.execute(
                "INSERT INTO subscriptions (subscriber_id, newsletter, status,"
                " status_changed_at, created_at, source) SELECT s.id, $1, 'active', $2, $2, $3"
                " FROM incoming i JOIN subscribers s ON s.email = i.email"
                " WHERE s.status = 'active' AND NOT EXISTS (SELECT 1 FROM subscriptions b"
                " WHERE b.subscriber_id = s.id AND b.newsletter = $1)",
                (self.newsletter, now, source),
            ).rowcount
            db.execute("DELETE FROM incoming")
        return report

    def _require(self, email: str) -> Subscriber:
        subscriber = self.get(email)
        if subscriber is None:
            raise SubscriberError(f"{email.strip()} is not on the list")
        return subscriber

    def rename_newsletter(self, old: str, new: str) -> int:
        """Move the subscriptions, sends and scheduled sends of newsletter `old` to key
        `new` (after its key changed in the settings); return the subscriptions moved."""
        with transaction(self.db) as db:
            if db.execute("SELECT 1 FROM subscriptions WHERE newsletter = $1", (new,)).fetchone():
                raise SubscriberError(f"newsletter {new!r} has subscriptions already")
            moved = db.execute(
                "UPDATE subscriptions SET newsletter = $1 WHERE newsletter = $2", (new, old)
            ).rowcount
            db.execute("UPDATE sends SET newsletter = $1 WHERE newsletter = $2", (new, old))
        return int(moved)


# The rows of an import, one per address (the first line of each), in each database's
# words; and what COPY loads (PostgreSQL), duplicates and all.
_INCOMING = {
    "sqlite": (
        "CREATE TEMP TABLE IF NOT EXISTS incoming (email TEXT PRIMARY KEY COLLATE NOCASE,"
        " name TEXT NOT NULL, line INTEGER NOT NULL, email_hash TEXT NOT NULL)"
    ),
    "postgresql": (
        'CREATE TEMP TABLE IF NOT EXISTS incoming (email TEXT COLLATE "C" PRIMARY KEY,'
        " name TEXT NOT NULL, line BIGINT NOT NULL, email_hash TEXT NOT NULL)"
    ),
}
_INCOMING_RAW = (
    'CREATE TEMP TABLE IF NOT EXISTS incoming_raw (email TEXT COLLATE "C" NOT NULL,'
    " name TEXT NOT NULL, line BIGINT NOT NULL, email_hash TEXT NOT NULL)"
)


def _hash(email: str) -> str:
    """Return the one-way form of an address kept after its erasure."""
    return hashlib.sha256(email.strip().lower().encode("utf-8")).hexdigest()


def _count(db: Db, query: str, parameters: tuple[str, ...] = ()) -> int:
    (number,) = db.execute(query, parameters).fetchone()
    return int(number)


def _batches(
    rows: Iterable[tuple[int, str, str]], size: int
) -> Iterator[list[tuple[int, str, str]]]:
    iterator = iter(rows)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


def _inert(cell: str) -> str:
    """Return a cell a spreadsheet will not run as a formula (OWASP's CSV injection)."""
    return f"'{cell}" if cell.startswith(_FORMULA_START) else cell


def _uncell(cell: str) -> str:
    """Undo `_inert`, so that an export imports back as it was."""
    return cell[1:] if cell.startswith("'") and cell[1:].startswith(_FORMULA_START) else cell


def _subscriber(row: tuple[object, ...]) -> Subscriber:
    id_, email, name, status, changed, reason, created, source = row
    return Subscriber(
        int(str(id_)),
        str(email),
        str(name),
        Status(str(status)),
        str(changed),
        str(reason),
        str(created),
        str(source),
    )


def _name(value: str) -> str:
    try:
        name = check_display_name(value)
    except AddressError as err:
        raise SubscriberError(str(err)) from err
    if len(name) > MAX_NAME:
        raise SubscriberError(f"name longer than {MAX_NAME} characters")
    return name


def _read_csv(stream: TextIO, where: str) -> Iterator[tuple[int, str, str]]:
    """Yield (line, email, name) for each data row; `email` is required, `name` optional."""
    first = stream.readline()
    if not first.strip():
        raise SubscriberError(f"{where}: the file is empty; it needs an `email` column")
    # Spreadsheets in French locales write ";" between columns.
    delimiter = ";" if first.count(";") > first.count(",") else ","
    reader = csv.reader(itertools.chain([first], stream), delimiter=delimiter)
    try:
        header = [column.strip().lower() for column in next(reader)]
    except StopIteration as err:
        raise SubscriberError(f"{where}: the file is empty; it needs an `email` column") from err
    except csv.Error as err:
        raise SubscriberError(f"{where}:1: {err}") from err
    if "email" not in header:
        shown = ", ".join(repr(c) for c in header[:10])
        raise SubscriberError(f"{where}:1: no `email` column (found: {shown or 'none'})")
    email_at = header.index("email")
    name_at = header.index("name") if "name" in header else None
    try:
        for record in reader:
            if not any(cell.strip() for cell in record):
                continue
            email = record[email_at] if email_at < len(record) else ""
            name = record[name_at] if name_at is not None and name_at < len(record) else ""
            yield reader.line_num, email, name
    except csv.Error as err:
        raise SubscriberError(f"{where}:{reader.line_num}: {err}") from err


@dataclass(frozen=True)
class PendingSignup:
    """A signup request waiting for its confirmation."""

    id: int
    email: str
    name: str
    newsletters: tuple[str, ...]
    form: str
    requested_at: str
    expires_at: float
    confirmed_at: str | None


class Signups:
    """Signup requests waiting for their confirmation, and the attempts the rate limits
    count (by a hash of the client and of the address: nothing that names anyone)."""

    def __init__(self, connection: Db) -> None:
        self.db = connection

    def attempt(
        self, client: str, email: str, now: float, *, per_client_hour: int, per_address_day: int
    ) -> bool:
        """Count a request from `client` for `email`; return whether a confirmation may be
        mailed for it (neither the client's hourly nor the address's daily limit is
        reached). Attempts older than a day are forgotten."""
        address = _hash(email)
        with transaction(self.db) as db:
            # Count, decide, write: one request at a time for a client and an address.
            one_at_a_time(db, f"signup client {client}", f"signup address {address}")
            db.execute("DELETE FROM signup_attempts WHERE at < $1", (now - 86400,))
            (by_client,) = db.execute(
                "SELECT count(*) FROM signup_attempts WHERE client = $1 AND at >= $2",
                (client, now - 3600),
            ).fetchone()
            (mailed,) = db.execute(
                "SELECT count(*) FROM signup_attempts WHERE email_hash = $1 AND mailed = 1",
                (address,),
            ).fetchone()
            allowed = by_client < per_client_hour and mailed < per_address_day
            db.execute(
                "INSERT INTO signup_attempts (at, client, email_hash, mailed)"
                " VALUES ($1, $2, $3, $4)",
                (now, client, address, int(allowed)),
            )
        return bool(allowed)

    def add(
        self,
        email: str,
        name: str,
        newsletters: Iterable[str],
        form: str,
        requested_at: str,
        expires_at: float,
        *,
        number: int | None = None,
    ) -> int | None:
        """Record a request, as `number` if given; return its number (None: `number` is
        another request's)."""
        values = (email, name, " ".join(newsletters), form, requested_at, expires_at)
        if number is None:
            row = self.db.execute(
                "INSERT INTO signups (email, name, newsletters, form, requested_at, expires_at)"
                " VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
                values,
            ).fetchone()
        else:
            row = self.db.execute(
                "INSERT INTO signups (id, email, name, newsletters, form, requested_at,"
                " expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (id) DO NOTHING"
                " RETURNING id",
                (number, *values),
            ).fetchone()
        return None if row is None else int(row[0])

    def get(self, signup_id: int) -> PendingSignup | None:
        """Return request number `signup_id`, if it is still kept."""
        row = self.db.execute(
            "SELECT id, email, name, newsletters, form, requested_at, expires_at, confirmed_at"
            " FROM signups WHERE id = $1",
            (signup_id,),
        ).fetchone()
        if row is None:
            return None
        number, email, name, newsletters, form, requested, expires, confirmed = row
        return PendingSignup(
            int(number),
            str(email),
            str(name),
            tuple(str(newsletters).split()),
            str(form),
            str(requested),
            float(expires),
            None if confirmed is None else str(confirmed),
        )

    def confirm(self, signup: PendingSignup, consent_form: str) -> tuple[list[Subscriber], bool]:
        """Subscribe the request's address to all its newsletters or to none, with its
        consent (the request's time and form, confirmed now), and mark it confirmed;
        return the subscriptions, and whether this was its first confirmation (of two
        at the same instant, one only is)."""
        now = now_text()
        consent = Consent(signup.requested_at, consent_form, now)
        source = f"signup form {consent_form}"
        with transaction(self.db) as db:
            first = db.execute(
                "UPDATE signups SET confirmed_at = $1 WHERE id = $2 AND confirmed_at IS NULL",
                (now, signup.id),
            ).rowcount
            for key in signup.newsletters:
                Subscribers(db, key)._confirm(signup.email, signup.name, consent, source)
        subscribed = [Subscribers(self.db, key).get(signup.email) for key in signup.newsletters]
        return [s for s in subscribed if s is not None], bool(first)

    def purge(self, now: float) -> int:
        """Delete the requests whose link has expired; return how many."""
        cursor = self.db.execute("DELETE FROM signups WHERE expires_at < $1", (now,))
        return int(cursor.rowcount)
