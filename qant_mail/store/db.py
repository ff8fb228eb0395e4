"""The database of subscribers and sends: SQLite (a file, the default) or PostgreSQL
(`[store] url = "postgresql://…"`, when one machine is not enough). Opening it, its
schema migrations (the same numbered steps for both), and the one way to write several
rows at once (`transaction`). The SQL of the other modules is written once, in SQLite's
words, and said in PostgreSQL's by `_postgres` here."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import re
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

from qant_mail.base.errors import ExitCode, QantError

# Each step brings a database from version N to N + 1 (PRAGMA user_version). Steps are
# never edited once released: a change of schema is a new step.
MIGRATIONS: list[str | Callable[[Db], None]] = [
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
    # 7: several senders on one send (PostgreSQL): who holds a row being sent and until
    # when (a lease its sender renews; expired, another sender takes the row), and the
    # senders of each send, for `status` and for sharing the rate between them
    """
    ALTER TABLE deliveries ADD COLUMN worker TEXT NOT NULL DEFAULT '';
    ALTER TABLE deliveries ADD COLUMN lease_until REAL NOT NULL DEFAULT 0;
    CREATE TABLE workers (
        send_id INTEGER NOT NULL REFERENCES sends (id),
        worker TEXT NOT NULL,
        started_at TEXT NOT NULL,
        seen_at REAL NOT NULL,
        left_at TEXT,
        PRIMARY KEY (send_id, worker)
    );
    """,
    # 8: the outbox of messages to one reader (a signup's confirmation, a welcome, a
    # test): each is written here, composed, in the transaction of what asked for it, and
    # tried until delivered or expired; the message itself is dropped once it is done
    """
    CREATE TABLE outbox (
        id INTEGER PRIMARY KEY,
        kind TEXT NOT NULL,
        newsletter TEXT NOT NULL,
        recipient TEXT NOT NULL COLLATE NOCASE,
        message BLOB NOT NULL,
        state TEXT NOT NULL DEFAULT 'pending'
            CHECK (state IN ('pending', 'sending', 'sent', 'failed', 'unknown', 'expired')),
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL NOT NULL DEFAULT 0,
        expires_at REAL NOT NULL,
        worker TEXT NOT NULL DEFAULT '',
        lease_until REAL NOT NULL DEFAULT 0,
        last_reply TEXT NOT NULL DEFAULT '',
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL
    );
    CREATE INDEX outbox_due ON outbox (state, next_attempt_at);
    """,
]


class Cursor(Protocol):
    """What a statement gives back, in both databases."""

    @property
    def rowcount(self) -> int: ...
    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...
    def __iter__(self) -> Iterator[Any]: ...


class Db(Protocol):
    """A connection to the store, SQLite or PostgreSQL: SQL in SQLite's words, `?`
    parameters."""

    dialect: str

    def execute(self, sql: str, parameters: Sequence[Any] = (), /) -> Cursor: ...
    def executemany(self, sql: str, rows: Iterable[Sequence[Any]], /) -> Cursor: ...
    def stream(self, sql: str, parameters: Sequence[Any] = (), /) -> Iterator[Any]: ...
    def copy_in(self, table: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> int: ...
    def copy_out(self, sql: str, parameters: Sequence[Any] = (), /) -> Iterator[Any]: ...
    def close(self) -> None: ...
    @property
    def in_transaction(self) -> bool: ...


class IntegrityError(sqlite3.IntegrityError):
    """A constraint refused a row (PostgreSQL's, said as SQLite's: callers catch one)."""


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
    dialect = "sqlite"

    def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:
        try:
            return super().execute(sql, parameters)
        except sqlite3.DatabaseError as err:
            raise _translated(self.path, err) from err

    def executemany(self, sql: str, rows: Any, /) -> sqlite3.Cursor:
        try:
            return super().executemany(sql, rows)
        except sqlite3.DatabaseError as err:
            raise _translated(self.path, err) from err

    def stream(self, sql: str, parameters: Sequence[Any] = (), /) -> Iterator[Any]:
        """Yield the rows of a query as they come (SQLite's cursors already do)."""
        return iter(self.execute(sql, parameters))

    def copy_out(self, sql: str, parameters: Sequence[Any] = (), /) -> Iterator[Any]:
        """Yield the rows of a query (the bulk path out; SQLite's is its cursor)."""
        return self.stream(sql, parameters)

    def copy_in(self, table: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> int:
        """Insert many rows into `table`; return how many."""
        marks = ", ".join("?" for _ in columns)
        sql = f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})"
        return int(self.executemany(sql, rows).rowcount)


class PgConnection:
    """A PostgreSQL connection (psycopg 3) that speaks like `Connection`: the same SQL,
    `?` parameters, explicit BEGIN/COMMIT, SQLite's IntegrityError, and errors of
    circumstance as `StoreError`s naming the server (never the password)."""

    dialect = "postgresql"

    def __init__(self, raw: Any, where: str) -> None:
        self.raw = raw
        self.where = where

    def execute(self, sql: str, parameters: Sequence[Any] = (), /) -> Cursor:
        try:
            cursor: Cursor = self.raw.execute(_postgres(sql), parameters or None)
        except Exception as err:
            raise _pg_translated(self.where, err) from err
        return cursor

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]], /) -> Cursor:
        cursor = self.raw.cursor()
        try:
            cursor.executemany(_postgres(sql), list(rows))
        except Exception as err:
            raise _pg_translated(self.where, err) from err
        result: Cursor = cursor
        return result

    def stream(self, sql: str, parameters: Sequence[Any] = (), /) -> Iterator[Any]:
        """Yield the rows of a query as the server sends them, not all held at once (a
        million subscribers exported take the memory of a few)."""
        cursor = self.raw.cursor()
        try:
            yield from cursor.stream(_postgres(sql), parameters or None)
        except Exception as err:
            raise _pg_translated(self.where, err) from err
        finally:
            cursor.close()

    def copy_out(self, sql: str, parameters: Sequence[Any] = (), /) -> Iterator[Any]:
        """Yield the rows of a query through COPY … TO STDOUT (the bulk path out)."""
        cursor = self.raw.cursor()
        statement = f"COPY ({_postgres(sql)}) TO STDOUT"
        try:
            with cursor.copy(statement, parameters or None) as copy:
                yield from copy.rows()
        except Exception as err:
            raise _pg_translated(self.where, err) from err
        finally:
            cursor.close()

    def copy_in(self, table: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> int:
        """Load many rows into `table` with COPY (the bulk path); return how many."""
        count = 0
        cursor = self.raw.cursor()
        try:
            with cursor.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
                    count += 1
        except Exception as err:
            raise _pg_translated(self.where, err) from err
        finally:
            cursor.close()
        return count

    def close(self) -> None:
        self.raw.close()

    def __del__(self) -> None:
        # As sqlite3 does: a connection dropped without close() is closed, quietly.
        with contextlib.suppress(Exception):
            self.raw.close()

    @property
    def in_transaction(self) -> bool:
        from psycopg import pq

        return bool(self.raw.info.transaction_status != pq.TransactionStatus.IDLE)


def _pg_translated(where: str, err: Exception) -> Exception:
    import psycopg

    if isinstance(err, psycopg.errors.IntegrityError):
        return IntegrityError(str(err))
    if isinstance(err, psycopg.errors.DiskFull):
        return StoreUnavailable(f"{where}: the database server's disk is full; nothing was written")
    if isinstance(err, psycopg.OperationalError):
        return StoreUnavailable(
            f"{where}: the database server cannot be used now: {_first_line(err)}"
        )
    if isinstance(err, psycopg.Error):
        return err
    return err


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


# SQLite's words → PostgreSQL's: the types of the schema (ids are 64-bit identities,
# addresses compare case-insensitively as citext), and what differs in statements.
_PG_RULES = [
    (
        re.compile(r"INTEGER PRIMARY KEY AUTOINCREMENT"),
        "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY",
    ),
    (
        re.compile(r"\bid INTEGER PRIMARY KEY\b"),
        "id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY",
    ),
    (re.compile(r"TEXT (NOT NULL |PRIMARY KEY )?(UNIQUE )?COLLATE NOCASE"), r"CITEXT \1\2"),
    (re.compile(r"\bREAL\b"), "DOUBLE PRECISION"),
    (re.compile(r"\bBLOB\b"), "BYTEA"),
    (re.compile(r"\bINTEGER\b"), "BIGINT"),
    (re.compile(r"^\s*BEGIN IMMEDIATE\s*$"), "BEGIN"),
]
_PG_CACHE: dict[str, str] = {}


def _postgres(sql: str) -> str:
    """Return `sql` (SQLite's words, `?` parameters) as PostgreSQL says it."""
    said = _PG_CACHE.get(sql)
    if said is None:
        said = sql
        for pattern, replacement in _PG_RULES:
            said = pattern.sub(replacement, said)
        # psycopg's parameters are %s, and a literal % is written %%.
        said = said.replace("%", "%%").replace("?", "%s")
        _PG_CACHE[sql] = said
    return said


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
def transaction(db: Db) -> Iterator[Db]:
    """Run the block as one write transaction: all of it is committed, or none. Inside
    another one, the block is part of it (what a use case writes together, it commits
    together: a confirmation and the welcome it queues).

    On an error the transaction is rolled back if it is still open (SQLite rolls back by
    itself on a full disk, and a second ROLLBACK would hide why) and the error goes on."""
    if db.in_transaction:
        yield db
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            # Whatever a failed ROLLBACK says, the error that led to it is the one to raise.
            with contextlib.suppress(Exception):
                db.execute("ROLLBACK")
        raise


StoreTarget = Path | str  # a SQLite file, or a postgresql:// URL
PASSWORD_VARIABLE = "QANT_STORE_PASSWORD"


def is_postgres(target: StoreTarget) -> bool:
    """Return whether `target` names a PostgreSQL database."""
    return isinstance(target, str) and target.startswith(("postgresql://", "postgres://"))


def describe(target: StoreTarget) -> str:
    """Return how messages name the store: its file, or its server and database (the
    URL without its password)."""
    if not is_postgres(target):
        return str(target)
    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1@", str(target))


def open_store(target: StoreTarget, *, migrate: bool | None = None) -> Db:
    """Open the store: a SQLite file (created and migrated if needed), or a PostgreSQL
    database. An empty PostgreSQL database gets the schema on first use; one at an older
    version must be migrated on purpose (`qant-mail db migrate`, `migrate=True`), since
    other hosts may still be running the version it suits."""
    if is_postgres(target):
        return _open_postgres(str(target), migrate=migrate)
    return _open_sqlite(Path(target))


def _open_sqlite(path: Path) -> Connection:
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


def _open_postgres(url: str, *, migrate: bool | None) -> PgConnection:
    where = describe(url)
    try:
        import psycopg
    except ImportError as err:
        raise StoreError(
            f"{where}: PostgreSQL needs psycopg: pip install 'qant-mail[postgresql]'"
        ) from err
    password = os.environ.get(PASSWORD_VARIABLE) or None
    try:
        raw = psycopg.connect(url, autocommit=True, password=password, connect_timeout=10)
    except psycopg.Error as err:
        raise StoreUnavailable(f"{where}: cannot connect: {_first_line(err)}") from err
    connection = PgConnection(raw, where)
    try:
        _check_postgres(connection, where, migrate=migrate)
    except BaseException:
        connection.close()
        raise
    return connection


# Taken while a PostgreSQL store is migrated: two processes never migrate it at once.
_MIGRATION_LOCK = 0x71A7_0001


def _check_postgres(db: PgConnection, where: str, *, migrate: bool | None) -> None:
    version = postgres_version(db)
    if version == len(MIGRATIONS):
        return
    if migrate is None:
        migrate = version == 0
    if version > len(MIGRATIONS):
        raise StoreError(
            f"{where}: schema version {version} is newer than this qant-mail knows "
            f"({len(MIGRATIONS)}); upgrade qant-mail"
        )
    if not migrate:
        raise StoreError(
            f"{where}: the database is at schema version {version}, this qant-mail needs "
            f"{len(MIGRATIONS)}: run `qant-mail db migrate` (once, from one host)"
        )
    migrate_postgres(db)


def migrate_postgres(db: Db, to_version: int | None = None) -> None:
    """Bring a PostgreSQL store to `to_version` (default: this qant-mail's), step by
    step, each in its transaction, holding a lock that keeps other hosts waiting."""
    target = len(MIGRATIONS) if to_version is None else to_version
    db.execute("SELECT pg_advisory_lock(?)", (_MIGRATION_LOCK,))
    try:
        db.execute("CREATE TABLE IF NOT EXISTS qant_schema (version INTEGER NOT NULL)")
        for number in range(postgres_version(db), target):
            with transaction(db):
                if number == 0:
                    db.execute("CREATE EXTENSION IF NOT EXISTS citext")
                    db.execute(_PG_INSTR)
                    db.execute("INSERT INTO qant_schema (version) VALUES (0)")
                step = MIGRATIONS[number]
                if not callable(step):  # the callable steps mend SQLite data of old versions
                    for statement in step.split(";"):
                        if statement.strip():
                            db.execute(statement)
                db.execute("UPDATE qant_schema SET version = ?", (number + 1,))
    finally:
        db.execute("SELECT pg_advisory_unlock(?)", (_MIGRATION_LOCK,))


# SQLite's instr(), which the ledger's SQL uses, in PostgreSQL.
_PG_INSTR = (
    "CREATE OR REPLACE FUNCTION instr(text, text) RETURNS integer"
    " LANGUAGE sql IMMUTABLE AS 'SELECT strpos($1, $2)'"
)


def postgres_version(db: Db) -> int:
    """Return the schema version of a PostgreSQL store (0: none yet)."""
    exists = db.execute("SELECT to_regclass('qant_schema') IS NOT NULL").fetchone()[0]
    if not exists:
        return 0
    row = db.execute("SELECT version FROM qant_schema").fetchone()
    return int(row[0]) if row else 0


def schema_version(db: Db) -> int:
    """Return the schema version of an open store."""
    if db.dialect == "postgresql":
        return postgres_version(db)
    return int(db.execute("PRAGMA user_version").fetchone()[0])


def _migrate(connection: Connection, path: Path) -> None:
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


def _ascii_domains(db: Db) -> None:
    """Write the international domains of stored addresses in their ASCII form; where
    that makes two rows of one mailbox, keep the older, with the stricter status."""
    from qant_mail.base.addresses import AddressError, normalise_address

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


# Every table, parents before children: the order a copy writes them in.
TABLES = (
    "subscribers",
    "subscriptions",
    "suppressions",
    "sends",
    "deliveries",
    "quota",
    "feedback_reports",
    "schedules",
    "signups",
    "signup_attempts",
    "workers",
    "outbox",
)


def row_counts(db: Db) -> dict[str, int]:
    """Return the rows of each table of an open store."""
    return {
        table: int(db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]) for table in TABLES
    }


def copy_store(source: StoreTarget, target: StoreTarget) -> dict[str, int]:
    """Copy every row of the store at `source` into the empty store at `target` (made
    at the current schema), in one transaction, and check the counts; return them."""
    origin = open_store(source)
    try:
        destination = open_store(target)
    except BaseException:
        origin.close()
        raise
    counts: dict[str, int] = {}
    try:
        for table in TABLES:
            (rows,) = destination.execute(f"SELECT count(*) FROM {table}").fetchone()
            if rows:
                raise StoreError(
                    f"{describe(target)}: not empty ({rows} rows in {table}); copy into a "
                    "new database"
                )
        with transaction(destination):
            for table in TABLES:
                counts[table] = _copy_table(origin, destination, table)
            if destination.dialect == "postgresql":
                for table in ("subscribers", "sends", "signups", "outbox"):
                    # Rows came with their ids: the next id follows the largest.
                    destination.execute(
                        f"SELECT setval(pg_get_serial_sequence('{table}', 'id'),"
                        f" coalesce((SELECT max(id) FROM {table}), 0) + 1, false)"
                    )
            for table in TABLES:
                (copied,) = destination.execute(f"SELECT count(*) FROM {table}").fetchone()
                if copied != counts[table]:
                    raise StoreError(
                        f"{describe(target)}: {table} has {copied} rows after the copy, "
                        f"{counts[table]} expected; nothing was kept"
                    )
    finally:
        origin.close()
        destination.close()
    return counts


def _copy_table(origin: Db, destination: Db, table: str) -> int:
    columns = (
        [
            str(name)
            for name, *_ in origin.execute(
                "SELECT name FROM pragma_table_info(?) ORDER BY cid", (table,)
            ).fetchall()
        ]
        if origin.dialect == "sqlite"
        else [
            str(name)
            for (name,) in origin.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_name = ?"
                " AND table_schema = current_schema() ORDER BY ordinal_position",
                (table,),
            ).fetchall()
        ]
    )
    listed = ", ".join(columns)
    rows = origin.stream(f"SELECT {listed} FROM {table}")
    return destination.copy_in(table, columns, (tuple(row) for row in rows))
