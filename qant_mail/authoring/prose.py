"""Markdown bodies (markdown-it-pyrs): checks, HTML, plain text with links written out."""

from __future__ import annotations

import bisect
import functools
import itertools
import operator
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from urllib.parse import unquote

from markdown_it_pyrs import MarkdownIt, Node

# CommonMark's rules (markdown-it's "commonmark" preset, raw HTML included) with
# strikethrough and tables, less "code": an indented paragraph is prose that slipped in a
# YAML block, not a code sample. Raw HTML is parsed (not escaped) only so that it can be
# found and refused: an email's markup belongs to the templates, tested in mail clients.
# markdown-it-pyrs is markdown-it in Rust: the same trees and HTML, at a fifth of the
# time of markdown-it-py, which was a sixth of a render.
_RULES = [
    *("blockquote", "fence", "heading", "hr", "lheading", "list", "paragraph", "reference"),
    *("autolink", "backticks", "emphasis", "entity", "escape", "image", "link", "newline"),
    *("html_block", "html_inline", "strikethrough", "table"),
]
_MD = MarkdownIt("zero").enable_many(_RULES)  # type: ignore[arg-type]

Typeset = Callable[[str], str]

# A body's "## Intertitre" is a subheading of its story, whose title is an h2 (the
# issue's is the h1): each level moves one down, for the outline screen readers use.
_HEADING_TAG = re.compile(r"<(/?)h([1-6])>")


def _shifted(match: re.Match[str]) -> str:
    return f"<{match[1]}h{min(int(match[2]) + 1, 6)}>"


_WORD = re.compile(r"\w+(?:[-‑’']\w+)*")
# Lines break at ASCII spaces and tabs only: a no-break space (French " : ") holds its
# words together.
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
def _tree(text: str) -> Node:
    # Bodies are parsed once per distinct text and shared by the checks, the HTML and the
    # plain text; the preview re-renders unchanged bodies on every keystroke elsewhere.
    return _MD.tree(_secure(text))


def _secure(text: str) -> str:
    # CommonMark: U+0000 is replaced by U+FFFD (markdown-it-pyrs leaves it).
    return text.replace("\x00", "\ufffd") if "\x00" in text else text


def clear_cache() -> None:
    """Forget parsed bodies (benchmarks measure cold renders)."""
    _tree.cache_clear()


def problems(text: str) -> list[MarkdownProblem]:
    """Return what `text` may not contain: raw HTML, Markdown images, unsafe links."""
    if "<" not in text and "![" not in text and "](" not in text and "[" not in text:
        return []  # none can occur: skip the parse
    found: list[MarkdownProblem] = []
    encoded = _secure(text).encode("utf-8")  # where a node starts is a byte offset
    for node in _tree(text).walk():
        kind = node.name
        message = None
        if kind in ("html_block", "html_inline"):
            message = _html_message(str(node.meta.get("content", "")))
        elif kind in ("link", "autolink"):
            message = link_problem(_url(node, text))
        elif kind == "image":
            message = (
                "Markdown images are not allowed; use an `image:` block (with alt, caption, credit)"
            )
        if message:
            start = node.srcmap[0] if node.srcmap else 0
            found.append(MarkdownProblem(encoded.count(b"\n", 0, start), message))
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


def to_html(text: str, lead: str = "") -> str:
    """Return `text` as HTML; `lead` (HTML) opens its first paragraph, as a bold lead-in."""
    html = _HEADING_TAG.sub(_shifted, _MD.render(_secure(text)))
    # markdown-it-pyrs writes an accented domain name percent-encoded: only then is there
    # an address to put back in its ASCII form (see `_url`).
    links = _tree(text).walk() if "%" in html and not text.isascii() else ()
    for node in links:
        if node.name in ("link", "autolink"):
            written, address = str(node.meta.get("url", "")), _url(node, text)
            if address != written:
                html = html.replace(
                    f'href="{_attribute(written)}"', f'href="{_attribute(address)}"'
                )
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
    writer = _TextWriter(text, width, " " * len(marker), typeset)
    writer.pending_marker = marker or None  # taken by the first paragraph
    writer.write(_tree(text), lead)
    return writer.result()


def words(text: str) -> int:
    """Return the number of words a reader reads in `text` (link targets excluded)."""
    # One search over the runs, a line each: no word goes on past the end of a line.
    return len(_WORD.findall("\n".join(_read(_tree(text).children))))


def plain_words(text: str) -> int:
    """Return the number of words of a text that is not Markdown (a title)."""
    return len(_WORD.findall(text))


def links(text: str) -> list[str]:
    """Return the link targets of `text`, in order."""
    if "](" not in text and "<" not in text and "[" not in text:
        return []
    return [_url(n, text) for n in _tree(text).walk() if n.name in ("link", "autolink")]


def _read(nodes: Sequence[Node]) -> Iterable[str]:
    """Yield the runs of text a reader reads (pictures' alt texts and raw HTML left out)."""
    for item in _runs(nodes):
        if isinstance(item, str):
            yield item
        elif item.name == "fence":
            yield str(item.meta.get("content", ""))
        elif item.name == "code_inline":
            yield _plain(item.children)
        elif item.name not in ("image", "html_inline", "html_block"):
            yield from _read(item.children)


def _runs(nodes: Sequence[Node]) -> Iterator[str | Node]:
    """Yield `nodes`, each run of text nodes joined into one string."""
    run: list[str] = []
    for node in nodes:
        if node.name in _TEXT:
            run.append(str(node.meta.get("content", "")))
            continue
        if run:
            yield "".join(run)
            run = []
        yield node
    if run:
        yield "".join(run)


# Text nodes: markdown-it-py joined each run of them into one text, and typesetting a run
# at once is what makes "aujourd\'hui" one word and "mot\ :" one French colon.
_TEXT = frozenset({"text", "text_special"})
_INLINE = _TEXT | {
    *("em", "strong", "strikethrough", "link", "autolink", "image", "code_inline"),
    *("softbreak", "hardbreak", "html_inline"),
}
_CONTAINERS = frozenset({"table", "thead", "tbody", "trow", "tcell"})


def _plain(nodes: Sequence[Node]) -> str:
    """Return the text of `nodes` as written, markup dropped (code, an alt text)."""
    return "".join(
        str(n.meta.get("content", "")) if n.name in _TEXT else _plain(n.children) for n in nodes
    )


def _url(node: Node, text: str) -> str:
    """Return a link's address as markdown-it normalises it: an international domain name
    in its ASCII form (punycode), where markdown-it-pyrs leaves it percent-encoded."""
    url = str(node.meta.get("url", ""))
    if "%" not in url:
        return url
    match = _HOST.match(url)
    if match is None:
        return url
    host = unquote(match["host"])
    if host.isascii():
        return url
    # Only a name the editor wrote with its accents: "ex%C3%A9mple.fr" written so stays.
    # Where the link is written inline, its own text says; a reference link's address is
    # written elsewhere in the body.
    written = text
    if node.srcmap:
        start, end = node.srcmap
        written = _secure(text).encode("utf-8")[start:end].decode("utf-8", "replace")
        if "](" not in written and not written.startswith("<"):
            written = text
    if host not in written:
        return url
    labels = (
        label if label.isascii() else "xn--" + label.encode("punycode").decode("ascii")
        for label in host.split(".")
    )
    return f"{url[: match.start('host')]}{'.'.join(labels)}{url[match.end('host') :]}"


_HOST = re.compile(r"(?i:https?://(?:[^/?#@]*@)?|mailto:[^@?#]*@)(?P<host>[^/?#:]+)")


def _attribute(value: str) -> str:
    return (
        value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
    )


class _TextWriter:
    """Walk markdown's tree and write wrapped plain text."""

    def __init__(
        self, source: str, width: int, hanging: str = "", typeset: Typeset | None = None
    ) -> None:
        self.source = source
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

    def write(self, root: Node, lead: str) -> None:
        lead = self._blocks(root.children, lead, heading=False)
        if lead:
            self._paragraph(lead, False)

    def _blocks(self, nodes: Sequence[Node], lead: str, heading: bool) -> str:
        """Write block nodes; return the lead-in not used yet."""
        run: list[Node] = []  # inline nodes outside a paragraph: a tight list item, a cell
        for node in nodes:
            kind = node.name
            if kind in _INLINE:
                run.append(node)
                continue
            if run:
                lead, run = self._inline(run, lead, heading), []
            if kind == "paragraph":
                lead = self._inline(node.children, lead, heading)
            elif kind == "heading":
                lead = self._inline(node.children, lead, True)
            elif kind in ("bullet_list", "ordered_list"):
                start = node.meta.get("start", 1) if kind == "ordered_list" else None
                self.lists.append([] if start is None else [int(start or 1)])
                lead = self._blocks(node.children, lead, heading)
                self.lists.pop()
                if not self.lists:
                    self.list_block = None
            elif kind == "list_item":
                counter = self.lists[-1]
                if counter:
                    self.pending_marker = f"{counter[0]}. "
                    counter[0] += 1
                else:
                    self.pending_marker = "• "
                lead = self._blocks(node.children, lead, heading)
            elif kind == "blockquote":
                self.quote_depth += 1
                lead = self._blocks(node.children, lead, heading)
                self.quote_depth -= 1
            elif kind == "hr":
                self.blocks.append("* * *")
            elif kind == "fence":
                self.blocks.append(str(node.meta.get("content", "")).rstrip("\n"))
            elif kind in _CONTAINERS:
                lead = self._blocks(node.children, lead, heading)
        if run:
            lead = self._inline(run, lead, heading)
        return lead

    def _inline(self, nodes: Sequence[Node], lead: str, heading: bool) -> str:
        out: list[str] = []
        self._inline_to(nodes, out)
        line = "".join(out)
        if lead:
            line, lead = lead + line, ""
        self._paragraph(line, heading)
        return lead

    def _inline_to(self, nodes: Sequence[Node], out: list[str]) -> None:
        typeset = self.typeset
        for item in _runs(nodes):
            if isinstance(item, str):
                out.append(typeset(item) if typeset else item)
                continue
            kind = item.name
            if kind == "softbreak":
                out.append(" ")
            elif kind == "hardbreak":
                out.append("\n")
            elif kind in ("code_inline", "image"):
                out.append(_plain(item.children))
            elif kind in ("link", "autolink"):
                target, start = _url(item, self.source), len(out)
                self._inline_to(item.children, out)
                label = "".join(out[start:]).strip()
                shown = target.removeprefix("mailto:")
                if label in (target, shown):
                    del out[start:]  # an autolink: its label already is the address
                    out.append(f"<{shown}>")
                else:
                    out.append(f" <{shown}>")
            elif kind in ("em", "strong", "strikethrough"):
                self._inline_to(item.children, out)

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


def wrap(text: str, width: int, first: str = "", rest: str = "") -> list[str]:
    """Wrap `text` at `width` between words, never inside one (a URL stays whole)."""
    # textwrap does the same at a tenth of the speed, which was half of a text render;
    # a loop over the words, a third. Here each line is found by bisection on the running
    # width of the words, so the Python work is per line, not per word.
    stripped = text.strip(" \t")
    if not stripped:
        return []
    # Split at ASCII spaces and tabs only (str.split() would split at no-break spaces);
    # three times faster than the regex split.
    words = list(filter(None, stripped.replace("\t", " ").split(" ")))
    if len(first) + len(stripped) <= width:
        return [first + " ".join(words)]
    # ends[i]: the width of words[0..i], each followed by one space (built in C).
    ends = list(map(operator.add, itertools.accumulate(map(len, words)), range(1, len(words) + 1)))
    lines: list[str] = []
    start, prefix = 0, first
    while start < len(words):
        before = ends[start - 1] if start else 0  # the width up to this line, its space too
        # The last word that still fits: ends[stop - 1] - 1 - before + len(prefix) <= width.
        stop = bisect.bisect_right(ends, width - len(prefix) + before + 1, lo=start)
        stop = max(stop, start + 1)  # a word longer than the line goes on a line alone
        while stop < len(words) and words[stop] in _GLUED:
            stop += 1  # punctuation standing alone stays with the word before it
        lines.append(prefix + " ".join(words[start:stop]))
        start, prefix = stop, rest
    return lines
