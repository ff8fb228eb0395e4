"""What readers would see change between two versions of an issue's message: the
subject, the preheader, each section's words, the links, the pictures, the size. Read
from the render (the text part for the words, the HTML part for links and pictures), so
that YAML that differs only in layout shows nothing."""

from __future__ import annotations

import difflib
import html
import re
from dataclasses import dataclass, field
from typing import Literal

from qant_mail.authoring.render import DEFERRED_WRAP, PLACEHOLDER, RenderedIssue

# A full-width rule of "=" after a blank line separates the sections of the text part
# (see the theme's email.txt.j2); a heading is underlined, right under it, with "=" or
# "-" of its own length.
_RULE = re.compile(r"\n\s*\n={20,}\n")
_UNDERLINE = re.compile(r"^[=-]{3,}$")
_HREF = re.compile(r"""<a\b[^>]*?\bhref\s*=\s*(["'])(.*?)\1""", re.IGNORECASE | re.DOTALL)
_IMG = re.compile(r"<img\b[^>]*>", re.IGNORECASE | re.DOTALL)
_ATTRIBUTE = re.compile(r"""\b(src|alt)\s*=\s*(["'])(.*?)\2""", re.IGNORECASE | re.DOTALL)
_CONTEXT = 6  # words kept around a change in a long paragraph

Op = Literal["=", "-", "+"]


@dataclass(frozen=True)
class Reading:
    """What readers see of one version of an issue's message."""

    subject: str
    preheader: str
    text: str  # the text part, per-recipient placeholders left in
    html: str  # the HTML part, placeholders left in
    size: int = 0  # bytes of the message before personalisation (0: not known)

    def sections(self) -> list[tuple[str, list[str]]]:
        """Return the sections of the text part: a title (its first lines) and its
        paragraphs, each unwrapped to one line."""
        text = DEFERRED_WRAP.sub(lambda m: m[4], self.text)
        found = []
        for chunk in _RULE.split(text):
            paragraphs = _paragraphs(chunk)
            if paragraphs:
                found.append((_title(chunk, paragraphs), paragraphs))
        return found

    def links(self) -> list[str]:
        """Return the links of the HTML part, in order, each once (not the readers' own)."""
        seen: dict[str, None] = {}
        for match in _HREF.finditer(self.html):
            url = html.unescape(match[2]).strip()
            if url and not PLACEHOLDER.search(url):
                seen.setdefault(url, None)
        return list(seen)

    def images(self) -> dict[str, str]:
        """Return the pictures of the HTML part: source → alternative text."""
        found: dict[str, str] = {}
        for tag in _IMG.finditer(self.html):
            attributes = {m[1].lower(): html.unescape(m[3]) for m in _ATTRIBUTE.finditer(tag[0])}
            if "src" in attributes:
                found.setdefault(attributes["src"], attributes.get("alt", ""))
        return found


def reading_of(rendered: RenderedIssue, size: int = 0) -> Reading:
    """Return what readers see of a render (`size`: its message's, when known)."""
    return Reading(rendered.subject, rendered.preheader, rendered.text, rendered.html, size)


@dataclass(frozen=True)
class Change:
    """A value before and after."""

    before: str
    after: str


@dataclass(frozen=True)
class SectionChange:
    """One section of the text part that was added, removed or changed: its title, and
    each changed paragraph as a word diff ((op, words): "=" kept, "-" removed, "+" added;
    "…" stands for words left out far from a change)."""

    title: str
    status: Literal["added", "removed", "changed"]
    paragraphs: list[list[tuple[Op, str]]] = field(default_factory=list)


@dataclass(frozen=True)
class Comparison:
    """Everything readers would see change from one version to the other."""

    subject: Change | None = None
    preheader: Change | None = None
    sections: list[SectionChange] = field(default_factory=list)
    links_added: list[str] = field(default_factory=list)
    links_removed: list[str] = field(default_factory=list)
    images_added: list[tuple[str, str]] = field(default_factory=list)  # (source, alt)
    images_removed: list[tuple[str, str]] = field(default_factory=list)
    images_changed: list[tuple[str, Change]] = field(default_factory=list)  # their alt
    size: Change | None = None  # in bytes, as text

    @property
    def empty(self) -> bool:
        """Return whether nothing a reader sees changed (the size aside)."""
        return not (
            self.subject
            or self.preheader
            or self.sections
            or self.links_added
            or self.links_removed
            or self.images_added
            or self.images_removed
            or self.images_changed
        )

    def to_json(self) -> dict[str, object]:
        """Return the comparison as JSON-ready data."""

        def change(value: Change | None) -> dict[str, str] | None:
            return None if value is None else {"before": value.before, "after": value.after}

        return {
            "changed": not self.empty,
            "subject": change(self.subject),
            "preheader": change(self.preheader),
            "sections": [
                {
                    "title": s.title,
                    "status": s.status,
                    "paragraphs": [[{"op": op, "text": t} for op, t in p] for p in s.paragraphs],
                }
                for s in self.sections
            ],
            "links": {"added": self.links_added, "removed": self.links_removed},
            "images": {
                "added": [{"src": s, "alt": a} for s, a in self.images_added],
                "removed": [{"src": s, "alt": a} for s, a in self.images_removed],
                "alt_changed": [{"src": s, **(change(c) or {})} for s, c in self.images_changed],
            },
            "size": (
                {"before": int(self.size.before), "after": int(self.size.after)}
                if self.size
                else None
            ),
        }


def compare(a: Reading, b: Reading) -> Comparison:
    """Return what changes for readers from version `a` to version `b`."""
    links_a, links_b = a.links(), b.links()
    images_a, images_b = a.images(), b.images()
    return Comparison(
        subject=Change(a.subject, b.subject) if a.subject != b.subject else None,
        preheader=Change(a.preheader, b.preheader) if a.preheader != b.preheader else None,
        sections=_sections(a.sections(), b.sections()),
        links_added=[url for url in links_b if url not in links_a],
        links_removed=[url for url in links_a if url not in links_b],
        images_added=[(s, alt) for s, alt in images_b.items() if s not in images_a],
        images_removed=[(s, alt) for s, alt in images_a.items() if s not in images_b],
        images_changed=[
            (s, Change(images_a[s], alt))
            for s, alt in images_b.items()
            if s in images_a and images_a[s] != alt
        ],
        size=Change(str(a.size), str(b.size)) if a.size and b.size and a.size != b.size else None,
    )


def _title(chunk: str, paragraphs: list[str], width: int = 60) -> str:
    """Return a section's title: its label (a first line in capitals) and its first
    heading (a line underlined), or else its first paragraph; cut between words."""
    heading = ""
    for block in re.split(r"\n\s*\n", chunk):  # a heading may wrap: its whole block
        lines = [line.strip() for line in block.strip("\n").splitlines()]
        if len(lines) > 1 and _UNDERLINE.match(lines[-1]):
            heading = " ".join(lines[:-1])
            break
    label = paragraphs[0] if paragraphs[0].isupper() else ""
    title = " — ".join(part for part in (label, heading) if part) or paragraphs[0]
    if len(title) <= width:
        return title
    return title[:width].rsplit(" ", 1)[0] + " …"


def _paragraphs(chunk: str) -> list[str]:
    """Return the paragraphs of a piece of the text part, each on one line (the text
    part is wrapped: a word added moves every line break after it)."""
    found = []
    for block in re.split(r"\n\s*\n", chunk):
        lines = [line.strip() for line in block.splitlines()]
        lines = [line for line in lines if line and not _UNDERLINE.match(line)]
        if lines:
            found.append(" ".join(lines))
    return found


def _sections(
    a: list[tuple[str, list[str]]], b: list[tuple[str, list[str]]]
) -> list[SectionChange]:
    changes: list[SectionChange] = []
    titles = difflib.SequenceMatcher(None, [t for t, _ in a], [t for t, _ in b], autojunk=False)
    for tag, i1, i2, j1, j2 in titles.get_opcodes():
        if tag == "equal":
            pairs = list(zip(a[i1:i2], b[j1:j2], strict=True))
        elif tag == "replace" and i2 - i1 == j2 - j1:
            pairs = list(zip(a[i1:i2], b[j1:j2], strict=True))  # retitled in place
        else:
            changes += [SectionChange(title, "removed") for title, _ in a[i1:i2]]
            changes += [SectionChange(title, "added") for title, _ in b[j1:j2]]
            continue
        for (_, before), (title, after) in pairs:
            paragraphs = _paragraph_changes(before, after)
            if paragraphs:
                changes.append(SectionChange(title, "changed", paragraphs))
    return changes


def _paragraph_changes(a: list[str], b: list[str]) -> list[list[tuple[Op, str]]]:
    found: list[list[tuple[Op, str]]] = []
    matcher = difflib.SequenceMatcher(None, a, b, autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            continue
        before, after = a[i1:i2], b[j1:j2]
        for old, new in zip(before, after, strict=False):
            found.append(_words(old, new))
        found += [[("-", old)] for old in before[len(after) :]]
        found += [[("+", new)] for new in after[len(before) :]]
    return found


def _words(a: str, b: str) -> list[tuple[Op, str]]:
    """Return the word diff of two paragraphs, the unchanged words far from a change
    left out."""
    old, new = a.split(), b.split()
    pieces: list[tuple[Op, str]] = []
    opcodes = difflib.SequenceMatcher(None, old, new, autojunk=False).get_opcodes()
    for number, (tag, i1, i2, j1, j2) in enumerate(opcodes):
        if tag == "equal":
            words = old[i1:i2]
            first, last = number == 0, number == len(opcodes) - 1
            if len(words) > 2 * _CONTEXT or ((first or last) and len(words) > _CONTEXT):
                head = [] if first else words[:_CONTEXT]
                tail = [] if last else words[-_CONTEXT:]
                text = " ".join([*head, "…", *tail]).strip()
            else:
                text = " ".join(words)
            pieces.append(("=", text))
            continue
        if i2 > i1:
            pieces.append(("-", " ".join(old[i1:i2])))
        if j2 > j1:
            pieces.append(("+", " ".join(new[j1:j2])))
    return pieces
