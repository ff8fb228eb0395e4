"""DKIM: each message signed, the unsubscribe headers covered, verifiable with the key."""

from __future__ import annotations

import base64
import dataclasses
import re
import subprocess
from pathlib import Path

import dkim
import pytest

from qant_mail.compose import DKIM_HEADERS, ComposeError, MessageTemplate, Recipient, dkim_signer
from qant_mail.config import Dkim, Settings
from qant_mail.errors import ConfigError
from qant_mail.render import RenderedIssue


@pytest.fixture(scope="module")
def key_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes]:
    folder = tmp_path_factory.mktemp("dkim")
    private = folder / "private.pem"
    subprocess.run(
        ["openssl", "genrsa", "-out", str(private), "2048"], check=True, capture_output=True
    )
    public = subprocess.run(
        ["openssl", "rsa", "-in", str(private), "-pubout", "-outform", "DER"],
        check=True,
        capture_output=True,
    ).stdout
    return private.read_bytes(), public


def test_messages_are_signed_over_the_unsubscribe_headers(
    settings: Settings, sample_rendered: RenderedIssue, key_pair: tuple[bytes, bytes]
) -> None:
    private, public = key_pair
    signing = dataclasses.replace(settings, dkim=Dkim(selector="qant2024"))
    signer = dkim_signer(signing, env={"QANT_DKIM_PRIVATE_KEY": private.decode()})
    template = MessageTemplate(sample_rendered, signing, secret=b"s" * 32, signer=signer)
    message = template.personalise(Recipient("lea@example.com", "Léa"))
    assert message.startswith(b"DKIM-Signature:")
    header = message.split(b"\r\n\r\n", 1)[0].decode()
    signed = re.search(r"h=([^;]+);", header.replace("\r\n", ""))
    assert signed is not None
    names = {name.strip().encode() for name in signed.group(1).split(":")}
    assert names == set(DKIM_HEADERS)

    record = b"v=DKIM1; k=rsa; p=" + base64.b64encode(public)

    def dns(name: bytes, timeout: int = 5) -> bytes:
        assert name == b"qant2024._domainkey.qant.example."
        return record

    assert dkim.verify(message, dnsfunc=dns)
    tampered = message.replace(b"List-Unsubscribe: <https://", b"List-Unsubscribe: <http://", 1)
    assert not dkim.verify(tampered, dnsfunc=dns)


def test_key_can_come_from_a_file(
    settings: Settings, key_pair: tuple[bytes, bytes], tmp_path: Path
) -> None:
    path = tmp_path / "key.pem"
    path.write_bytes(key_pair[0])
    signing = dataclasses.replace(settings, dkim=Dkim(selector="s", domain="autre.example"))
    signer = dkim_signer(signing, env={"QANT_DKIM_PRIVATE_KEY_FILE": str(path)})
    assert signer is not None
    assert signer.domain == b"autre.example"
    assert "BEGIN" not in repr(signer)


def test_missing_or_bad_key_is_a_clear_error(settings: Settings) -> None:
    signing = dataclasses.replace(settings, dkim=Dkim(selector="s"))
    with pytest.raises(ConfigError, match="QANT_DKIM_PRIVATE_KEY"):
        dkim_signer(signing, env={})
    with pytest.raises(ComposeError, match="not a PEM RSA private key"):
        dkim_signer(signing, env={"QANT_DKIM_PRIVATE_KEY": "-----BEGIN NOTHING-----"})
    assert dkim_signer(settings, env={}) is None
