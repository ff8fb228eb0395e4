"""The store on PostgreSQL beside SQLite: the schema and its versions, copies from one
to the other and back, locks seen from every host, secrets kept out of messages."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import Result

from qant_mail.base.config import Store
from qant_mail.base.errors import ConfigError
from qant_mail.store import schema
from qant_mail.store.clicks import Clicks
from qant_mail.store.db import (
    TABLES,
    IntegrityError,
    StoreError,
    copy_store,
    describe,
    now_text,
    open_store,
    schema_version,
    transaction,
)
from qant_mail.store.ledger import Ledger, Outcome, State
from qant_mail.store.subscribers import Status, Subscribers

Cli = Callable[..., Result]


def test_an_empty_database_gets_the_schema_and_an_older_one_waits_for_db_migrate(
    postgres_empty_url: str,
) -> None:
    postgres_url = postgres_empty_url
    import psycopg

    from qant_mail.store.db import PgConnection, migrate_postgres

    raw = psycopg.connect(postgres_url, autocommit=True, cursor_factory=psycopg.RawCursor)
    older = PgConnection(raw, "test")
    migrate_postgres(older, 5)  # what a qant-mail of schema 5 made
    older.execute(
        "INSERT INTO subscribers (email, status, status_changed_at, created_at)"
        " VALUES ('left@example.com', 'unsubscribed', '2024-01-01T00:00:00+00:00',"
        " '2023-12-01T00:00:00+00:00')"
    )
    older.close()
    with pytest.raises(StoreError, match=r"schema version 5.*qant-mail db migrate"):
        open_store(postgres_url)
    migrated = open_store(postgres_url, migrate=True)
    assert migrated.dialect == "postgresql"
    assert schema_version(migrated) == schema.VERSION
    with Subscribers(migrated) as store:
        found = store.get("left@example.com")
        assert found is not None
        assert found.status is Status.UNSUBSCRIBED  # migration 6 on PostgreSQL too
    migrated = open_store(postgres_url)
    migrated.execute("UPDATE qant_schema SET version = 99")
    migrated.close()
    with pytest.raises(StoreError, match="newer than this qant-mail"):
        open_store(postgres_url)


def test_addresses_compare_without_case_and_constraints_hold(postgres_url: str) -> None:
    with Subscribers.open(postgres_url) as store:
        store.add("Lea@Example.com")
        assert store.get("lea@example.COM") is not None
        report = store.import_rows("email\nLEA@example.com\nmax@example.com\n", "t")
        assert (report.added, report.unchanged) == (1, 1)
        # An address written behind the tool's back keeps to the stored form too.
        with pytest.raises(IntegrityError, match="subscribers_email_lower"), transaction(store.db):
            store.db.execute(
                "INSERT INTO subscribers (email, status_changed_at, created_at)"
                " VALUES ('LEA@EXAMPLE.COM', '2024-01-01T00:00:00Z', '2024-01-01T00:00:00Z')"
            )
        assert store.count()[Status.ACTIVE] == 2  # the failed transaction left nothing


def test_a_copy_sqlite_to_postgresql_and_back_gives_identical_exports(
    tmp_path: Path, postgres_url: str
) -> None:
    first = tmp_path / "first.db"
    with Subscribers.open(first) as store:
        rows = "email,name\n" + "".join(f"r{n}@example.com,Lecteur {n}\n" for n in range(300))
        store.import_rows(rows, "t")
        store.unsubscribe("r3@example.com")
        store.set_status("r4@example.com", Status.BOUNCED, "550")
        store.remove("r5@example.com")
        store.of("finance").import_rows("email\nr1@example.com\nnew@example.com\n", "t")
    ledger = Ledger(first)
    send = ledger.plan("2023-11-20", "hash", "Sujet")
    ledger.close()
    counts = copy_store(first, postgres_url)
    assert counts["subscribers"] == 300  # 299 + new, less the erased
    assert counts["deliveries"] == 297
    back = tmp_path / "back.db"
    assert copy_store(postgres_url, back) == counts
    exports = []
    for target in (first, postgres_url, back):
        with Subscribers.open(target) as store:
            for key in ("default", "finance"):
                out = __import__("io").StringIO()
                store.of(key).export(out)
                exports.append(out.getvalue())
            assert store.suppressed_since("r5@example.com")
    assert exports[0:2] == exports[2:4] == exports[4:6]
    # The copy goes on where the original was: new rows get new ids.
    with Subscribers.open(postgres_url) as store:
        added = store.add("after@example.com")
        assert added.id > 300
    assert Ledger(postgres_url).find("2023-11-20") == send


def test_a_copy_into_a_store_that_has_rows_is_refused(tmp_path: Path, postgres_url: str) -> None:
    with Subscribers.open(postgres_url) as store:
        store.add("here@example.com")
    source = tmp_path / "s.db"
    Subscribers.open(source).close()
    with pytest.raises(StoreError, match="not empty"):
        copy_store(source, postgres_url)


def test_the_run_due_lock_is_seen_from_another_process(postgres_url: str) -> None:
    code = (
        "import sys; from qant_mail.store.ledger import Ledger\n"
        "with Ledger(sys.argv[1]).run_lock() as held: print(held)"
    )
    ledger = Ledger(postgres_url)
    with ledger.run_lock() as held:
        assert held
        other = subprocess.run(
            [sys.executable, "-c", code, postgres_url], capture_output=True, text=True
        )
        assert other.stdout.strip() == "False", other.stderr
    again = subprocess.run(
        [sys.executable, "-c", code, postgres_url], capture_output=True, text=True
    )
    assert again.stdout.strip() == "True"
    ledger.close()


def test_the_password_never_shows(monkeypatch: pytest.MonkeyPatch) -> None:
    assert (
        describe("postgresql://qant:s3cret@db.example/qant") == "postgresql://qant@db.example/qant"
    )
    with pytest.raises(ValueError, match="QANT_STORE_PASSWORD"):
        Store(url="postgresql://qant:s3cret@db.example/qant")
    monkeypatch.setenv("QANT_STORE_PASSWORD", "s3cret")
    with pytest.raises(StoreError) as caught:
        open_store("postgresql://qant@127.0.0.1:1/qant")
    assert "s3cret" not in str(caught.value)
    assert "127.0.0.1" in str(caught.value)


def test_db_commands(cli: Cli, project: Path, postgres_url: str) -> None:
    (project / "list.csv").write_text("email\na@example.com\nb@example.com\n")
    assert cli("subscribers", "import", "list.csv").exit_code == 0
    copied = cli("db", "copy", "data/subscribers.db", postgres_url)
    assert copied.exit_code == 0, copied.output
    assert "copied" in copied.stdout
    assert "subscribers 2" in copied.stdout
    status = cli("db", "status")
    assert "schema" in status.stdout
    assert "subscribers\t2" in status.stdout
    assert cli("db", "migrate").exit_code == 0
    for table in TABLES:
        assert table in status.stdout


def test_a_bad_store_url_is_a_settings_error(project: Path) -> None:
    from qant_mail.base.config import load_settings

    path = project / "qant.toml"
    path.write_text(path.read_text().replace("[store]\n", '[store]\nurl = "mysql://x"\n', 1))
    with pytest.raises(ConfigError, match=r"store\.url"):
        load_settings(path, env={})


@pytest.fixture(params=["sqlite", "postgresql"])
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> str | Path:
    """A new store of each kind."""
    if request.param == "sqlite":
        return tmp_path / "store.db"
    url: str = request.getfixturevalue("postgres_url")
    return url


def test_literals_that_look_like_parameters_or_types_come_back_as_written(
    any_store: str | Path,
) -> None:
    db = open_store(any_store)
    try:
        row = db.execute("SELECT '100 %', 'who?', 'INTEGER REAL', '$1 ok', $1", ("x",))
        assert tuple(row.fetchone()) == ("100 %", "who?", "INTEGER REAL", "$1 ok", "x")
        (alone,) = db.execute("SELECT '50 % off'").fetchone()
        assert alone == "50 % off"
        with Subscribers(db) as store:
            store.add("lea@example.com", "Léa ? 100 % INTEGER")
            found = store.get("lea@example.com")
            assert found is not None
            assert found.name == "Léa ? 100 % INTEGER"
    finally:
        db.close()


def test_a_refused_constraint_is_the_stores_own_error_in_both(any_store: str | Path) -> None:
    from qant_mail.store.db import IntegrityError

    db = open_store(any_store)
    try:
        insert = (
            "INSERT INTO suppressions (email_hash, reason, created_at)"
            " VALUES ('h', 'r', '2024-01-01T00:00:00+00:00')"
        )
        db.execute(insert)
        with pytest.raises(IntegrityError):
            db.execute(insert)
        assert issubclass(IntegrityError, StoreError)
    finally:
        db.close()


def test_times_become_timestamptz_on_postgresql_and_read_as_they_were_written(
    postgres_empty_url: str,
) -> None:
    import psycopg

    from qant_mail.store.db import PgConnection, migrate_postgres

    raw = psycopg.connect(postgres_empty_url, autocommit=True, cursor_factory=psycopg.RawCursor)
    older = PgConnection(raw, "test")
    migrate_postgres(older, 9)  # times as ISO text, as qant-mail wrote them before
    older.execute(
        "INSERT INTO subscribers (email, status_changed_at, created_at)"
        " VALUES ('lea@example.com', '2024-02-01T09:30:00+00:00', '2023-12-01T00:00:00+00:00')"
    )
    older.close()
    db = open_store(postgres_empty_url, migrate=True)
    try:
        (kind,) = db.execute(
            "SELECT data_type FROM information_schema.columns"
            " WHERE table_name = 'subscribers' AND column_name = 'created_at'"
        ).fetchone()
        assert kind == "timestamp with time zone"
        row = db.execute("SELECT status_changed_at, created_at FROM subscribers").fetchone()
        assert tuple(row) == ("2024-02-01T09:30:00+00:00", "2023-12-01T00:00:00+00:00")
        # Compared as times, not as text: an offset of another zone is the same moment.
        (same,) = db.execute(
            "SELECT count(*) FROM subscribers WHERE created_at = $1",
            ("2023-12-01T01:00:00+01:00",),
        ).fetchone()
        assert same == 1
    finally:
        db.close()


def test_a_new_sqlite_store_and_its_wal_and_shm_files_are_readable_by_their_owner_only(
    tmp_path: Path,
) -> None:
    path = tmp_path / "data" / "subscribers.db"
    # What a shared machine's default lets through: read for everyone, write for the group.
    before = os.umask(0o002)
    try:
        with Subscribers.open(path) as store:
            store.add("lea@example.com")
            # While a connection is open, WAL keeps its two side files beside the database.
            modes = {
                name: Path(f"{path}{name}").stat().st_mode & 0o777 for name in ("", "-wal", "-shm")
            }
    finally:
        os.umask(before)
    assert modes == {"": 0o600, "-wal": 0o600, "-shm": 0o600}


def test_a_new_sqlite_store_opened_by_many_threads_at_once_opens_for_each(
    tmp_path: Path,
) -> None:
    """Switching a new store to WAL needs it alone for a moment, and SQLite said
    "locked" at once, with no wait, to the others opening it (a CI run lost a test to
    it): each opening now waits its turn. Thirty new stores, sixteen threads each."""
    from concurrent.futures import ThreadPoolExecutor

    from qant_mail.store.db import open_store

    def opened(path: Path) -> str:
        try:
            open_store(path).close()
        except Exception as err:  # noqa: BLE001 - every failure is reported
            return f"{type(err).__name__}: {err}"
        return "ok"

    for number in range(30):
        path = tmp_path / f"store-{number}" / "subscribers.db"
        with ThreadPoolExecutor(max_workers=16) as pool:
            outcomes = set(pool.map(opened, [path] * 16))
        assert outcomes == {"ok"}, (number, outcomes)


def test_outcomes_committed_together_are_each_written_as_one_at_a_time(
    any_store: str | Path,
) -> None:
    # The group commit of a send writes several connections' outcomes in one
    # transaction: each row, the minute counts and a bounce as `record` writes them.
    with Subscribers(open_store(any_store)) as readers:
        for n in range(4):
            readers.add(f"reader{n}@example.com", f"Lecteur {n}")
    ledger = Ledger(any_store)
    try:
        send = ledger.plan("2024-01-08", "hash", "Sujet")
        bounced = ledger.deliveries(send, State.PENDING)[2].subscriber_id
        ledger.record_many(
            send,
            [
                Outcome(1, State.SENT, "250 ok", quota={28_000_000: 2}, relay="main:25"),
                Outcome(2, State.DEFERRED, "451 later", retry_at=1e10, relay="main:25"),
                Outcome(3, State.FAILED, "550 5.1.1 unknown", bounce=bounced, relay="b:25"),
            ],
        )
        rows = {d.position: d for d in ledger.deliveries(send, *State)}
        assert [(rows[p].state, rows[p].attempts, rows[p].last_reply) for p in (1, 2, 3, 4)] == [
            (State.SENT, 1, "250 ok"),
            (State.DEFERRED, 1, "451 later"),
            (State.FAILED, 1, "550 5.1.1 unknown"),
            (State.PENDING, 0, ""),
        ]
        assert ledger.quota_since(28_000_000) == {28_000_000: 2}
        assert ledger.relays(send) == {"main:25": 1}
        with Subscribers(open_store(any_store)) as readers:
            found = readers.get("reader2@example.com")
            assert found is not None
            assert found.status == Status.BOUNCED
    finally:
        ledger.close()


def test_outcomes_without_counts_are_written_together_as_one_at_a_time(
    any_store: str | Path,
) -> None:
    # One transaction for several outcomes, each row as `record` writes it alone.
    with Subscribers(open_store(any_store)) as readers:
        for n in range(5):
            readers.add(f"reader{n}@example.com", f"Lecteur {n}")
    ledger = Ledger(any_store)
    try:
        send = ledger.plan("2024-01-08", "hash", "Sujet")
        ledger.record_many(
            send,
            [
                Outcome(1, State.SENT, "250 2.0.0 Ok: queued as A1 'x' \\ \"y\"", relay="m:25"),
                Outcome(2, State.DEFERRED, "451 4.7.1 later, {soon}", retry_at=1.5e9 + 0.25),
                Outcome(4, State.FAILED, "not sent: bad address", attempt=False),
            ],
        )
        ledger.record_many(
            send,
            [
                Outcome(2, State.DEFERRED, "451 again", retry_at=1.6e9, relay="b:25"),
                Outcome(5, State.SENT, "250 ok", relay="b:25"),
            ],
        )
        rows = {d.position: d for d in ledger.deliveries(send, *State)}
        assert [(rows[p].state, rows[p].attempts, rows[p].last_reply) for p in range(1, 6)] == [
            (State.SENT, 1, "250 2.0.0 Ok: queued as A1 'x' \\ \"y\""),
            (State.DEFERRED, 2, "451 again"),
            (State.PENDING, 0, ""),
            (State.FAILED, 0, "not sent: bad address"),
            (State.SENT, 1, "250 ok"),
        ]
        assert ledger.next_retry(send) == 1.6e9
        assert ledger.relays(send) == {"b:25": 1, "m:25": 1}
    finally:
        ledger.close()


def test_a_write_returns_its_rows_survives_a_forgetful_server_and_names_its_errors(
    any_store: str | Path,
) -> None:
    # `write` is the ledger's short road (libpq itself on PostgreSQL, its parameters as
    # text): values of each type, a server that dropped its prepared statements, errors.
    with Subscribers(open_store(any_store)) as readers:
        readers.add("lea@example.com", "Léa")
        readers.add("noe@example.com", "Noé")
    db = open_store(any_store)
    try:
        rename = "UPDATE subscribers SET name = $1 WHERE email = $2 OR id < $3"
        assert db.write(rename, ("Léa ? 100 % 'x' \\", "lea@example.com", 0.5)) == 1
        if db.dialect == "postgresql":
            db.execute("DISCARD ALL")  # what a pooler may do: prepared statements gone
        assert db.write(rename, ("x", "nobody@example.com", -1)) == 0
        found = db.execute("SELECT name FROM subscribers WHERE email = 'lea@example.com'")
        assert found.fetchone()[0] == "Léa ? 100 % 'x' \\"
        with pytest.raises(IntegrityError):
            db.write("UPDATE subscribers SET status = $1 WHERE id > $2", ("nope", 0))
        with pytest.raises(IntegrityError):
            db.write(rename, (None, "lea@example.com", 0))
        assert db.write(rename, ("Tous", "nobody@example.com", 1e9)) == 2
    finally:
        db.close()


def test_a_write_takes_what_psycopg_takes_and_refuses_what_postgresql_cannot_hold(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import enum

    class Kind(str, enum.Enum):  # noqa: UP042 - the mixin whose str() is its name
        LETTER = "lettre"

    # The client's encoding is ours (UTF-8), whatever the environment says.
    monkeypatch.setenv("PGCLIENTENCODING", "LATIN1")
    with Subscribers(open_store(postgres_url)) as readers:
        readers.add("lea@example.com", "Léa")
    db = open_store(postgres_url)
    try:
        rename = "UPDATE subscribers SET name = $1 WHERE email = $2 AND id < $3"
        assert db.write(rename, ("Léa 5 € ✓", "lea@example.com", 2**70)) == 1
        (name,) = db.execute("SELECT name FROM subscribers").fetchone()
        assert name == "Léa 5 € ✓"
        assert db.write(rename, (Kind.LETTER, "lea@example.com", 10)) == 1
        assert db.execute("SELECT name FROM subscribers").fetchone()[0] == "lettre"
        # A statement that returns rows still runs once, and says how many it changed.
        returning = "UPDATE subscribers SET name = $1 WHERE email = $2 RETURNING id"
        assert db.write(returning, ("Léa", "lea@example.com")) == 1
        # PostgreSQL's text holds no NUL: refused, as the store's own error, by both
        # roads (psycopg's would have raised its own DataError, a traceback).
        with pytest.raises(StoreError, match="NUL"):
            db.write(rename, ("a\x00b", "lea@example.com", 10))
        with pytest.raises(StoreError, match="NUL"):
            db.execute(rename, ("a\x00b", "lea@example.com", 10))
        with pytest.raises(TypeError):
            db.write(rename, (b"bytes", "lea@example.com", 10))
        assert db.execute("SELECT name FROM subscribers").fetchone()[0] == "Léa"
    finally:
        db.close()


@pytest.mark.postgresql_only
def test_a_plan_does_not_wait_on_the_statistics_when_their_tables_are_locked(
    postgres_url: str,
) -> None:
    # A VACUUM or a CREATE INDEX CONCURRENTLY elsewhere holds the lock ANALYZE needs:
    # the plan is made and the send goes on, with the statistics it has.
    import psycopg

    with Subscribers(open_store(postgres_url)) as readers:
        readers.add("lea@example.com", "Léa")
    with psycopg.connect(postgres_url, autocommit=True) as holder:
        holder.execute("BEGIN")
        holder.execute("LOCK TABLE subscriptions IN SHARE UPDATE EXCLUSIVE MODE")
        ledger = Ledger(postgres_url)
        started = time.monotonic()
        try:
            send = ledger.plan("2024-01-08", "hash", "Sujet")
            assert ledger.counts(send)[State.PENDING] == 1
        finally:
            ledger.close()
        assert time.monotonic() - started < 10
        holder.execute("ROLLBACK")


@pytest.mark.postgresql_only
def test_a_planned_send_is_claimed_through_indexes_not_by_scanning_it(
    postgres_url: str,
) -> None:
    # Fresh statistics after the plan: without them PostgreSQL guessed tables of a few
    # rows, and once autovacuum analysed the send (but not yet the list) hashed the
    # whole list for every claim; with them, a join on the send's key alone hashed the
    # whole send. (Below a few thousand rows, a scan of the send is its right choice.)
    from qant_mail.store.ledger import _CLAIM_SHARED

    with Subscribers(open_store(postgres_url)) as readers:
        rows = "email,name\n" + "".join(f"r{n}@example.com,R {n}\n" for n in range(10_000))
        readers.import_rows(rows, "test")
    ledger = Ledger(postgres_url)
    try:
        send = ledger.plan("2024-01-08", "hash", "Sujet")
        db = ledger.db
        claim = _CLAIM_SHARED.format(condition="d.state = 'pending'", order="position", most=32)
        db.execute(
            "PREPARE claim (text, bigint, float8, bigint, text, float8, timestamptz) AS " + claim
        )
        plans = []
        for mode in ("force_custom_plan", "force_generic_plan"):
            db.execute(f"SET plan_cache_mode = {mode}")
            found = db.execute(
                f"EXPLAIN EXECUTE claim('{send.newsletter}', {send.id}, 0, 32, 'w', 60,"
                " '2026-01-01')"
            ).fetchall()
            plans.append("\n".join(line for (line,) in found))
        db.execute("SET plan_cache_mode = auto")
        custom, generic = plans
        # The planner knows the send's size from the start (the plan's ANALYZE).
        assert "rows=10000 " in custom, custom
        # Each row by its key, never a walk through the send or the list: neither a
        # scan nor a bitmap of all their rows, whichever plan the server keeps.
        for plan in plans:
            assert "Index Scan using deliveries_pending" in plan, plan
            assert "Index Scan using deliveries_pkey on deliveries" in plan, plan
            assert "Seq Scan" not in plan, plan
            assert "Bitmap Heap Scan" not in plan, plan
        assert generic  # both plans were read
    finally:
        ledger.close()


@pytest.mark.postgresql_only
def test_a_claim_takes_a_row_another_transaction_changed_while_it_ran(
    postgres_url: str,
) -> None:
    # Bounce processing notes a late report on a deferred row while a sender claims it.
    # The claim's lock follows the row to its newest version; the claim must take that
    # version, not drop the row (found by its ctid, it was dropped: locked, unclaimed).
    import psycopg

    from qant_mail.store.ledger import _CLAIM_SHARED

    with Subscribers(open_store(postgres_url)) as readers:
        for n in range(5):
            readers.add(f"r{n}@example.com", f"R {n}")
    ledger = Ledger(postgres_url)
    send = ledger.plan("2024-01-08", "hash", "Sujet")
    ledger.close()
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        admin.execute(
            "UPDATE deliveries SET state = 'deferred', next_attempt_at = 0 WHERE send_id = %s",
            (send.id,),
        )
    # The claim's scan dwells on row 1 (pg_sleep): the other commit lands between the
    # statement's snapshot and its lock of that row.
    slow = "d.state = 'deferred' AND (d.position <> 1 OR pg_sleep(1) IS NOT NULL)"
    claim = _CLAIM_SHARED.format(condition=slow, order="next_attempt_at, position", most=32)

    def note_a_report() -> None:
        time.sleep(0.3)
        with psycopg.connect(postgres_url, autocommit=True) as other:
            other.execute(
                "UPDATE deliveries SET bounce = 'soft: mailbox full'"
                " WHERE send_id = %s AND position = 1",
                (send.id,),
            )

    late = threading.Thread(target=note_a_report)
    late.start()
    db = open_store(postgres_url)
    try:
        claimed = db.execute(
            claim, (send.newsletter, send.id, time.time(), 32, "w", time.time() + 60, now_text())
        ).fetchall()
    finally:
        late.join()
        db.close()
    assert sorted(row[0] for row in claimed) == [1, 2, 3, 4, 5]
    ledger = Ledger(postgres_url)
    try:
        rows = {d.position: d for d in ledger.deliveries(send, *State)}
        assert {rows[p].state for p in rows} == {State.SENDING}
    finally:
        ledger.close()


def test_a_counted_link_leads_where_it_was_registered_and_counts_by_day(
    any_store: str | Path,
) -> None:
    db = open_store(any_store)
    try:
        clicks = Clicks(db)
        clicks.register("default", "2024-01-08", ["https://a.example/", "https://b.example/"])
        clicks.register("default", "2024-01-08", ["https://changed.example/"])  # first stays
        assert clicks.follow("2024-01-08", 1, "2024-01-08") == "https://a.example/"
        assert clicks.follow("2024-01-08", 1, "2024-01-09") == "https://a.example/"
        assert clicks.follow("2024-01-08", 3, "2024-01-09") is None
        assert clicks.target("2024-01-08", 2) == "https://b.example/"
        counted = {(c.number, c.url): c.clicks for c in clicks.counts()}
        assert counted == {(1, "https://a.example/"): 2, (2, "https://b.example/"): 0}
        assert {c.number: c.clicks for c in clicks.counts("2024-01-09")} == {1: 1, 2: 0}
    finally:
        db.close()
