"""A real PostgreSQL for the tests: Debian's server, started by the tests themselves
(initdb and pg_ctl in a temporary folder, on a Unix socket), one database per test."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

# PostgreSQL refuses to run as root: the server runs as this user when the tests are root.
SERVER_USER = "postgres"


def _binaries() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    if found:
        return found[-1].parent
    pg_ctl = shutil.which("pg_ctl")
    return Path(pg_ctl).resolve().parent if pg_ctl else None


def _unavailable(why: str) -> None:
    # Locally a missing server skips, visibly; in CI (.ci/run installs it) it fails.
    if os.environ.get("QANT_TEST_REQUIRE_POSTGRESQL") or os.environ.get("CI"):
        pytest.fail(f"PostgreSQL is needed in CI: {why}")
    pytest.skip(f"no PostgreSQL here ({why}): `apt-get install postgresql` to run these tests")


class PostgresUnavailable(Exception):
    """No PostgreSQL server can be started here."""


@contextlib.contextmanager
def running_postgres() -> Iterator[Path]:
    """Start a PostgreSQL server in a temporary folder, listening on a Unix socket
    there only; yield the folder; stop it and delete everything after."""
    binaries = _binaries()
    if binaries is None:
        raise PostgresUnavailable("no pg_ctl")
    folder = Path(tempfile.mkdtemp(prefix="qant-pg-"))
    run_as: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(folder, SERVER_USER)
        run_as = ["runuser", "-u", SERVER_USER, "--"]
    data = folder / "data"
    try:
        initdb = [str(binaries / "initdb"), "-D", str(data), "-A", "trust", "-U", "qant"]
        subprocess.run(
            [*run_as, *initdb, "--no-sync", "-E", "UTF8", "--locale=C.UTF-8"],
            check=True,
            capture_output=True,
        )
        options = f"-k {folder} -c listen_addresses='' -c fsync=off -c max_connections=300"
        options += " -c synchronous_commit=off -c full_page_writes=off"
        pg_ctl = [str(binaries / "pg_ctl"), "-D", str(data), "-o", options]
        subprocess.run(
            [*run_as, *pg_ctl, "-l", str(folder / "log"), "-w", "start"],
            check=True,
            capture_output=True,
        )
    except subprocess.CalledProcessError as err:
        shutil.rmtree(folder, ignore_errors=True)
        why = err.stderr.decode(errors="replace")[-300:]
        raise PostgresUnavailable(f"the server did not start: {why}") from err
    try:
        yield folder
    finally:
        subprocess.run(
            [*run_as, str(binaries / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
            capture_output=True,
        )
        shutil.rmtree(folder, ignore_errors=True)


def create_database(folder: Path, template: str = "template1") -> str:
    """Create a new database on the server of `folder` (a copy of `template`); return
    its URL."""
    import psycopg

    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(url_of(folder, "postgres"), autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name} TEMPLATE {template}")
    return url_of(folder, name)


# A database with the current schema, made once a session: each test's database is a
# copy of it, which PostgreSQL makes faster than the migrations run.
TEMPLATE = "qant_schema_template"


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[Path]:
    """A PostgreSQL server for the session; its Unix socket's folder."""
    import psycopg

    from qant_mail.store.db import open_store

    try:
        with running_postgres() as folder:
            with psycopg.connect(url_of(folder, "postgres"), autocommit=True) as admin:
                admin.execute(f"CREATE DATABASE {TEMPLATE}")
            open_store(url_of(folder, TEMPLATE)).close()  # migrated
            yield folder
    except PostgresUnavailable as err:
        _unavailable(str(err))


def url_of(folder: Path, database: str) -> str:
    """Return the URL of `database` on the server whose socket is in `folder`."""
    return f"postgresql://qant@/{database}?host={folder}"


@pytest.fixture
def postgres_url(postgres_server: Path) -> Iterator[str]:
    """A new database of its own for one test, at the current schema and without rows;
    its URL."""
    yield from _database(postgres_server, TEMPLATE)


@pytest.fixture
def postgres_empty_url(postgres_server: Path) -> Iterator[str]:
    """A new database without even the schema; its URL."""
    yield from _database(postgres_server, "template1")


def _database(postgres_server: Path, template: str) -> Iterator[str]:
    import psycopg

    url = create_database(postgres_server, template)
    name = url.split("/")[-1].split("?")[0]
    try:
        yield url
    finally:
        with (
            contextlib.suppress(psycopg.Error),
            psycopg.connect(url_of(postgres_server, "postgres"), autocommit=True) as admin,
        ):
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
