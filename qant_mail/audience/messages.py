"""What readers write to us: an unsubscription by email (the List-Unsubscribe mailto),
read for its sender and the newsletter it names, never for more than its headers."""

from __future__ import annotations

import re

from qant_mail.base.addresses import AddressChecker, AddressError
from qant_mail.store.subscribers import SubscriberError

# An unsubscription request is a short message; one of more is not worth reading.
MAX_MESSAGE = 10 * 1024 * 1024


def sender_of(message: bytes) -> str:
    """Return the address an unsubscription email came from (its From), as stored."""
    from email import policy
    from email.errors import MessageError
    from email.headerregistry import AddressHeader
    from email.parser import HeaderParser

    if len(message) > MAX_MESSAGE:
        raise SubscriberError(f"the message is larger than {MAX_MESSAGE // 2**20} MB")
    try:
        # The headers only: the body, however nested, is never parsed. Headers may be
        # UTF-8 (RFC 6532), which the bytes parser would leave undecoded.
        text = message.decode("utf-8", "replace")
        parsed = HeaderParser(policy=policy.default).parsestr(text, headersonly=True)
        header = parsed.get("From")
        addresses = header.addresses if isinstance(header, AddressHeader) else ()
    except (MessageError, ValueError, LookupError, TypeError, RecursionError) as err:
        raise SubscriberError(f"the message's From cannot be read ({err})") from err
    if len(addresses) != 1 or not addresses[0].addr_spec:
        raise SubscriberError("the message has no single From address")
    try:
        return AddressChecker(test_domains=True).check(str(addresses[0].addr_spec))
    except AddressError as err:
        raise SubscriberError(f"the message's From is not usable: {err}") from err


_ASKED = re.compile(r"^\s*unsubscribe\s+([a-z0-9][a-z0-9-]{0,31})\s*$", re.IGNORECASE)


def newsletter_asked(message: bytes) -> str | None:
    """Return the newsletter an unsubscription email names in its subject
    ("unsubscribe KEY"), if it names one."""
    from email import policy
    from email.errors import MessageError
    from email.parser import HeaderParser

    try:
        text = message[:MAX_MESSAGE].decode("utf-8", "replace")
        subject = HeaderParser(policy=policy.default).parsestr(text, headersonly=True)["Subject"]
    except (MessageError, ValueError, LookupError, TypeError, RecursionError):
        return None
    match = _ASKED.match(str(subject or ""))
    return match.group(1).lower() if match else None
