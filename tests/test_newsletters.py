"""Several newsletters in one installation: settings, issues, lists, sends, links, the
archive, and a store made before there were several."""

from __future__ import annotations

import dataclasses
import email
import sqlite3
from email import policy
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from qant_mail.app.context import Context
from qant_mail.audience import tokens
from qant_mail.authoring.archive import build_archive
from qant_mail.authoring.render import Renderer
from qant_mail.base.config import Settings, Store, load_settings
from qant_mail.base.errors import ConfigError
from qant_mail.delivery.compose import Recipient
from qant_mail.delivery.transport import MemoryTransport
from qant_mail.store import schema
from qant_mail.store.db import Connection, open_store
from qant_mail.store.ledger import Ledger
from qant_mail.store.subscribers import Status, Subscribers
from qant_mail.web.serve import create_app
from tests.conftest import SAMPLE, check, prepare_send, send_to_list

SECRET = b"the-site-secret-for-these-tests"
FINANCE = """
[newsletters.finance]
name = "Qant Finance"
title = "Qant Finance : l’IA et les marchés"
description = "Chaque lundi."

[newsletters.finance.sender]
address = "finance@qant.example"

[newsletters.finance.labels]
unsubscribe = "Quitter Qant Finance"
"""


@pytest.fixture
def two(project: Path) -> Settings:
    """The project's settings with a second newsletter, `finance`."""
    path = project / "qant.toml"
    path.write_text(path.read_text() + FINANCE, encoding="utf-8")
    return load_settings(path, env={})


def finance_issue(project: Path, name: str = "2024-01-15-finance.yaml") -> Path:
    text = SAMPLE.read_text(encoding="utf-8").replace(
        "subject:", "newsletter: finance\nsubject:", 1
    )
    path = project / "issues" / name
    path.write_text(text, encoding="utf-8")
    return path


def test_a_newsletter_inherits_what_it_does_not_set_and_keeps_its_own(two: Settings) -> None:
    finance = two.for_newsletter("finance")
    main = two.for_newsletter(None)
    assert list(two.editions) == ["default", "finance"]
    assert finance.newsletter.name == "Qant Finance"
    assert finance.newsletter.base_url == main.newsletter.base_url
    assert finance.newsletter.locale == "fr"
    assert finance.sender.address == "finance@qant.example"
    assert finance.sender.name == main.sender.name  # inherited inside a sub-table too
    assert finance.labels.unsubscribe == "Quitter Qant Finance"
    assert finance.labels.archive == main.labels.archive
    # Its own: never inherited.
    assert finance.newsletter.welcome == ""
    assert main.newsletter.welcome != ""
    assert finance.archive_url == "https://lettre.qant.example/finance"
    assert main.archive_url == "https://lettre.qant.example"
    assert finance.edition.list_id == "finance.finance.qant.example"
    assert main.edition.list_id == "lettre.qant.example"  # as before there were several


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('[newsletters."Finance"]\nname = "X"\n', "lower-case letters"),
        ("[newsletters.default]\nname = 'X'\n", "main newsletter's already"),
        ("[newsletters.finance]\nnmae = 'X'\n", "newsletters.finance.nmae: unknown key"),
        ("[newsletters.finance]\nid = 'x'\n", "newsletters.finance.id"),
        ("[newsletters.finance.sender]\naddress = 'nope'\n", "newsletters.finance.sender.address"),
        ("[newsletters.finance.sender]\npassword = 'x'\n", "secrets do not belong"),
    ],
)
def test_a_bad_newsletter_table_is_an_error_naming_its_key(
    project: Path, table: str, message: str
) -> None:
    path = project / "qant.toml"
    path.write_text(path.read_text() + "\n" + table, encoding="utf-8")
    with pytest.raises(ConfigError, match=message):
        load_settings(path, env={})


def test_an_issue_of_another_newsletter_is_rendered_and_sent_as_that_newsletter(
    project: Path, two: Settings
) -> None:
    path = finance_issue(project)
    prepared = prepare_send(path, two, secret=SECRET)
    assert prepared.newsletter == "finance"
    message = email.message_from_bytes(
        prepared.template.personalise(_recipient(1)), policy=policy.default
    )
    assert message["From"].addresses[0].addr_spec == "finance@qant.example"
    assert message["List-Id"] == "Qant Finance <finance.finance.qant.example>"
    assert "2024-01-15-finance:finance:" in message["Feedback-ID"]
    assert "/unsubscribe/AQ.finance." in message["List-Unsubscribe"]
    text = message.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert "Quitter Qant Finance" in text
    assert "https://lettre.qant.example/finance/2024-01-15-finance/" in prepared.rendered.web_url


def test_an_unknown_newsletter_in_an_issue_is_a_located_problem(
    project: Path, two: Settings
) -> None:
    path = project / "issues" / "2024-01-15.yaml"
    path.write_text(
        "date: 2024-01-15\nnewsletter: sport\nsubject: S\nsections:\n  - text: x\n",
        encoding="utf-8",
    )
    report = check(path, Renderer(two))
    (problem,) = report.problems
    assert (problem.line, problem.field) == (2, "newsletter")
    assert "no newsletter 'sport'" in problem.message
    assert "default, finance" in problem.message


def test_each_send_reaches_the_readers_of_its_newsletter_only(project: Path, two: Settings) -> None:
    with Subscribers.open(two.store_path) as main:
        main.import_rows("email\nboth@example.com\nmain@example.com\n", "t")
        finance = main.of("finance")
        report = finance.import_rows("email\nboth@example.com\nfin@example.com\n", "t")
        assert (report.added, report.unchanged) == (2, 0)  # `both` is new to finance
    transport = MemoryTransport()
    send_to_list(prepare_send(SAMPLE, two, secret=SECRET), two, transport)
    send_to_list(prepare_send(finance_issue(project), two, secret=SECRET), two, transport)
    got = [(r, b"finance@qant.example" in data) for _, r, data in transport.messages]
    assert sorted(got) == [
        ("both@example.com", False),
        ("both@example.com", True),
        ("fin@example.com", True),
        ("main@example.com", False),
    ]


def test_leaving_one_newsletter_keeps_the_other_and_a_bounce_stops_both(two: Settings) -> None:
    with Subscribers.open(two.store_path) as main:
        main.import_rows("email\nlea@example.com\nmax@example.com\n", "t")
        finance = main.of("finance")
        finance.import_rows("email\nlea@example.com\nmax@example.com\n", "t")
        ids = {s.email: s.id for s in main.all()}
    client = TestClient(create_app(Context(two, secret=SECRET), None), follow_redirects=False)
    token = tokens.make(SECRET, ids["lea@example.com"], "lea@example.com", "finance")
    page = client.get(f"/unsubscribe/{token}")
    assert "Ne plus recevoir Qant Finance" in page.text
    done = client.post(f"/unsubscribe/{token}", content=b"List-Unsubscribe=One-Click")
    assert done.status_code == 200
    # The link of one newsletter does not open another's: its MAC names it.
    forged = token.replace(".finance.", ".")
    assert client.post(f"/unsubscribe/{forged}", content=b"x").status_code == 404
    with Subscribers.open(two.store_path) as main:
        assert main.get("lea@example.com").status is Status.ACTIVE  # type: ignore[union-attr]
        assert main.of("finance").get("lea@example.com").status is Status.UNSUBSCRIBED  # type: ignore[union-attr]
        main.set_status("max@example.com", Status.BOUNCED, "550 no such user")
        for key in ("default", "finance"):
            assert main.of(key).get("max@example.com").status is Status.BOUNCED  # type: ignore[union-attr]
        assert main.of("finance").count()[Status.ACTIVE] == 0


def test_the_archive_has_one_folder_and_one_feed_per_newsletter(
    project: Path, two: Settings
) -> None:
    finance_issue(project)
    site = build_archive(two, project / "site").folder
    assert (site / "2023-11-20" / "index.html").is_file()
    assert (site / "finance" / "2024-01-15-finance" / "index.html").is_file()
    assert not (site / "2024-01-15-finance").exists()
    main_feed = (site / "feed.xml").read_text()
    finance_feed = (site / "finance" / "feed.xml").read_text()
    assert "2024-01-15-finance" not in main_feed
    assert "https://lettre.qant.example/finance/2024-01-15-finance/" in finance_feed
    assert "Qant Finance" in (site / "finance" / "index.html").read_text()


def test_a_catch_up_counts_the_readers_of_its_newsletter_only(project: Path, two: Settings) -> None:
    transport = MemoryTransport()
    prepared = prepare_send(finance_issue(project), two, secret=SECRET)
    with Subscribers.open(two.store_path) as main:
        main.of("finance").import_rows("email\nfirst@example.com\n", "t")
    send_to_list(prepared, two, transport)
    with Subscribers.open(two.store_path) as main:
        main.import_rows("email\nmain-only@example.com\n", "t")
        main.of("finance").import_rows("email\nlate@example.com\n", "t")
    report = send_to_list(prepared, two, transport, new_subscribers=True)
    assert [r for _, r, _ in transport.messages] == ["first@example.com", "late@example.com"]
    assert report.joined == 0


def _recipient(number: int) -> Recipient:
    return Recipient(f"reader{number}@example.com", "", number)


def _store_of_version_5(path: Path) -> None:
    """Write the store a qant-mail of before several newsletters made (schema 5)."""
    db = sqlite3.connect(path, isolation_level=None, factory=Connection)
    for step in schema.SQLITE[:5]:
        if callable(step):
            step(db)
        else:
            for statement in step.split(";"):
                if statement.strip():
                    db.execute(statement)
    db.execute("PRAGMA user_version = 5")
    rows = [
        ("active@example.com", "active", "", "2024-01-01T00:00:00+00:00"),
        ("left@example.com", "unsubscribed", "one-click", "2024-02-01T00:00:00+00:00"),
        ("gone@example.com", "bounced", "550 5.1.1", "2024-03-01T00:00:00+00:00"),
    ]
    for address, status, reason, when in rows:
        db.execute(
            "INSERT INTO subscribers (email, status, status_changed_at, status_reason,"
            " created_at, source) VALUES ($1, $2, $3, $4, '2023-12-01T00:00:00+00:00', 'import')",
            (address, status, when, reason),
        )
    db.execute(
        "INSERT INTO sends (issue, content_hash, subject, created_at)"
        " VALUES ('2023-11-20', 'h', 'S', '2024-01-02T00:00:00+00:00')"
    )
    db.close()


def test_a_store_of_the_single_newsletter_version_becomes_the_main_newsletters(
    tmp_path: Path, settings: Settings
) -> None:
    path = tmp_path / "old.db"
    _store_of_version_5(path)
    old_token = tokens.make(SECRET, 1, "active@example.com")  # mailed before the upgrade
    db = open_store(path)
    assert db.execute("PRAGMA user_version").fetchone() == (schema.VERSION,)
    store = Subscribers(db)
    assert [(s.email, s.status, s.status_reason) for s in store.all()] == [
        ("active@example.com", Status.ACTIVE, ""),
        ("left@example.com", Status.UNSUBSCRIBED, "one-click"),
        ("gone@example.com", Status.BOUNCED, "550 5.1.1"),
    ]
    left = store.get("left@example.com")
    assert left is not None
    assert left.status_changed_at == "2024-02-01T00:00:00+00:00"
    assert store.count()[Status.ACTIVE] == 1
    assert Ledger(path).find("2023-11-20").newsletter == "default"  # type: ignore[union-attr]
    db.close()
    moved = dataclasses.replace(settings, store=_store_at(path))
    app = create_app(Context(moved, secret=SECRET), None)
    client = TestClient(app, follow_redirects=False)
    assert client.post(f"/unsubscribe/{old_token}", content=b"List-Unsubscribe=One-Click").text
    with Subscribers.open(path) as store:
        assert store.get("active@example.com").status is Status.UNSUBSCRIBED  # type: ignore[union-attr]


def test_renaming_a_newsletter_moves_its_readers_and_sends(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    _store_of_version_5(path)
    with Subscribers.open(path) as store:
        assert store.rename_newsletter("default", "qant") == 3
        assert store.newsletters() == {"qant": 3}
        assert store.of("qant").count()[Status.ACTIVE] == 1
    assert Ledger(path).find("2023-11-20").newsletter == "qant"  # type: ignore[union-attr]


def _store_at(path: Path) -> Store:
    return Store(path=str(path))


def test_sends_and_status_name_the_newsletter_when_there_are_several(
    project: Path, two: Settings
) -> None:
    from typer.testing import CliRunner

    from qant_mail.cli import app

    with Subscribers.open(two.store_path) as main:
        main.of("finance").import_rows("email\nfin@example.com\n", "t")
    send_to_list(prepare_send(finance_issue(project), two, secret=SECRET), two, MemoryTransport())
    config = ["--config", str(project / "qant.toml")]
    listed = CliRunner().invoke(app, [*config, "sends"])
    assert listed.exit_code == 0, listed.output
    header, row = listed.output.splitlines()[:2]
    assert header.split()[:2] == ["issue", "newsletter"]
    assert row.split()[:2] == ["2024-01-15-finance", "finance"]
    status = CliRunner().invoke(app, [*config, "status", "2024-01-15-finance"])
    assert status.output.startswith("2024-01-15-finance (finance): ")
