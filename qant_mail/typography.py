"""Locale typography for every text a reader sees: French no-break spaces, apostrophes."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass

NBSP = "\u00a0"  # no-break space: before ":" and in "n° 12"
NNBSP = "\u202f"  # narrow no-break space: before ; ! ? », after «, between digit groups
NBHY = "\u2011"  # non-breaking hyphen: "GPT‑4o" stays on one line

# Spans left exactly as written: addresses, links written out, per-recipient placeholders.
_PROTECTED = re.compile(
    r"%%qant:\w+%%"
    r"|<[^\s<>]+>"
    r"|\b(?:https?|ftp|mailto|tel|cid|data|file):[^\s<>\"]+"
    r"|\bwww\.[^\s<>\"]+"
    r"|[\w.+-]+@[\w-]+(?:\.[\w-]+)+",
    re.IGNORECASE,
)

# Cheap test before the full search: every protected span holds one of these.
_MAYBE_PROTECTED = re.compile(r"[%<:@.]")
_KEPT = "\ue000"  # a private-use character stands for each protected span meanwhile
_KEPT_RE = re.compile(_KEPT)

Rule = tuple[re.Pattern[str], str | Callable[[re.Match[str]], str]]

# Each rule turns a space into a no-break space, or a character into its typographic
# twin, so that applying the rules twice gives the same text: a template may pass a
# text through twice (a filter, then the output of every expression).
_FRENCH: tuple[Rule, ...] = (
    (re.compile(r"(?<=[^\W\d_])'(?=[^\W_])"), "’"),  # l'IA → l’IA, aujourd'hui
    (re.compile(r"(?<=\S)[ \t\u202f]+(?=:)"), NBSP),  # mot : → mot :
    (re.compile(r"(?<=\S)[ \t\u00a0]+(?=[;!?»])"), NNBSP),  # pourquoi ? → pourquoi ?
    (re.compile(r"(?<=«)[ \t\u00a0]+"), NNBSP),  # « texte » inside the guillemets
    (re.compile(r"(?<=\S)[ \t]+(?=•)"), NBSP),  # a "•" separator never opens a line
    (re.compile(r"(?<=\b[nN]°)[ \t]+(?=\d)"), NBSP),  # n° 12
    (re.compile(r"(?<=\d)[ \t\u00a0](?=\d{3}(?!\d))"), NNBSP),  # 250 000
    (re.compile(r"(?<=\d)[ \t]+(?=[%€$£‰])"), NBSP),  # 49 %
)
# Guillemets the editor wrote without their spaces get them.
_FRENCH_INSERT: tuple[Rule, ...] = (
    (re.compile(r"«(?=[^\s\u202f\u00a0])"), "«" + NNBSP),
    (re.compile(r"(?<=[^\s\u202f\u00a0])»"), NNBSP + "»"),
)
# In HTML only: a hyphen next to a digit inside a word does not break ("GPT-4o", "B-1023"),
# and an apostrophe escaped by the template (&#39;) is one too. The text part wraps at
# spaces only, and keeps the plain hyphen for plain-text readers.
_HTML_ONLY: tuple[Rule, ...] = (
    (re.compile(r"(?<=[^\W_])-(?=\d)|(?<=\d)-(?=[^\W_])"), NBHY),
    (re.compile(r"(?<=[^\W\d_])&#(?:39|x27);(?=[^\W_])"), "’"),
)
# In a document, the text between tags is typeset; tags, comments, styles and scripts
# (and MJML's head blocks) are left alone.
_SKIPPED = re.compile(
    r"<!--.*?-->|<(style|script|mj-style|mj-attributes)\b.*?</\1\s*>|<[^>]*>",
    re.DOTALL | re.IGNORECASE,
)


@dataclass(frozen=True)
class Typographer:
    """Apply one locale's typography to text shown to readers."""

    rules: tuple[Rule, ...] = ()

    def __call__(self, text: str) -> str:
        """Return `text` typeset; links, addresses and placeholders in it are untouched."""
        if not self.rules or not text:
            return text
        kept: list[str] = []

        def keep(match: re.Match[str]) -> str:
            kept.append(match.group())
            return _KEPT  # one character that is not a space: "URL :" still reads as such

        work = _PROTECTED.sub(keep, text) if _MAYBE_PROTECTED.search(text) else text
        for pattern, replacement in self.rules:
            work = pattern.sub(replacement, work)
        if kept:
            spans = iter(kept)
            work = _KEPT_RE.sub(lambda _: next(spans), work)
        return work

    def markup(self, document: str) -> str:
        """Return an HTML (or MJML) document with the text between its tags typeset:
        attribute values (links, file names, alt texts) keep what the template wrote."""
        if not self.rules:
            return document
        out: list[str] = []
        position = 0
        for match in _SKIPPED.finditer(document):
            out.append(self(document[position : match.start()]))
            out.append(match.group())
            position = match.end()
        out.append(self(document[position:]))
        return "".join(out)

    @property
    def active(self) -> bool:
        """Return whether this locale changes anything."""
        return bool(self.rules)


@functools.cache
def for_locale(language: str, *, html: bool) -> Typographer:
    """Return the typographer of `language` (`fr`); other languages are left as written."""
    if language != "fr":
        return Typographer()
    rules = _FRENCH + _FRENCH_INSERT
    return Typographer((*rules, *_HTML_ONLY) if html else rules)
