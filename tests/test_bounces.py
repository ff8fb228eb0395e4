"""Bounces and complaints close the loop: each report of tests/bounces (DSNs as Postfix,
Exim, Gmail, Outlook and Yahoo write them, ARF complaints, and what is none of these)
is matched to its reader and issue, and changes exactly what it should."""

from __future__ import annotations

import dataclasses
import mailbox
import os
import re
import sqlite3
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings, strategies

from qant_mail.app.bounces import Letter, Outcome, process
from qant_mail.app.context import Context
from qant_mail.audience import tokens
from qant_mail.base.config import Bounces, Settings, load_settings
from qant_mail.base.errors import ExitCode
from qant_mail.delivery.bounces import ACTING, read
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
    "postfix-delayed": (Outcome.DELAYED, "reader2", "active"),
    "postfix-mailbox-full": (Outcome.SOFT, "reader2", "active"),
    "postfix-gave-up": (Outcome.SOFT, "reader9", "active"),
    "postfix-delivered": (Outcome.DELIVERED, "reader0", "active"),
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
    "not-ours": (Outcome.UNPROVEN, "reader0", "active"),
}


@dataclasses.dataclass
class Sent:
    """An issue sent to ten readers, with what each message carried."""

    settings: Settings
    verp: dict[str, str]
    message_id: dict[str, str]
    unsubscribe: dict[str, str]

    def fill(self, name: str, folder: Path = CORPUS) -> bytes:
        data = (folder / f"{name}.eml").read_bytes()
        upper = {k: v.upper() for k, v in self.verp.items()}
        tables = {
            "verp": self.verp,
            "verp_upper": upper,
            "message_id": self.message_id,
            "unsubscribe": self.unsubscribe,
        }

        def value(match: re.Match[bytes]) -> bytes:
            return tables[match[1].decode()][match[2].decode()].encode()

        return re.sub(rb"\{(\w+):(\w+)\}", value, data)

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
        Context(sent.settings, secret=SECRET.encode()), [Letter(name, sent.fill(name))]
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
        assert bounce.startswith(("soft: 5.2.2", "soft: 4.4.7"))
    elif outcome is Outcome.COMPLAINT:
        assert complaint == "feedback type abuse"
    else:
        assert (bounce, complaint) == ("", "")


def test_soft_bounces_count_once_a_send_and_mark_an_address_bounced_at_the_limit(
    sent: Sent,
) -> None:
    settings = dataclasses.replace(
        sent.settings, bounces=Bounces(address="bounces@qant.example", soft_limit=2)
    )
    ctx = Context(settings, secret=SECRET.encode())
    full = sent.fill("postfix-mailbox-full")
    process(ctx, [Letter("a", full)])
    # The same report again is read once only; another report of the same send is
    # another copy of the same news, and counts once.
    again = process(ctx, [Letter("b", full)])
    assert [f.outcome for f in again.findings] == [Outcome.ALREADY]
    other = full.replace(b"Message-Id: <", b"Message-Id: <other.")
    assert [f.outcome for f in process(ctx, [Letter("c", other)]).findings] == [Outcome.SOFT]
    assert sent.status("reader2") == "active"
    # A second send full too: the limit is reached.
    second = settings.issues_dir / "2023-11-27.yaml"
    second.write_text((settings.issues_dir / "2023-11-20.yaml").read_text(), encoding="utf-8")
    transport = MemoryTransport()
    send_to_list(prepare_send(second, settings), settings, transport)
    (verp,) = [s for s, r, _ in transport.messages if r == "reader2@example.com"]
    later = full.replace(sent.verp["reader2"].encode(), verp.encode())
    later = later.replace(b"Message-Id: <", b"Message-Id: <later.")
    assert [f.outcome for f in process(ctx, [Letter("d", later)]).findings] == [Outcome.SOFT]
    assert sent.status("reader2") == "bounced"


def test_a_delay_warning_and_a_delivery_notice_change_nobody(sent: Sent) -> None:
    ctx = Context(sent.settings, secret=SECRET.encode())
    for name in ("postfix-delayed", "postfix-delivered"):
        for copy in range(3):  # however many come
            data = sent.fill(name).replace(b"Message-Id: <", f"Message-Id: <{copy}.".encode())
            process(ctx, [Letter(f"{name}-{copy}", data)])
    assert {sent.status(f"reader{n}") for n in range(10)} == {"active"}
    assert sent.row("reader2") == ("", "")


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
    assert "hard bounce 6, soft bounce 2, complaint 1" in first.stderr
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
    assert "neither a Maildir, an mbox" in result.stderr  # type: ignore[attr-defined]


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


# ---- hostile reports: the corpus of tests/bad/bounces, through the real command ----------

BAD = ROOT / "tests" / "bad"
HOSTILE: dict[str, dict[str, Any]] = tomllib.loads(
    (BAD / "cases.toml").read_text(encoding="utf-8")
)["bounces"]


def _made(kind: str) -> bytes:
    if kind == "deep":  # a report nested a thousand parts deep
        head = b"From: MAILER-DAEMON@relay.example\nDelivered-To: lettre@qant.example\n"
        nest = b"".join(
            b'Content-Type: multipart/mixed; boundary="b%d"\n\n--b%d\n' % (n, n)
            for n in range(1000)
        )
        return head + b"MIME-Version: 1.0\n" + nest + b"Content-Type: text/plain\n\nx\n"
    assert kind == "huge"  # past the size a report is read at
    return b"Subject: big\n\n" + b"x" * (11 * 2**20)


def _statuses(sent: Sent) -> dict[str, str]:
    return {f"reader{n}": sent.status(f"reader{n}") for n in range(10)}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_a_hostile_report_changes_only_whom_it_proves_and_never_fails(
    sent: Sent, name: str, tmp_path: Path
) -> None:
    spec = HOSTILE[name]
    data = _made(spec["make"]) if "make" in spec else sent.fill(name, BAD / "bounces")
    path = tmp_path / f"{name}.eml"
    path.write_bytes(data)
    env = {"QANT_SECRET_KEY": SECRET, "QANT_BOUNCES_ADDRESS": "bounces@qant.example"}
    before = _statuses(sent)
    outcome = run_cli(["bounces", str(path)], cwd=sent.settings.root, env=env)
    assert outcome.traceback == "", outcome.traceback
    assert "Traceback" not in outcome.stderr, outcome.stderr  # nor a library's, logged
    assert outcome.exit_code == ExitCode.OK, outcome.output
    assert spec["says"] in outcome.stdout, outcome.output
    after = _statuses(sent)
    assert sorted(r for r in after if after[r] != before[r]) == spec.get("changed", [])
    # Through a mail server's pipe: read once already, never bounced back.
    piped = run_cli(["bounces", "-"], cwd=sent.settings.root, env=env, stdin=data)
    assert piped.exit_code == 0, piped.output
    assert piped.traceback == ""


def test_a_maildir_run_goes_past_what_it_cannot_read_and_ends_with_its_summary(
    sent: Sent, tmp_path: Path
) -> None:
    folder = mailbox.Maildir(tmp_path / "Maildir", create=True)
    folder.add(_made("deep"))
    folder.add(sent.fill("postfix-hard"))
    unreadable = Path(folder._path) / "new" / "unreadable.eml"
    unreadable.mkdir()  # a folder where a message's file should be
    folder.add(sent.fill("gmail-hard"))
    env = {"QANT_SECRET_KEY": SECRET, "QANT_BOUNCES_ADDRESS": "bounces@qant.example"}
    outcome = run_cli(["bounces", str(tmp_path / "Maildir")], cwd=sent.settings.root, env=env)
    assert outcome.exit_code == ExitCode.OK, outcome.output
    assert outcome.traceback == ""
    assert "hard bounce 2, unreadable 1" in outcome.stderr
    assert {sent.status("reader1"), sent.status("reader4")} == {"bounced"}


def test_the_whole_hostile_corpus_leaves_no_traceback_on_a_real_terminal(
    sent: Sent, tmp_path: Path
) -> None:
    """In a process of its own, as a mail server's pipe or an editor runs it: what a
    library logs goes to the real stderr (the forked runs above capture only what
    escapes the command)."""
    folder = mailbox.Maildir(tmp_path / "Maildir", create=True)
    for name, spec in sorted(HOSTILE.items()):
        folder.add(_made(spec["make"]) if "make" in spec else sent.fill(name, BAD / "bounces"))
    env = {
        **os.environ,
        "QANT_SECRET_KEY": SECRET,
        "QANT_BOUNCES_ADDRESS": "bounces@qant.example",
        "QANT_CONFIG": str(sent.settings.path),
    }
    done = subprocess.run(
        [sys.executable, "-m", "qant_mail", "bounces", str(tmp_path / "Maildir")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == ExitCode.OK, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert f"{len(HOSTILE)} read:" in done.stderr


def test_a_single_message_file_is_read_as_one_message(sent: Sent, tmp_path: Path) -> None:
    path = tmp_path / "report.eml"
    path.write_bytes(sent.fill("postfix-hard"))
    env = {"QANT_SECRET_KEY": SECRET, "QANT_BOUNCES_ADDRESS": "bounces@qant.example"}
    outcome = run_cli(["bounces", str(path)], cwd=sent.settings.root, env=env)
    assert "1 read: hard bounce 1" in outcome.stderr, outcome.output


def test_the_pipe_reads_what_needs_no_secret_and_waits_for_the_rest(
    sent: Sent, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("QANT_SECRET_KEY")  # the pipe's environment has no secret
    env = {"QANT_BOUNCES_ADDRESS": "bounces@qant.example"}
    spam = (
        b"From: promo@spam.example\nTo: bounces@qant.example\nSubject: Gagnez un iPhone\n\n"
        b"Cliquez ici.\n"
    )
    reply = run_cli(["bounces", "-"], cwd=sent.settings.root, env=env, stdin=spam)
    assert reply.exit_code == 0, reply.output
    assert "not a bounce" in reply.stdout
    bounce = run_cli(
        ["bounces", "-"], cwd=sent.settings.root, env=env, stdin=sent.fill("postfix-hard")
    )
    assert bounce.exit_code == ExitCode.TEMPFAIL, bounce.output
    assert "bounces are matched by what it signs" in bounce.stderr
    assert "unsubscribe links" not in bounce.stderr


@settings(max_examples=150, derandomize=True, deadline=None)
@given(strategies.binary(max_size=3000) | strategies.sampled_from([b"", b"\x00" * 100]))
def test_fuzzed_reports_never_fail_and_change_nobody(data: bytes) -> None:
    report_settings = load_settings(ROOT / "qant.toml", env={})
    reading = read(data, lambda: SECRET.encode(), report_settings)
    assert reading.outcome not in ACTING or reading.verp is None
