"""The subscriber store: statuses, imports that are idempotent, exports, migrations."""

from __future__ import annotations

import csv
import io
import random
import sqlite3
import string
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from email_validator import EmailNotValidError, validate_email
from typer.testing import Result

from qant_mail.base.addresses import AddressChecker, AddressError
from qant_mail.base.errors import ExitCode
from qant_mail.store import schema
from qant_mail.store.db import StoreError, open_store
from qant_mail.store.subscribers import Status, SubscriberError, Subscribers

Cli = Callable[..., Result]


@pytest.fixture
def store(tmp_path: Path, store_kind: str, request: pytest.FixtureRequest) -> Iterator[Subscribers]:
    """A new list: a SQLite file, or a PostgreSQL database of its own."""
    if store_kind == "postgresql":
        opened = Subscribers.open(request.getfixturevalue("postgres_url"))
    else:
        opened = Subscribers.open(tmp_path / "subscribers.db")
    yield opened
    opened.close()


def test_addresses_are_unique_whatever_their_case(store: Subscribers) -> None:
    store.add("Jean.Dupont@Example.com", "Jean")
    with pytest.raises(SubscriberError, match="already subscribed"):
        store.add("jean.dupont@example.COM")
    found = store.get("JEAN.DUPONT@EXAMPLE.COM")
    assert found is not None
    assert found.email == "jean.dupont@example.com"  # one reader: stored in lower case


def test_status_changes_record_when_and_why(store: Subscribers) -> None:
    store.add("a@example.com")
    changed = store.unsubscribe("a@example.com", "one-click")
    assert (changed.status, changed.status_reason) == (Status.UNSUBSCRIBED, "one-click")
    assert changed.status_changed_at >= changed.created_at


def test_an_unsubscribed_address_is_reactivated_only_on_purpose(store: Subscribers) -> None:
    store.add("a@example.com")
    store.unsubscribe("a@example.com")
    with pytest.raises(SubscriberError, match="--resubscribe"):
        store.add("a@example.com")
    assert store.add("a@example.com", resubscribe=True).status is Status.ACTIVE


def test_import_reports_rejects_with_line_numbers_and_goes_on(store: Subscribers) -> None:
    report = store.import_rows(
        "email,name\n"
        "un@example.com,Un\n"
        "pas une adresse,Deux\n"
        "\n"
        "trois@example.com,\n"
        "Un@Example.com,Encore un\n"
        "quatre@localhost,Quatre\n"
        'cinq@example.com,"Cinq\nsur deux lignes"\n',
        "test",
    )
    assert report.added == 2
    assert report.duplicates == 1
    assert [line for line, _ in report.rejected] == [3, 7, 9]
    assert "not a valid address" in report.rejected[0][1]
    assert "line break" in report.rejected[2][1]


def test_import_is_idempotent_and_never_reactivates(store: Subscribers) -> None:
    rows = "email,name\na@example.com,A\nb@example.com,B\n"
    store.import_rows(rows, "first")
    store.unsubscribe("b@example.com")
    again = store.import_rows(rows, "second")
    assert (again.added, again.unchanged, again.inactive) == (0, 1, 1)
    b = store.get("b@example.com")
    assert b is not None
    assert b.status is Status.UNSUBSCRIBED
    assert store.count()[Status.ACTIVE] == 1


def test_import_accepts_a_bom_semicolons_and_no_name(tmp_path: Path, store: Subscribers) -> None:
    path = tmp_path / "liste.csv"
    path.write_bytes("\ufeffEmail;Nom\nlea@example.com;Léa\n".encode())
    report = store.import_csv(path)
    assert report.added == 1
    lea = store.get("lea@example.com")
    assert lea is not None
    assert lea.name == ""  # no `name` column: "Nom" is not it
    assert lea.source == "import liste.csv"


def test_bad_csv_files_are_clear_errors(tmp_path: Path, store: Subscribers) -> None:
    latin = tmp_path / "latin.csv"
    latin.write_bytes("email,name\nzoé@example.com,Zoé\n".encode("latin-1"))
    with pytest.raises(SubscriberError, match=r"latin\.csv:2: not UTF-8"):
        store.import_csv(latin)
    no_column = tmp_path / "colonnes.csv"
    no_column.write_text("adresse,nom\na@example.com,A\n")
    with pytest.raises(SubscriberError, match="no `email` column"):
        store.import_csv(no_column)
    with pytest.raises(SubscriberError, match="cannot read"):
        store.import_csv(tmp_path / "absent.csv")
    assert sum(store.count().values()) == 0


def test_export_round_trips(store: Subscribers) -> None:
    store.import_rows('email,name\na@example.com,Ann\nb@example.com,"Dupont, Bob"\n', "t")
    store.unsubscribe("a@example.com")
    out = io.StringIO()
    assert store.export(out) == 2
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert [(r["email"], r["name"], r["status"]) for r in rows] == [
        ("a@example.com", "Ann", "unsubscribed"),
        ("b@example.com", "Dupont, Bob", "active"),
    ]


def test_the_address_checker_agrees_with_email_validator() -> None:
    rng = random.Random(4)
    alphabet = string.ascii_letters + string.digits + ".-_+!#'\"() @é"
    domains = ["example.com", "exa_mple.com", "localhost", "xn--bcher-kva.example", "a..b.com"]
    checker = AddressChecker()
    for _ in range(3000):
        local = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        address = f"{local}@{rng.choice(domains)}"
        try:
            # Cells of a CSV file come with stray spaces: both sides strip them.
            expected = validate_email(address.strip(), check_deliverability=False)
            reference = not expected.smtputf8
        except EmailNotValidError:
            reference = False
        try:
            checker.check(address)
            ours = True
        except AddressError:
            ours = False
        assert ours == reference, address


def test_database_is_migrated_from_an_older_version(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    old = sqlite3.connect(path)
    first = schema.SQLITE[0]
    assert isinstance(first, str)
    old.executescript(first + ";PRAGMA user_version = 1;")
    old.execute(
        "INSERT INTO subscribers (email, status_changed_at, created_at) VALUES ('a@b.fr', 'x', 'x')"
    )
    old.commit()
    old.close()
    connection = open_store(path)
    assert connection.execute("PRAGMA user_version").fetchone() == (schema.VERSION,)
    assert connection.execute("SELECT count(*) FROM sends").fetchone() == (0,)
    assert connection.execute("SELECT email FROM subscribers").fetchone() == ("a@b.fr",)


def test_a_newer_or_foreign_database_is_refused(tmp_path: Path) -> None:
    newer = tmp_path / "newer.db"
    connection = sqlite3.connect(newer)
    connection.execute(f"PRAGMA user_version = {schema.VERSION + 1}")
    connection.close()
    with pytest.raises(StoreError, match="newer than this qant-mail"):
        open_store(newer)
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database, not at all" * 100)
    with pytest.raises(StoreError, match="not a qant-mail database"):
        open_store(junk)


def test_subscribers_commands(cli: Cli, project: Path) -> None:
    (project / "liste.csv").write_text("email,name\na@example.com,A\nmauvaise,B\n")
    imported = cli("subscribers", "import", "liste.csv")
    assert imported.exit_code == ExitCode.PARTIAL
    assert "added 1" in imported.stdout
    assert "liste.csv:3: 'mauvaise' is not a valid address" in imported.stderr
    assert cli("subscribers", "add", "b@example.com", "--name", "Bé").exit_code == ExitCode.OK
    assert cli("subscribers", "unsubscribe", "a@example.com").exit_code == ExitCode.OK
    counted = cli("subscribers", "count")
    assert "active\t1" in counted.stdout
    assert "unsubscribed\t1" in counted.stdout
    listed = cli("subscribers", "list", "--status", "active")
    assert listed.stdout.startswith("b@example.com\tBé\tactive\t")
    exported = cli("subscribers", "export", "export.csv")
    assert exported.exit_code == ExitCode.OK
    assert (project / "export.csv").read_text().count("\n") == 3
    assert cli("subscribers", "remove", "a@example.com").exit_code == ExitCode.OK
    missing = cli("subscribers", "remove", "a@example.com")
    assert missing.exit_code == ExitCode.INVALID
    assert "not on the list" in missing.stderr
    bad = cli("subscribers", "add", "a b@example.com")
    assert bad.exit_code == ExitCode.INVALID
    assert bad.stderr.startswith("error: 'a b@example.com' is not a valid address")
