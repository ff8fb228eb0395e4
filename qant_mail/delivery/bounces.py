"""What comes back after a message was accepted: bounces (DSNs, RFC 3464, and the
non-standard formats of common servers, read by flufl.bounce) and complaints (ARF,
RFC 5965), read from a Maildir, an mbox, IMAP or a mail pipe, and classified: who and
which message each is about (by the VERP return path when there is one). What is done
about them is the application's (`app.bounces`)."""

from __future__ import annotations

import contextlib
import email
import enum
import hashlib
import imaplib
import mailbox
import os
import re
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from email import policy
from email.message import Message
from pathlib import Path
from urllib.parse import unquote, urlsplit

from qant_mail.audience import tokens
from qant_mail.audience.messages import MAX_MESSAGE
from qant_mail.base.config import Settings
from qant_mail.base.errors import ExitCode, QantError
from qant_mail.base.files import read_file

IMAP_PASSWORD_VARIABLE = "QANT_BOUNCES_PASSWORD"
_STATUS = re.compile(r"^\s*Status:\s*([245])\.(\d{1,3})\.(\d{1,3})", re.IGNORECASE | re.MULTILINE)
_MESSAGE_ID = re.compile(r"<([A-Za-z0-9._-]+)\.[0-9a-f]{24}@[^>]+>")
_UNSUBSCRIBE = re.compile(r"/unsubscribe/([A-Za-z0-9_-]+\.[A-Za-z0-9_-]+)")


class BounceSourceError(QantError):
    """A mailbox of bounces that cannot be read (missing, a server that refuses us)."""

    exit_code = ExitCode.UNAVAILABLE


class Outcome(enum.StrEnum):
    """What a report turned out to be, and what was done."""

    HARD = "hard bounce"  # the address is gone: marked bounced
    SOFT = "soft bounce"  # counted; marked bounced at the limit
    COMPLAINT = "complaint"  # the reader called it spam: marked complained
    NOT_SPAM = "not-spam report"  # a feedback report that is no complaint
    NOT_A_BOUNCE = "not a bounce"  # an auto-reply, a reader's answer…
    UNMATCHED = "no reader of ours"  # a bounce about no address we know
    FORGED = "forged token"  # a VERP address whose signature is wrong: nothing done
    ALREADY = "already read"


@dataclass(frozen=True)
class Finding:
    """One report, read."""

    source: str  # where it was read from (a file, "stdin", an IMAP uid)
    outcome: Outcome
    address: str = ""
    issue: str = ""
    detail: str = ""


@dataclass
class BounceReport:
    """What a run of `qant-mail bounces` read and did."""

    findings: list[Finding] = field(default_factory=list)

    @property
    def counts(self) -> Counter[Outcome]:
        """Return how many reports ended in each outcome."""
        return Counter(finding.outcome for finding in self.findings)


@dataclass(frozen=True)
class Reading:
    outcome: Outcome
    addresses: tuple[str, ...] = ()
    detail: str = ""
    verp: tuple[int, int] | None = None
    issue: str = ""
    unsubscribe_token: str = ""  # from the copy of our message a complaint encloses


def identity(data: bytes) -> str:
    """Return what makes a report the same report wherever it was kept: its Message-ID,
    or else its text without the spaces, line ends and ">From " escapes that storing it
    in an mbox (or a Maildir) may change."""
    head = data.split(b"\n\n", 1)[0].split(b"\r\n\r\n", 1)[0]
    found = re.search(rb"(?im)^Message-ID:\s*(<[^>\r\n]+>)", head)
    if found:
        return "id:" + found.group(1).decode("ascii", "replace")
    text = re.sub(rb"(?m)^>(?=From )", b"", data)
    return "sha256:" + hashlib.sha256(re.sub(rb"\s+", b"", text)).hexdigest()


def read(data: bytes, secret: bytes, settings: Settings) -> Reading:
    """Classify a report: a complaint, a hard or soft bounce, or none, and who it is about."""
    parsed = email.message_from_bytes(data[:MAX_MESSAGE], policy=policy.compat32)
    verp = _verp(parsed, secret, settings)
    if verp == "forged":
        return Reading(Outcome.FORGED, detail="the VERP address's signature is wrong")
    found = verp if isinstance(verp, tuple) else None
    complaint = _complaint(parsed)
    if complaint is not None:
        return complaint
    temporary, permanent, detail = _failures(parsed)
    original = _original_headers(parsed)
    issue = _issue_of(original)
    if permanent:
        return Reading(Outcome.HARD, tuple(permanent), detail, found, issue)
    if temporary:
        return Reading(Outcome.SOFT, tuple(temporary), detail, found, issue)
    if found is not None and _looks_like_a_bounce(parsed):
        # Addressed to a VERP address, worded like a failure, in no format we know:
        # counted as soft, so that one odd message does not take a reader off the list.
        return Reading(Outcome.SOFT, (), detail or "an unrecognised bounce", found, issue)
    return Reading(Outcome.NOT_A_BOUNCE, detail=_subject(parsed))


def _verp(message: Message, secret: bytes, settings: Settings) -> tuple[int, int] | str | None:
    """Return the (send, position) the bounce's envelope recipient names, "forged" when
    its token does not verify, None when it went to no VERP address."""
    base = settings.bounces.address
    if not base:
        return None
    local, _, domain = base.partition("@")
    pattern = re.compile(rf"{re.escape(local)}\+([a-z0-9]+)@{re.escape(domain)}", re.IGNORECASE)
    for header in ("Delivered-To", "X-Original-To", "Envelope-To", "X-Envelope-To", "To"):
        for value in message.get_all(header, []):
            match = pattern.search(str(value))
            if match:
                found = tokens.read_return(secret, match.group(1).lower())
                return found if found is not None else "forged"
    return None


def _complaint(message: Message) -> Reading | None:
    if message.get_content_type() != "multipart/report":
        return None
    if str(message.get_param("report-type", "")).lower() != "feedback-report":
        return None
    feedback_type, recipients = "abuse", []
    for part in message.walk():
        if part.get_content_type() == "message/feedback-report":
            fields = _fields(part)
            feedback_type = fields.get("feedback-type", "abuse").lower()
            recipients = [
                value.split(";")[-1].strip(" <>")
                for name, value in fields.items()
                if name in ("original-rcpt-to", "removal-recipient")
            ]
    original = _original_headers(message)
    match = _UNSUBSCRIBE.search(str(original.get("List-Unsubscribe", "")))
    if not recipients:
        recipients = list(re.findall(r"[\w.+-]+@[\w.-]+", str(original.get("to", ""))))
    if feedback_type == "not-spam":
        return Reading(Outcome.NOT_SPAM, detail="the reader said it is not spam")
    return Reading(
        Outcome.COMPLAINT,
        tuple(recipients),
        f"feedback type {feedback_type}",
        None,
        _issue_of(original),
        match.group(1) if match else "",
    )


def _fields(part: Message) -> dict[str, str]:
    """Return the fields of a report part (feedback or delivery status), lower-cased."""
    payload = part.get_payload()
    if isinstance(payload, list):  # parsed as messages (header blocks)
        fields: dict[str, str] = {}
        for block in payload:
            if isinstance(block, Message):
                fields.update({k.lower(): str(v) for k, v in block.items()})
        return fields
    text = part.get_payload(decode=True)
    raw = text.decode("utf-8", "replace") if isinstance(text, bytes) else str(payload)
    return {
        name.strip().lower(): value.strip()
        for name, _, value in (line.partition(":") for line in raw.splitlines())
        if value
    }


def _failures(message: Message) -> tuple[list[str], list[str], str]:
    """Return (temporary, permanent) failed addresses and the server's words."""
    # Imported here: only this command needs it, and it is slow to import.
    from flufl.bounce import all_failures

    try:
        temporary, permanent = all_failures(message)
    except (LookupError, ValueError, TypeError, UnicodeError, AttributeError):
        temporary, permanent = frozenset(), frozenset()
    return _addresses(temporary), _addresses(permanent), _diagnostic(message)


def _addresses(found: frozenset[bytes]) -> list[str]:
    return sorted(address.decode("ascii", "replace").lower() for address in found)


def _diagnostic(message: Message) -> str:
    for part in message.walk():
        if part.get_content_type() == "message/delivery-status":
            fields = _fields(part)
            code = fields.get("diagnostic-code", "").partition(";")[2].strip()
            status = fields.get("status", "")
            return " ".join(x for x in (status, code) if x)[:300]
    header = message.get("X-Failed-Recipients")
    return f"failed: {header}" if header else ""


def _original_headers(message: Message) -> Message:
    """Return the headers of the message a report is about (from its enclosed copy)."""
    for part in message.walk():
        kind = part.get_content_type()
        if kind in ("message/rfc822", "message/global") and part.is_multipart():
            enclosed = part.get_payload(0)
            if isinstance(enclosed, Message):
                return enclosed
        if kind == "text/rfc822-headers":
            payload = part.get_payload(decode=True)
            if isinstance(payload, bytes):
                return email.message_from_bytes(payload, policy=policy.compat32)
    return Message()


def _issue_of(original: Message) -> str:
    match = _MESSAGE_ID.search(str(original.get("Message-ID", "")))
    return match.group(1) if match else ""


def _looks_like_a_bounce(message: Message) -> bool:
    sender = str(message.get("From", "")).lower()
    subject = _subject(message).lower()
    return (
        "mailer-daemon" in sender
        or "postmaster" in sender
        or bool(_STATUS.search(message.as_string()[:20000]))
        or any(w in subject for w in ("undeliver", "delivery status", "failure", "returned"))
    )


def _subject(message: Message) -> str:
    return str(message.get("Subject", ""))[:120]


# ---- where reports come from -----------------------------------------------------------


def read_source(source: str, env: Mapping[str, str] | None = None) -> Iterator[tuple[str, bytes]]:
    """Yield (name, message) from a Maildir, an mbox, an IMAP folder (imaps://user@host/
    folder, password in QANT_BOUNCES_PASSWORD) or `-` (one message on standard input)."""
    env = os.environ if env is None else env
    if source == "-":
        import sys

        yield "stdin", sys.stdin.buffer.read(MAX_MESSAGE + 1)
        return
    if source.startswith(("imap://", "imaps://")):
        yield from _imap(source, env)
        return
    path = Path(source)
    if (path / "cur").is_dir() and (path / "new").is_dir():
        yield from _maildir(path)
    elif path.is_file():
        yield from _mbox(path)
    else:
        raise BounceSourceError(f"{source}: neither a Maildir, an mbox file, an imap:// URL nor -")


def _maildir(path: Path) -> Iterator[tuple[str, bytes]]:
    for folder in ("new", "cur"):
        for entry in sorted((path / folder).iterdir()):
            if entry.is_file():
                try:
                    data = read_file(entry, MAX_MESSAGE)
                except OSError as err:
                    raise BounceSourceError(f"{entry}: cannot read: {err.strerror}") from err
                yield str(entry), data


def _mbox(path: Path) -> Iterator[tuple[str, bytes]]:
    box = mailbox.mbox(path, create=False)
    try:
        for key, message in box.iteritems():
            yield f"{path}#{key}", message.as_bytes()
    finally:
        box.close()


def _imap(source: str, env: Mapping[str, str]) -> Iterator[tuple[str, bytes]]:
    url = urlsplit(source)
    host, user = url.hostname or "", unquote(url.username or "")
    folder = unquote(url.path.lstrip("/")) or "INBOX"
    password = env.get(IMAP_PASSWORD_VARIABLE, "")
    if not password:
        raise BounceSourceError(f"{IMAP_PASSWORD_VARIABLE} is not set: export the password")
    where = f"{host}:{url.port or (993 if url.scheme == 'imaps' else 143)}"
    try:
        client: imaplib.IMAP4 = (
            imaplib.IMAP4_SSL(host, url.port or 993, timeout=30)
            if url.scheme == "imaps"
            else imaplib.IMAP4(host, url.port or 143, timeout=30)
        )
        client.login(user, password)
        status, _ = client.select(_quoted(folder))
        if status != "OK":
            raise BounceSourceError(f"{where}: no folder {folder!r}")
        _, found = client.uid("SEARCH", "UNSEEN")
    except (imaplib.IMAP4.error, OSError) as err:
        raise BounceSourceError(f"cannot read {where} as {user!r}: {err}") from err
    try:
        for raw_uid in (found[0] or b"").split():
            uid = raw_uid.decode("ascii")
            _, fetched = client.uid("FETCH", uid, "(BODY.PEEK[])")
            data = next((item[1] for item in fetched if isinstance(item, tuple)), b"")
            yield f"imap uid {uid}", bytes(data)
            # Marked read once recorded: a run that stops half-way goes on next time.
            client.uid("STORE", uid, "+FLAGS", "(\\Seen)")
    except (imaplib.IMAP4.error, OSError) as err:
        raise BounceSourceError(f"{where}: {err}") from err
    finally:
        with contextlib.suppress(imaplib.IMAP4.error, OSError):
            client.logout()


def _quoted(folder: str) -> str:
    return '"' + folder.replace("\\", "\\\\").replace('"', '\\"') + '"'
