"""Checks of the rendered email that a reader's inbox would punish."""

from __future__ import annotations

import binascii
import re
from html.parser import HTMLParser
from pathlib import PurePosixPath

from pydantic import BaseModel

from qant_mail.authoring import prose
from qant_mail.authoring.load import Document
from qant_mail.authoring.model import Image, Link, Quote, walk
from qant_mail.authoring.render import PLACEHOLDER, RenderedIssue, Slot
from qant_mail.base.config import Settings
from qant_mail.base.errors import Problem, Severity
from qant_mail.base.schema import Loc

ERROR, WARNING = Severity.ERROR, Severity.WARNING
_EMAIL: Loc = ("(email)",)
_TEMPLATE: Loc = ("(template)",)
# Values of typical length stand in for the per-recipient placeholders when the HTML is
# measured: Gmail counts the bytes a subscriber receives, not our template.
SAMPLE_VALUES = {
    Slot.NAME: "Dominique Exemple-Durand",
    Slot.EMAIL: "dominique.exemple-durand@example.com",
    Slot.UNSUBSCRIBE_URL: "https://newsletter.example.com/unsubscribe/AAAAAQ.0123456789abcdefghijkl",
    Slot.PREFERENCES_URL: "https://newsletter.example.com/subscriptions/AAAAAQ.0123456789abcdefghijkl",
    Slot.BROWSER_URL: "https://newsletter.example.com/2023-11-20/",
}


def lint(document: Document, rendered: RenderedIssue, settings: Settings) -> list[Problem]:
    """Return the problems of the email a subscriber would receive, errors first."""
    limits = settings.lint
    issue = document.issue
    found: list[Problem] = []

    def report(loc: Loc, message: str, severity: Severity) -> None:
        found.append(document.problem(loc, message, severity))

    html, text = rendered.fill(SAMPLE_VALUES)
    html_bytes = html.encode("utf-8")
    size = len(html_bytes)
    # The warning weighs the part as the message carries it: quoted-printable adds about
    # a tenth (=3D for each "=", =C3=A9 for an "é", a soft break every 75 characters).
    sent = quoted_printable_size(html_bytes)
    if size > limits.html_error_bytes:
        report(_EMAIL, _size_message(size, "past", limits.html_error_bytes), ERROR)
    elif sent > limits.html_warning_bytes:
        report(_EMAIL, _sent_size_message(sent, size, limits.html_warning_bytes), WARNING)
    whole = message_size(html_bytes, text.encode("utf-8"), rendered)
    if whole > limits.message_warning_bytes:
        severity = ERROR if whole > limits.message_error_bytes else WARNING
        report(_EMAIL, _message_size_message(whole, rendered, settings), severity)

    if len(issue.subject) > limits.subject_max_chars:
        report(
            ("subject",),
            f"{len(issue.subject)} characters; inboxes cut subjects past about "
            f"{limits.subject_max_chars}",
            WARNING,
        )
    if not issue.preheader:
        report(
            (),
            "no preheader: inboxes will show the first words of the email instead "
            '("Voir dans le navigateur…")',
            WARNING,
        )
    elif len(issue.preheader) > limits.preheader_max_chars:
        report(
            ("preheader",),
            f"{len(issue.preheader)} characters; inboxes show about {limits.preheader_max_chars}",
            WARNING,
        )
    if issue.draft:
        report(("draft",), "the issue is marked `draft: true`: it will not go to the list", WARNING)

    marks = settings.labels.quote_marks
    if marks.replace("{text}", "").strip():
        for loc, value in walk(issue, ()):
            if isinstance(value, Quote) and _QUOTED.search(value.text):
                report(
                    (*loc, "text"),
                    f"already between quotation marks, and labels.quote_marks adds its own "
                    f"({marks.format(text='…')}): the reader would see them twice; remove "
                    "them from the text",
                    WARNING,
                )

    origins = _Origins(issue, rendered)
    page = _Anchors()
    page.feed(rendered.html)  # with its placeholders: they are not links to check
    for attrs in page.images:
        src = attrs.get("src") or ""
        loc = origins.image(src)
        alt = (attrs.get("alt") or "").strip()
        if not alt:
            report(loc, f"image {_short(src)} has no alt text", ERROR)
        elif _looks_like_file_name(alt):
            report(loc, f"alt text {alt!r} looks like a file name; describe the image", WARNING)
        # MJML writes height="auto" when it has no height: only numbers count.
        if not all((attrs.get(side) or "").isdigit() for side in ("width", "height")):
            report(
                loc,
                f"image {_short(src)} has no width and height: set both, so that the "
                "layout does not jump while it loads and Outlook draws it at its size",
                WARNING,
            )
    seen: dict[str, Loc] = {}
    for href in page.links:
        if PLACEHOLDER.fullmatch(href):
            continue
        loc = origins.link(href)
        problem = prose.link_problem(href)  # a template's own link, the issue's are checked
        if problem:
            report(loc, problem, ERROR)
        elif href.lower().startswith("http:"):
            report(loc, f"link {_short(href)} is not https", WARNING)
        if href in seen and loc != _TEMPLATE:  # the templates' own repeats are on purpose
            report(loc, f"duplicate link {_short(href)} (also at {_dotted(seen[href])})", WARNING)
        else:
            seen[href] = loc
    return sorted(found, key=lambda p: (p.severity != ERROR, p.line, p.column, p.message))


# A quote that opens or closes with quotation marks of its own.
_QUOTED = re.compile(r"^\s*[«“„‹\"]|[»”‟›\"]\s*$")


def quoted_printable_size(data: bytes) -> int:
    """Return how many bytes `data` takes in quoted-printable, as a message carries it."""
    # The standard library's encoder, counted as compose writes (delivery is out of
    # reach here): lines end in CRLF, and a dot that starts one is "=2E" (SMTP would
    # double it). The two break long lines a little apart: within 10 bytes.
    encoded = binascii.b2a_qp(data, istext=True)
    lines = encoded.split(b"\n")
    return len(encoded) + len(lines) - 1 + 2 * sum(line.startswith(b".") for line in lines)


def message_size(html: bytes, text: bytes, rendered: RenderedIssue) -> int:
    """Return about how many bytes one message weighs: both parts in quoted-printable,
    and the embedded images in base64 (hosted ones are links)."""
    images = sum(
        (asset.path.stat().st_size + 2) // 3 * 4 * 78 // 76
        for asset in rendered.assets
        if asset.url.startswith("cid:")
    )
    parts = quoted_printable_size(html) + quoted_printable_size(text)
    return parts + images + 3_000  # headers and MIME boundaries


def _message_size_message(size: int, rendered: RenderedIssue, settings: Settings) -> str:
    embedded = [a for a in rendered.assets if a.url.startswith("cid:")]
    message = f"the message weighs about {size / 1e6:.1f} MB"
    if embedded:
        biggest = max(embedded, key=lambda a: a.path.stat().st_size)
        message += (
            f" with its {len(embedded)} images embedded (the largest, {biggest.name}, "
            f"{biggest.path.stat().st_size / 1e6:.1f} MB)"
        )
    limits = settings.lint
    message += (
        f": every reader downloads it, and relays refuse messages past about "
        f"{limits.message_error_bytes / 1e6:.0f} MB"
    )
    if embedded:
        message += '; link the images instead ([images] mode = "host") or make them smaller'
    return message


def _size_message(size: int, relation: str, limit: int) -> str:
    return (
        f"the HTML part is {size / 1000:.1f} KB, {relation} the {limit / 1000:.0f} KB limit: "
        "Gmail clips messages past ~102 KB, hiding the end of the issue and its "
        "unsubscribe link"
    )


def _sent_size_message(sent: int, size: int, limit: int) -> str:
    return (
        f"the HTML part is {sent / 1000:.1f} KB as sent ({size / 1000:.1f} KB before "
        f"quoted-printable), over {limit / 1000:.0f} KB: Gmail clips messages past "
        "~102 KB, hiding the end of the issue and its unsubscribe link"
    )


def _short(value: str, limit: int = 60) -> str:
    return value if len(value) <= limit else value[: limit - 1] + "…"


def _dotted(loc: Loc) -> str:
    return ".".join(map(str, loc)) or "(document)"


def _looks_like_file_name(alt: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+\.(png|jpe?g|gif|webp|svg)", alt, re.IGNORECASE)) or bool(
        re.fullmatch(r"(IMG|DSC|image|Capture)[_ -]?\d+", alt, re.IGNORECASE)
    )


class _Anchors(HTMLParser):
    """Collect the images and links of an HTML document."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.images: list[dict[str, str | None]] = []
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img":
            self.images.append(dict(attrs))
        elif tag == "a":
            href = dict(attrs).get("href")
            if href is not None:
                self.links.append(href.strip())


class _Origins:
    """Map an image source or a link target back to the issue field it came from."""

    def __init__(self, issue: BaseModel, rendered: RenderedIssue) -> None:
        self.images: dict[str, Loc] = {}
        self.links: dict[str, list[Loc]] = {}
        self.used: dict[str, int] = {}
        by_path = {asset.source: asset.url for asset in rendered.assets}
        for loc, value in walk(issue, ()):
            if isinstance(value, Image):
                url = by_path.get(value.file) if value.file else value.src
                self.images.setdefault(url or value.src, loc)
                if value.link:
                    self.links.setdefault(value.link, []).append((*loc, "link"))
            elif isinstance(value, Link):
                self.links.setdefault(value.url, []).append((*loc, "url"))
            elif isinstance(value, str):
                for href in prose.links(value):
                    self.links.setdefault(href, []).append(loc)

    def image(self, src: str) -> Loc:
        return self.images.get(src, ("(template)", PurePosixPath(src).name or src))

    def link(self, href: str) -> Loc:
        # The n-th time a target appears in the HTML is the n-th field that holds it.
        places = self.links.get(href)
        if not places:
            return _TEMPLATE
        index = self.used.get(href, 0)
        self.used[href] = index + 1
        return places[min(index, len(places) - 1)]
