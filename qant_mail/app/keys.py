"""The use case of DKIM keys: make a key pair, and say the DNS records to publish."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from qant_mail.app.context import Context
from qant_mail.base.errors import ConfigError
from qant_mail.base.files import create_new
from qant_mail.delivery import dkim


@dataclass(frozen=True)
class NewKey:
    """A key pair written, and what to publish and set for it."""

    path: Path  # the private key (0600)
    selector: str
    domain: str
    dkim_record: str  # the TXT record's value, in strings of 255 characters
    variable: str  # the environment variable the key goes in (…_FILE: its path)
    setting: str  # the `[dkim]` key that names the selector

    @property
    def dns(self) -> list[str]:
        """Return the records to publish: the key's, SPF and DMARC (adapt SPF)."""
        return [
            f"{self.selector}._domainkey.{self.domain}. IN TXT {self.dkim_record}",
            f'{self.domain}. IN TXT "v=spf1 mx include:YOUR-RELAY ~all"',
            f'_dmarc.{self.domain}. IN TXT "v=DMARC1; p=none; rua=mailto:dmarc@{self.domain}"',
        ]


def keygen(
    ctx: Context, kind: str = "rsa", selector: str | None = None, folder: Path = Path()
) -> NewKey:
    """Write a new DKIM private key (RSA 2048 or Ed25519) as SELECTOR.private.pem in
    `folder`, readable by its owner only; never over an existing file."""
    if kind not in ("rsa", "ed25519"):
        raise ConfigError(f"{kind!r}: a DKIM key is rsa or ed25519")
    algorithm: Literal["rsa", "ed25519"] = "ed25519" if kind == "ed25519" else "rsa"
    name = selector or f"qant{dt.date.today().year}{'e' if algorithm == 'ed25519' else ''}"
    domain = ctx.settings.dkim.domain or ctx.settings.sender_domain
    pem, public = dkim.generate(algorithm)
    path = folder / f"{name}.private.pem"
    create_new(path, pem, mode=0o600)
    record = dkim.dns_record(algorithm, public)
    # A TXT string holds 255 characters at most: longer records are cut into several.
    strings = " ".join(f'"{record[i : i + 255]}"' for i in range(0, len(record), 255))
    variable = dkim.ED25519_VARIABLE if algorithm == "ed25519" else dkim.RSA_VARIABLE
    setting = "ed25519_selector" if algorithm == "ed25519" else "selector"
    return NewKey(path, name, domain, strings, variable, setting)
