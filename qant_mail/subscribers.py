"""The subscriber list (SQLite): statuses, suppressions, CSV import and export."""

from __future__ import annotations

import csv
import enum
import hashlib
import io
import itertools
import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from qant_mail.addresses import AddressChecker, AddressError, check_display_name
from qant_mail.errors import QantError
from qant_mail.files import first_bad_utf8_line, open_text
from qant_mail.store import now_text, open_store, transaction

MAX_NAME = 200
# Rows go to the database this many at a time, so that memory does not grow with the file.
BATCH = 5000
# An import reports this many rejected lines, and counts the rest.
MAX_REPORTED = 1000
# Spreadsheets run a cell that starts with one of these as a formula (CSV injection).
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


class Status(enum.StrEnum):
    """Where a subscriber stands; only `active` ones get issues."""

    ACTIVE = "active"
    UNSUBSCRIBED = "unsubscribed"
    BOUNCED = "bounced"
    COMPLAINED = "complained"


class SubscriberError(QantError):
    """A subscriber operation that cannot be done (unknown address, refused change)."""


@dataclass(frozen=True)
class Subscriber:
    """One row of the list."""

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


_COLUMNS = "id, email, name, status, status_changed_at, status_reason, created_at, source"
_INSERT = (
    "INSERT INTO subscribers (email, name, status, status_changed_at, created_at, source)"
    " VALUES (?, ?, 'active', ?, ?, ?) ON CONFLICT (email) DO NOTHING"
)
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
    """The subscriber list in a SQLite database."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        self.db = connection

    @classmethod
    def open(cls, path: Path) -> Subscribers:
        """Open the list stored at `path`, creating it if needed."""
        return cls(open_store(path))

    def close(self) -> None:
        """Close the database."""
        self.db.close()

    def __enter__(self) -> Subscribers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def get(self, email: str) -> Subscriber | None:
        """Return the subscriber with this address (any case), if any."""
        row = self.db.execute(
            f"SELECT {_COLUMNS} FROM subscribers WHERE email = ?", (email.strip(),)
        ).fetchone()
        return _subscriber(row) if row else None

    def by_id(self, subscriber_id: int) -> Subscriber | None:
        """Return subscriber number `subscriber_id`, if any."""
        row = self.db.execute(
            f"SELECT {_COLUMNS} FROM subscribers WHERE id = ?", (subscriber_id,)
        ).fetchone()
        return _subscriber(row) if row else None

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
        existing = self.get(address)
        now = now_text()
        if existing is None:
            suppressed = self.suppressed_since(address)
            if suppressed and not resubscribe:
                raise SubscriberError(
                    f"{address} was removed from the list on request ({suppressed}); add it "
                    "again with --resubscribe, and only with their consent"
                )
            with transaction(self.db) as db:
                db.execute("DELETE FROM suppressions WHERE email_hash = ?", (_hash(address),))
                db.execute(_INSERT, (address, name, now, now, source))
        elif existing.status is Status.ACTIVE:
            raise SubscriberError(f"{existing.email} is already subscribed")
        elif not resubscribe:
            raise SubscriberError(
                f"{existing.email} is {existing.status} (since {existing.status_changed_at}); "
                "re-activate it with --resubscribe, and only with their consent"
            )
        else:
            self.db.execute(
                "UPDATE subscribers SET status = 'active', status_changed_at = ?,"
                " status_reason = 'resubscribed', name = CASE WHEN ? != '' THEN ? ELSE name END"
                " WHERE id = ?",
                (now, name, name, existing.id),
            )
        found = self.get(address)
        assert found is not None
        return found

    def remove(self, email: str) -> Subscriber:
        """Delete a subscriber and their data (the right to erasure). What remains is a
        one-way hash of the address, so that no later import adds them back."""
        subscriber = self._require(email)
        with transaction(self.db) as db:
            db.execute("DELETE FROM subscribers WHERE id = ?", (subscriber.id,))
            db.execute(
                "INSERT INTO suppressions (email_hash, reason, created_at) VALUES (?, ?, ?)"
                " ON CONFLICT (email_hash) DO NOTHING",
                (_hash(subscriber.email), "removed on request", now_text()),
            )
        return subscriber

    def suppressed_since(self, email: str) -> str | None:
        """Return when `email` was removed on request, if it was."""
        row = self.db.execute(
            "SELECT created_at FROM suppressions WHERE email_hash = ?", (_hash(email),)
        ).fetchone()
        return str(row[0]) if row else None

    def set_status(self, email: str, status: Status, reason: str) -> Subscriber:
        """Change a subscriber's status, recording when and why."""
        subscriber = self._require(email)
        return self.set_status_by_id(subscriber.id, status, reason) or subscriber

    def set_status_by_id(
        self, subscriber_id: int, status: Status, reason: str
    ) -> Subscriber | None:
        """Change the status of subscriber `subscriber_id`; None if there is no such one."""
        self.db.execute(
            "UPDATE subscribers SET status = ?, status_changed_at = ?, status_reason = ?"
            " WHERE id = ? AND status != ?",
            (status.value, now_text(), reason, subscriber_id, status.value),
        )
        row = self.db.execute(
            f"SELECT {_COLUMNS} FROM subscribers WHERE id = ?", (subscriber_id,)
        ).fetchone()
        return _subscriber(row) if row else None

    def unsubscribe(self, email: str, reason: str = "command line") -> Subscriber:
        """Mark a subscriber unsubscribed."""
        return self.set_status(email, Status.UNSUBSCRIBED, reason)

    def all(self, status: Status | None = None) -> Iterator[Subscriber]:
        """Yield subscribers in the order they joined, of one status or all."""
        if status is None:
            rows = self.db.execute(f"SELECT {_COLUMNS} FROM subscribers ORDER BY id")
        else:
            rows = self.db.execute(
                f"SELECT {_COLUMNS} FROM subscribers WHERE status = ? ORDER BY id", (status.value,)
            )
        for row in rows:
            yield _subscriber(row)

    def count(self) -> dict[Status, int]:
        """Return the number of subscribers in each status."""
        counts = dict.fromkeys(Status, 0)
        for status, number in self.db.execute(
            "SELECT status, count(*) FROM subscribers GROUP BY status"
        ):
            counts[Status(status)] = number
        return counts

    def export(self, out: TextIO, status: Status | None = None) -> int:
        """Write the list as CSV (with a header); return the number of rows."""
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(EXPORT_HEADER)
        written = 0
        for subscriber in self.all(status):
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
        with transaction(self.db) as db:
            db.execute(_INCOMING)
            db.execute("DELETE FROM temp.incoming")
            for batch in _batches(rows, BATCH):
                valid = []
                for line, email, name in batch:
                    try:
                        address = checker.check(_uncell(email))
                        valid.append((address, _name(_uncell(name)), line, _hash(address)))
                    except (AddressError, SubscriberError) as err:
                        report.reject(line, str(err))
                before = db.total_changes
                db.executemany(
                    "INSERT INTO temp.incoming (email, name, line, email_hash)"
                    " VALUES (?, ?, ?, ?) ON CONFLICT (email) DO NOTHING",
                    valid,
                )
                report.duplicates += len(valid) - (db.total_changes - before)
            report.inactive = _count(
                db,
                "SELECT count(*) FROM temp.incoming i JOIN subscribers s ON s.email = i.email"
                " WHERE s.status != 'active'",
            )
            report.suppressed = _count(
                db,
                "SELECT count(*) FROM temp.incoming i"
                " JOIN suppressions p ON p.email_hash = i.email_hash"
                " WHERE NOT EXISTS (SELECT 1 FROM subscribers s WHERE s.email = i.email)",
            )
            known_active = _count(
                db,
                "SELECT count(*) FROM temp.incoming i JOIN subscribers s ON s.email = i.email"
                " WHERE s.status = 'active'",
            )
            report.renamed = db.execute(
                "UPDATE subscribers SET name = i.name FROM temp.incoming i"
                " WHERE subscribers.email = i.email AND subscribers.status = 'active'"
                " AND i.name != '' AND i.name != subscribers.name"
            ).rowcount
            report.unchanged = known_active - report.renamed
            now = now_text()
            report.added = db.execute(
                "INSERT INTO subscribers (email, name, status, status_changed_at, created_at,"
                " source) SELECT i.email, i.name, 'active', ?, ?, ? FROM temp.incoming i"
                " WHERE NOT EXISTS (SELECT 1 FROM subscribers s WHERE s.email = i.email)"
                " AND NOT EXISTS (SELECT 1 FROM suppressions p WHERE p.email_hash = i.email_hash)"
                " ORDER BY i.line",
                (now, now, source),
            ).rowcount
            db.execute("DELETE FROM temp.incoming")
        return report

    def _require(self, email: str) -> Subscriber:
        subscriber = self.get(email)
        if subscriber is None:
            raise SubscriberError(f"{email.strip()} is not on the list")
        return subscriber


_INCOMING = (
    "CREATE TEMP TABLE IF NOT EXISTS incoming (email TEXT PRIMARY KEY COLLATE NOCASE,"
    " name TEXT NOT NULL, line INTEGER NOT NULL, email_hash TEXT NOT NULL)"
)


def _hash(email: str) -> str:
    """Return the one-way form of an address kept after its erasure."""
    return hashlib.sha256(email.strip().lower().encode("utf-8")).hexdigest()


def _count(db: sqlite3.Connection, query: str) -> int:
    (number,) = db.execute(query).fetchone()
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


# An unsubscription request is a short message; one of more is not worth reading.
MAX_MESSAGE = 10 * 1024 * 1024


def sender_of(message: bytes) -> str:
    """Return the address an unsubscription email came from (its From), as stored."""
    from email import policy
    from email.errors import MessageError
    from email.headerregistry import AddressHeader
    from email.parser import HeaderParser

    if len(message) > MAX_MESSAGE:
        raise SubscriberError(f"the message is larger than {MAX_MESSAGE // 2**20} MB")
    try:
        # The headers only: the body, however nested, is never parsed. Headers may be
        # UTF-8 (RFC 6532), which the bytes parser would leave undecoded.
        text = message.decode("utf-8", "replace")
        parsed = HeaderParser(policy=policy.default).parsestr(text, headersonly=True)
        header = parsed.get("From")
        addresses = header.addresses if isinstance(header, AddressHeader) else ()
    except (MessageError, ValueError, LookupError, TypeError, RecursionError) as err:
        raise SubscriberError(f"the message's From cannot be read ({err})") from err
    if len(addresses) != 1 or not addresses[0].addr_spec:
        raise SubscriberError("the message has no single From address")
    try:
        return AddressChecker(test_domains=True).check(str(addresses[0].addr_spec))
    except AddressError as err:
        raise SubscriberError(f"the message's From is not usable: {err}") from err


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
