"""DKIM: every message signed (RSA, Ed25519 or both) over the headers that matter, the
ones most worth forging over-signed; verified by dkimpy, which no one here wrote."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from pathlib import Path

import dkim as dkimpy
import pytest

from qant_mail.app import issues, sending
from qant_mail.app.context import Context
from qant_mail.authoring.render import RenderedIssue
from qant_mail.base.config import Dkim, Settings
from qant_mail.base.errors import ConfigError, ExitCode, SendError
from qant_mail.delivery import dkim
from qant_mail.delivery.compose import MessageTemplate, Recipient
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
ADDED_ABOVE = {
    "From": b"From: Pirate <pirate@evil.example>\r\n",
    "Subject": b"Subject: Urgent\r\n",
    "Reply-To": b"Reply-To: pirate@evil.example\r\n",
    "List-Unsubscribe": b"List-Unsubscribe: <https://evil.example/u>\r\n",
    "List-Unsubscribe-Post": b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n",
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


@pytest.mark.parametrize("name", sorted(ADDED_ABOVE))
def test_a_second_copy_of_an_oversigned_header_breaks_the_signature(
    signed: bytes, keys: dict[str, tuple[bytes, str]], name: str
) -> None:
    head, body = header_block(signed)
    signature_end = head.index(b"\r\nFrom:") + 2  # after the DKIM-Signature header
    added = head[:signature_end] + ADDED_ABOVE[name] + head[signature_end:]
    assert verify_all(added + b"\r\n\r\n" + body, dns(keys)) == [False]


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


def test_keygen_writes_a_key_and_prints_the_records(
    cli: Callable[..., object], project: Path
) -> None:
    result = cli("dkim", "keygen", "--type", "ed25519", "--selector", "ed2026", "-o", "keys")
    assert result.exit_code == ExitCode.OK  # type: ignore[attr-defined]
    private = project / "keys" / "ed2026.private.pem"
    assert private.stat().st_mode & 0o777 == 0o600
    key = dkim.load_key(private.read_bytes(), domain="qant.example", selector="ed2026", where="t")
    assert key.algorithm == "ed25519-sha256"
    output = result.stdout  # type: ignore[attr-defined]
    assert 'ed2026._domainkey.qant.example. IN TXT "v=DKIM1; k=ed25519; p=' in output
    assert "v=spf1" in output
    assert "_dmarc.qant.example. IN TXT" in output
    assert "BEGIN" not in output
