"""The SQLite database of subscribers and sends: opening it, and its schema migrations."""

from __future__ import annotations

import datetime as dt
import sqlite3
from pathlib import Path

from qant_mail.errors import QantError

# Each step brings a database from version N to N + 1 (PRAGMA user_version). Steps are
# never edited once released: a change of schema is a new step.
MIGRATIONS: list[str] = [
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
]


class StoreError(QantError):
    """The database cannot be opened or is not ours."""


def open_store(path: Path) -> sqlite3.Connection:
    """Open (creating if needed) the database at `path`, migrated to the current schema."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(path, timeout=30, isolation_level=None)
    except (OSError, sqlite3.Error) as err:
        raise StoreError(f"{path}: cannot open the database: {err}") from None
    try:
        # WAL lets the senders' threads write while others read; NORMAL syncs at
        # checkpoints, which survives a killed process (power loss is another story).
        connection.execute("PRAGMA journal_mode = WAL")
        connection.execute("PRAGMA synchronous = NORMAL")
        connection.execute("PRAGMA foreign_keys = ON")
        _migrate(connection, path)
    except sqlite3.DatabaseError as err:
        connection.close()
        raise StoreError(f"{path}: not a qant-mail database ({err})") from None
    return connection


def _migrate(connection: sqlite3.Connection, path: Path) -> None:
    (version,) = connection.execute("PRAGMA user_version").fetchone()
    if version > len(MIGRATIONS):
        raise StoreError(
            f"{path}: schema version {version} is newer than this qant-mail knows "
            f"({len(MIGRATIONS)}); upgrade qant-mail"
        )
    for number in range(version, len(MIGRATIONS)):
        connection.execute("BEGIN IMMEDIATE")
        try:
            (current,) = connection.execute("PRAGMA user_version").fetchone()
            if current == number:  # another process may have migrated meanwhile
                # One statement at a time: executescript() would commit half a migration.
                for statement in MIGRATIONS[number].split(";"):
                    if statement.strip():
                        connection.execute(statement)
                connection.execute(f"PRAGMA user_version = {number + 1}")
            connection.execute("COMMIT")
        except BaseException:
            connection.execute("ROLLBACK")
            raise


def now_text() -> str:
    """Return the current time as stored: ISO 8601, UTC, to the second."""
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()
