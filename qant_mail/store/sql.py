"""What every module of the store writes SQL against: a connection (`Db`) to SQLite or
PostgreSQL, and the few words that differ between the two.

SQL is written once where both databases say the same thing, with PostgreSQL's own
parameters, `$1`, `$2`…, which SQLite binds as well (as named parameters); where they
differ, each says it in its own words, next to the other (`contains`, the locks of a
claim, the migrations in `schema`). No statement is rewritten, and no value is ever
written into SQL: values are bound."""

from __future__ import annotations

import datetime as dt
import hashlib
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Protocol


class Cursor(Protocol):
    """What a statement gives back, in both databases."""

    @property
    def rowcount(self) -> int: ...
    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...
    def __iter__(self) -> Iterator[Any]: ...


class Db(Protocol):
    """A connection to the store, SQLite or PostgreSQL: `$n` parameters."""

    dialect: str  # "sqlite" or "postgresql"

    def execute(self, sql: str, parameters: Sequence[Any] = (), /) -> Cursor: ...
    def executemany(self, sql: str, rows: Iterable[Sequence[Any]], /) -> Cursor: ...
    def write(self, sql: str, parameters: Sequence[Any] = (), /) -> int: ...
    def stream(self, sql: str, parameters: Sequence[Any] = (), /) -> Iterator[Any]: ...
    def copy_in(self, table: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> int: ...
    def copy_out(self, sql: str, parameters: Sequence[Any] = (), /) -> Iterator[Any]: ...
    def close(self) -> None: ...
    @property
    def in_transaction(self) -> bool: ...


def marks(first: int, count: int) -> str:
    """Return `count` parameters from `$first` on, for an IN (…) list: "$3, $4, $5"."""
    return ", ".join(f"${number}" for number in range(first, first + count))


def contains(db: Db, text: str, part: str) -> str:
    """Return the condition "`part` occurs in `text`" (SQL expressions), in the words of
    the database of `db`."""
    function = "strpos" if db.dialect == "postgresql" else "instr"
    return f"{function}({text}, {part}) > 0"


def one_at_a_time(db: Db, *names: str) -> None:
    """Make the transaction under way the only one, until it ends, to read and decide on
    what `names` name (a client, an address…): a read-decide-write that holds. SQLite's
    write transactions already run one at a time; PostgreSQL takes a lock of the
    transaction for each name, in the order given (callers give them in one order)."""
    if db.dialect != "postgresql":
        return
    for name in names:
        digest = hashlib.blake2b(name.encode(), digest_size=8, person=b"qant-lock").digest()
        db.execute(
            "SELECT pg_advisory_xact_lock($1)", (int.from_bytes(digest, "big", signed=True),)
        )


def row_lock(db: Db) -> str:
    """Return the clause that locks the rows a SELECT reads until the transaction ends
    (PostgreSQL's FOR UPDATE; SQLite's write transactions hold the whole database)."""
    return " FOR UPDATE" if db.dialect == "postgresql" else ""


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
