"""Email addresses: syntax checks (email-validator, no DNS) and display names."""

from __future__ import annotations

import re

from qant_mail.base.errors import QantError

# Characters that would let a display name or an address break out of its header line,
# and the other controls no name holds (escape sequences would also reach terminals).
_BREAKER = re.compile("[\r\n\x0b\x0c\x85\u2028\u2029]")
_BREAKS = re.compile("[\t\r\n\x0b\x0c\x85\u2028\u2029]+")
_CONTROL = re.compile("[\x00-\x08\x0e-\x1f\x7f\x80-\x84\x86-\x9f]")
# An ASCII addr-spec without quoting or comments: what can go in a header as it is.
_PLAIN_ADDRESS = re.compile(
    r"[!#-'*+\-/-9=?A-Z^-~]+(\.[!#-'*+\-/-9=?A-Z^-~]+)*@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+"
)


class AddressError(QantError, ValueError):
    """An email address or a display name that cannot go into a header."""


def normalise_address(value: str, *, test_domains: bool = False) -> str:
    """Return `value` as it is stored and sent, or raise `AddressError` saying why.

    An address is stored in lower case (what mail systems match on: Lea@Example.com
    and lea@example.com are one reader), so that both databases compare addresses as
    plain text. An international domain is accepted and written in its ASCII form (IDNA:
    bücher.de becomes xn--bcher-kva.de), which every relay understands and which makes
    one mailbox one row. A non-ASCII local part is refused: it needs SMTPUTF8 from end to
    end, which few relays offer. `test_domains` lets the reserved `.test` names through
    (tests)."""
    _refuse_controls(value, "address")
    # Imported here: its tables take 25 ms to build, which every command would pay.
    from email_validator import EmailNotValidError, validate_email

    try:
        # Without DNS: a check must not depend on the network, and an import of 100,000
        # rows cannot wait on 100,000 lookups.
        checked = validate_email(
            value.strip(), check_deliverability=False, test_environment=test_domains
        )
    except EmailNotValidError as err:
        hint = ""
        if not test_domains and value.strip().lower().endswith(".test"):
            hint = " (to try things out with .test addresses: --allow-test-domains)"
        raise AddressError(f"{_shown(value.strip())} is not a valid address: {err}{hint}") from err
    if checked.smtputf8 or checked.ascii_email is None:
        raise AddressError(
            f"{_shown(value.strip())} needs SMTPUTF8 (non-ASCII before the @), which "
            "relays rarely carry"
        )
    return canonical(checked.ascii_email)


def canonical(address: str) -> str:
    """Return the form an address is stored and looked up in: stripped, in lower case
    (ASCII letters only: a stored address is ASCII, its domain in IDNA form)."""
    return address.strip().translate(_ASCII_LOWER)


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def check_one_line(value: str, what: str) -> str:
    """Return `value` if it has no line break nor control character (a header's text,
    a name shown on one line); raise AddressError naming `what` otherwise."""
    _refuse_controls(value, what)
    return value


def strip_controls(value: str) -> str:
    """Return `value` with line breaks and tabs made spaces and other control characters
    removed: the last guard before a value reaches a header line."""
    return _CONTROL.sub("", _BREAKS.sub(" ", value))


def _refuse_controls(value: str, what: str) -> None:
    if _BREAKER.search(value):
        raise AddressError(f"{what} {_shown(value)} contains a line break")
    found = _CONTROL.search(value)
    if found:
        raise AddressError(
            f"{what} {_shown(value)} contains the control character U+{ord(found.group()):04X}"
        )


def _shown(value: str, limit: int = 80) -> str:
    """Return `value` quoted for a message, control characters escaped, cut if long."""
    return repr(value[:limit] + ("…" if len(value) > limit else ""))


def check_display_name(value: str) -> str:
    """Return a display name stripped of surrounding spaces; refuse one with line breaks
    or other control characters."""
    _refuse_controls(value, "name")
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
    full check. The cache of domains is bounded, so that a list of a million distinct
    domains does not hold them all.
    """

    MAX_DOMAINS = 10_000

    def __init__(self, *, test_domains: bool = False) -> None:
        self.test_domains = test_domains
        # domain as written → its ASCII form, or the reason it is refused
        self._domains: dict[str, tuple[str | None, str | None]] = {}

    def check(self, value: str) -> str:
        """Return the address as it will be stored, or raise `AddressError`."""
        address = value.strip()
        local, at, domain = address.rpartition("@")
        if not (at and _LOCAL_PART.fullmatch(local) and len(local) <= 64 and len(address) <= 254):
            return normalise_address(address, test_domains=self.test_domains)
        key = domain.lower()
        known = self._domains.get(key)
        if known is None:
            try:
                checked = normalise_address(f"postmaster@{domain}", test_domains=self.test_domains)
                known = (checked.rpartition("@")[2], None)
            except AddressError as err:
                # The reason, with the domain's own words; the address is put back in below.
                known = (None, str(err).split(" is not a valid address: ", 1)[-1])
            if len(self._domains) >= self.MAX_DOMAINS:
                self._domains.clear()
            self._domains[key] = known
        ascii_domain, reason = known
        if ascii_domain is None:
            raise AddressError(f"{_shown(address)} is not a valid address: {reason}")
        return canonical(f"{local}@{ascii_domain}")
