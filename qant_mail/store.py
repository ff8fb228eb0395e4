"""The SQLite database of subscribers and sends: opening it, its schema migrations, and
the one way to write several rows at once (`transaction`)."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from qant_mail.errors import ExitCode, QantError

# Each step brings a database from version N to N + 1 (PRAGMA user_version). Steps are
# never edited once released: a change of schema is a new step.
MIGRATIONS: list[str | Callable[[sqlite3.Connection], None]] = [
    # 1: subscribers
    """
    CREATE TABLE subscribers (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        email TEXT NOT NULL UNIQUE COLLATE NOCASE,
        name TEXT NOT NULL DEFAULT '',
        status TEXT NOT NULL DEFAULT 'active'
            CHECK (status IN ('active', 'unsubscribed', 'bounced', 'complained')),
        status_changed_at TEXT NOT NULL,
        status_reason TEXT NOT NULL DEFAULT '',
        created_at TEXT NOT NULL,
        source TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX subscribers_status ON subscribers (status);
    """,
    # 2: the send ledger, and the quota counters shared by every send
    """
    CREATE TABLE sends (
        id INTEGER PRIMARY KEY,
        issue TEXT NOT NULL UNIQUE,
        content_hash TEXT NOT NULL,
        subject TEXT NOT NULL,
        created_at TEXT NOT NULL,
        finished_at TEXT
    );
    CREATE TABLE deliveries (
        send_id INTEGER NOT NULL REFERENCES sends (id),
        position INTEGER NOT NULL,
        subscriber_id INTEGER,
        email TEXT NOT NULL COLLATE NOCASE,
        name TEXT NOT NULL DEFAULT '',
        state TEXT NOT NULL DEFAULT 'pending'
            CHECK (state IN ('pending', 'sending', 'sent', 'deferred', 'failed',
                             'unknown', 'skipped')),
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL NOT NULL DEFAULT 0,
        last_reply TEXT NOT NULL DEFAULT '',
        updated_at TEXT NOT NULL,
        PRIMARY KEY (send_id, position),
        UNIQUE (send_id, email)
    );
    CREATE INDEX deliveries_queue ON deliveries (send_id, state, position);
    CREATE INDEX deliveries_retry ON deliveries (send_id, state, next_attempt_at);
    CREATE TABLE quota (
        minute INTEGER PRIMARY KEY,
        messages INTEGER NOT NULL
    );
    """,
    # 3: addresses removed on request, kept as a one-way hash so that no import brings
    # them back; international domains in their ASCII form, one mailbox one row
    """
    CREATE TABLE suppressions (
        email_hash TEXT PRIMARY KEY,
        reason TEXT NOT NULL,
        created_at TEXT NOT NULL
    );
    """,
    lambda db: _ascii_domains(db),
    # 4: what comes back after a message was accepted: bounces (RFC 3464 and kin) and
    # complaints (RFC 5965), on the ledger's row of that issue; soft bounces counted per
    # subscriber; each report read once
    """
    ALTER TABLE subscribers ADD COLUMN soft_bounces INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE deliveries ADD COLUMN bounce TEXT NOT NULL DEFAULT '';
    ALTER TABLE deliveries ADD COLUMN complaint TEXT NOT NULL DEFAULT '';
    ALTER TABLE deliveries ADD COLUMN feedback_at TEXT;
    CREATE TABLE feedback_reports (
        digest TEXT PRIMARY KEY,
        outcome TEXT NOT NULL,
        read_at TEXT NOT NULL
    );
    """,
    # 5: sends scheduled for a set time, one per issue, run by `qant-mail run-due`
    """
    CREATE TABLE schedules (
        issue TEXT PRIMARY KEY,
        path TEXT NOT NULL,
        due_at TEXT NOT NULL,
        state TEXT NOT NULL DEFAULT 'scheduled'
            CHECK (state IN ('scheduled', 'running', 'sent', 'failed', 'cancelled')),
        outcome TEXT NOT NULL DEFAULT '',
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL
    );
    CREATE INDEX schedules_due ON schedules (state, due_at);
    """,
    # 6: several newsletters. A reader (subscribers) has a subscription to each newsletter
    # they get; leaving one is the subscription's status, while a bounce or a complaint
    # stays the reader's. What was "the" list becomes the main newsletter's, keyed
    # 'default'. Signup requests wait for their confirmation in `signups`; the attempts
    # are counted for the rate limits.
    """
    CREATE TABLE subscriptions (
        subscriber_id INTEGER NOT NULL REFERENCES subscribers (id) ON DELETE CASCADE,
        newsletter TEXT NOT NULL,
        status TEXT NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'unsubscribed')),
        status_changed_at TEXT NOT NULL,
        status_reason TEXT NOT NULL DEFAULT '',
        created_at TEXT NOT NULL,
        source TEXT NOT NULL DEFAULT '',
        consent_at TEXT,
        consent_form TEXT NOT NULL DEFAULT '',
        confirmed_at TEXT,
        PRIMARY KEY (newsletter, subscriber_id)
    );
    CREATE INDEX subscriptions_reader ON subscriptions (subscriber_id);
    INSERT INTO subscriptions (subscriber_id, newsletter, status, status_changed_at,
        status_reason, created_at, source)
    SELECT id, 'default', CASE status WHEN 'unsubscribed' THEN 'unsubscribed' ELSE 'active' END,
        CASE status WHEN 'unsubscribed' THEN status_changed_at ELSE created_at END,
        CASE status WHEN 'unsubscribed' THEN status_reason ELSE '' END, created_at, source
    FROM subscribers;
    UPDATE subscribers SET status = 'active', status_reason = '' WHERE status = 'unsubscribed';
    ALTER TABLE sends ADD COLUMN newsletter TEXT NOT NULL DEFAULT 'default';
    CREATE TABLE signups (
        id INTEGER PRIMARY KEY,
        email TEXT NOT NULL COLLATE NOCASE,
        name TEXT NOT NULL DEFAULT '',
        newsletters TEXT NOT NULL,
        form TEXT NOT NULL,
        requested_at TEXT NOT NULL,
        expires_at REAL NOT NULL,
        confirmed_at TEXT
    );
    CREATE INDEX signups_expiry ON signups (expires_at);
    CREATE TABLE signup_attempts (
        at REAL NOT NULL,
        client TEXT NOT NULL,
        email_hash TEXT NOT NULL,
        mailed INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX signup_attempts_client ON signup_attempts (client, at);
    CREATE INDEX signup_attempts_email ON signup_attempts (email_hash, at);
    """,
]


class StoreError(QantError):
    """The database cannot be opened or is not ours."""


class StoreUnavailable(StoreError):
    """The database is there but cannot be written now: a full disk, a read-only file,
    another process holding it. Nothing was changed; trying again later may work."""

    exit_code = ExitCode.UNAVAILABLE


class Connection(sqlite3.Connection):
    """A connection whose errors of circumstance (a full disk, a read-only file, a lock)
    arrive as `StoreError`s naming the database; those of the program (a constraint, a
    bad statement) stay sqlite3's own."""

    path: Path = Path("?")

    def execute(self, *args: Any, **kwargs: Any) -> sqlite3.Cursor:
        try:
            return super().execute(*args, **kwargs)
        except sqlite3.DatabaseError as err:
            raise _translated(self.path, err) from err

    def executemany(self, *args: Any, **kwargs: Any) -> sqlite3.Cursor:
        try:
            return super().executemany(*args, **kwargs)
        except sqlite3.DatabaseError as err:
            raise _translated(self.path, err) from err


def _translated(path: Path, err: sqlite3.DatabaseError) -> Exception:
    if isinstance(err, sqlite3.IntegrityError | sqlite3.ProgrammingError):
        return err
    text = str(err)
    if "full" in text:
        why = "the disk is full (or the database hit its size limit); nothing was written"
    elif "readonly" in text or "read-only" in text:
        why = (
            "cannot write the database: it is read-only for this user (check the "
            "permissions of the file and of its folder, which SQLite writes to as well)"
        )
    elif "locked" in text or "busy" in text:
        why = "another process kept the database locked for 30 s; try again"
    elif "unable to open" in text and not _writable(path):
        # WAL needs files beside the database: a folder it cannot write is enough.
        why = (
            "cannot write the database: it is read-only for this user (check the "
            "permissions of the file and of its folder, which SQLite writes to as well)"
        )
    elif "unable to open" in text or "disk I/O" in text:
        why = f"cannot use the database ({text})"
    elif "not a database" in text or "malformed" in text:
        return StoreError(f"{path}: not a qant-mail database, or a damaged one ({text})")
    else:
        return StoreError(f"{path}: database error: {text}")
    return StoreUnavailable(f"{path}: {why}")


def _writable(path: Path) -> bool:
    folder_ok = os.access(path.parent, os.W_OK)
    return folder_ok and (not path.exists() or os.access(path, os.W_OK))


@contextlib.contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """Run the block as one write transaction: all of it is committed, or none.

    On an error the transaction is rolled back if it is still open (SQLite rolls back by
    itself on a full disk, and a second ROLLBACK would hide why) and the error goes on."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            with contextlib.suppress(sqlite3.Error, StoreError):
                db.execute("ROLLBACK")
        raise


def open_store(path: Path) -> sqlite3.Connection:
    """Open (creating if needed) the database at `path`, migrated to the current schema."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(path, timeout=30, isolation_level=None, factory=Connection)
    except sqlite3.DatabaseError as err:
        raise _translated(path, err) from err
    except OSError as err:
        raise StoreUnavailable(f"{path}: cannot open the database: {err.strerror}") from err
    assert isinstance(connection, Connection)
    connection.path = path
    try:
        # WAL lets the senders' threads write while others read; NORMAL syncs at
        # checkpoints, which survives a killed process (power loss is another story).
        connection.execute("PRAGMA journal_mode = WAL")
        connection.execute("PRAGMA synchronous = NORMAL")
        connection.execute("PRAGMA foreign_keys = ON")
        _migrate(connection, path)
    except BaseException:
        connection.close()
        raise
    return connection


def _migrate(connection: sqlite3.Connection, path: Path) -> None:
    (version,) = connection.execute("PRAGMA user_version").fetchone()
    if version > len(MIGRATIONS):
        raise StoreError(
            f"{path}: schema version {version} is newer than this qant-mail knows "
            f"({len(MIGRATIONS)}); upgrade qant-mail"
        )
    for number in range(version, len(MIGRATIONS)):
        with transaction(connection):
            (current,) = connection.execute("PRAGMA user_version").fetchone()
            if current == number:  # another process may have migrated meanwhile
                step = MIGRATIONS[number]
                if callable(step):
                    step(connection)
                else:
                    # One statement at a time: executescript() would commit half of one.
                    for statement in step.split(";"):
                        if statement.strip():
                            connection.execute(statement)
                connection.execute(f"PRAGMA user_version = {number + 1}")


def _ascii_domains(db: sqlite3.Connection) -> None:
    """Write the international domains of stored addresses in their ASCII form; where
    that makes two rows of one mailbox, keep the older, with the stricter status."""
    from qant_mail.addresses import AddressError, normalise_address

    rows = db.execute(
        "SELECT id, email, status FROM subscribers WHERE email GLOB '*[^ -~]*'"
    ).fetchall()
    for subscriber_id, email, status in rows:
        try:
            ascii_email = normalise_address(email, test_domains=True)
        except AddressError:
            continue  # left as it is: a send marks it failed, with why
        twin = db.execute(
            "SELECT id FROM subscribers WHERE email = ? AND id != ?", (ascii_email, subscriber_id)
        ).fetchone()
        if twin is None:
            db.execute(
                "UPDATE subscribers SET email = ? WHERE id = ?", (ascii_email, subscriber_id)
            )
            continue
        if status != "active":
            db.execute(
                "UPDATE subscribers SET status = ?, status_reason = 'merged' WHERE id = ?",
                (status, twin[0]),
            )
        db.execute("DELETE FROM subscribers WHERE id = ?", (subscriber_id,))


def now_text() -> str:
    """Return the current time as stored: ISO 8601, UTC, to the second."""
    # Written with every outcome of a send: formatted once a second, not each time.
    second = int(time.time())
    cached = _NOW
    if cached[0] != second:
        text = dt.datetime.fromtimestamp(second, dt.UTC).isoformat()
        cached = _NOW[:] = [second, text]
    return str(cached[1])


_NOW: list[int | str] = [0, ""]
