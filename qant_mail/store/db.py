"""The database of subscribers and sends: SQLite (a file, the default) or PostgreSQL
(`[store] url = "postgresql://…"`, when one machine is not enough). Opening it (a pool of
connections for a long-lived process), its migrations (`schema`), the one way to write
several rows at once (`transaction`), the errors of circumstance as `StoreError`s naming
the store, and copies of a store into another.

Each database is spoken to in its own words (`sql`): PostgreSQL through psycopg's raw
cursors, which send `$n` parameters to the server as they are (server-side binding,
prepared statements for the statements a send repeats); SQLite binds the same `$n`."""

from __future__ import annotations

import atexit
import contextlib
import functools
import hashlib
import os
import re
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from qant_mail.base import secrets
from qant_mail.base.errors import ExitCode, QantError
from qant_mail.store import schema
from qant_mail.store.sql import Cursor, Db, contains, marks, now_text

__all__ = ["Cursor", "Db", "contains", "marks", "now_text"]

StoreTarget = Path | str  # a SQLite file, or a postgresql:// URL
PASSWORD_VARIABLE = "QANT_STORE_PASSWORD"


class StoreError(QantError):
    """The database cannot be opened or is not ours."""


class StoreUnavailable(StoreError):
    """The database is there but cannot be used now: a full disk, a read-only file,
    another process holding it, a server down or restarting. Nothing was changed by the
    statement that failed; trying again later may work."""

    exit_code = ExitCode.UNAVAILABLE


class IntegrityError(StoreError):
    """A constraint refused a row (a key taken, a check failed), in either database."""


# ---- SQLite ----------------------------------------------------------------------------

# SQLite binds `$1`, `$2`… as parameters named "1", "2"…
_NAMES = tuple(str(number) for number in range(1, 1001))


class Connection(sqlite3.Connection):
    """A SQLite connection whose errors of circumstance (a full disk, a read-only file, a
    lock) arrive as `StoreError`s naming the database; a constraint's as IntegrityError;
    those of the program (a bad statement) stay sqlite3's own."""

    path: Path = Path("?")
    dialect = "sqlite"

    def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:
        try:
            return super().execute(sql, dict(zip(_NAMES, parameters, strict=False)))
        except sqlite3.DatabaseError as err:
            raise _translated(self.path, err) from err

    def executemany(self, sql: str, rows: Any, /) -> sqlite3.Cursor:
        named = (dict(zip(_NAMES, row, strict=False)) for row in rows)
        try:
            return super().executemany(sql, named)
        except sqlite3.DatabaseError as err:
            raise _translated(self.path, err) from err

    def write(self, sql: str, parameters: Sequence[Any] = (), /) -> int:
        """Run a statement that returns no rows, as `execute` does; return the number
        of rows it changed."""
        return int(self.execute(sql, parameters).rowcount)

    def stream(self, sql: str, parameters: Sequence[Any] = (), /) -> Iterator[Any]:
        """Yield the rows of a query as they come (SQLite's cursors already do)."""
        return iter(self.execute(sql, parameters))

    def copy_out(self, sql: str, parameters: Sequence[Any] = (), /) -> Iterator[Any]:
        """Yield the rows of a query (the bulk path out; SQLite's is its cursor)."""
        return self.stream(sql, parameters)

    def copy_in(self, table: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> int:
        """Insert many rows into `table`; return how many."""
        sql = f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks(1, len(columns))})"
        return int(self.executemany(sql, rows).rowcount)


def _translated(path: Path, err: sqlite3.DatabaseError) -> Exception:
    if isinstance(err, sqlite3.IntegrityError):
        return IntegrityError(f"{path}: {err}")
    if isinstance(err, sqlite3.ProgrammingError):
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


def _open_sqlite(path: Path) -> Connection:
    """Open (creating if needed) the database at `path`, migrated to the current schema."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _create_private(path)
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
        _write_ahead(connection)
        connection.execute("PRAGMA synchronous = NORMAL")
        connection.execute("PRAGMA foreign_keys = ON")
        _migrate_sqlite(connection, path)
    except BaseException:
        connection.close()
        raise
    return connection


# How long an opening waits for another to finish making a new store (the busy timeout).
_OPEN_PATIENCE = 30.0


def _write_ahead(connection: Connection) -> None:
    """Put the database in WAL mode (a mode its file keeps: done once, by whoever opens
    a new store first)."""
    (mode,) = connection.execute("PRAGMA journal_mode").fetchone()
    if str(mode).lower() == "wal":
        return
    # Switching needs the database to itself for a moment, and SQLite answers "locked"
    # at once, without its busy wait, when another connection is opening the new store
    # too (threads of one process, or two commands): wait for it, as for any lock.
    deadline = time.monotonic() + _OPEN_PATIENCE
    delay = 0.005
    while True:
        try:
            sqlite3.Connection.execute(connection, "PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as err:
            locked = "locked" in str(err) or "busy" in str(err)
            if not locked or time.monotonic() + delay > deadline:
                raise _translated(connection.path, err) from err
        time.sleep(delay)
        delay = min(delay * 2, 0.25)


def _create_private(path: Path) -> None:
    """Create the database's file readable by its owner only, if it does not exist."""
    # The readers' addresses are in it. SQLite creates its -wal, -shm and -journal files
    # with the mode of the database's own file, so this one file decides for all of them;
    # an empty file is a new database to SQLite. A umask around sqlite3.connect would do
    # the same, but the umask is the whole process's, and other threads create files.
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))


def _migrate_sqlite(connection: Connection, path: Path) -> None:
    (version,) = connection.execute("PRAGMA user_version").fetchone()
    if version > schema.VERSION:
        raise StoreError(
            f"{path}: schema version {version} is newer than this qant-mail knows "
            f"({schema.VERSION}); upgrade qant-mail"
        )
    for number in range(version, schema.VERSION):
        with transaction(connection):
            (current,) = connection.execute("PRAGMA user_version").fetchone()
            if current == number:  # another process may have migrated meanwhile
                step = schema.SQLITE[number]
                if callable(step):
                    step(connection)
                else:
                    # One statement at a time: executescript() would commit half of one.
                    for statement in schema.statements(step):
                        connection.execute(statement)
                connection.execute(f"PRAGMA user_version = {number + 1}")


# ---- PostgreSQL ------------------------------------------------------------------------


class PgConnection:
    """A PostgreSQL connection (psycopg 3, raw cursors: `$n` parameters bound by the
    server) that speaks like `Connection`: explicit BEGIN/COMMIT, dates and times read as
    the ISO text SQLite keeps, errors of circumstance as `StoreError`s naming the server
    (never the password). From a pool, `close` gives it back."""

    dialect = "postgresql"

    def __init__(self, raw: Any, where: str, give_back: Callable[[Any], None] | None = None):
        self.raw = raw
        self.where = where
        self._give_back = give_back

    def execute(self, sql: str, parameters: Sequence[Any] = (), /) -> Cursor:
        try:
            cursor: Cursor = self.raw.execute(sql, parameters or None)
        except Exception as err:
            raise _pg_translated(self.where, err) from err
        return cursor

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]], /) -> Cursor:
        cursor = self.raw.cursor()
        try:
            cursor.executemany(sql, list(rows))
        except Exception as err:
            raise _pg_translated(self.where, err) from err
        result: Cursor = cursor
        return result

    def write(self, sql: str, parameters: Sequence[Any] = (), /) -> int:
        """Run a statement whose rows are not read (one a send repeats for every
        message); return the number of rows it changed. Parameters are None, bool, int,
        float or str (an str enum's value included).

        It goes through libpq itself, prepared once a connection, with the parameters
        as text: one call that waits for the server with the GIL released. psycopg's
        cursor costs 48 µs of Python a statement where this costs 17 (measured on the
        ledger's record of an outcome), and every thread of a send waits on the GIL for
        the others' share of it. Outside a transaction, a statement the server forgot
        (after a DISCARD ALL) is prepared again."""
        from psycopg import pq

        pgconn = self.raw.pgconn
        done = (pq.ExecStatus.COMMAND_OK, pq.ExecStatus.TUPLES_OK)
        try:
            # Typed as psycopg types them (a float stays a float where the column is an
            # integer); text, and NULL, take the type the statement gives them.
            types = [_pg_type(value) for value in parameters]
            values = [_as_text(value) for value in parameters]
            name = _prepared_name(sql, types)
            known = _PREPARED.setdefault(pgconn, set())
            if name not in known:
                prepared = pgconn.prepare(name, sql.encode(), types)
                _expect(pgconn, prepared, pq.ExecStatus.COMMAND_OK)
                known.add(name)
            result = pgconn.exec_prepared(name, values)
            if result.status == pq.ExecStatus.FATAL_ERROR and _sqlstate(result) == "26000":
                # The server forgot it (a DISCARD ALL): prepare it again.
                prepared = pgconn.prepare(name, sql.encode(), types)
                _expect(pgconn, prepared, pq.ExecStatus.COMMAND_OK)
                result = pgconn.exec_prepared(name, values)
            _expect(pgconn, result, *done)
        except TypeError:
            raise  # a parameter of a kind `write` does not take: the program's error
        except Exception as err:
            raise _pg_translated(self.where, err) from err
        return int(result.command_tuples or 0)

    def stream(self, sql: str, parameters: Sequence[Any] = (), /) -> Iterator[Any]:
        """Yield the rows of a query as the server sends them, thousands at a time from a
        cursor of the server: a million subscribers exported take the memory of a few."""
        import psycopg

        cursor = psycopg.RawServerCursor(
            self.raw, f"qant_rows_{id(self):x}", withhold=not self.in_transaction
        )
        cursor.itersize = 5000
        try:
            yield from cursor.execute(sql, parameters or None)
        except Exception as err:
            raise _pg_translated(self.where, err) from err
        finally:
            with contextlib.suppress(Exception):
                cursor.close()

    def copy_out(self, sql: str, parameters: Sequence[Any] = (), /) -> Iterator[Any]:
        """Yield the rows of a query (the bulk path out). COPY takes no parameters the
        server binds: the server's cursor, read in large batches, carries them instead."""
        return self.stream(sql, parameters)

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
        raw, self.raw = self.raw, None
        if raw is None:
            return
        if self._give_back is not None:
            self._give_back(raw)
        else:
            raw.close()

    def __del__(self) -> None:
        # As sqlite3 does: a connection dropped without close() is closed, quietly.
        with contextlib.suppress(Exception):
            self.close()

    @property
    def in_transaction(self) -> bool:
        from psycopg import pq

        return bool(self.raw.info.transaction_status != pq.TransactionStatus.IDLE)


# The statements `PgConnection.write` prepared on each connection (libpq's), by name.
_PREPARED: weakref.WeakKeyDictionary[Any, set[bytes]] = weakref.WeakKeyDictionary()


# The types of parameters `write` names to the server (OIDs); text and NULL are left for
# the server to infer from the statement.
_BOOL, _BIGINT, _NUMERIC, _DOUBLE = 16, 20, 1700, 701


def _pg_type(value: Any) -> int:
    if isinstance(value, bool):
        return _BOOL
    if isinstance(value, int):
        return _BIGINT if -(2**63) <= value < 2**63 else _NUMERIC
    if isinstance(value, float):
        return _DOUBLE
    return 0


def _prepared_name(sql: str, types: Sequence[int]) -> bytes:
    key = f"{sql}\0{types}".encode()
    return b"qant_" + hashlib.blake2b(key, digest_size=8).hexdigest().encode()


def _as_text(value: Any) -> bytes | None:
    """Return a parameter in PostgreSQL's text form (the server casts it to the
    column's type), in UTF-8, the encoding every connection of ours speaks."""
    from psycopg import errors

    if value is None:
        return None
    if isinstance(value, bool):
        return b"t" if value else b"f"
    if isinstance(value, int | float):
        return repr(value).encode()
    if isinstance(value, str):
        if "\0" in value:  # libpq would cut the text there; psycopg refuses it so
            raise errors.DataError("PostgreSQL text fields cannot contain NUL (0x00) bytes")
        return str.encode(value, "utf-8")  # an str enum: its value, not its name
    raise TypeError(f"write() takes None, bool, int, float or str, not {type(value).__name__}")


def _sqlstate(result: Any) -> str:
    from psycopg import pq

    state = result.error_field(pq.DiagnosticField.SQLSTATE)
    return state.decode() if state else ""


def _expect(pgconn: Any, result: Any, *statuses: Any) -> None:
    """Raise the error the server sent, as psycopg would, unless `result` is one of
    `statuses`: a connection that broke (no SQLSTATE then) as psycopg's
    OperationalError."""
    from psycopg import errors, pq

    if result.status in statuses:
        return
    if pgconn.status == pq.ConnStatus.BAD:
        message = result.error_message.decode(errors="replace").strip()
        raise errors.OperationalError(message or "the connection to the server was lost")
    raise errors.error_from_result(result)


def _pg_translated(where: str, err: Exception) -> Exception:
    import psycopg

    if isinstance(err, psycopg.errors.IntegrityError):
        return IntegrityError(f"{where}: {_first_line(err)}")
    if isinstance(err, psycopg.errors.DataError):
        # A value PostgreSQL cannot hold (a NUL in a text, a number out of range).
        return StoreError(f"{where}: {_first_line(err)}")
    if isinstance(err, psycopg.errors.DiskFull):
        return StoreUnavailable(f"{where}: the database server's disk is full; nothing was written")
    if isinstance(err, psycopg.errors.ReadOnlySqlTransaction):
        return StoreUnavailable(f"{where}: the database server is read-only now (a standby?)")
    if isinstance(err, psycopg.OperationalError | psycopg.InterfaceError):
        return StoreUnavailable(
            f"{where}: the database server cannot be used now: {_first_line(err)}"
        )
    return err


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _connection_options() -> dict[str, Any]:
    """Return how every connection of ours is made: raw cursors ($n parameters, bound by
    the server), times in UTC, the password from the environment if there."""
    import psycopg

    return {
        "autocommit": True,
        "cursor_factory": psycopg.RawCursor,
        "password": secrets.secret(os.environ, PASSWORD_VARIABLE),
        "connect_timeout": 10,
        # Ours, whatever PGCLIENTENCODING says: `write` sends text as UTF-8.
        "client_encoding": "UTF8",
        "options": "-c TimeZone=UTC -c DateStyle=ISO",
    }


def _password_hint(why: str) -> str:
    """Return what to do when the server refused us for the password (libpq's words)."""
    if "no password supplied" in why:
        return (
            f" (the server asks for a password: set {PASSWORD_VARIABLE}, or "
            f"{PASSWORD_VARIABLE}_FILE naming a file that holds it)"
        )
    if "password authentication failed" in why:
        if secrets.is_set(os.environ, PASSWORD_VARIABLE):
            given = secrets.origin(os.environ, PASSWORD_VARIABLE)
            return f" (the password of {given} was refused)"
        return (
            f" (a password from PGPASSWORD or ~/.pgpass was refused; the one to set is "
            f"{PASSWORD_VARIABLE} or {PASSWORD_VARIABLE}_FILE)"
        )
    return ""


def _read_times_as_text(raw: Any) -> None:
    """Teach a new connection to read dates and times as the ISO text SQLite keeps."""
    raw.adapters.register_loader("timestamptz", _iso_time())


@functools.cache
def _iso_time() -> type:
    """Return the loader of timestamptz values, made once (SQLite users never import
    psycopg)."""
    from psycopg.adapt import Loader

    class IsoTime(Loader):
        """Reads a timestamptz ("2026-12-05 08:30:00+00") as ISO 8601 text
        ("2026-12-05T08:30:00+00:00"), the form SQLite stores and callers compare."""

        def load(self, data: Any) -> str:
            text = bytes(data).decode("ascii")
            day, _, time_of_day = text.partition(" ")
            if len(time_of_day) > 3 and time_of_day[-3] in "+-":
                time_of_day += ":00"
            return f"{day}T{time_of_day}"

    return IsoTime


def _open_postgres(url: str, *, migrate: bool | None) -> PgConnection:
    where = describe(url)
    pool = _POOLS.get(url)
    if pool is not None:
        try:
            raw = pool.getconn(timeout=30)
        except Exception as err:
            raise _pg_translated(where, err) from err
        return PgConnection(raw, where, pool.putconn)
    psycopg = _psycopg(where)
    try:
        raw = psycopg.connect(url, **_connection_options())
    except psycopg.Error as err:
        why = _first_line(err)
        raise StoreUnavailable(f"{where}: cannot connect: {why}{_password_hint(why)}") from err
    _read_times_as_text(raw)
    connection = PgConnection(raw, where)
    try:
        _check_postgres(connection, where, migrate=migrate)
    except BaseException:
        connection.close()
        raise
    return connection


def _psycopg(where: str) -> Any:
    try:
        import psycopg
    except ImportError as err:
        raise StoreError(
            f"{where}: PostgreSQL needs psycopg: pip install 'qant-mail[postgresql]'"
        ) from err
    return psycopg


# Taken while a PostgreSQL store is migrated: two processes never migrate it at once.
_MIGRATION_LOCK = 0x71A7_0001


def _check_postgres(db: PgConnection, where: str, *, migrate: bool | None) -> None:
    version = postgres_version(db)
    if version == schema.VERSION:
        return
    if migrate is None:
        migrate = version == 0
    if version > schema.VERSION:
        raise StoreError(
            f"{where}: schema version {version} is newer than this qant-mail knows "
            f"({schema.VERSION}); upgrade qant-mail"
        )
    if not migrate:
        raise StoreError(
            f"{where}: the database is at schema version {version}, this qant-mail needs "
            f"{schema.VERSION}: run `qant-mail db migrate` (once, from one host)"
        )
    migrate_postgres(db)


def migrate_postgres(db: Db, to_version: int | None = None) -> None:
    """Bring a PostgreSQL store to `to_version` (default: this qant-mail's), step by
    step, each in its transaction, holding a lock that keeps other hosts waiting."""
    target = schema.VERSION if to_version is None else to_version
    db.execute("SELECT pg_advisory_lock($1)", (_MIGRATION_LOCK,))
    try:
        db.execute("CREATE TABLE IF NOT EXISTS qant_schema (version INTEGER NOT NULL)")
        for number in range(postgres_version(db), target):
            with transaction(db):
                if number == 0:
                    db.execute("INSERT INTO qant_schema (version) VALUES (0)")
                for statement in schema.statements(schema.POSTGRESQL[number]):
                    db.execute(statement)
                db.execute("UPDATE qant_schema SET version = $1", (number + 1,))
    finally:
        db.execute("SELECT pg_advisory_unlock($1)", (_MIGRATION_LOCK,))


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


# A long-lived process (`serve`) keeps a pool of connections per PostgreSQL store: a
# request takes one and gives it back, instead of connecting anew.
_POOLS: dict[str, Any] = {}
_POOLS_LOCK = threading.Lock()


@contextlib.contextmanager
def pooled(target: StoreTarget, size: int = 10) -> Iterator[None]:
    """While this lasts, `open_store(target)` takes connections from a pool of at most
    `size` (a PostgreSQL store; a SQLite one opens its file, which costs little). The
    store is checked (migrated) once, as the pool opens."""
    if not is_postgres(target):
        yield
        return
    url = str(target)
    where = describe(url)
    _open_postgres(url, migrate=None).close()  # reachable, and at our schema
    _psycopg(where)
    from psycopg_pool import ConnectionPool

    pool = ConnectionPool(
        url,
        min_size=1,
        max_size=size,
        kwargs=_connection_options(),
        configure=_read_times_as_text,
        check=ConnectionPool.check_connection,
        open=True,
        name=f"qant-{where}",
    )
    with _POOLS_LOCK:
        _POOLS[url] = pool
    try:
        yield
    finally:
        with _POOLS_LOCK:
            _POOLS.pop(url, None)
        pool.close()


@atexit.register
def _close_pools() -> None:
    with _POOLS_LOCK:
        pools = list(_POOLS.values())
        _POOLS.clear()
    for pool in pools:
        with contextlib.suppress(Exception):
            pool.close()


# ---- both ------------------------------------------------------------------------------


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
    # SQLite: take the write lock at once, so that a read-decide-write never meets
    # another writer half-way. PostgreSQL: row locks and constraints do that.
    db.execute("BEGIN IMMEDIATE" if db.dialect == "sqlite" else "BEGIN")
    try:
        yield db
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            # Whatever a failed ROLLBACK says, the error that led to it is the one to raise.
            with contextlib.suppress(Exception):
                db.execute("ROLLBACK")
        raise


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
    "approvals",
    "send_messages",
    "links",
    "clicks",
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
        for table, rows in row_counts(destination).items():
            if rows:
                raise StoreError(
                    f"{describe(target)}: not empty ({rows} rows in {table}); copy into a "
                    "new database"
                )
        with transaction(destination):
            for table in TABLES:
                counts[table] = _copy_table(origin, destination, table)
            if destination.dialect == "postgresql":
                for table in ("subscribers", "sends", "signups", "outbox", "approvals"):
                    # Rows came with their ids: the next id follows the largest.
                    destination.execute(
                        f"SELECT setval(pg_get_serial_sequence('{table}', 'id'),"
                        f" coalesce((SELECT max(id) FROM {table}), 0) + 1, false)"
                    )
            for table, copied in row_counts(destination).items():
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
                "SELECT name FROM pragma_table_info($1) ORDER BY cid", (table,)
            ).fetchall()
        ]
        if origin.dialect == "sqlite"
        else [
            str(name)
            for (name,) in origin.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_name = $1"
                " AND table_schema = current_schema() ORDER BY ordinal_position",
                (table,),
            ).fetchall()
        ]
    )
    listed = ", ".join(columns)
    rows = origin.stream(f"SELECT {listed} FROM {table}")
    return destination.copy_in(table, columns, (tuple(row) for row in rows))
