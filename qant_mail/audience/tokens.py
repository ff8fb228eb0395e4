"""Signed, opaque tokens (HMAC-SHA256 with the installation's secret): unsubscribe links,
the reader's page, signup confirmations, VERP return paths, Message-ID digests. The
secret may be several keys (a rotation): the first signs, every one is accepted."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence

from qant_mail.base import secrets
from qant_mail.base.errors import ConfigError

SECRET_VARIABLE = "QANT_SECRET_KEY"
# Several keys, for a rotation: the first signs, every one is accepted.
SECRETS_VARIABLE = "QANT_SECRET_KEYS"
# A token names a subscriber by number only: it reveals no address. 16 bytes of MAC
# (128 bits) make forging one as hard as guessing the secret.
_MAC_BYTES = 16
_MIN_SECRET_BYTES = 16
# The exact shape of a token: an id of 1 to 8 bytes, the key of a newsletter other than
# the main one if it is about one, a 16-byte MAC; id and MAC in unpadded URL-safe
# base64. Anything else (padding, other characters, a longer id that would overflow the
# database's integers) is refused before it is decoded.
_TOKEN = re.compile(r"([A-Za-z0-9_-]{2,11})\.(?:([a-z0-9][a-z0-9-]{0,31})\.)?([A-Za-z0-9_-]{22})")
UNSUBSCRIBE = "unsubscribe"
READER = "reader"  # the reader's page: which newsletters they get
_MAX_ID = 2**63 - 1


class SigningKeys(bytes):
    """The key that signs (these bytes), and `accepted`: every key a token may have been
    signed with, the signing one first, then older ones whose links are still in inboxes."""

    # A bytes value rather than an object of its own: every caller already hands "the
    # secret" around as bytes and signs with it; only the checks here look further.
    accepted: tuple[bytes, ...]

    def __new__(cls, keys: Sequence[bytes]) -> SigningKeys:
        made = super().__new__(cls, keys[0])
        made.accepted = tuple(bytes(key) for key in keys)
        return made

    def __repr__(self) -> str:
        # Never the keys: this value may end up in a traceback or a log.
        return f"SigningKeys({len(self.accepted)} keys)"


def _accepted(secret: bytes) -> tuple[bytes, ...]:
    return secret.accepted if isinstance(secret, SigningKeys) else (secret,)


def secret_from_env(
    env: Mapping[str, str] | None = None, *, needed_for: str = "unsubscribe links are signed"
) -> bytes:
    """Return the signing keys from the environment (QANT_SECRET_KEYS, or the single
    QANT_SECRET_KEY; either as itself or `_FILE`), or explain how to set one (what it is
    `needed_for` here, in the error: "bounces are matched by what it signs")."""
    env = os.environ if env is None else env
    one = secrets.secret(env, SECRET_VARIABLE)
    several = secrets.secret(env, SECRETS_VARIABLE)
    if one is not None and several is not None:
        raise ConfigError(
            f"{SECRET_VARIABLE} and {SECRETS_VARIABLE} are both set: keep {SECRETS_VARIABLE} "
            "(the key that signs first, then those still accepted)"
        )
    if several is not None:
        where = secrets.origin(env, SECRETS_VARIABLE)
        # Keys made by token_urlsafe hold no comma or space: a list is written either
        # way, and a _FILE holds one a line.
        keys = [key for key in re.split(r"[\s,]+", several) if key]
    elif one is not None:
        where = secrets.origin(env, SECRET_VARIABLE)
        keys = [one]
    else:
        raise ConfigError(
            f"{SECRET_VARIABLE} is not set: {needed_for} with it. Create one "
            f"with `python -c 'import secrets; print(secrets.token_urlsafe(32))'` and export it "
            f"(or {SECRET_VARIABLE}_FILE: a file holding it; {SECRETS_VARIABLE}: several, "
            "to rotate)"
        )
    if not keys:
        raise ConfigError(f"{where}: no key in it")
    encoded = [key.encode("utf-8") for key in keys]
    for number, key in enumerate(encoded, start=1):
        if len(key) < _MIN_SECRET_BYTES:
            which = f"key {number} of {len(keys)}" if len(keys) > 1 else "the key"
            raise ConfigError(f"{where}: {which} is too short: use at least 16 random bytes")
    return SigningKeys(encoded)


def make(
    secret: bytes,
    subscriber_id: int,
    address: str,
    newsletter: str = "",
    purpose: str = UNSUBSCRIBE,
) -> str:
    """Return the token that lets the holder unsubscribe `address` (subscriber
    `subscriber_id`) from `newsletter` ("": the main one), or, for `purpose` READER,
    open their page."""
    number = subscriber_id.to_bytes(max(1, (subscriber_id.bit_length() + 7) // 8), "big")
    mac = _b64(_mac(secret, subscriber_id, address, newsletter, purpose))
    middle = f"{newsletter}." if newsletter else ""
    return f"{_b64(number)}.{middle}{mac}"


class Minter:
    """Makes the tokens and Message-ID digests of one send, many a second: the same
    values as `make` and `message_digest`, with the key's HMAC state prepared once
    instead of for every token."""

    def __init__(self, secret: bytes, newsletter: str = "") -> None:
        # An HMAC object holds the key already mixed in; a copy of it per token skips
        # that part of the work (a third of a short token's HMAC).
        self._keyed = hmac.new(secret, digestmod="sha256")
        self._newsletter = f"\0{newsletter}".encode() if newsletter else b""
        self._middle = f"{newsletter}." if newsletter else ""

    def make(self, subscriber_id: int, address: str, purpose: str = UNSUBSCRIBE) -> str:
        """Return `make(secret, subscriber_id, address, newsletter, purpose)`; READER
        tokens name no newsletter, as `make` is called for them."""
        message = f"{purpose}\0{subscriber_id}\0{address.lower()}".encode()
        middle = ""
        if purpose != READER:
            message += self._newsletter
            middle = self._middle
        state = self._keyed.copy()
        state.update(message)
        number = subscriber_id.to_bytes(max(1, (subscriber_id.bit_length() + 7) // 8), "big")
        return f"{_b64(number)}.{middle}{_b64(state.digest()[:_MAC_BYTES])}"

    def message_digest(self, issue_key: str, address: str, nonce: str = "") -> str:
        """Return `message_digest(secret, issue_key, address, nonce)`."""
        state = self._keyed.copy()
        state.update(f"msgid\0{issue_key}\0{address.lower()}\0{nonce}".encode())
        return state.digest()[:12].hex()


# Reader number 0 is nobody (the store numbers readers from 1): `qant-mail doctor` posts a
# one-click unsubscription with a token for it, signed like any other, to see that the
# public side answers and shares our secret. It unsubscribes nobody.
PROBE_ID = 0
PROBE_ADDRESS = "doctor@qant-mail.invalid"


def make_probe(secret: bytes, newsletter: str = "") -> str:
    """Return the unsubscribe token of nobody, for `newsletter` ("": the main one)."""
    return make(secret, PROBE_ID, PROBE_ADDRESS, newsletter)


def is_probe(token: str, secret: Callable[[], bytes]) -> bool:
    """Return whether `token` is a genuine probe of `make_probe` (the secret is asked
    for only when the token claims reader 0)."""
    match = _TOKEN.fullmatch(token)
    if match is None or match.group(1) != _b64(b"\0"):
        return False
    return verify(secret(), token, PROBE_ID, PROBE_ADDRESS)


def newsletter_of(token: str) -> str:
    """Return the newsletter key a token names (unverified); "" for the main one."""
    match = _TOKEN.fullmatch(token)
    return match.group(2) or "" if match else ""


def subscriber_id(token: str) -> int | None:
    """Return the subscriber number a token claims (unverified), or None if malformed."""
    match = _TOKEN.fullmatch(token)
    if match is None:
        return None
    raw = _unb64(match.group(1))
    if len(raw) > 8 or _b64(raw) != match.group(1):  # one spelling only
        return None
    number = int.from_bytes(raw, "big")
    return number if 0 < number <= _MAX_ID else None


def verify(
    secret: bytes, token: str, subscriber_id: int, address: str, purpose: str = UNSUBSCRIBE
) -> bool:
    """Return whether `token` was made with `secret` for this subscriber, address and
    purpose (and the newsletter it names)."""
    match = _TOKEN.fullmatch(token)
    if match is None:
        return False
    given = _unb64(match.group(3))
    if _b64(given) != match.group(3):
        return False
    newsletter = match.group(2) or ""
    return any(
        hmac.compare_digest(given, _mac(key, subscriber_id, address, newsletter, purpose))
        for key in _accepted(secret)
    )


def _mac(secret: bytes, subscriber_id: int, address: str, newsletter: str, purpose: str) -> bytes:
    # The main newsletter's unsubscribe MAC is the one links carried before there were
    # several newsletters: those already in inboxes keep working.
    message = f"{purpose}\0{subscriber_id}\0{address.lower()}".encode()
    if newsletter:
        message += f"\0{newsletter}".encode()
    # hmac.digest: OpenSSL's one-shot HMAC, several times faster than hmac.new per token.
    return hmac.digest(secret, message, hashlib.sha256)[:_MAC_BYTES]


def _b64(data: bytes) -> str:
    # binascii and a translation table: urlsafe_b64encode is the same in Python wrappers.
    return binascii.b2a_base64(data, newline=False).translate(_URLSAFE).rstrip(b"=").decode()


_URLSAFE = bytes.maketrans(b"+/", b"-_")


def _unb64(text: str) -> bytes:
    # Only ever called on text the pattern above has checked.
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# Signs the unsubscribe link of samples (render, preview) when no secret is set: those
# links are for looking at, and the public site refuses them.
SAMPLE_SECRET = b"qant-mail sample secret: links signed with it are refused"


def secret_or_sample(env: Mapping[str, str] | None = None) -> bytes:
    """Return the configured secret, or the sample one when none is set."""
    env = os.environ if env is None else env
    configured = secrets.is_set(env, SECRET_VARIABLE) or secrets.is_set(env, SECRETS_VARIABLE)
    return secret_from_env(env) if configured else SAMPLE_SECRET


# A VERP return path (bounces+TOKEN@domain) names the message a bounce is about: the
# send and the row of the ledger, signed. Lower-case letters and digits only, since
# some mail servers change the case of local parts.
_RETURN = re.compile(r"([a-z2-7]{16,40})")
_RETURN_MAC_BYTES = 10


def make_return(secret: bytes, send_id: int, position: int) -> str:
    """Return the token of a VERP address for row `position` of send `send_id`."""
    ids = _varint(send_id) + _varint(position)
    return base64.b32encode(ids + _return_mac(secret, ids)).decode("ascii").rstrip("=").lower()


def read_return(secret: bytes, token: str) -> tuple[int, int] | None:
    """Return (send id, position) a genuine VERP token names; None for anything else."""
    if not _RETURN.fullmatch(token):
        return None
    try:
        raw = base64.b32decode(token.upper() + "=" * (-len(token) % 8))
    except ValueError:
        return None
    if base64.b32encode(raw).decode("ascii").rstrip("=").lower() != token:
        return None  # one spelling only
    ids, mac = raw[:-_RETURN_MAC_BYTES], raw[-_RETURN_MAC_BYTES:]
    if not any(hmac.compare_digest(mac, _return_mac(key, ids)) for key in _accepted(secret)):
        return None
    numbers = _unvarints(ids)
    if numbers is None or len(numbers) != 2:
        return None
    return numbers[0], numbers[1]


def _return_mac(secret: bytes, ids: bytes) -> bytes:
    return hmac.digest(secret, b"return\0" + ids, hashlib.sha256)[:_RETURN_MAC_BYTES]


def _varint(number: int) -> bytes:
    out = bytearray()
    while True:
        byte, number = number & 0x7F, number >> 7
        out.append(byte | (0x80 if number else 0))
        if not number:
            return bytes(out)


def _unvarints(data: bytes) -> list[int] | None:
    numbers, current, shift = [], 0, 0
    for byte in data:
        current |= (byte & 0x7F) << shift
        shift += 7
        if shift > 63:
            return None
        if not byte & 0x80:
            numbers.append(current)
            current, shift = 0, 0
    return numbers if shift == 0 else None


# A signup's confirmation link names the pending request and when the link expires,
# signed with the address it was sent to (which the token does not reveal).
_CONFIRM = re.compile(r"[A-Za-z0-9_-]{24,44}")


def make_confirm(secret: bytes, signup_id: int, address: str, expires: int) -> str:
    """Return the token of the confirmation link of signup `signup_id`."""
    ids = _varint(signup_id) + _varint(expires)
    return _b64(ids + _confirm_mac(secret, ids, address))


def read_confirm(token: str) -> tuple[int, int] | None:
    """Return (signup id, expiry) a well-formed confirmation token claims, unverified."""
    if not _CONFIRM.fullmatch(token):
        return None
    raw = _unb64(token)
    if _b64(raw) != token or len(raw) <= _MAC_BYTES:
        return None
    numbers = _unvarints(raw[:-_MAC_BYTES])
    if numbers is None or len(numbers) != 2 or not 0 < numbers[0] <= _MAX_ID:
        return None
    return numbers[0], numbers[1]


def verify_confirm(secret: bytes, token: str, address: str) -> bool:
    """Return whether a confirmation token was made with `secret` for `address`."""
    if read_confirm(token) is None:
        return False
    raw = _unb64(token)
    ids, mac = raw[:-_MAC_BYTES], raw[-_MAC_BYTES:]
    return any(
        hmac.compare_digest(mac, _confirm_mac(key, ids, address)) for key in _accepted(secret)
    )


def _confirm_mac(secret: bytes, ids: bytes, address: str) -> bytes:
    message = b"confirm\0" + ids + b"\0" + address.lower().encode("utf-8")
    return hmac.digest(secret, message, hashlib.sha256)[:_MAC_BYTES]


# A message's Message-ID names its issue and, through a MAC, its reader: what a report
# that encloses a copy of the message (a bounce without VERP, a complaint) proves it is
# about, where anyone could write an address in a report.
_MESSAGE_ID = re.compile(r"<([A-Za-z0-9._-]+)\.([0-9a-f]{24})@[^>]+>")


def message_digest(secret: bytes, issue_key: str, address: str, nonce: str = "") -> str:
    """Return the part of a Message-ID that names the reader of one issue's message (a
    test's, with its `nonce`): 24 hex digits only the secret's holder can make."""
    message = f"msgid\0{issue_key}\0{address.lower()}\0{nonce}".encode()
    return hmac.digest(secret, message, hashlib.sha256)[:12].hex()


def read_message_id(
    secret: bytes, message_id: str, addresses: Iterable[str]
) -> tuple[str, str] | None:
    """Return (issue, address) when `message_id` is one we made for one of `addresses`,
    None otherwise (a Message-ID of someone else's, or forged)."""
    match = _MESSAGE_ID.search(message_id)
    if match is None:
        return None
    issue, given = match.group(1), match.group(2)
    listed = list(addresses)
    for key in _accepted(secret):
        for address in listed:
            if hmac.compare_digest(given, message_digest(key, issue, address)):
                return issue, address.lower()
    return None
