"""DKIM signatures (RFC 6376), RSA-SHA256 and Ed25519-SHA256 (RFC 8463), made with the
`cryptography` library (OpenSSL), relaxed/relaxed.

A newsletter's messages differ only in a few per-recipient values, each on lines of its
own in the encoded body. So the body is canonicalised once, segment by segment: each
message hashes its own values and the fixed segments after the first of them, never the
whole message again, and signs its headers.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

from qant_mail.base import secrets
from qant_mail.base.errors import ConfigError

Algorithm = Literal["rsa-sha256", "ed25519-sha256"]
# What every signature covers (RFC 6376 5.4; Gmail and Yahoo also want both unsubscribe
# headers). Each is listed in h= once more than the message holds it ("over-signing",
# RFC 6376 8.15): a copy added on the way, above or below, or a header the message lacks
# added to it, breaks the signature. A prepended `Content-Type: text/plain` that still
# verified would make a reader show the message as plain text.
SIGNED = (
    "from",
    "to",
    "subject",
    "date",
    "message-id",
    "reply-to",
    "mime-version",
    "content-type",
    "list-id",
    "list-unsubscribe",
    "list-unsubscribe-post",
    "feedback-id",
)

_WSP_RUN = re.compile(rb"[ \t]+")
_TRAILING_WSP = re.compile(rb"[ \t]+\r\n")
_FOLD = re.compile(rb"\r\n(?=[ \t])")


class DkimKeyError(ConfigError):
    """A DKIM key that cannot be used (unreadable, of a kind DKIM does not know)."""


@dataclass(frozen=True)
class DkimKey:
    """One signing key: where its public half is published, and the private half."""

    domain: str
    selector: str
    private_key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey

    @property
    def algorithm(self) -> Algorithm:
        """Return the DKIM name of the key's algorithm."""
        return (
            "ed25519-sha256"
            if isinstance(self.private_key, ed25519.Ed25519PrivateKey)
            else ("rsa-sha256")
        )

    @property
    def record(self) -> str:
        """Return the value of the TXT record that publishes the public half."""
        kind = "ed25519" if self.algorithm == "ed25519-sha256" else "rsa"
        return dns_record(kind, _public_value(self.private_key))

    def __repr__(self) -> str:
        # Never the key: this object may end up in a traceback or a log.
        return f"DkimKey({self.algorithm}, {self.selector}._domainkey.{self.domain})"

    def sign(self, data: bytes) -> bytes:
        """Return the signature of the canonicalised header data."""
        key = self.private_key
        if isinstance(key, ed25519.Ed25519PrivateKey):
            # RFC 8463: Ed25519 signs the SHA-256 hash of the data (PureEdDSA).
            return key.sign(hashlib.sha256(data).digest())
        return key.sign(data, padding.PKCS1v15(), hashes.SHA256())


def load_key(pem: bytes, *, domain: str, selector: str, where: str) -> DkimKey:
    """Read a PEM private key (RSA of 1024 bits or more, or Ed25519)."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise DkimKeyError(f"{where}: not a PEM private key without a passphrase") from err
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < 1024:
            raise DkimKeyError(f"{where}: an RSA key of {key.key_size} bits; use 2048")
        return DkimKey(domain, selector, key)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return DkimKey(domain, selector, key)
    raise DkimKeyError(f"{where}: DKIM signs with RSA or Ed25519 keys only")


def key_from_env(
    env: Mapping[str, str], variable: str, *, domain: str, selector: str
) -> DkimKey | None:
    """Return the key in `variable` (PEM) or in the file `variable`_FILE, if either is set."""
    pem = secrets.secret(env, variable)
    if pem is None:
        return None
    where = secrets.origin(env, variable)
    return load_key(pem.encode("utf-8"), domain=domain, selector=selector, where=where)


def generate(kind: Literal["rsa", "ed25519"]) -> tuple[bytes, str]:
    """Return a new private key (PEM) and the `p=` value of its DNS record."""
    private: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    if kind == "rsa":
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    else:
        private = ed25519.Ed25519PrivateKey.generate()
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return pem, _public_value(private)


def _public_value(private: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey) -> str:
    """Return the `p=` value that publishes the public half of `private` (RFC 6376 3.6.1:
    an RSA key's SubjectPublicKeyInfo; RFC 8463: an Ed25519 key's 32 bytes)."""
    public: bytes
    if isinstance(private, rsa.RSAPrivateKey):
        public = private.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    else:
        public = private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
    return base64.b64encode(public).decode()


def dns_record(kind: str, public: str) -> str:
    """Return the TXT record's value that publishes a public key."""
    return f"v=DKIM1; k={'ed25519' if kind == 'ed25519' else 'rsa'}; p={public}"


# ---- canonicalisation (RFC 6376 3.4, relaxed) ------------------------------------------


def relaxed_body(chunk: bytes) -> bytes:
    """Canonicalise whole lines of a body (each ending in CRLF): runs of spaces become
    one, spaces at line ends go. Trailing empty lines are the caller's affair."""
    return _TRAILING_WSP.sub(b"\r\n", _WSP_RUN.sub(b" ", chunk))


def relaxed_header(name: str, value: bytes) -> bytes:
    """Canonicalise one header field: `name:value` unfolded, without its CRLF."""
    if b"\r" in value or b"\t" in value or b"  " in value:
        value = _WSP_RUN.sub(b" ", _FOLD.sub(b"", value))
    # Else (what we write mostly: one line, single spaces) only its ends change.
    return name.lower().encode() + b":" + value.strip(b" \t")


class _Hash(Protocol):
    def copy(self) -> _Hash: ...
    def update(self, data: bytes, /) -> None: ...
    def digest(self) -> bytes: ...


@dataclass
class BodyHash:
    """The body hash of messages whose bodies differ only in some segments: the hash of
    everything before the first varying segment is computed once."""

    prefix: _Hash
    tail: Sequence[bytes | None]  # canonical fixed segments; None where a value goes

    @classmethod
    def of(cls, segments: Sequence[bytes | None]) -> BodyHash:
        """Prepare from the body's segments (None for each per-recipient one)."""
        first = next((i for i, s in enumerate(segments) if s is None), len(segments))
        prefix = hashlib.sha256()
        for segment in segments[:first]:
            assert segment is not None
            prefix.update(relaxed_body(segment))
        tail = [relaxed_body(s) if s is not None else None for s in segments[first:]]
        return cls(prefix, tail)

    def digest(self, values: Sequence[bytes]) -> bytes:
        """Return the body hash with `values` (encoded, CRLF-ended) in the varying places."""
        state = self.prefix.copy()
        filled = iter(values)
        for segment in self.tail:
            if segment is None:
                segment = next(filled)
                # An encoded value seldom has anything to canonicalise: three searches
                # in C instead of two substitutions.
                if b"  " in segment or b"\t" in segment or b" \r\n" in segment:
                    segment = relaxed_body(segment)
            state.update(segment)
        return state.digest()


class Signer:
    """Signs the messages of one issue with one key: the headers every message shares
    are canonicalised once; per message, only its own headers, the body hash and the
    signature itself are computed."""

    def __init__(self, key: DkimKey, shared: Sequence[tuple[str, bytes]], own: Sequence[str]):
        self.key = key
        held = Counter(name.lower() for name in own)
        canonical: dict[str, list[bytes]] = {}
        for name, value in shared:
            lower = name.lower()
            if lower in SIGNED:
                held[lower] += 1
                canonical.setdefault(lower, []).append(relaxed_header(name, value) + b"\r\n")
        self.listed = [name for name in SIGNED for _ in range(held[name] + 1)]
        # The header data in h= order, each name's copies from the bottom up (RFC 6376
        # 5.4.2): the shared copies joined now, and a name (str) where a message's own
        # go, which come above the shared ones; the extra listing of each adds nothing.
        own_names = {name.lower() for name in own}
        plan: list[bytes | str] = []
        fixed = b""
        for name in SIGNED:
            fixed += b"".join(reversed(canonical.get(name, [])))
            if name in own_names:
                plan += [fixed, name]
                fixed = b""
        plan.append(fixed)
        self._plan = plan
        self._folded: tuple[int, bytes, bytes] | None = None

    def sign(
        self, own: Sequence[tuple[str, bytes]], body_hash: bytes, *, timestamp: int | None = None
    ) -> bytes:
        """Return the DKIM-Signature header (CRLF-ended) of a message whose own headers
        are `own` (name, raw value) and whose body hashes to `body_hash`."""
        mine: dict[str, bytes] = {}
        for name, value in reversed(own):
            lower = name.lower()
            mine[lower] = mine.get(lower, b"") + relaxed_header(name, value) + b"\r\n"
        data = bytearray()
        for piece in self._plan:
            data += piece if isinstance(piece, bytes) else mine.get(piece, b"")
        when = int(time.time()) if timestamp is None else timestamp
        unsigned, relaxed = self._unsigned(when)
        # The header is folded first and signed as it will be sent, with an empty b=:
        # the verifier canonicalises the folds we chose, not an unfolded copy of them.
        # Both forms are made once a second with a placeholder for bh=, which
        # canonicalisation leaves as it is: the body hash goes in by replacement.
        encoded = base64.b64encode(body_hash)
        unsigned = unsigned.replace(_BH_PLACEHOLDER, encoded)
        data += relaxed.replace(_BH_PLACEHOLDER, encoded)
        signature = base64.b64encode(self.key.sign(bytes(data)))
        folded = b"".join(b"\r\n\t " + signature[i : i + 72] for i in range(0, len(signature), 72))
        return b"DKIM-Signature:" + unsigned + folded + b"\r\n"

    def _unsigned(self, when: int) -> tuple[bytes, bytes]:
        """Return the folded tags, with a placeholder for bh=, and their canonical form
        as signed (the same for a second)."""
        if self._folded is None or self._folded[0] != when:
            key = self.key
            tags = [
                "v=1",
                f"a={key.algorithm}",
                "c=relaxed/relaxed",
                f"d={key.domain}",
                f"s={key.selector}",
                f"t={when}",
                "h=" + ":".join(self.listed),
                "bh=" + _BH_PLACEHOLDER.decode(),
                "b=",
            ]
            folded = _fold(tags)
            self._folded = (when, folded, relaxed_header("dkim-signature", folded))
        return self._folded[1], self._folded[2]


# As long as a SHA-256 in base64, so that folding it in place changes nothing.
_BH_PLACEHOLDER = b"@" * 44


def _fold(tags: Sequence[str], width: int = 76) -> bytes:
    """Return the value of a DKIM-Signature header (after its colon), folded between
    tags and, in the list of header names, after a colon (RFC 6376 allows both)."""
    lines: list[str] = []
    line = len("DKIM-Signature:") * " "
    for index, tag in enumerate(tags):
        text = f" {tag}" + (";" if index < len(tags) - 1 else "")
        pieces = text.split(":") if tag.startswith("h=") else [text]
        for number, piece in enumerate(pieces):
            piece += ":" if number < len(pieces) - 1 else ""
            if len(line) + len(piece) > width and line.strip():
                lines.append(line)
                line = "\t"
            line += piece
    lines.append(line)
    first = lines[0][len("DKIM-Signature:") :]
    return "\r\n".join([first, *lines[1:]]).encode()


def keys_from_settings(
    selector: str, ed25519_selector: str, domain: str, env: Mapping[str, str] | None = None
) -> list[DkimKey]:
    """Return the keys the settings name, read from the environment; explain what is
    missing. Two keys (one of each kind) give two signatures."""
    env = os.environ if env is None else env
    keys: list[DkimKey] = []
    for chosen, variable in ((selector, RSA_VARIABLE), (ed25519_selector, ED25519_VARIABLE)):
        if not chosen:
            continue
        key = key_from_env(env, variable, domain=domain, selector=chosen)
        if key is None:
            raise DkimKeyError(
                f"dkim selector {chosen!r} is set but neither {variable} nor {variable}_FILE "
                "is: export the private key"
            )
        keys.append(key)
    return keys


RSA_VARIABLE = "QANT_DKIM_PRIVATE_KEY"
ED25519_VARIABLE = "QANT_DKIM_ED25519_PRIVATE_KEY"


def sign_message(keys: Sequence[DkimKey], message: bytes) -> bytes:
    """Return `message` (CRLF line ends, headers then body) with one signature for each
    key on top: for messages composed whole, one at a time (a confirmation, a test)."""
    if not keys:
        return message
    head, separator, body = message.partition(b"\r\n\r\n")
    if not separator:
        head, body = message, b""
    fields: list[tuple[str, bytes]] = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and fields:
            name, value = fields[-1]
            fields[-1] = (name, value + b"\r\n" + line)
        elif b":" in line:
            name_bytes, _, value = line.partition(b":")
            fields.append((name_bytes.decode("ascii", "replace"), value))
    # Relaxed canonicalisation ends the body with one line end: no empty lines after it.
    canonical = relaxed_body(body if body.endswith(b"\r\n") else body + b"\r\n")
    canonical = canonical.rstrip(b"\r\n") + b"\r\n" if canonical.strip(b"\r\n") else b""
    body_hash = BodyHash.of([canonical]).digest([])
    return b"".join(Signer(key, fields, ()).sign([], body_hash) for key in keys) + message
