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
    # An address is looked for only where a word starts: tried at every letter, the
    # backtracking of `[\w.+-]+` made this search quadratic in the length of each word.
    r"|(?<![\w.+-])[\w.+-]+@[\w-]+(?:\.[\w-]+)+",
    re.IGNORECASE,
)

# A link's scheme ends in ":" followed by the rest of the address: with ":" first, this
# search jumps from colon to colon, where the one above tries every position.
_SCHEME_COLON = re.compile(r":[^\s<>\"]")


def _maybe_protected(text: str) -> bool:
    """Return whether `text` can hold a protected span: a cheap test before the search."""
    return (
        "%%" in text
        or "<" in text
        or "@" in text
        or (":" in text and _SCHEME_COLON.search(text) is not None)
        or ("." in text and "www." in text.lower())
    )


_KEPT = "\ue000"  # a private-use character stands for each protected span meanwhile
_KEPT_RE = re.compile(_KEPT)
_SEPARATOR = "\x1c"  # a control character, so never in a document: issues refuse them

# A rule: a pattern, its replacement, and characters of which the text must hold one for
# the pattern to match at all. Testing those with `in` costs far less than a regex scan
# that finds nothing, which is what most rules do on most texts.
Rule = tuple[re.Pattern[str], str | Callable[[re.Match[str]], str], str]
_DIGITS = "0123456789"

# Each rule turns a space into a no-break space, or a character into its typographic
# twin, so that applying the rules twice gives the same text: a template may pass a
# text through twice (a filter, then the output of every expression).
_FRENCH: tuple[Rule, ...] = (
    # Patterns start with the character they change where they can: the search then
    # jumps from one such character to the next instead of trying every position.
    (re.compile(r"'(?<=[^\W\d_]')(?=[^\W_])"), "’", "'"),  # l'IA → l’IA, aujourd'hui
    (re.compile(r"[ \t\u202f](?<=\S[ \t\u202f])[ \t\u202f]*(?=:)"), NBSP, ":"),  # mot : → mot :
    (
        re.compile(r"[ \t\u00a0](?<=\S[ \t\u00a0])[ \t\u00a0]*(?=[;!?»])"),
        NNBSP,
        ";!?»",
    ),  # pourquoi ? → pourquoi ?
    (re.compile(r"(?<=«)[ \t\u00a0]+"), NNBSP, "«"),  # « texte » inside the guillemets
    (re.compile(r"(?<=\S)[ \t]+(?=•)"), NBSP, "•"),  # a "•" separator never opens a line
    (re.compile(r"(?<=\b[nN]°)[ \t]+(?=\d)"), NBSP, "°"),  # n° 12
    (re.compile(r"[ \t\u00a0](?<=\d[ \t\u00a0])(?=\d{3}(?!\d))"), NNBSP, _DIGITS),  # 250 000
    (re.compile(r"(?<=\d)[ \t]+(?=[%€$£‰])"), NBSP, "%€$£‰"),  # 49 %
)
# Guillemets the editor wrote without their spaces get them.
_FRENCH_INSERT: tuple[Rule, ...] = (
    (re.compile(r"«(?=[^\s\u202f\u00a0])"), "«" + NNBSP, "«"),
    (re.compile(r"(?<=[^\s\u202f\u00a0])»"), NNBSP + "»", "»"),
)
# In HTML only: a hyphen next to a digit inside a word does not break ("GPT-4o", "B-1023"),
# and an apostrophe escaped by the template (&#39;) is one too. The text part wraps at
# spaces only, and keeps the plain hyphen for plain-text readers.
_HTML_ONLY: tuple[Rule, ...] = (
    (re.compile(r"-(?:(?<=[^\W_]-)(?=\d)|(?<=\d-)(?=[^\W_]))"), NBHY, "-"),
    (re.compile(r"(?<=[^\W\d_])&#(?:39|x27);(?=[^\W_])"), "’", "&"),
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

        work = _PROTECTED.sub(keep, text) if _maybe_protected(text) else text
        for pattern, replacement, needs in self.rules:
            for char in needs:
                if char in work:
                    work = pattern.sub(replacement, work)
                    break
        if kept:
            spans = iter(kept)
            work = _KEPT_RE.sub(lambda _: next(spans), work)
        return work

    def markup(self, document: str) -> str:
        """Return an HTML (or MJML) document with the text between its tags typeset:
        attribute values (links, file names, alt texts) keep what the template wrote."""
        if not self.rules:
            return document
        pieces: list[str] = []  # tags and texts, alternating: even indexes are texts
        position = 0
        for match in _SKIPPED.finditer(document):
            pieces.append(document[position : match.start()])
            pieces.append(match.group())
            position = match.end()
        pieces.append(document[position:])
        texts = pieces[0::2]
        if _SEPARATOR in document:
            pieces[0::2] = [self(text) if not text.isspace() else text for text in texts]
        else:
            # The texts are typeset in one pass, joined by a separator that every rule
            # treats as the end of a text (it is a space, and no rule crosses a space
            # that is not one of its own): a thousand short calls cost ten times more.
            typeset = self(_SEPARATOR.join(texts)).split(_SEPARATOR)
            if len(typeset) != len(texts):  # pragma: no cover - a rule crossed a separator
                typeset = [self(text) for text in texts]
            pieces[0::2] = typeset
        return "".join(pieces)

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
