"""The use cases of the store itself: which it is and at what schema, its migration (a
PostgreSQL store is migrated on purpose, once, from one host), and copies between
SQLite and PostgreSQL."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from qant_mail.app.context import Context
from qant_mail.store import db as stores


@dataclass(frozen=True)
class StoreStatus:
    """Which store the settings name, its schema version and its rows per table."""

    description: str
    dialect: str
    version: int
    rows: dict[str, int]


def status(ctx: Context) -> StoreStatus:
    """Return which store the settings name, at what version, with how many rows."""
    db = stores.open_store(ctx.store, migrate=False)
    try:
        return StoreStatus(
            stores.describe(ctx.store),
            db.dialect,
            stores.schema_version(db),
            stores.row_counts(db),
        )
    finally:
        db.close()


def migrate(ctx: Context) -> tuple[str, int]:
    """Bring the store to this qant-mail's schema; return it and its version now."""
    db = stores.open_store(ctx.store, migrate=True)
    try:
        return stores.describe(ctx.store), stores.schema_version(db)
    finally:
        db.close()


def target(value: str) -> stores.StoreTarget:
    """Return the store a command line names: a postgresql:// URL, sqlite:///PATH or a
    file's path."""
    if value.startswith(("postgresql://", "postgres://")):
        return value
    return Path(value.removeprefix("sqlite:///"))


@dataclass(frozen=True)
class Copied:
    """What a copy of a store wrote, table by table."""

    description: str
    counts: dict[str, int]


def copy(source: str, destination: str) -> Copied:
    """Copy every row of the store `source` into the empty store `destination` (SQLite
    into PostgreSQL and back), in one transaction, checked by the counts of each table."""
    origin, into = target(source), target(destination)
    if isinstance(origin, Path) and not origin.is_file():
        raise stores.StoreError(f"{origin}: no such store")
    return Copied(stores.describe(into), stores.copy_store(origin, into))
