"""Markdown bodies (markdown-it-py): checks, HTML, plain text with links written out."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from markdown_it import MarkdownIt
from markdown_it.renderer import RendererHTML
from markdown_it.token import Token

# Raw HTML is parsed (not escaped) only so that it can be found and refused: an email's
# markup belongs to the templates, where it is tested in mail clients.
_MD = MarkdownIt("commonmark", {"html": True}).enable(["strikethrough", "table"])
# An indented paragraph is prose that slipped in a YAML block, not a code sample.
_MD.disable("code")

Typeset = Callable[[str], str]


def _heading_open(
    self: RendererHTML, tokens: Sequence[Token], idx: int, options: Any, env: Any
) -> str:
    # A body's "## Intertitre" is a subheading of its story, whose title is an h2 (the
    # issue's is the h1): each level moves one down, for the outline screen readers use.
    return f"<h{_shifted(tokens[idx].tag)}>"


def _heading_close(
    self: RendererHTML, tokens: Sequence[Token], idx: int, options: Any, env: Any
) -> str:
    return f"</h{_shifted(tokens[idx].tag)}>\n"


def _shifted(tag: str) -> int:
    return min(int(tag[1:]) + 1, 6)


_MD.add_render_rule("heading_open", _heading_open)
_MD.add_render_rule("heading_close", _heading_close)

_WORD = re.compile(r"\w+(?:[-‑’']\w+)*")
# Lines break at ASCII spaces only: a no-break space (French " : ") holds its words together.
_SPACES = re.compile(r"[ \t]+")
# Punctuation standing alone never opens a line: it stays with the word before it.
_GLUED = frozenset(":;!?»•–—|")


_LINK_SCHEMES = ("https://", "http://", "mailto:")
_FULL_URL = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*:[^\s<>\"]+")


def link_problem(href: str) -> str | None:
    """Return why `href` cannot be a link in an email (or on the site), or None.

    One rule for every output (email, archive, feed): https, http or mailto, written in
    full; no javascript:, data:, file:, ftp: or relative links."""
    if not _FULL_URL.fullmatch(href):
        return f"{_clip(href)!r} is not a full address (https://…)"
    if not href.lower().startswith(_LINK_SCHEMES):
        return f"{_clip(href)!r}: a link is https://, http:// or mailto:"
    return None


def _clip(value: str, limit: int = 60) -> str:
    return value if len(value) <= limit else value[: limit - 1] + "…"


@dataclass(frozen=True)
class MarkdownProblem:
    """Something a body may not contain, with its line inside the text (0-based)."""

    line: int
    message: str


@functools.lru_cache(maxsize=1024)
def _tokens(text: str) -> tuple[Token, ...]:
    # Bodies are parsed once per distinct text and shared by the checks, the HTML and the
    # plain text; the preview re-renders unchanged bodies on every keystroke elsewhere.
    return tuple(_MD.parse(text))


def clear_cache() -> None:
    """Forget parsed bodies (benchmarks measure cold renders)."""
    _tokens.cache_clear()


def problems(text: str) -> list[MarkdownProblem]:
    """Return what `text` may not contain: raw HTML, Markdown images, unsafe links."""
    if "<" not in text and "![" not in text and "](" not in text and "[" not in text:
        return []  # none can occur: skip the parse
    found: list[MarkdownProblem] = []
    for token in _tokens(text):
        start = token.map[0] if token.map else 0
        if token.type == "html_block":
            found.append(MarkdownProblem(start, _html_message(token.content)))
        for child in token.children or ():
            line = start + _line_within(token.content, child)
            if child.type == "link_open":
                unsafe = link_problem(str(child.attrs.get("href", "")))
                if unsafe:
                    found.append(MarkdownProblem(line, unsafe))
            if child.type == "html_inline":
                found.append(MarkdownProblem(line, _html_message(child.content)))
            elif child.type == "image":
                found.append(
                    MarkdownProblem(
                        line,
                        "Markdown images are not allowed; use an `image:` block "
                        "(with alt, caption, credit)",
                    )
                )
    # A closing tag repeats its opening tag's complaint: one per line is enough.
    unique: dict[int, MarkdownProblem] = {}
    for problem in found:
        unique.setdefault(problem.line, problem)
    return list(unique.values())


def _html_message(markup: str) -> str:
    snippet = markup.strip().splitlines()[0] if markup.strip() else markup
    if len(snippet) > 40:
        snippet = snippet[:39] + "…"
    return f"raw HTML is not allowed in Markdown: {snippet!r} (write Markdown instead)"


def _line_within(content: str, child: Token) -> int:
    if child.type == "link_open":
        needle = str(child.attrs.get("href", ""))
    elif child.type == "html_inline":
        needle = child.content
    else:
        needle = f"![{child.content}"
    index = content.find(needle)
    return content.count("\n", 0, index) if index > 0 else 0


def to_html(text: str, lead: str = "") -> str:
    """Return `text` as HTML; `lead` (HTML) opens its first paragraph, as a bold lead-in."""
    html: str = _MD.renderer.render(list(_tokens(text)), _MD.options, {})
    if lead:
        html = f"<p>{lead}{html[3:]}" if html.startswith("<p>") else f"<p>{lead}</p>{html}"
    return html


def to_text(
    text: str,
    width: int = 72,
    lead: str = "",
    marker: str = "",
    typeset: Typeset | None = None,
) -> str:
    """Return `text` as plain text wrapped at `width`, every link written out as `<url>`;
    `lead` opens the first paragraph; `marker` ("• ") opens the first line, and every
    other line is indented under it (a hanging indent)."""
    writer = _TextWriter(width, " " * len(marker), typeset)
    writer.pending_marker = marker or None  # taken by the first paragraph
    writer.walk(_tokens(text), lead)
    return writer.result()


def words(text: str) -> int:
    """Return the number of words a reader reads in `text` (link targets excluded)."""
    return sum(len(_WORD.findall(piece)) for piece in _inline_text(_tokens(text)))


def plain_words(text: str) -> int:
    """Return the number of words of a text that is not Markdown (a title)."""
    return len(_WORD.findall(text))


def links(text: str) -> list[str]:
    """Return the link targets of `text`, in order."""
    if "](" not in text and "<" not in text:
        return []
    found = []
    for token in _tokens(text):
        for child in token.children or ():
            if child.type == "link_open":
                found.append(str(child.attrs.get("href", "")))
    return found


def _inline_text(tokens: Sequence[Token]) -> Iterator[str]:
    for token in tokens:
        for child in token.children or ():
            if child.type in ("text", "code_inline"):
                yield child.content
        if token.type == "fence":
            yield token.content


class _TextWriter:
    """Walk markdown-it's tokens and write wrapped plain text."""

    def __init__(self, width: int, hanging: str = "", typeset: Typeset | None = None) -> None:
        self.width = width
        self.hanging = hanging
        self.typeset = typeset
        self.blocks: list[str] = []
        self.lists: list[list[int]] = []  # per open list: [next number] or [] for bullets
        self.quote_depth = 0
        self.pending_marker: str | None = None
        self.list_block: int | None = None  # the block a top-level list is written into

    def result(self) -> str:
        return "\n\n".join(self.blocks)

    def walk(self, tokens: Sequence[Token], lead: str) -> None:
        heading = False
        for token in tokens:
            kind = token.type
            if kind == "bullet_list_open":
                self.lists.append([])
            elif kind == "ordered_list_open":
                self.lists.append([int(token.attrs.get("start", 1) or 1)])
            elif kind in ("bullet_list_close", "ordered_list_close"):
                self.lists.pop()
                if not self.lists:
                    self.list_block = None
            elif kind == "list_item_open":
                counter = self.lists[-1]
                if counter:
                    self.pending_marker = f"{counter[0]}. "
                    counter[0] += 1
                else:
                    self.pending_marker = "• "
            elif kind == "blockquote_open":
                self.quote_depth += 1
            elif kind == "blockquote_close":
                self.quote_depth -= 1
            elif kind == "heading_open":
                heading = True
            elif kind == "heading_close":
                heading = False
            elif kind == "hr":
                self.blocks.append("* * *")
            elif kind == "fence":
                self.blocks.append(token.content.rstrip("\n"))
            elif kind == "inline":
                line = _inline_to_text(token.children or [], self.typeset)
                if lead:
                    line, lead = lead + line, ""
                self._paragraph(line, heading)
        if lead:
            self._paragraph(lead, False)

    def _paragraph(self, line: str, heading: bool) -> None:
        indent = self.hanging + "  " * max(len(self.lists) - 1, 0)
        marker = self.pending_marker
        self.pending_marker = None
        if marker and self.lists:  # a list item: "• " or "1. ", its lines under its text
            first, rest = indent + marker, indent + " " * len(marker)
        elif marker:  # the marker of the whole text, at the margin, hanging over the rest
            first, rest = marker, indent
        else:
            first = rest = indent + ("  " if self.lists else "")
        quote = "> " * self.quote_depth
        out: list[str] = []
        for number, part in enumerate(line.split("\n")):
            wrapped = wrap(part, self.width - len(quote), first if number == 0 else rest, rest)
            out.extend(quote + w for w in wrapped or [""])
        text = "\n".join(out)
        if heading:
            text = f"{text}\n{'-' * min(len(line), self.width)}"
        # The items of a list stay together in one block, without blank lines.
        if self.lists and self.list_block is not None:
            self.blocks[self.list_block] += "\n" + text
        else:
            self.blocks.append(text)
            if self.lists:
                self.list_block = len(self.blocks) - 1


def _inline_to_text(children: Sequence[Token], typeset: Typeset | None = None) -> str:
    out: list[str] = []
    href: list[str] = []
    label_start: list[int] = []
    for child in children:
        kind = child.type
        if kind == "text":
            out.append(typeset(child.content) if typeset else child.content)
        elif kind == "code_inline":
            out.append(child.content)
        elif kind == "softbreak":
            out.append(" ")
        elif kind == "hardbreak":
            out.append("\n")
        elif kind == "link_open":
            href.append(str(child.attrs.get("href", "")))
            label_start.append(len(out))
        elif kind == "link_close" and href:
            target, start = href.pop(), label_start.pop()
            label = "".join(out[start:]).strip()
            shown = target.removeprefix("mailto:")
            if label in (target, shown):
                del out[start:]  # an autolink: its label already is the address
                out.append(f"<{shown}>")
            else:
                out.append(f" <{shown}>")
        elif kind == "image":
            out.append(child.content)
    return "".join(out)


def wrap(text: str, width: int, first: str = "", rest: str = "") -> list[str]:
    """Wrap `text` at `width` between words, never inside one (a URL stays whole)."""
    # textwrap does the same at a tenth of the speed, which was half of a text render.
    lines: list[str] = []
    line, length, empty = first, len(first), True
    for word in _SPACES.split(text.strip(" \t")):
        if not word:
            continue
        if not empty and length + 1 + len(word) > width and word not in _GLUED:
            lines.append(line)
            line, length, empty = rest + word, len(rest) + len(word), False
        elif empty:
            line, length, empty = line + word, length + len(word), False
        else:
            line, length = f"{line} {word}", length + 1 + len(word)
    if not empty:
        lines.append(line)
    return lines
