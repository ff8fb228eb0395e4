"""Email addresses: syntax checks (email-validator, no DNS) and display names."""

from __future__ import annotations

import re

from qant_mail.errors import QantError

# Characters that would let a display name or an address break out of its header line.
_BREAKER = re.compile("[\r\n\0\x0b\x0c\x85\u2028\u2029]")
# An ASCII addr-spec without quoting or comments: what can go in a header as it is.
_PLAIN_ADDRESS = re.compile(
    r"[!#-'*+\-/-9=?A-Z^-~]+(\.[!#-'*+\-/-9=?A-Z^-~]+)*@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+"
)


class AddressError(QantError, ValueError):
    """An email address or a display name that cannot go into a header."""


def normalise_address(value: str) -> str:
    """Return `value` as a deliverable-looking address, or raise `AddressError` saying why."""
    if _BREAKER.search(value):
        raise AddressError(f"{value!r} contains a line break")
    # Imported here: its tables take 25 ms to build, which every command would pay.
    from email_validator import EmailNotValidError, validate_email

    try:
        # Without DNS: a check must not depend on the network, and an import of 100,000
        # rows cannot wait on 100,000 lookups.
        checked = validate_email(value.strip(), check_deliverability=False)
    except EmailNotValidError as err:
        raise AddressError(f"{value.strip()!r} is not a valid address: {err}") from err
    if checked.smtputf8:
        # Non-ASCII local parts need SMTPUTF8 end to end, which few relays offer.
        raise AddressError(f"{value.strip()!r} needs SMTPUTF8 (non-ASCII before the @)")
    return checked.normalized


def check_display_name(value: str) -> str:
    """Return a display name stripped of surrounding spaces; refuse one with line breaks."""
    if _BREAKER.search(value):
        raise AddressError(f"name {value!r} contains a line break")
    return " ".join(value.split())


def is_plain_address(value: str) -> bool:
    """Return whether `value` is a plain ASCII address that can go in a header unquoted."""
    return bool(_PLAIN_ADDRESS.fullmatch(value))


_LOCAL_PART = re.compile(r"[!#-'*+\-/-9=?A-Z^-~]+(\.[!#-'*+\-/-9=?A-Z^-~]+)*")


class AddressChecker:
    """Check many addresses fast: each distinct domain goes through email-validator once.

    An import of 100,000 rows would spend 10 s in email-validator, most of it checking
    the same few domains again and again. A plain local part (RFC 5322 dot-atom) with a
    domain email-validator already accepted needs no second look; anything else gets the
    full check.
    """

    def __init__(self) -> None:
        self._domains: dict[str, str | None] = {}

    def check(self, value: str) -> str:
        """Return the address as it will be stored (stripped), or raise `AddressError`."""
        address = value.strip()
        local, at, domain = address.rpartition("@")
        if at and _LOCAL_PART.fullmatch(local) and len(local) <= 64 and len(address) <= 254:
            key = domain.lower()
            if key not in self._domains:
                try:
                    normalise_address(f"postmaster@{domain}")
                    self._domains[key] = None
                except AddressError as err:
                    self._domains[key] = str(err).replace("postmaster@", f"{local}@", 1)
            verdict = self._domains[key]
            if verdict is None:
                return address
            raise AddressError(verdict.replace(f"{local}@{domain}", address))
        normalise_address(address)
        return address
