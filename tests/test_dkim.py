"""DKIM: every message signed (RSA, Ed25519 or both) over the headers that matter, each
over-signed, so that no copy can be added; verified by dkimpy, which no one here wrote."""

from __future__ import annotations

import contextlib
import dataclasses
import email
import os
import re
import sqlite3
import subprocess
from collections.abc import Callable
from email import policy
from pathlib import Path

import dkim as dkimpy
import pytest
from dkim.canonicalization import Relaxed
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import Result

from qant_mail.app import issues, sending
from qant_mail.app.context import Context
from qant_mail.authoring.render import RenderedIssue
from qant_mail.base.config import Dkim, Settings
from qant_mail.base.errors import ConfigError, ExitCode, SendError
from qant_mail.delivery import dkim
from qant_mail.delivery.compose import MessageTemplate, Recipient, notice
from qant_mail.delivery.outbox import Outbox, Rules
from qant_mail.delivery.transport import SmtpTransport
from qant_mail.store.ledger import State
from tests.smtp_server import SmtpServer
from tests.test_send import SAMPLE, subscribe

Dns = Callable[..., bytes]


@pytest.fixture(scope="module")
def keys() -> dict[str, tuple[bytes, str]]:
    """An RSA and an Ed25519 key: (private PEM, public `p=` value)."""
    return {kind: dkim.generate(kind) for kind in ("rsa", "ed25519")}


def env_of(keys: dict[str, tuple[bytes, str]], *kinds: str) -> dict[str, str]:
    variables = {"rsa": dkim.RSA_VARIABLE, "ed25519": dkim.ED25519_VARIABLE}
    return {variables[kind]: keys[kind][0].decode() for kind in kinds}


def dns(keys: dict[str, tuple[bytes, str]]) -> Dns:
    records = {
        b"rsa2026._domainkey.qant.example.": dkim.dns_record("rsa", keys["rsa"][1]),
        b"ed2026._domainkey.qant.example.": dkim.dns_record("ed25519", keys["ed25519"][1]),
    }

    def lookup(name: bytes, timeout: int = 5) -> bytes:
        return records[name].encode()

    return lookup


def signing(settings: Settings, *kinds: str) -> Settings:
    selectors = {"rsa": "rsa2026", "ed25519": "ed2026"}
    config = Dkim(
        selector=selectors["rsa"] if "rsa" in kinds else "",
        ed25519_selector=selectors["ed25519"] if "ed25519" in kinds else "",
    )
    return dataclasses.replace(settings, dkim=config)


def keys_of(config: Settings, env: dict[str, str]) -> list[dkim.DkimKey]:
    """The keys the outbox signs the main newsletter's messages with."""
    return list(Rules.of(config, env).keys)


def signing_of(config: Settings, env: dict[str, str] | None = None) -> str:
    """How the outbox would sign a send of `config` through its relay (or refuse it)."""
    outbox = Outbox(config, transport=SmtpTransport(config, env={}), env=env or {})
    return outbox.check(outbox.rules(None))


def verify_all(message: bytes, lookup: Dns) -> list[bool]:
    """Verify each DKIM-Signature of a message (dkimpy checks one per call)."""
    count = len(re.findall(rb"(?m)^DKIM-Signature:", message.split(b"\r\n\r\n", 1)[0]))
    return [_verifies(message, index, lookup) for index in range(count)]


def _verifies(message: bytes, index: int, lookup: Dns) -> bool:
    try:
        return bool(dkimpy.DKIM(message).verify(idx=index, dnsfunc=lookup))
    except dkimpy.ValidationError:  # dkimpy raises for some mismatches (the body hash)
        return False


@pytest.mark.parametrize("kinds", [("rsa",), ("ed25519",), ("rsa", "ed25519")])
def test_each_key_type_and_both_sign_a_message_dkimpy_verifies(
    settings: Settings,
    sample_rendered: RenderedIssue,
    keys: dict[str, tuple[bytes, str]],
    kinds: tuple[str, ...],
) -> None:
    config = signing(settings, *kinds)
    template = MessageTemplate(
        sample_rendered, config, secret=b"s" * 32, keys=keys_of(config, env_of(keys, *kinds))
    )
    message = template.personalise(Recipient("lea@example.com", "Léa Dupont"))
    assert verify_all(message, dns(keys)) == [True] * len(kinds)
    header = message.split(b"\r\n\r\n", 1)[0]
    assert max(len(line) for line in header.split(b"\r\n")) <= 78


def header_block(message: bytes) -> tuple[bytes, bytes]:
    head, _, body = message.partition(b"\r\n\r\n")
    return head, body


TAMPERING = {
    "From": (b"From: Qant <lettre@qant.example>", b"From: Qant <lettre@qant.exemple>"),
    "To": (b"To: ", b"To: x"),
    "Subject": (b"Subject: ", b"Subject: Re: "),
    "Date": (b"Date: ", b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\nX-Old-Date: "),
    "Message-ID": (b"Message-ID: <", b"Message-ID: <x"),
    "Reply-To": (b"Reply-To: redaction@qant.example", b"Reply-To: pirate@evil.example"),
    "MIME-Version": (b"MIME-Version: 1.0", b"MIME-Version: 1.1"),
    "Content-Type": (b'boundary="', b'boundary="x'),
    "List-Id": (b"List-Id: Qant", b"List-Id: Autre"),
    "List-Unsubscribe": (b"List-Unsubscribe:\r\n <https://", b"List-Unsubscribe:\r\n <http://"),
    "List-Unsubscribe-Post": (b"One-Click", b"Two-Click"),
    "Feedback-ID": (b"Feedback-ID: ", b"Feedback-ID: x"),
}
# A copy of each signed header as one added on the way would write it; a prepended
# `Content-Type: text/plain` alone makes a mail reader show the message as plain text.
FORGED = {
    "from": b"From: Pirate <pirate@evil.example>",
    "to": b"To: victim@example.com",
    "subject": b"Subject: Urgent",
    "date": b"Date: Mon, 1 Jan 2024 00:00:00 +0000",
    "message-id": b"Message-ID: <forged@evil.example>",
    "reply-to": b"Reply-To: pirate@evil.example",
    "mime-version": b"MIME-Version: 1.0",
    "content-type": b"Content-Type: text/plain",
    "list-id": b"List-Id: Autre <autre.evil.example>",
    "list-unsubscribe": b"List-Unsubscribe: <https://evil.example/u>",
    "list-unsubscribe-post": b"List-Unsubscribe-Post: List-Unsubscribe=One-Click",
    "feedback-id": b"Feedback-ID: x:y:evil.example",
}


@pytest.fixture
def signed(
    settings: Settings, sample_rendered: RenderedIssue, keys: dict[str, tuple[bytes, str]]
) -> bytes:
    config = signing(settings, "rsa")
    template = MessageTemplate(
        sample_rendered, config, secret=b"s" * 32, keys=keys_of(config, env_of(keys, "rsa"))
    )
    return template.personalise(Recipient("lea@example.com", "Léa"))


@pytest.mark.parametrize("name", sorted(TAMPERING))
def test_changing_any_signed_header_breaks_the_signature(
    signed: bytes, keys: dict[str, tuple[bytes, str]], name: str
) -> None:
    head, body = header_block(signed)
    old, new = TAMPERING[name]
    assert old in head, name
    tampered = head.replace(old, new, 1) + b"\r\n\r\n" + body
    assert verify_all(tampered, dns(keys)) == [False]


@pytest.fixture(scope="module")
def signed_by(
    settings: Settings, sample_rendered: RenderedIssue, keys: dict[str, tuple[bytes, str]]
) -> dict[tuple[str, ...], bytes]:
    """The sample, signed by RSA, by Ed25519, and by both."""
    messages: dict[tuple[str, ...], bytes] = {}
    for kinds in (("rsa",), ("ed25519",), ("rsa", "ed25519")):
        config = signing(settings, *kinds)
        template = MessageTemplate(
            sample_rendered, config, secret=b"s" * 32, keys=keys_of(config, env_of(keys, *kinds))
        )
        messages[kinds] = template.personalise(Recipient("lea@example.com", "Léa Dupont"))
    return messages


def with_added(message: bytes, line: bytes, where: str) -> bytes:
    """Return `message` with the header `line` added atop its header or at its end."""
    head, body = header_block(message)
    head = line + b"\r\n" + head if where == "above" else head + b"\r\n" + line
    return head + b"\r\n\r\n" + body


@pytest.mark.parametrize("where", ["above", "below"])
@pytest.mark.parametrize("name", dkim.SIGNED)
@pytest.mark.parametrize("kind", ["rsa", "ed25519"])
def test_a_second_copy_of_any_signed_header_breaks_the_signature(
    signed_by: dict[tuple[str, ...], bytes],
    keys: dict[str, tuple[bytes, str]],
    kind: str,
    name: str,
    where: str,
) -> None:
    message = signed_by[(kind,)]
    head, _ = header_block(message)
    assert re.search(rb"(?im)^" + re.escape(name.encode()) + rb":", head), name
    assert verify_all(message, dns(keys)) == [True]
    assert verify_all(with_added(message, FORGED[name], where), dns(keys)) == [False]


def test_a_prepended_plain_text_content_type_breaks_both_signatures(
    signed_by: dict[tuple[str, ...], bytes], keys: dict[str, tuple[bytes, str]]
) -> None:
    message = signed_by[("rsa", "ed25519")]
    tampered = with_added(message, b"Content-Type: text/plain", "above")
    # What a reader would see: the whole MIME structure as one plain text.
    assert email.message_from_bytes(tampered, policy=policy.default).get_content_type() == (
        "text/plain"
    )
    assert verify_all(message, dns(keys)) == [True, True]
    assert verify_all(tampered, dns(keys)) == [False, False]


@pytest.mark.parametrize("name", dkim.SIGNED)
def test_any_signed_header_added_to_a_one_off_message_breaks_its_signature(
    settings: Settings, keys: dict[str, tuple[bytes, str]], name: str
) -> None:
    """A confirmation holds no list headers and, here, no Reply-To: adding one breaks
    its signature as adding a second From does."""
    sender = settings.sender.model_copy(update={"reply_to": ""})
    config = signing(dataclasses.replace(settings, sender=sender), "ed25519")
    message = notice(config, Recipient("lea@example.com", "Léa"), "Confirmez", "<p>Oui</p>", "Oui")
    signed = dkim.sign_message(keys_of(config, env_of(keys, "ed25519")), message)
    assert verify_all(signed, dns(keys)) == [True]
    assert verify_all(with_added(signed, FORGED[name], "above"), dns(keys)) == [False]


def test_each_signed_header_is_listed_once_more_than_the_message_holds_it(
    signed_by: dict[tuple[str, ...], bytes],
) -> None:
    message = email.message_from_bytes(signed_by[("rsa", "ed25519")], policy=policy.compat32)
    for signature in message.get_all("DKIM-Signature") or []:
        tags = dict(
            tag.strip().split("=", 1) for tag in re.sub(r"\s", "", signature).split(";") if tag
        )
        listed = tags["h"].split(":")
        assert sorted(set(listed)) == sorted(dkim.SIGNED)
        for name in dkim.SIGNED:
            assert listed.count(name) == len(message.get_all(name) or []) + 1, name


# A header value as a message may hold it: words, runs of spaces and tabs, and folds
# (CRLF, then white space).
_HEADER_VALUES = st.lists(
    st.one_of(
        st.text(alphabet="abz<>@.:;=-/", min_size=1, max_size=8),
        st.text(alphabet=" \t", min_size=1, max_size=3),
        st.sampled_from(["\r\n ", "\r\n\t", "\r\n  "]),
    ),
    max_size=12,
).map(lambda pieces: "".join(pieces).encode())


@settings(max_examples=400, derandomize=True, deadline=None)
@given(st.sampled_from(["To", "Message-ID", "List-Unsubscribe", "DKIM-Signature"]), _HEADER_VALUES)
def test_a_header_is_canonicalised_as_dkimpy_canonicalises_it(name: str, value: bytes) -> None:
    ((_, expected),) = Relaxed.canonicalize_headers([(name.encode(), value)])
    canonical = dkim.relaxed_header(name, value) + b"\r\n"
    assert canonical == b"%s:%s" % (name.lower().encode(), expected)


def test_the_body_is_covered(signed: bytes, keys: dict[str, tuple[bytes, str]]) -> None:
    assert verify_all(signed, dns(keys)) == [True]
    assert verify_all(signed.replace(b"Sam Altman", b"Sam Altmann", 1), dns(keys)) == [False]


def test_every_message_of_a_send_verifies(
    local: Settings,
    smtp_server: SmtpServer,
    keys: dict[str, tuple[bytes, str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in env_of(keys, "rsa", "ed25519").items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("QANT_SECRET_KEY", "a-test-secret-that-is-long-enough")
    config = signing(local, "rsa", "ed25519")
    subscribe(config, 12)
    ctx = Context(config, transport=SmtpTransport(config, env={}))
    report = sending.send(ctx, issues.prepare(ctx, config.root / SAMPLE))
    assert report.done[State.SENT] == 12
    for message in smtp_server.handler.received:
        assert verify_all(message.data, dns(keys)) == [True, True]


def test_a_key_can_come_from_a_file_and_is_never_shown(
    settings: Settings, keys: dict[str, tuple[bytes, str]], tmp_path: Path
) -> None:
    path = tmp_path / "key.pem"
    path.write_bytes(keys["ed25519"][0])
    config = dataclasses.replace(settings, dkim=Dkim(ed25519_selector="s", domain="autre.example"))
    (key,) = keys_of(config, env={f"{dkim.ED25519_VARIABLE}_FILE": str(path)})
    assert (key.domain, key.algorithm) == ("autre.example", "ed25519-sha256")
    assert "BEGIN" not in repr(key)
    assert "PRIVATE" not in repr(key)


def test_a_missing_or_bad_key_is_a_clear_error(settings: Settings) -> None:
    config = dataclasses.replace(settings, dkim=Dkim(selector="s"))
    with pytest.raises(ConfigError, match="QANT_DKIM_PRIVATE_KEY"):
        keys_of(config, env={})
    with pytest.raises(ConfigError, match="not a PEM private key"):
        keys_of(config, env={dkim.RSA_VARIABLE: "-----BEGIN NOTHING-----"})
    assert keys_of(settings, env={}) == []


def test_an_unsigned_send_to_a_remote_relay_is_refused_unless_allowed(
    settings: Settings, keys: dict[str, tuple[bytes, str]]
) -> None:
    remote = dataclasses.replace(
        settings, smtp=settings.smtp.model_copy(update={"host": "smtp.example.com"})
    )
    with pytest.raises(SendError, match="would not be DKIM-signed"):
        signing_of(remote)
    allowed = dataclasses.replace(remote, dkim=Dkim(required=False))
    assert "unsigned" in signing_of(allowed)
    # The local inbox, on this machine, needs no signature.
    assert "unsigned" in signing_of(settings)
    described = signing_of(signing(remote, "rsa"), env_of(keys, "rsa"))
    assert described == "rsa-sha256 by rsa2026._domainkey.qant.example, aligned with From"


def test_keygen_writes_the_key_in_the_users_folder_readable_by_them_only_and_never_prints_it(
    cli: Callable[..., Result], project: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    subprocess.run(["git", "init", "-q", str(project)], check=True)
    config = tmp_path_factory.mktemp("home") / "config"
    # The mode comes from the file's creation, whatever the umask lets through.
    before = os.umask(0)
    try:
        result = cli(
            "dkim", "keygen", "--type", "ed25519", "--selector", "ed2026",
            env={"XDG_CONFIG_HOME": str(config)},
        )  # fmt: skip
    finally:
        os.umask(before)
    assert result.exit_code == ExitCode.OK, result.output
    private = config / "qant-mail" / "keys" / "qant.example" / "ed2026.private.pem"
    assert private.stat().st_mode & 0o777 == 0o600
    for folder in (config, config / "qant-mail", config / "qant-mail" / "keys", private.parent):
        assert folder.stat().st_mode & 0o777 == 0o700, folder
    key = dkim.load_key(private.read_bytes(), domain="qant.example", selector="ed2026", where="t")
    assert key.algorithm == "ed25519-sha256"
    output = result.stdout
    assert f"wrote {private}" in output
    assert f"QANT_DKIM_ED25519_PRIVATE_KEY_FILE={private}\n" in output
    assert 'ed2026._domainkey.qant.example. IN TXT "v=DKIM1; k=ed25519; p=' in output
    assert "v=spf1" in output
    assert "_dmarc.qant.example. IN TXT" in output
    assert "BEGIN" not in result.output
    untracked = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all"],
        cwd=project, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert ".pem" not in untracked


def test_keygen_refuses_the_project_a_git_work_tree_or_an_existing_key_unless_forced(
    cli: Callable[..., Result], project: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    repository = elsewhere / "dotfiles"
    (repository / ".git").mkdir(parents=True)
    refused = {
        "keys/k.pem": "inside the newsletter's folder",
        str(repository / "keys" / "k.pem"): f"inside the git work tree {repository}",
    }
    for out, why in refused.items():
        result = cli("dkim", "keygen", "--out", out)
        assert result.exit_code == ExitCode.INVALID, result.output
        assert why in result.stderr
        assert "--force" in result.stderr
        assert not (project / "keys").exists()
        assert not (repository / "keys").exists()
    forced = cli("dkim", "keygen", "--out", str(repository / "keys" / "k.pem"), "--force")
    assert forced.exit_code == ExitCode.OK, forced.output
    # A folder given: the key goes in it, named after its selector.
    safe = elsewhere / "safe"
    safe.mkdir()
    first = cli("dkim", "keygen", "--selector", "s1", "--out", str(safe))
    assert first.exit_code == ExitCode.OK, first.output
    written = (safe / "s1.private.pem").read_bytes()
    again = cli("dkim", "keygen", "--selector", "s1", "--out", str(safe))
    assert again.exit_code == ExitCode.INVALID
    assert "s1.private.pem already exists" in again.stderr
    assert (safe / "s1.private.pem").read_bytes() == written
    replaced = cli("dkim", "keygen", "--selector", "s1", "--out", str(safe), "--force")
    assert replaced.exit_code == ExitCode.OK, replaced.output
    assert (safe / "s1.private.pem").read_bytes() != written
    assert (safe / "s1.private.pem").stat().st_mode & 0o777 == 0o600
    assert [p.name for p in safe.iterdir()] == ["s1.private.pem"]  # no temporary left
    bad = cli("dkim", "keygen", "--selector", "../s1", "--out", str(safe))
    assert bad.exit_code == ExitCode.INVALID
    assert "a DKIM selector is letters, digits, - and ." in bad.stderr


def test_check_warns_when_only_an_ed25519_key_signs(settings: Settings) -> None:
    def warned(config: Settings) -> list[str]:
        report = issues.check(Context(config, env={}), config.root / SAMPLE)
        return [p.message for p in report.warnings if p.field == "(settings)"]

    (warning,) = warned(signing(settings, "ed25519"))
    assert "RSA 2048 and Ed25519 (RFC 8463)" in warning
    assert "SpamAssassin's Mail::DKIM" in warning
    assert warned(signing(settings, "rsa", "ed25519")) == []
    assert warned(signing(settings, "rsa")) == []


def test_a_send_signed_by_ed25519_alone_says_so_once_before_it_starts(
    settings: Settings, keys: dict[str, tuple[bytes, str]]
) -> None:
    config = signing(settings, "ed25519")
    env = env_of(keys, "ed25519")
    (note,) = Rules.of(config, env).notes
    assert "RSA 2048 and Ed25519 (RFC 8463)" in note
    ctx = Context(config, env=env, secret=b"s" * 32, transport=SmtpTransport(config, env={}))
    prepared = issues.prepare(ctx, config.root / SAMPLE)
    assert sum("Mail::DKIM" in warning for warning in prepared.warnings) == 1
    both = signing(settings, "rsa", "ed25519")
    assert Rules.of(both, env_of(keys, "rsa", "ed25519")).notes == ()


@pytest.mark.parametrize("connections", [1, 4])
def test_each_signed_message_of_a_send_reaches_the_reader_it_names(
    local: Settings,
    smtp_server: SmtpServer,
    keys: dict[str, tuple[bytes, str]],
    monkeypatch: pytest.MonkeyPatch,
    connections: int,
) -> None:
    # Every message goes to the reader it was made and signed for, once, whatever the
    # number of connections; a row that cannot become a message fails alone.
    for name, value in env_of(keys, "rsa").items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("QANT_SECRET_KEY", "a-test-secret-that-is-long-enough")
    config = signing(local, "rsa")
    config = dataclasses.replace(
        config, smtp=config.smtp.model_copy(update={"connections": connections})
    )
    addresses = subscribe(config, 40)
    ctx = Context(config, transport=SmtpTransport(config, env={}))
    broken = addresses[7]
    with contextlib.closing(sqlite3.connect(config.store_path)) as db, db:
        # An address no message can carry (the store never takes one in).
        db.execute("UPDATE subscribers SET email = ? WHERE email = ?", (f"x {broken}", broken))
    report = sending.send(ctx, issues.prepare(ctx, config.root / SAMPLE))
    assert report.done[State.SENT] == 39
    assert report.done[State.FAILED] == 1
    received = smtp_server.handler.received
    assert sorted(m.recipient for m in received) == sorted(a for a in addresses if a != broken)
    for message in received:
        parsed = email.message_from_bytes(message.data, policy=policy.default)
        assert parsed["To"].addresses[0].addr_spec == message.recipient
        assert verify_all(message.data, dns(keys)) == [True]
