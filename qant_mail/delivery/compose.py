"""The MIME message of an issue: built once as encoded bytes, spliced per recipient."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import html
import json
import re
import secrets
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from email.utils import format_datetime, formataddr
from typing import TYPE_CHECKING, Any

from qant_mail.audience import tokens
from qant_mail.authoring import prose
from qant_mail.authoring.render import DEFERRED_WRAP, PLACEHOLDER, RenderedIssue, Slot
from qant_mail.base.addresses import check_display_name, is_plain_address, strip_controls
from qant_mail.base.config import DEFAULT_NEWSLETTER, Settings
from qant_mail.base.errors import QantError

if TYPE_CHECKING:
    # Imported where a key is used: loading `cryptography` is a tenth of a render's
    # start-up, and `render`, `check` and the preview sign nothing.
    from qant_mail.delivery import dkim

CRLF = b"\r\n"
HeaderField = tuple[str, bytes]  # a name, and its value as written after the colon
# Quoted-printable keeps printable ASCII but "=" as is; everything else becomes =XX.
_QP_UNSAFE = re.compile(rb"[^\x21-\x3c\x3e-\x7e \t]")
_QP_LINE = 76  # RFC 2045: encoded lines of at most 76 characters, the soft break included
# A display name of letters, digits and spaces needs no quoting (RFC 5322 phrase of atoms).
# The href of a link: (everything before the value, the quote, the value).
_HREF = re.compile(r"""(<a\b[^>]*?\bhref\s*=\s*)(["'])(.*?)\2""", re.IGNORECASE | re.DOTALL)
_PLAIN_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+( [A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")


class ComposeError(QantError):
    """A message cannot be built for a recipient (an unusable address or name)."""


@dataclass(frozen=True)
class Recipient:
    """Who one message goes to."""

    address: str
    name: str = ""
    subscriber_id: int = 0


@dataclass(frozen=True)
class _Slot:
    slot: Slot
    html: bool  # in the HTML part (escape the value) or the text part

    @property
    def index(self) -> int:
        """Return where the value's encoding is kept in a message's list of them."""
        return _SLOT_INDEX[self]


# Per message, the values are a list in the order of Slot, and each is encoded once into
# a list, at 2 x its place (+1 in the HTML part): cheaper than dictionaries keyed by
# enums or dataclasses, whose hashes are Python calls on every lookup.
_SLOTS = tuple(_Slot(slot, html) for slot in Slot for html in (False, True))
_SLOT_INDEX = {kind: index for index, kind in enumerate(_SLOTS)}
_PLACE = {slot: place for place, slot in enumerate(Slot)}
_ESCAPED = re.compile("[&<>\"']")  # what html.escape changes
_UNSUBSCRIBE = _PLACE[Slot.UNSUBSCRIBE_URL]


@dataclass(frozen=True)
class _Wrapped:
    """A paragraph of the text part with per-recipient values, wrapped once filled."""

    text: str
    width: int
    indent: str
    hanging: str
    slots: tuple[Slot, ...]  # its placeholders, in order
    # Encoded layouts by the lengths of the values: see `layout`.
    layouts: dict[tuple[int, ...], tuple[bytes | int, ...]] = field(
        default_factory=dict, compare=False, repr=False
    )
    places: tuple[int, ...] = field(init=False, compare=False, repr=False)  # in a row

    def __post_init__(self) -> None:
        object.__setattr__(self, "places", tuple(_PLACE[slot] for slot in self.slots))

    def layout(self, row: Sequence[str]) -> tuple[bytes | int, ...] | None:
        """Return the paragraph wrapped and encoded for values of these lengths, each
        value on an encoded line of its own (an int: the place of its encoding, see
        `_SLOTS`); None if a value could change the
        wrapping by more than its length (it holds a space or tab, or it is one
        character, which may be punctuation that `prose.wrap` keeps with the word before).

        The wrapping depends only on the words' lengths, so every recipient whose values
        have the lengths of an earlier one's shares its layout: a send wraps and encodes
        the paragraph once per distinct length, not once per message."""
        lengths = []
        for place in self.places:
            value = row[place]
            if len(value) == 1 or " " in value or "\t" in value:
                return None
            lengths.append(len(value))
        key = tuple(lengths)
        found = self.layouts.get(key)
        if found is None:
            if len(self.layouts) >= _MAX_LAYOUTS:
                self.layouts.clear()  # many distinct lengths: bounded memory, not speed
            found = self.layouts[key] = self._lay_out(key)
        return found

    def _lay_out(self, lengths: tuple[int, ...]) -> tuple[bytes | int, ...]:
        # Each value stands in as a run of its own control character, of its length:
        # control characters never come from an issue or the settings, which refuse them.
        stand_ins = iter(chr(_STAND_IN + n) * length for n, length in enumerate(lengths))
        filled = PLACEHOLDER.sub(lambda _: next(stand_ins), self.text)
        lines = "\n".join(prose.wrap(filled, self.width, self.indent, self.hanging))
        text = _STAND_IN_RUN.sub(lambda m: self.slots[ord(m[1]) - _STAND_IN].token, lines)
        pieces = _qp_template(text, html=False, soft_end=True)
        return tuple(p.index if isinstance(p, _Slot) else p for p in pieces)  # type: ignore[misc]

    def fill(self, values: Mapping[Slot, str]) -> bytes:
        """Return the paragraph filled, wrapped and encoded (any values at all)."""
        filled = PLACEHOLDER.sub(lambda m: values[Slot(m.group(1))], self.text)
        lines = prose.wrap(filled, self.width, self.indent, self.hanging)
        return qp_encode("\n".join(lines).encode("utf-8"), soft_end=True)


_STAND_IN = 0x10  # \x10, \x11, ...: one character per placeholder of a paragraph
_MAX_SLOTS = 14  # \x10 to \x1d: \x1e and \x1f stay out of the way of the render's marks
_STAND_IN_RUN = re.compile("([\x10-\x1d])\\1*")
_MAX_LAYOUTS = 256


Segment = bytes | _Slot | _Wrapped


def reader_page_url(settings: Settings, secret: bytes, recipient: Recipient) -> str:
    """Return the link to the recipient's page: the newsletters they get, one click each."""
    token = tokens.make(secret, recipient.subscriber_id, recipient.address, purpose=tokens.READER)
    return f"{settings.newsletter.base_url}/subscriptions/{token}"


def notice(
    settings: Settings,
    recipient: Recipient,
    subject: str,
    html_part: str,
    text_part: str,
    *,
    when: dt.datetime | None = None,
) -> bytes:
    """Return a one-off message to one reader (a signup's confirmation): From the
    newsletter, HTML and text; no list headers, since it is not a mailing to a list.
    Unsigned: the outbox signs it as it leaves, with the keys of the newsletter."""
    alternative = _boundary("alt")
    sender = settings.sender
    domain = settings.sender_domain
    moment = when or dt.datetime.now(dt.UTC).astimezone()
    headers: list[tuple[str, str]] = [
        ("From", _address_header(sender.name, sender.address, "From")),
        ("To", _address_header(check_display_name(recipient.name), recipient.address, "To")),
        ("Subject", _header_text(subject, "Subject")),
        ("Date", format_datetime(moment)),
        ("Message-ID", f"<notice.{secrets.token_hex(12)}@{domain}>"),
        ("MIME-Version", "1.0"),
        # RFC 3834: no vacation replies to it.
        ("Auto-Submitted", "auto-generated"),
        ("Content-Type", f'multipart/alternative;\r\n boundary="{alternative}"'),
    ]
    if sender.reply_to:
        headers.insert(1, ("Reply-To", sender.reply_to))
    if not is_plain_address(recipient.address):
        raise ComposeError(f"{recipient.address!r} cannot be put in a To header")
    fields = [(name, f" {value}".encode("ascii")) for name, value in headers]
    body = b"".join(
        [
            f"--{alternative}\r\n".encode(),
            b'Content-Type: text/plain; charset="utf-8"\r\n'
            b"Content-Transfer-Encoding: quoted-printable\r\n\r\n",
            qp_encode(text_part.encode("utf-8"), soft_end=False),
            f"\r\n--{alternative}\r\n".encode(),
            b'Content-Type: text/html; charset="utf-8"\r\n'
            b"Content-Transfer-Encoding: quoted-printable\r\n\r\n",
            qp_encode(html_part.encode("utf-8"), soft_end=False),
            f"\r\n--{alternative}--\r\n".encode(),
        ]
    )
    return _render_headers(fields) + CRLF + body


class MessageTemplate:
    """An issue's message with every part encoded once; `personalise` is cheap splicing."""

    def __init__(
        self,
        rendered: RenderedIssue,
        settings: Settings,
        *,
        secret: bytes,
        issue_key: str | None = None,
        test: bool = False,
        unique: bool = False,
        date: dt.datetime | None = None,
        keys: Sequence[dkim.DkimKey] = (),
    ) -> None:
        self.settings = settings
        self.keys = tuple(keys)
        self.secret = secret
        self.issue_key = issue_key or rendered.issue.date.isoformat()
        self.domain = settings.sender_domain
        self.web_url = rendered.web_url
        self.unsubscribe_base = f"{settings.newsletter.base_url}/unsubscribe/"
        # The main newsletter's links name no newsletter: those mailed before there were
        # several keep working.
        key = settings.newsletter.id
        self.newsletter_token = "" if key == settings.main_id else key
        self._reader_base = f"{settings.newsletter.base_url}/subscriptions/"
        self._mailto = self._mailto_link()
        # A test's Message-IDs are its own: a mail client that folds messages of one
        # Message-ID together must not hide the real issue behind an editor's test. A
        # message sent on an occasion (a welcome) is its own message each time, too.
        self.test_nonce = secrets.token_hex(6) if test or unique else ""
        subject = ("[TEST] " if test else "") + rendered.subject
        when = date or dt.datetime.now(dt.UTC).astimezone()
        self.subject = subject
        # Counted links ([audience] count_clicks): the list's messages only, not a test
        # or a welcome. `links[n - 1]` is where base_url/l/ISSUE/n leads.
        counted = settings.audience.count_clicks and not (test or unique)
        self.links: list[str] = []
        self._click_base = f"{settings.newsletter.base_url}/l/{self.issue_key}/" if counted else ""
        # The boundaries follow from the content, not from chance: the same render gives
        # the same message, so that an approval can name it by a digest and a reader's
        # copy can be made again. ("=_" never occurs in an encoded body: no collision.)
        seed = hashlib.sha256(
            "\0".join([self.issue_key, self.test_nonce, rendered.html, rendered.text]).encode()
        ).hexdigest()[:24]
        alternative = _boundary("alt", seed)
        self._headers = self._static_headers(subject, when, alternative)
        self._segments = self._body(rendered, alternative, seed)
        self._finish()

    def _finish(self) -> None:
        """Prepare what `personalise` walks, and the signers, from the headers and parts."""
        self._minter = tokens.Minter(self.secret, self.newsletter_token)
        self._header_bytes = _render_headers(self._headers)
        # What `personalise` walks: a value's place (an int) where the value goes.
        self._plan: list[bytes | int | _Wrapped] = [
            s.index if isinstance(s, _Slot) else s for s in self._segments
        ]
        used = {s.index for s in self._segments if isinstance(s, _Slot)}
        for segment in self._segments:
            if isinstance(segment, _Wrapped):
                used.update(_Slot(slot, False).index for slot in segment.slots)
        self._used = sorted(used)
        self._body_hash: dkim.BodyHash | None = None
        self._signers: list[dkim.Signer] = []
        if self.keys:
            from qant_mail.delivery import dkim

            signed = [s if isinstance(s, bytes) else None for s in self._segments]
            self._body_hash = dkim.BodyHash.of(signed)
            own = ("Message-ID", "To", "List-Unsubscribe")  # see _recipient_headers
            self._signers = [dkim.Signer(key, self._headers, own) for key in self.keys]

    # -- as kept in the store ------------------------------------------------------------

    def frozen(self) -> bytes:
        """Return the message before personalisation, as the store keeps it: with
        `thaw`, the same secret and the same keys, it gives every reader's message again,
        byte for byte but the signatures' timestamps."""
        return zlib.compress(json.dumps(self._state(), separators=(",", ":")).encode(), 6)

    def digest(self) -> str:
        """Return the digest of what this message says to every reader: its headers but
        the date, and its parts before personalisation (what an approval names)."""
        state = self._state()
        state["headers"] = [h for h in state["headers"] if h[0] != "Date"]
        return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()

    @property
    def size(self) -> int:
        """Return the size of the message before personalisation, in bytes."""
        fixed = sum(len(s) for s in self._segments if isinstance(s, bytes))
        return len(self._header_bytes) + fixed

    def dated(self, when: str) -> MessageTemplate:
        """Return this message dated `when` (a Date header's value, as a send first
        sent it): every reader of one send gets the same message, resumed or not."""
        copy = object.__new__(MessageTemplate)
        copy.__dict__.update(self.__dict__)
        copy._headers = [
            (name, f" {when}".encode("ascii") if name == "Date" else value)
            for name, value in self._headers
        ]
        copy._finish()
        return copy

    @property
    def date(self) -> str:
        """Return the value of the Date header."""
        return next(v.decode("ascii").strip() for n, v in self._headers if n == "Date")

    @classmethod
    def thaw(
        cls, frozen: bytes, *, secret: bytes, keys: Sequence[dkim.DkimKey] = ()
    ) -> MessageTemplate:
        """Return the message `frozen` gave, to personalise with `secret` and `keys`."""
        try:
            state = json.loads(zlib.decompress(frozen))
            template = object.__new__(cls)
            template.keys = tuple(keys)
            template.secret = secret
            for name in _KEPT:
                setattr(template, name, state[name])
            template._headers = [(n, base64.b64decode(v)) for n, v in state["headers"]]
            template._segments = [_thawed(piece) for piece in state["segments"]]
        except (ValueError, KeyError, TypeError, zlib.error) as err:
            raise ComposeError(f"the message kept in the store cannot be read: {err}") from err
        template._finish()
        return template

    def _state(self) -> dict[str, Any]:
        state: dict[str, Any] = {name: getattr(self, name) for name in _KEPT}
        state["headers"] = [[n, base64.b64encode(v).decode()] for n, v in self._headers]
        state["segments"] = [_frozen(piece) for piece in self._segments]
        return state

    # -- per recipient ---------------------------------------------------------------

    def personalise(self, recipient: Recipient) -> bytes:
        """Return the complete message for `recipient`, ready for SMTP DATA."""
        row = self._row(recipient)
        # Each value the message holds, encoded once for the part it is in; a value that
        # escaping leaves alone (a link, most addresses) is encoded once for both.
        encoded = [b""] * len(_SLOTS)
        for index in self._used:
            text = row[index >> 1]
            if index & 1:
                if encoded[index - 1] and not _ESCAPED.search(text):
                    encoded[index] = encoded[index - 1]
                    continue
                text = html.escape(text)
            encoded[index] = qp_encode(text.encode("utf-8"), soft_end=True)
        own = self._recipient_headers(recipient, row[_UNSUBSCRIBE])
        parts = [_OWN_HEADERS % tuple(value for _, value in own), self._header_bytes, CRLF]
        varying: list[bytes] = []
        for segment in self._plan:
            if segment.__class__ is bytes:
                parts.append(segment)
                continue
            if segment.__class__ is int:
                chunk = encoded[segment]
            else:
                wrapped: _Wrapped = segment  # type: ignore[assignment]
                layout = wrapped.layout(row) if wrapped.slots else None
                if layout is None:
                    chunk = wrapped.fill(dict(zip(Slot, row, strict=True)))
                else:
                    chunk = b"".join([encoded[p] if isinstance(p, int) else p for p in layout])
            parts.append(chunk)
            varying.append(chunk)
        if self._body_hash is not None:
            body_hash = self._body_hash.digest(varying)
            parts[:0] = [signer.sign(own, body_hash) for signer in self._signers]
        return b"".join(parts)

    def values(self, recipient: Recipient) -> dict[Slot, str]:
        """Return the per-recipient values that fill the placeholders."""
        return dict(zip(Slot, self._row(recipient), strict=True))

    def _row(self, recipient: Recipient) -> list[str]:
        """Return the per-recipient values in the order of Slot."""
        number, address = recipient.subscriber_id, recipient.address
        row = [
            recipient.name,
            address,
            self.unsubscribe_base + self._minter.make(number, address),
            self._reader_base + self._minter.make(number, address, tokens.READER),
            self.web_url,
        ]
        assert len(row) == len(_PLACE)  # in the order of Slot: a new slot comes here too
        return row

    def unsubscribe_url(self, recipient: Recipient) -> str:
        """Return the recipient's one-click unsubscribe link."""
        return self.unsubscribe_base + self._minter.make(recipient.subscriber_id, recipient.address)

    def message_id(self, recipient: Recipient) -> str:
        """Return a Message-ID stable for this (issue, recipient) pair, and one of its
        own for each test send; signed, so that a report enclosing the message proves
        which reader it went to."""
        digest = self._minter.message_digest(self.issue_key, recipient.address, self.test_nonce)
        return f"<{self.issue_key}.{digest}@{self.domain}>"

    def _recipient_headers(self, recipient: Recipient, unsubscribe_url: str) -> list[HeaderField]:
        # Addresses were validated when they entered the store (or the command line);
        # here it is enough to make sure none can break out of its header line.
        address = recipient.address
        if not is_plain_address(address):
            raise ComposeError(f"{address!r} cannot be put in a To header")
        name = recipient.name
        if name and _PLAIN_NAME.fullmatch(name):
            # Most names: atoms and single spaces, nothing to strip, check or quote.
            to = f"{name} <{address}>"
        else:
            try:
                name = check_display_name(name)
            except QantError as err:
                raise ComposeError(str(err)) from err
            to = _address_header(name, address, "To")
        # Folded before the URL: the header then stays within 78 characters a line,
        # and the URL, which cannot be folded, starts a line of its own.
        unsubscribe = f"\r\n <{unsubscribe_url}>{self._mailto}"
        return [  # in the order of _OWN_HEADERS
            ("Message-ID", f" {self.message_id(recipient)}".encode("ascii")),
            ("To", f" {to}".encode("ascii")),
            ("List-Unsubscribe", unsubscribe.encode("ascii")),
        ]

    def _counted(self, page: str) -> str:
        """Return the HTML with each link to elsewhere going through its counter; keep
        where each leads in `links` (one number per address, however often it appears)."""
        numbers: dict[str, int] = {}

        def through(match: re.Match[str]) -> str:
            target = html.unescape(match[3])
            if not target.startswith(("https://", "http://")) or PLACEHOLDER.search(target):
                return match[0]  # mailto:, anchors, a reader's own links: as they are
            if target not in numbers:
                self.links.append(target)
                numbers[target] = len(self.links)
            return f"{match[1]}{match[2]}{self._click_base}{numbers[target]}{match[2]}"

        return _HREF.sub(through, page)

    def _mailto_link(self) -> str:
        """Return the List-Unsubscribe header's second link, if the sender has one."""
        address = self.settings.sender.unsubscribe_address
        if not address:
            return ""
        token = self.newsletter_token
        subject = f"unsubscribe%20{token}" if token else "unsubscribe"
        return f",\r\n <mailto:{address}?subject={subject}>"

    # -- once per issue --------------------------------------------------------------

    def _static_headers(self, subject: str, when: dt.datetime, boundary: str) -> list[HeaderField]:
        sender = self.settings.sender
        list_label = self.settings.edition.list_id
        headers: list[tuple[str, str]] = [
            ("From", _address_header(sender.name, sender.address, "From")),
        ]
        if sender.reply_to:
            headers.append(("Reply-To", sender.reply_to))
        headers += [
            ("Subject", _header_text(subject, "Subject")),
            ("Date", format_datetime(when)),
            ("MIME-Version", "1.0"),
            ("List-Id", _header_text(self.settings.newsletter.name, "List-Id", f" <{list_label}>")),
            ("List-Unsubscribe-Post", "List-Unsubscribe=One-Click"),
            ("Precedence", "bulk"),
            ("Feedback-ID", f"{self.issue_key}:{self._campaign}:{self.domain}"),
            ("Content-Type", f'multipart/alternative;\r\n boundary="{boundary}"'),
        ]
        return [(name, f" {value}".encode("ascii")) for name, value in headers]

    @property
    def _campaign(self) -> str:
        # Gmail's Feedback-ID: issue, then the newsletter, so complaints add up per title.
        return self.newsletter_token or "newsletter"

    def _body(self, rendered: RenderedIssue, alternative: str, seed: str) -> list[Segment]:
        segments: list[Segment] = [
            f"--{alternative}\r\n".encode(),
            b'Content-Type: text/plain; charset="utf-8"\r\n'
            b"Content-Transfer-Encoding: quoted-printable\r\n\r\n",
        ]
        # The "view in browser" link is the same for every reader: filled once, here.
        web_url = rendered.web_url
        segments += _text_template(rendered.text.replace(Slot.BROWSER_URL.token, web_url))
        segments.append(f"\r\n--{alternative}\r\n".encode())
        # Hosted images are links; only embedded ones travel inside the message.
        embedded = [asset for asset in rendered.assets if asset.url.startswith("cid:")]
        related = _boundary("rel", seed) if embedded else None
        if related:
            segments.append(
                f'Content-Type: multipart/related; type="text/html";\r\n boundary="{related}"'
                f"\r\n\r\n--{related}\r\n".encode()
            )
        segments.append(
            b'Content-Type: text/html; charset="utf-8"\r\n'
            b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"
        )
        page = rendered.html.replace(Slot.BROWSER_URL.token, html.escape(web_url))
        if self._click_base:
            page = self._counted(page)
        segments += _qp_template(page, html=True)
        if related:
            for asset in embedded:
                data = asset.path.read_bytes()
                encoded = base64.encodebytes(data).replace(b"\n", CRLF)
                name = asset.name.encode("ascii", "replace").decode().replace('"', "")
                segments.append(
                    (
                        f"\r\n--{related}\r\n"
                        f"Content-Type: {asset.mime_type}\r\n"
                        "Content-Transfer-Encoding: base64\r\n"
                        f"Content-ID: <{asset.content_id}>\r\n"
                        f'Content-Disposition: inline; filename="{name}"\r\n\r\n'
                    ).encode()
                    + encoded.rstrip(CRLF)
                )
            segments.append(f"\r\n--{related}--\r\n".encode())
        else:
            segments.append(CRLF)
        segments.append(f"--{alternative}--\r\n".encode())
        return _merge(segments)


# A message's own headers, as `_recipient_headers` gives their values.
_OWN_HEADERS = b"Message-ID:%b\r\nTo:%b\r\nList-Unsubscribe:%b\r\n"


def _render_headers(headers: Sequence[HeaderField]) -> bytes:
    return b"".join(name.encode("ascii") + b":" + value + CRLF for name, value in headers)


def _boundary(kind: str, seed: str | None = None) -> str:
    # "=_" cannot occur in quoted-printable or base64 bodies: the boundary never collides.
    return f"=_qant_{kind}_{seed or secrets.token_hex(12)}"


# What a kept message holds besides its headers and parts (see MessageTemplate.frozen).
_KEPT = (
    "issue_key",
    "domain",
    "web_url",
    "unsubscribe_base",
    "newsletter_token",
    "_reader_base",
    "_mailto",
    "test_nonce",
    "subject",
    "links",
)


def _frozen(piece: Segment) -> Any:
    if isinstance(piece, bytes):
        return base64.b64encode(piece).decode()
    if isinstance(piece, _Slot):
        return {"slot": piece.slot.value, "html": piece.html}
    return {
        "wrap": piece.text,
        "width": piece.width,
        "indent": piece.indent,
        "hanging": piece.hanging,
        "slots": [slot.value for slot in piece.slots],
    }


def _thawed(piece: Any) -> Segment:
    if isinstance(piece, str):
        return base64.b64decode(piece, validate=True)
    if "slot" in piece:
        return _Slot(Slot(piece["slot"]), bool(piece["html"]))
    slots = tuple(Slot(value) for value in piece["slots"])
    return _Wrapped(piece["wrap"], int(piece["width"]), piece["indent"], piece["hanging"], slots)


def _merge(segments: Sequence[Segment]) -> list[Segment]:
    """Join adjacent byte strings, so that personalising touches few pieces."""
    merged: list[Segment] = []
    for segment in segments:
        if isinstance(segment, bytes) and merged and isinstance(merged[-1], bytes):
            merged[-1] += segment
        else:
            merged.append(segment)
    return merged


def _text_template(text: str) -> list[Segment]:
    """Encode the text part: paragraphs that hold per-recipient values are wrapped for each
    recipient; the others (the "view in browser" line, say) are wrapped now."""
    segments: list[Segment] = []
    pending: list[str] = []
    position = 0
    for match in DEFERRED_WRAP.finditer(text):
        pending.append(text[position : match.start()])
        position = match.end()
        width, indent, hanging, paragraph = int(match[1]), match[2], match[3], match[4]
        slots = tuple(Slot(found[1]) for found in PLACEHOLDER.finditer(paragraph))
        if slots:
            segments += _qp_template("".join(pending), html=False, soft_end=True)
            if len(slots) > _MAX_SLOTS:
                slots = ()  # no layout for so many: wrapped whole for each message
            segments.append(_Wrapped(paragraph, width, indent, hanging, slots))
            pending = []
        else:
            pending.append("\n".join(prose.wrap(paragraph, width, indent, hanging)))
    pending.append(text[position:])
    return segments + _qp_template("".join(pending), html=False)


def _qp_template(text: str, *, html: bool, soft_end: bool = False) -> list[Segment]:
    """Encode `text` as quoted-printable around its placeholders, each on its own line;
    with `soft_end`, end on a soft break (a per-recipient segment follows)."""
    segments: list[Segment] = []
    position = 0
    for match in PLACEHOLDER.finditer(text):
        chunk = text[position : match.start()]
        segments.append(qp_encode(chunk.encode("utf-8"), soft_end=True))
        segments.append(_Slot(Slot(match.group(1)), html))
        position = match.end()
    segments.append(qp_encode(text[position:].encode("utf-8"), soft_end=soft_end))
    return segments


def qp_encode(data: bytes, *, soft_end: bool) -> bytes:
    """Encode `data` as quoted-printable with CRLF line ends, no line over 76 characters
    and no line starting with "." (so SMTP needs no dot-stuffing); with `soft_end`,
    end on a soft line break, so that what follows starts a line of its own."""
    # A per-recipient value is mostly a short, plain address or link: nothing to do.
    if (
        soft_end
        and len(data) < _QP_LINE
        and not _QP_UNSAFE.search(data)
        and data[:1] != b"."
        and data[-1:] not in (b" ", b"\t")
    ):
        return data + b"=" + CRLF
    out: list[bytes] = []
    lines = data.split(b"\n")
    for number, line in enumerate(lines):
        line = line.removesuffix(b"\r")
        encoded = _QP_UNSAFE.sub(_escape, line)
        if encoded[-1:] in (b" ", b"\t"):
            encoded = encoded[:-1] + b"=%02X" % encoded[-1]
        if encoded[:1] == b".":
            encoded = b"=2E" + encoded[1:]
        last = number == len(lines) - 1
        out.extend(_fold(encoded, _QP_LINE - 1 if (soft_end and last) else _QP_LINE))
    joined = CRLF.join(out)
    return joined + b"=" + CRLF if soft_end else joined


def _escape(match: re.Match[bytes]) -> bytes:
    return b"=%02X" % match.group()[0]


def _fold(encoded: bytes, last_limit: int) -> list[bytes]:
    """Cut an encoded line into lines ending in soft breaks, escapes never split."""
    if len(encoded) <= last_limit:
        return [encoded]
    lines: list[bytes] = []
    start = 0
    while len(encoded) - start > last_limit:
        cut = start + _QP_LINE - 1  # room for the "=" soft break
        # Do not split "=XX", and do not start the next line with ".".
        while cut > start + 1 and (
            encoded[cut - 1 : cut] == b"="
            or encoded[cut - 2 : cut - 1] == b"="
            or encoded[cut : cut + 1] == b"."
        ):
            cut -= 1
        lines.append(encoded[start:cut] + b"=")
        start = cut
        if encoded[start : start + 1] == b".":
            # Only reachable for a run of dots: escape the one that starts the line.
            encoded = encoded[:start] + b"=2E" + encoded[start + 1 :]
    lines.append(encoded[start:])
    return lines


def lone_ed25519(settings: Settings) -> str:
    """Return the warning for a newsletter signed by an Ed25519 key alone ("" if not)."""
    config = settings.dkim
    if not config.ed25519_selector or config.selector:
        return ""
    return (
        "dkim.ed25519_selector is set without dkim.selector: the mail is signed with "
        "Ed25519 alone, which many receivers cannot verify (SpamAssassin's Mail::DKIM "
        "among them) and take for unsigned. Sign twice, RSA 2048 and Ed25519 (RFC 8463): "
        "create an RSA key (`qant-mail dkim keygen`), publish its record, set "
        "dkim.selector and QANT_DKIM_PRIVATE_KEY"
    )


def _address_header(name: str, address: str, header: str) -> str:
    name = strip_controls(name)
    if not name:
        return address
    if _PLAIN_NAME.fullmatch(name):
        return f"{name} <{address}>"  # what formataddr gives, at a fraction of its cost
    if name.isascii() and "=?" not in name:
        return formataddr((name, address))
    return _encoded(name, len(header) + 2, f" <{address}>", phrase=True)


def _header_text(value: str, header: str, tail: str = "") -> str:
    """Return `value` as the text of header `header`, then `tail` (an address part)."""
    # Settings and issues refuse control characters already; this is the last guard,
    # for whatever reaches a header by another way.
    value = strip_controls(value)
    # Plain text that looks like an encoded word would be decoded by the reader.
    if value.isascii() and "=?" not in value and len(value) + len(header) + 2 <= 78:
        if len(value) + len(tail) + len(header) + 2 > 78:
            return f"{value}\r\n{tail}"
        return value + tail
    return _encoded(value, len(header) + 2, tail)


# RFC 2047 2: an encoded word of at most 75 characters, on a line of at most 76.
_ENCODED_WORD, _ENCODED_LINE = 75, 76
_WORD_FRAME = len("=?utf-8?q??=")
# RFC 2047 5(3): what a "Q" word may hold as is anywhere, a display name included.
_Q_PLAIN = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789!*+-/")
# A word of a display name that can stay as it is (an RFC 5322 atom, short enough to fold
# around, not mistakable for an encoded word).
_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]{1,40}")


def _encoded(text: str, used: int, tail: str = "", *, phrase: bool = False) -> str:
    """Return `text` as UTF-8 encoded words (RFC 2047) of whole characters, each at most
    75 characters long, folded between them so that no line passes 76: `used` characters
    precede it on its first line, `tail` follows it (on a line of its own if need be).
    In a `phrase` (a display name), the words that need no encoding stay as they are."""
    pieces = [(text, True)]
    if phrase and text == " ".join(text.split()):
        # Python's address parser reads a space into a display name between two
        # encoded words, where RFC 2047 6.2 drops it (CPython gh-128110): words that
        # need no encoding stay plain between the encoded ones, and a run of encoded
        # words is cut in two only when one word cannot hold it.
        pieces = []
        for word in text.split(" "):
            plain = bool(_ATOM.fullmatch(word)) and "=?" not in word
            if not plain and pieces and pieces[-1][1]:
                pieces[-1] = (f"{pieces[-1][0]} {word}", True)
            else:
                pieces.append((word, not plain))
    out: list[str] = []
    line = used  # characters on the current line
    for piece, encode in pieces:
        tokens = [piece]
        if encode:
            tokens = _words(piece, _ENCODED_LINE - line - (1 if out else 0))
            if phrase and len(tokens) > 1:
                whole = _words(piece, _ENCODED_WORD)  # on a line of its own
                tokens = whole if len(whole) == 1 else tokens
        for token in tokens:
            if out and line + 1 + len(token) > _ENCODED_LINE:
                out.append("\r\n ")
                line = 1
            elif out:
                out.append(" ")
                line += 1
            out.append(token)
            line += len(token)
    if tail and line + len(tail) > _ENCODED_LINE:
        out.append("\r\n")
    return "".join(out) + tail


def _words(text: str, room: int) -> list[str]:
    """Return `text` as encoded words, the first within `room` characters if it can hold
    one character, each of the others within 75."""
    quoted = [_q_char(char) for char in text]
    size = len(text.encode("utf-8"))
    # "Q" keeps French readable in the source; "B" is shorter for emoji and non-Latin
    # scripts. Whichever is shorter for the whole text, as Python's email package does.
    as_q = sum(map(len, quoted)) <= 4 * -(-size // 3)
    kind = "q" if as_q else "b"
    words: list[str] = []
    space = min(room, _ENCODED_WORD) - _WORD_FRAME
    if space < (len(quoted[0]) if as_q else 8):
        space = _ENCODED_WORD - _WORD_FRAME  # too little room left: start on the next line
    start = 0
    while start < len(text):
        end, length = start + 1, len(quoted[start])
        if as_q:
            while end < len(text) and length + len(quoted[end]) <= space:
                length += len(quoted[end])
                end += 1
            payload = "".join(quoted[start:end])
        else:
            count = len(text[start].encode("utf-8"))
            while end < len(text):
                more = count + len(text[end].encode("utf-8"))
                if 4 * -(-more // 3) > space:
                    break
                count, end = more, end + 1
            payload = base64.b64encode(text[start:end].encode("utf-8")).decode("ascii")
        words.append(f"=?utf-8?{kind}?{payload}?=")
        start = end
        space = _ENCODED_WORD - _WORD_FRAME
    return words


def _q_char(char: str) -> str:
    return "".join(
        "_" if byte == 0x20 else chr(byte) if byte in _Q_PLAIN else f"={byte:02X}"
        for byte in char.encode("utf-8")
    )


@dataclass(frozen=True)
class Prepared:
    """An issue ready to go: rendered, checked, composed once."""

    issue_key: str
    rendered: RenderedIssue
    template: MessageTemplate
    content_hash: str
    warnings: list[str]
    newsletter: str = DEFAULT_NEWSLETTER  # the key of the newsletter it is an issue of
