"""The subscriber list (SQLite): statuses, CSV import and export."""

from __future__ import annotations

import csv
import enum
import io
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from qant_mail.addresses import AddressChecker, AddressError, check_display_name
from qant_mail.errors import QantError
from qant_mail.store import now_text, open_store

MAX_NAME = 200


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
    """What an import did: counts, and each rejected line with its reason."""

    added: int = 0
    renamed: int = 0
    unchanged: int = 0
    inactive: int = 0  # already known and not active: left as they are
    duplicates: int = 0
    rejected: list[tuple[int, str]] = field(default_factory=list)


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
        self, email: str, name: str = "", source: str = "command line", *, resubscribe: bool = False
    ) -> Subscriber:
        """Add an active subscriber; an inactive one is re-activated only with `resubscribe`."""
        address = AddressChecker().check(email)
        name = _name(name)
        existing = self.get(address)
        now = now_text()
        if existing is None:
            self.db.execute(_INSERT, (address, name, now, now, source))
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
        """Delete a subscriber and their data (the right to erasure)."""
        subscriber = self._require(email)
        self.db.execute("DELETE FROM subscribers WHERE id = ?", (subscriber.id,))
        return subscriber

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
                [
                    subscriber.email,
                    subscriber.name,
                    subscriber.status.value,
                    subscriber.status_changed_at,
                    subscriber.status_reason,
                    subscriber.created_at,
                    subscriber.source,
                ]
            )
            written += 1
        return written

    def import_csv(self, path: Path, source: str | None = None) -> ImportReport:
        """Add the addresses of a CSV file (`email`, optional `name`); idempotent."""
        try:
            raw = path.read_bytes()
        except OSError as err:
            raise SubscriberError(f"{path}: cannot read: {err.strerror}") from None
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as err:
            line = raw.count(b"\n", 0, err.start) + 1
            raise SubscriberError(f"{path}:{line}: not UTF-8; save the file as UTF-8") from None
        return self.import_rows(text, source or f"import {path.name}", str(path))

    def import_rows(self, text: str, source: str, where: str = "(csv)") -> ImportReport:
        """Import CSV text; see `import_csv`."""
        rows = _read_csv(text, where)
        report = ImportReport()
        known = {
            email.lower(): (status, name)
            for email, status, name in self.db.execute(
                "SELECT email, status, name FROM subscribers"
            )
        }
        seen: dict[str, int] = {}
        checker = AddressChecker()
        now = now_text()
        new: list[tuple[str, str, str, str, str]] = []
        renames: list[tuple[str, str]] = []
        for line, email, name in rows:
            try:
                address = checker.check(email)
                name = _name(name)
            except (AddressError, SubscriberError) as err:
                report.rejected.append((line, str(err)))
                continue
            key = address.lower()
            if key in seen:
                report.duplicates += 1
                continue
            seen[key] = line
            if key not in known:
                new.append((address, name, now, now, source))
                continue
            status, old_name = known[key]
            if status != Status.ACTIVE:
                report.inactive += 1  # never re-activated by an import
            elif name and name != old_name:
                renames.append((name, address))
            else:
                report.unchanged += 1
        self.db.execute("BEGIN IMMEDIATE")
        try:
            self.db.executemany(_INSERT, new)
            self.db.executemany("UPDATE subscribers SET name = ? WHERE email = ?", renames)
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        report.added, report.renamed = len(new), len(renames)
        return report

    def _require(self, email: str) -> Subscriber:
        subscriber = self.get(email)
        if subscriber is None:
            raise SubscriberError(f"{email.strip()} is not on the list")
        return subscriber


def sender_of(message: bytes) -> str:
    """Return the address an unsubscription email came from (its From)."""
    from email import message_from_bytes, policy
    from email.headerregistry import AddressHeader

    parsed = message_from_bytes(message, policy=policy.default)
    header = parsed.get("From")
    if not isinstance(header, AddressHeader) or len(header.addresses) != 1:
        raise SubscriberError("the message has no single From address")
    return str(header.addresses[0].addr_spec)


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
        raise SubscriberError(str(err)) from None
    if len(name) > MAX_NAME:
        raise SubscriberError(f"name longer than {MAX_NAME} characters")
    return name


def _read_csv(text: str, where: str) -> list[tuple[int, str, str]]:
    """Return (line, email, name) for each data row; `email` is required, `name` optional."""
    first = text.split("\n", 1)[0]
    # Spreadsheets in French locales write ";" between columns.
    delimiter = ";" if first.count(";") > first.count(",") else ","
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = [column.strip().lower() for column in next(reader)]
    except StopIteration:
        raise SubscriberError(f"{where}: the file is empty; it needs an `email` column") from None
    except csv.Error as err:
        raise SubscriberError(f"{where}:1: {err}") from None
    if "email" not in header:
        raise SubscriberError(
            f"{where}:1: no `email` column (found: {', '.join(header) or 'none'})"
        )
    email_at = header.index("email")
    name_at = header.index("name") if "name" in header else None
    rows: list[tuple[int, str, str]] = []
    try:
        for record in reader:
            if not any(cell.strip() for cell in record):
                continue
            line = reader.line_num
            email = record[email_at] if email_at < len(record) else ""
            name = record[name_at] if name_at is not None and name_at < len(record) else ""
            rows.append((line, email, name))
    except csv.Error as err:
        raise SubscriberError(f"{where}:{reader.line_num}: {err}") from None
    return rows
