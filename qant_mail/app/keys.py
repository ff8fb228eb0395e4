"""The use case of DKIM keys: make a key pair, and say the DNS records to publish."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from qant_mail.app.context import Context
from qant_mail.base.errors import ConfigError, OutputError
from qant_mail.base.files import git_work_tree, write_private
from qant_mail.delivery import dkim

# A selector is DNS labels (RFC 6376 3.1): letters, digits and inner hyphens, dot-joined.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_SELECTOR = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")


@dataclass(frozen=True)
class NewKey:
    """A key pair written, and what to publish and set for it."""

    path: Path  # the private key (0600), absolute
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
    ctx: Context,
    kind: str = "rsa",
    selector: str | None = None,
    out: Path | None = None,
    *,
    force: bool = False,
) -> NewKey:
    """Write a new DKIM private key (RSA 2048 or Ed25519), readable by its owner only, at
    `out` (a folder: SELECTOR.private.pem in it) or in this user's folder of keys, outside
    any project; never over an existing key, in the newsletter's folder or in a git work
    tree, unless `force`."""
    if kind not in ("rsa", "ed25519"):
        raise ConfigError(f"{kind!r}: a DKIM key is rsa or ed25519")
    algorithm: Literal["rsa", "ed25519"] = "ed25519" if kind == "ed25519" else "rsa"
    name = selector or f"qant{dt.date.today().year}{'e' if algorithm == 'ed25519' else ''}"
    if not _SELECTOR.fullmatch(name):
        # It names a file as well as a DNS record: no "/" or ".." may lead elsewhere.
        raise ConfigError(f"--selector {name!r}: a DKIM selector is letters, digits, - and .")
    domain = ctx.settings.dkim.domain or ctx.settings.sender_domain
    if out is None:
        # Named after what names the key in DNS: the newsletters of one machine, each
        # with its domain and selectors, never meet, and one key is never made twice.
        path = keys_folder(ctx.env) / domain / f"{name}.private.pem"
    else:
        path = out / f"{name}.private.pem" if out.is_dir() else out
    if not force:
        _refuse_risky(path, ctx.settings.root)
    pem, public = dkim.generate(algorithm)
    write_private(path, pem, replace=force)
    record = dkim.dns_record(algorithm, public)
    # A TXT string holds 255 characters at most: longer records are cut into several.
    strings = " ".join(f'"{record[i : i + 255]}"' for i in range(0, len(record), 255))
    variable = dkim.ED25519_VARIABLE if algorithm == "ed25519" else dkim.RSA_VARIABLE
    setting = "ed25519_selector" if algorithm == "ed25519" else "selector"
    return NewKey(path.resolve(), name, domain, strings, variable, setting)


def keys_folder(env: Mapping[str, str]) -> Path:
    """Return this user's folder of keys: $XDG_CONFIG_HOME/qant-mail/keys, or
    ~/.config/qant-mail/keys."""
    configured = env.get("XDG_CONFIG_HOME", "")
    # The XDG specification: a relative path there is invalid, and ignored.
    if configured and Path(configured).is_absolute():
        base = Path(configured)
    else:
        base = Path(env.get("HOME") or Path.home()) / ".config"
    return base / "qant-mail" / "keys"


def _refuse_risky(path: Path, project: Path) -> None:
    """Refuse a key's path where it would be overwritten, copied with the newsletter's
    files or committed."""
    if path.exists():
        raise OutputError(
            f"{path} already exists: a key in use there would stop verifying. Choose another "
            "--selector (and publish its record), or pass --force to replace it"
        )
    where = path.resolve()
    if where.is_relative_to(project.resolve()):
        raise OutputError(
            f"{path} is inside the newsletter's folder ({project}): a private key there is "
            "copied, backed up and published with it. Leave out --out (it goes in your "
            "configuration folder), or pass --force"
        )
    tree = git_work_tree(where)
    if tree is not None:
        raise OutputError(
            f"{path} is inside the git work tree {tree}: `git add` would commit the private "
            "key. Leave out --out (it goes in your configuration folder), or pass --force"
        )
