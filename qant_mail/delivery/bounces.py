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
import logging
import mailbox
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from email import policy
from email.message import Message
from pathlib import Path
from urllib.parse import unquote, urlsplit

from qant_mail.audience import tokens
from qant_mail.audience.messages import MAX_MESSAGE
from qant_mail.base import secrets
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
    DELIVERED = "delivery notice"  # a DSN saying the message arrived: nothing to do
    DELAYED = "delay warning"  # still being tried by the relay: nothing to do yet
    NOT_A_BOUNCE = "not a bounce"  # an auto-reply, a reader's answer…
    UNPROVEN = "no proof"  # names a reader, but proves no message of ours: nothing done
    UNMATCHED = "no reader of ours"  # proves a message of ours no ledger row holds
    FORGED = "forged token"  # a VERP address whose signature is wrong: nothing done
    UNREADABLE = "unreadable"  # too large, too deep, or broken: skipped
    ALREADY = "already read"


# What changes a reader; the others change nobody.
ACTING = (Outcome.HARD, Outcome.SOFT, Outcome.COMPLAINT)


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
    """What a report says, and what in it could prove which message it is about."""

    outcome: Outcome
    addresses: tuple[str, ...] = ()  # the addresses the report names (anyone can write)
    detail: str = ""
    verp: tuple[int, int] | None = None  # (send, position) of a VERP token that verifies
    issue: str = ""  # the issue the enclosed copy's Message-ID names (unverified)
    message_id: str = ""  # the enclosed copy's Message-ID: proof, if signed for an address
    unsubscribe_token: str = ""  # from the enclosed copy's List-Unsubscribe: proof too


def identity(data: bytes) -> str:
    """Return what makes a report the same report wherever it was kept: its Message-ID,
    or else its text without the spaces, line ends and ">From " escapes that storing it
    in an mbox (or a Maildir) may change."""
    head = data.split(b"\n\n", 1)[0].split(b"\r\n\r\n", 1)[0]
    found = re.search(rb"(?im)^Message-ID:\s*(<[^>\r\n]{1,250}>)", head)
    if found:
        return "id:" + found.group(1).decode("ascii", "replace")
    text = re.sub(rb"(?m)^>(?=From )", b"", data)
    return "sha256:" + hashlib.sha256(re.sub(rb"\s+", b"", text)).hexdigest()


# A report is a few nested parts (a DSN: the report, its status, the copy). One nested
# deeper than this is no report of any server, and Python's parser would recurse into it.
MAX_DEPTH = 12
_MULTIPART = re.compile(rb"(?im)^content-type:\s*multipart/")


def read(data: bytes, secret: Callable[[], bytes], settings: Settings) -> Reading:
    """Classify a report: a complaint, a hard or soft bounce, a notice that changes
    nobody, or none; and what in it proves the message it is about. `secret` is asked
    for only when a token is there to verify. A message too large, too deep or broken
    is UNREADABLE, never an error."""
    if len(data) > MAX_MESSAGE:
        return Reading(Outcome.UNREADABLE, detail=f"larger than {MAX_MESSAGE // 2**20} MB")
    if len(_MULTIPART.findall(data)) > MAX_DEPTH:
        return Reading(Outcome.UNREADABLE, detail=f"more than {MAX_DEPTH} nested parts")
    try:
        return _classify(email.message_from_bytes(data, policy=policy.compat32), secret, settings)
    except QantError:
        raise  # the secret is missing: the caller says so
    except Exception as err:  # noqa: BLE001 - a hostile report never stops the run
        return Reading(Outcome.UNREADABLE, detail=f"cannot be read ({type(err).__name__})")


def _classify(message: Message, secret: Callable[[], bytes], settings: Settings) -> Reading:
    verp = _verp(message, secret, settings)
    if verp == "forged":
        return Reading(Outcome.FORGED, detail="the VERP address's signature is wrong")
    found = verp if isinstance(verp, tuple) else None
    complaint = _complaint(message, found)
    if complaint is not None:
        return complaint
    original = _original_headers(message)
    proof = {
        "verp": found,
        "issue": _issue_of(original),
        "message_id": str(original.get("Message-ID", ""))[:300],
        "unsubscribe_token": _token_of(original),
    }
    statuses = _statuses(message)
    if statuses and all(
        action in ("delivered", "relayed", "expanded") for _, action, _ in statuses
    ):
        return Reading(Outcome.DELIVERED, detail="the message arrived")
    if statuses and all(action == "delayed" for _, action, _ in statuses):
        return Reading(Outcome.DELAYED, detail="the relay still tries")
    temporary, permanent, detail = _failures(message, statuses)
    if permanent:
        return Reading(Outcome.HARD, tuple(permanent), detail, **proof)  # type: ignore[arg-type]
    if temporary:
        return Reading(Outcome.SOFT, tuple(temporary), detail, **proof)  # type: ignore[arg-type]
    if found is not None and _looks_like_a_bounce(message):
        # Addressed to a VERP address, worded like a failure, in no format we know:
        # counted as soft, so that one odd message does not take a reader off the list.
        detail = detail or "an unrecognised bounce"
        return Reading(Outcome.SOFT, (), detail, **proof)  # type: ignore[arg-type]
    return Reading(Outcome.NOT_A_BOUNCE, detail=_subject(message))


def _verp(
    message: Message, secret: Callable[[], bytes], settings: Settings
) -> tuple[int, int] | str | None:
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
                found = tokens.read_return(secret(), match.group(1).lower())
                return found if found is not None else "forged"
    return None


def _complaint(message: Message, verp: tuple[int, int] | None) -> Reading | None:
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
    if feedback_type == "not-spam":
        return Reading(Outcome.NOT_SPAM, detail="the reader said it is not spam")
    original = _original_headers(message)
    recipients += re.findall(r"[\w.+-]+@[\w.-]+", str(original.get("to", "")))
    return Reading(
        Outcome.COMPLAINT,
        tuple(dict.fromkeys(r.lower() for r in recipients)),
        f"feedback type {feedback_type}"[:100],
        verp,
        _issue_of(original),
        str(original.get("Message-ID", ""))[:300],
        _token_of(original),
    )


def _token_of(original: Message) -> str:
    match = _UNSUBSCRIBE.search(str(original.get("List-Unsubscribe", "")))
    return match.group(1) if match else ""


def _fields(part: Message) -> dict[str, str]:
    """Return the fields of a report part (feedback or delivery status), lower-cased."""
    fields: dict[str, str] = {}
    for block in _blocks(part):
        fields.update(block)
    return fields


def _blocks(part: Message) -> list[dict[str, str]]:
    """Return the blocks of fields of a report part: the report's, then one per
    recipient (RFC 3464), each lower-cased."""
    payload = part.get_payload()
    encoding = str(part.get("Content-Transfer-Encoding", "")).strip().lower()
    if isinstance(payload, list) and encoding in ("base64", "quoted-printable"):
        # The parser split the encoded text as if it were plain fields: join it back and
        # decode it as the sender said, so that an encoded report is read like any other.
        joined = "\n\n".join(b.as_string() for b in payload if isinstance(b, Message))
        part = Message()
        part["Content-Transfer-Encoding"] = encoding
        part.set_payload(joined)
        payload = joined
    if isinstance(payload, list):  # parsed as messages (header blocks)
        return [
            {k.lower(): str(v) for k, v in block.items()}
            for block in payload
            if isinstance(block, Message)
        ]
    decoded = part.get_payload(decode=True)
    raw = decoded.decode("utf-8", "replace") if isinstance(decoded, bytes) else str(payload)
    return [
        {
            name.strip().lower(): value.strip()
            for name, _, value in (line.partition(":") for line in chunk.splitlines())
            if value
        }
        for chunk in re.split(r"\n\s*\n", raw.replace("\r\n", "\n"))
        if chunk.strip()
    ]


def _statuses(message: Message) -> list[tuple[str, str, str]]:
    """Return (address, action, status) of each recipient a DSN reports on."""
    found = []
    for part in message.walk():
        if part.get_content_type() != "message/delivery-status":
            continue
        for block in _blocks(part):
            recipient = block.get("final-recipient") or block.get("original-recipient", "")
            if not recipient:
                continue
            address = recipient.partition(";")[2].strip(" <>").lower() or recipient.lower()
            found.append((address, block.get("action", "").lower(), block.get("status", "")))
    return found


def _failures(
    message: Message, statuses: list[tuple[str, str, str]]
) -> tuple[list[str], list[str], str]:
    """Return (temporary, permanent) failed addresses and the server's words. A DSN's
    own status decides (RFC 3463): 5.x.x is permanent, but for a full mailbox (5.2.2,
    which clears by itself); 4.x.x on a failure the relay gave up on is temporary. Other
    formats are read by flufl.bounce."""
    failed = [(a, s) for a, action, s in statuses if action == "failed"]
    if failed:
        permanent = sorted(
            {a for a, s in failed if s.startswith("5") and not s.startswith("5.2.2")}
        )
        temporary = sorted({a for a, s in failed if a not in permanent})
        return temporary, permanent, _diagnostic(message)
    # Imported here: only this command needs it, and it is slow to import.
    from flufl.bounce import all_failures

    _quiet_flufl()

    try:
        temporary_found, permanent_found = all_failures(message)
    except Exception:  # noqa: BLE001 - its detectors trip on odd messages (no From, say)
        # One detector's slip must not make the whole message unreadable: what we read
        # ourselves (VERP, the wording) still decides.
        temporary_found = permanent_found = frozenset()
    return _addresses(temporary_found), _addresses(permanent_found), _diagnostic(message)


def _quiet_flufl() -> None:
    """Keep flufl.bounce's log to itself: a detector that trips on an odd message logs a
    traceback before it raises, and the raise is handled here (the message is read by
    what we read ourselves). On an editor's terminal or in a mail server's log, that
    traceback would look like a crash."""
    log = logging.getLogger("flufl.bounce")
    if log.propagate:
        log.addHandler(logging.NullHandler())
        log.propagate = False


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
    return f"failed: {header}"[:300] if header else ""


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


@dataclass(frozen=True)
class Letter:
    """One message of a source, or why it could not be read."""

    source: str  # where it was read from (a file, "stdin", an IMAP uid)
    data: bytes
    problem: str = ""  # why it could not be read; then `data` is empty


def read_source(source: str, env: Mapping[str, str] | None = None) -> Iterator[Letter]:
    """Yield each message of a Maildir, an mbox, a file holding one message, an IMAP
    folder (imaps://user@host/folder, password in QANT_BOUNCES_PASSWORD) or `-` (one
    message on standard input). A message that cannot be read is yielded with why; a
    source that cannot be read at all is an error."""
    env = os.environ if env is None else env
    if source == "-":
        import sys

        yield Letter("stdin", sys.stdin.buffer.read(MAX_MESSAGE + 1))
        return
    if source.startswith(("imap://", "imaps://")):
        yield from _imap(source, env)
        return
    path = Path(source)
    if (path / "cur").is_dir() and (path / "new").is_dir():
        yield from _maildir(path)
    elif path.is_file():
        yield from _mbox(path) if _is_mbox(path) else _files([path])
    else:
        raise BounceSourceError(
            f"{source}: neither a Maildir, an mbox, a message's file, an imap:// URL nor -"
        )


def _is_mbox(path: Path) -> bool:
    """Return whether `path` is an mbox (its first line a "From " separator), not one
    message saved as a file (.eml)."""
    try:
        with path.open("rb") as handle:
            return handle.read(5) == b"From "
    except OSError as err:
        raise BounceSourceError(f"{path}: cannot read: {err.strerror}") from err


def _maildir(path: Path) -> Iterator[Letter]:
    for folder in ("new", "cur"):
        yield from _files(sorted(e for e in (path / folder).iterdir() if e.is_file()))


def _files(paths: list[Path]) -> Iterator[Letter]:
    for entry in paths:
        try:
            yield Letter(str(entry), read_file(entry, MAX_MESSAGE))
        except (OSError, QantError) as err:
            yield Letter(str(entry), b"", str(err))


def _mbox(path: Path) -> Iterator[Letter]:
    box = mailbox.mbox(path, create=False)
    try:
        for key in box.iterkeys():
            where = f"{path}#{key}"
            try:
                data = box.get_bytes(key)
            except (OSError, ValueError, LookupError) as err:
                yield Letter(where, b"", f"cannot be read ({err})")
                continue
            yield Letter(where, data)
    finally:
        box.close()


def _imap(source: str, env: Mapping[str, str]) -> Iterator[Letter]:
    url = urlsplit(source)
    host, user = url.hostname or "", unquote(url.username or "")
    folder = unquote(url.path.lstrip("/")) or "INBOX"
    password = secrets.secret(env, IMAP_PASSWORD_VARIABLE) or ""
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
            yield Letter(f"imap uid {uid}", bytes(data))
            # Marked read once recorded: a run that stops half-way goes on next time.
            client.uid("STORE", uid, "+FLAGS", "(\\Seen)")
    except (imaplib.IMAP4.error, OSError) as err:
        raise BounceSourceError(f"{where}: {err}") from err
    finally:
        with contextlib.suppress(imaplib.IMAP4.error, OSError):
            client.logout()


def _quoted(folder: str) -> str:
    return '"' + folder.replace("\\", "\\\\").replace('"', '\\"') + '"'
