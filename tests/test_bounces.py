"""Bounces and complaints close the loop: each report of tests/bounces (DSNs as Postfix,
Exim, Gmail, Outlook and Yahoo write them, ARF complaints, and what is none of these)
is matched to its reader and issue, and changes exactly what it should."""

from __future__ import annotations

import dataclasses
import mailbox
import re
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from qant_mail.app.bounces import Outcome, process
from qant_mail.app.context import Context
from qant_mail.audience import tokens
from qant_mail.base.config import Bounces, Settings
from qant_mail.base.errors import ExitCode
from qant_mail.delivery.transport import MemoryTransport
from qant_mail.store.subscribers import Subscribers
from tests.conftest import ROOT, prepare_send, send_to_list
from tests.imap_server import ImapServer, ImapState
from tests.isolated import run_cli

CORPUS = ROOT / "tests" / "bounces"
SECRET = "a-test-secret-that-is-long-enough"
# file → (outcome, reader concerned, status of that reader afterwards)
EXPECTED: dict[str, tuple[Outcome, str, str]] = {
    "postfix-hard": (Outcome.HARD, "reader1", "bounced"),
    "postfix-delayed": (Outcome.SOFT, "reader2", "active"),
    "exim-hard": (Outcome.HARD, "reader3", "bounced"),
    "gmail-hard": (Outcome.HARD, "reader4", "bounced"),
    "outlook-hard": (Outcome.HARD, "reader5", "bounced"),
    "yahoo-hard": (Outcome.HARD, "reader6", "bounced"),
    "arf-complaint": (Outcome.COMPLAINT, "reader7", "complained"),
    "arf-not-spam": (Outcome.NOT_SPAM, "reader0", "active"),
    "reader-reply": (Outcome.NOT_A_BOUNCE, "reader0", "active"),
    "out-of-office": (Outcome.NOT_A_BOUNCE, "reader0", "active"),
    "forged-verp": (Outcome.FORGED, "reader0", "active"),
    "dsn-without-verp": (Outcome.HARD, "reader8", "bounced"),
    "not-ours": (Outcome.UNMATCHED, "reader0", "active"),
}


@dataclasses.dataclass
class Sent:
    """An issue sent to ten readers, with what each message carried."""

    settings: Settings
    verp: dict[str, str]
    message_id: dict[str, str]
    unsubscribe: dict[str, str]

    def fill(self, name: str) -> bytes:
        text = (CORPUS / f"{name}.eml").read_text(encoding="utf-8")
        tables = {"verp": self.verp, "message_id": self.message_id, "unsubscribe": self.unsubscribe}
        text = re.sub(r"\{(\w+):(\w+)\}", lambda m: tables[m[1]][m[2]], text)
        return text.encode("utf-8")

    def status(self, reader: str) -> str:
        store = Subscribers.open(self.settings.store_path)
        found = store.get(f"{reader}@example.com")
        store.close()
        assert found is not None
        return found.status.value

    def row(self, reader: str) -> tuple[str, str]:
        with sqlite3.connect(self.settings.store_path) as db:
            found = db.execute(
                "SELECT bounce, complaint FROM deliveries WHERE email = $1",
                (f"{reader}@example.com",),
            ).fetchone()
        assert found is not None
        return found[0], found[1]


@pytest.fixture
def sent(project_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Sent:
    monkeypatch.setenv("QANT_SECRET_KEY", SECRET)
    settings = dataclasses.replace(
        project_settings, bounces=Bounces(address="bounces@qant.example")
    )
    store = Subscribers.open(settings.store_path)
    store.import_rows("email\n" + "".join(f"reader{n}@example.com\n" for n in range(10)), "t")
    store.close()
    transport = MemoryTransport()
    prepared = prepare_send(settings.issues_dir / "2023-11-20.yaml", settings)
    send_to_list(prepared, settings, transport)
    verp, ids, links = {}, {}, {}
    for sender, recipient, data in transport.messages:
        reader = recipient.split("@")[0]
        verp[reader] = sender
        head = data.split(b"\r\n\r\n", 1)[0].decode()
        found_id = re.search(r"Message-ID: (<[^>]+>)", head)
        found_link = re.search(r"List-Unsubscribe:\s*<([^>]+)>", head)
        assert found_id is not None
        assert found_link is not None
        ids[reader], links[reader] = found_id[1], found_link[1]
    return Sent(settings, verp, ids, links)


def test_each_message_has_a_signed_verp_return_path(sent: Sent) -> None:
    for reader, address in sent.verp.items():
        local, _, domain = address.partition("@")
        assert domain == "qant.example"
        assert local.startswith("bounces+")
        assert tokens.read_return(SECRET.encode(), local.removeprefix("bounces+")) is not None
        assert len(local) <= 64, reader


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_report_is_classified_and_acted_on(sent: Sent, name: str) -> None:
    outcome, reader, status_after = EXPECTED[name]
    before = {f"reader{n}": sent.status(f"reader{n}") for n in range(10)}
    report = process(
        Context(sent.settings, secret=SECRET.encode()), iter([(name, sent.fill(name))])
    )
    assert [f.outcome for f in report.findings] == [outcome], report.findings
    after = {f"reader{n}": sent.status(f"reader{n}") for n in range(10)}
    assert after[reader] == status_after
    # Nobody else's standing changed.
    assert {r: s for r, s in after.items() if r != reader} == {
        r: s for r, s in before.items() if r != reader
    }
    bounce, complaint = sent.row(reader)
    if outcome is Outcome.HARD:
        assert bounce.startswith("hard:")
        assert report.findings[0].issue == "2023-11-20"
    elif outcome is Outcome.SOFT:
        assert bounce.startswith("soft: 4.2.2")
    elif outcome is Outcome.COMPLAINT:
        assert complaint == "feedback type abuse"
    else:
        assert (bounce, complaint) == ("", "")


def test_soft_bounces_mark_an_address_bounced_at_the_limit(sent: Sent) -> None:
    settings = dataclasses.replace(
        sent.settings, bounces=Bounces(address="bounces@qant.example", soft_limit=2)
    )
    delayed = sent.fill("postfix-delayed")
    process(Context(settings, secret=SECRET.encode()), iter([("a", delayed)]))
    # The same report again is read once only; another one counts.
    again = process(Context(settings, secret=SECRET.encode()), iter([("b", delayed)]))
    assert [f.outcome for f in again.findings] == [Outcome.ALREADY]
    assert sent.status("reader2") == "active"
    other = delayed.replace(b"Will-Retry-Until", b"X-Next: 1\r\nWill-Retry-Until")
    store = Subscribers.open(settings.store_path)
    store.db.execute("UPDATE deliveries SET bounce = '' WHERE email = 'reader2@example.com'")
    store.close()
    process(Context(settings, secret=SECRET.encode()), iter([("c", other)]))
    assert sent.status("reader2") == "bounced"


def test_a_whole_maildir_and_an_mbox_are_read_once(sent: Sent, tmp_path: Path) -> None:
    folder = mailbox.Maildir(tmp_path / "Maildir", create=True)
    box = mailbox.mbox(tmp_path / "mbox", create=True)
    for name in sorted(EXPECTED):
        folder.add(sent.fill(name))
        box.add(sent.fill(name))
    box.close()
    env = {"QANT_SECRET_KEY": SECRET, "QANT_BOUNCES_ADDRESS": "bounces@qant.example"}
    root = sent.settings.root
    first = run_cli(["bounces", str(tmp_path / "Maildir")], cwd=root, env=env)
    assert first.exit_code == ExitCode.OK, first.output
    assert "hard bounce 6, soft bounce 1, complaint 1" in first.stderr
    assert "reader1@example.com (2023-11-20): 5.1.1" in first.stdout
    second = run_cli(["bounces", str(tmp_path / "mbox")], cwd=root, env=env)
    assert f"already read {len(EXPECTED)}" in second.stderr


def test_the_mail_pipe_never_bounces_a_bounce(sent: Sent) -> None:
    env = {"QANT_SECRET_KEY": SECRET, "QANT_BOUNCES_ADDRESS": "bounces@qant.example"}
    for data in (sent.fill("postfix-hard"), b"", b"\x00\xff garbage", sent.fill("reader-reply")):
        outcome = run_cli(["bounces", "-"], cwd=sent.settings.root, env=env, stdin=data)
        assert outcome.exit_code == 0, outcome.output
        assert outcome.traceback == ""


def test_a_source_that_is_none_is_an_error(sent: Sent, cli: Callable[..., object]) -> None:
    result = cli("bounces", "nowhere", env={"QANT_SECRET_KEY": SECRET})
    assert result.exit_code == ExitCode.UNAVAILABLE  # type: ignore[attr-defined]
    assert "neither a Maildir, an mbox file" in result.stderr  # type: ignore[attr-defined]


def test_an_imap_folder_is_read_and_its_reports_marked_seen(sent: Sent) -> None:
    state = ImapState("bounces", "mot de passe")
    for uid, name in enumerate(("postfix-hard", "arf-complaint", "reader-reply"), start=1):
        state.messages[uid] = sent.fill(name)
    env = {
        "QANT_SECRET_KEY": SECRET,
        "QANT_BOUNCES_ADDRESS": "bounces@qant.example",
        "QANT_BOUNCES_PASSWORD": "mot de passe",
    }
    with ImapServer(state):
        source = f"imap://bounces@127.0.0.1:{state.port}/INBOX"
        outcome = run_cli(["bounces", source], cwd=sent.settings.root, env=env)
        assert outcome.exit_code == ExitCode.OK, outcome.output
        assert "hard bounce 1, complaint 1, not a bounce 1" in outcome.stderr
        assert state.seen == {1, 2, 3}
        wrong = run_cli(
            ["bounces", source],
            cwd=sent.settings.root,
            env={**env, "QANT_BOUNCES_PASSWORD": "faux"},
        )
        assert wrong.exit_code == ExitCode.UNAVAILABLE
        assert "cannot read 127.0.0.1" in wrong.stderr
        assert "faux" not in wrong.output
    assert sent.status("reader1") == "bounced"
    assert sent.status("reader7") == "complained"
