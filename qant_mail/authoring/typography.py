"""Locale typography for every text a reader sees: French no-break spaces, apostrophes."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass

NBSP = "\u00a0"  # no-break space: before ":" and in "n° 12"
NNBSP = "\u202f"  # narrow no-break space: before ; ! ? », after «, between digit groups
NBHY = "\u2011"  # non-breaking hyphen: "GPT‑4o" stays on one line

# Spans left exactly as written: per-recipient placeholders, <bracketed> addresses, links
# (a scheme, or www.) and e-mail addresses. As one alternation, tried at each position of
# each text, they cost most of the typesetting: each kind is found from the character
# that announces it (%, <, :, w, @), which a search reaches by jumping, and the spans are
# then chosen as that alternation would have chosen them (`_protected_spans`).
_PLACEHOLDER = re.compile(r"%%qant:\w+%%", re.IGNORECASE)
_BRACKETED = re.compile(r"<[^\s<>]+>")
_SCHEME_LINK = re.compile(r"\b(?:https?|ftp|mailto|tel|cid|data|file):[^\s<>\"]+", re.IGNORECASE)
_SCHEME_COLON = re.compile(r":(?=[^\s<>\"])")
_SCHEME_LENGTHS = (3, 4, 5, 6)  # tel, http, https, mailto…
_WWW_LINK = re.compile(r"[wW](?<!\w[wW])[wW][wW]\.[^\s<>\"]+")  # `\bwww\.`, w first
_AT_DOMAIN = re.compile(r"@[\w-]+(?:\.[\w-]+)+")
_LOCAL_PART = "_.+-"  # with letters and digits, what an address has before its "@"


def _protected_spans(text: str) -> list[tuple[int, int]]:
    """Return the (start, end) of each protected span of `text`, in order.

    The candidates of every kind at every position where one starts, then the same choice
    as one search for `placeholder|bracketed|scheme link|www link|address` moving left to
    right: the leftmost, the earlier kind at the same place, and on after its end."""
    found: list[tuple[int, int, int]] = []  # (start, kind, end)
    for kind, announce, pattern in ((0, "%%", _PLACEHOLDER), (1, "<", _BRACKETED)):
        at = text.find(announce)
        while at >= 0:
            match = pattern.match(text, at)
            if match:
                found.append((at, kind, match.end()))
            at = text.find(announce, at + 1)
    if ":" in text:
        for colon in _SCHEME_COLON.finditer(text):
            for length in _SCHEME_LENGTHS:
                begin = colon.start() - length
                if begin >= 0 and ":" not in text[begin : colon.start()]:
                    match = _SCHEME_LINK.match(text, begin)
                    if match:
                        found.append((begin, 2, match.end()))
    if "." in text:
        match = _WWW_LINK.search(text)
        while match:
            found.append((match.start(), 3, match.end()))
            match = _WWW_LINK.search(text, match.start() + 1)
    at = text.find("@")
    while at >= 0:
        begin = at
        # Back over the local part: what `[\w.+-]` matches, \w being what isalnum says.
        while begin > 0 and (text[begin - 1].isalnum() or text[begin - 1] in _LOCAL_PART):
            begin -= 1
        if begin < at:
            match = _AT_DOMAIN.match(text, at)
            if match:
                found.append((begin, 4, match.end()))
        at = text.find("@", at + 1)
    spans: list[tuple[int, int]] = []
    position = 0
    for begin, _kind, end in sorted(found):
        if begin >= position:
            spans.append((begin, end))
            position = end
    return spans


_KEPT = "\ue000"  # a private-use character stands for each protected span meanwhile
_KEPT_RE = re.compile(_KEPT)
_SEPARATOR = "\x1c"  # a control character, so never in a document: issues refuse them

# A rule: a pattern, its replacement, and characters of which the text must hold one for
# the pattern to match at all. Testing those with `in` costs far less than a regex scan
# that finds nothing, which is what most rules do on most texts.
Rule = tuple[re.Pattern[str], str | Callable[[re.Match[str]], str], str]
_DIGITS = "0123456789"

# The spaces before a punctuation mark that takes a no-break one, and which spaces each
# mark accepts as written (a run holding any other is left alone): one search for them
# all, where one per mark read every text four times over.
_SPACE_BEFORE: dict[str, tuple[frozenset[str], str]] = {
    ":": (frozenset(" \t\u202f"), NBSP),  # mot : → mot :
    **dict.fromkeys(";!?»", (frozenset(" \t\u00a0"), NNBSP)),  # pourquoi ? → pourquoi ?
    "•": (frozenset(" \t"), NBSP),  # a "•" separator never opens a line
    **dict.fromkeys("%€$£‰", (frozenset(" \t"), NBSP)),  # 49 % (after a digit only)
}


def _space_before(match: re.Match[str]) -> str:
    run = match.group()
    mark = match.string[match.end()]
    accepted, replacement = _SPACE_BEFORE[mark]
    if mark in "%€$£‰" and not match.string[match.start() - 1].isdecimal():
        return run  # "le %" is not a percentage
    return replacement if accepted.issuperset(run) else run


# Each rule turns a space into a no-break space, or a character into its typographic
# twin, so that applying the rules twice gives the same text: a template may pass a
# text through twice (a filter, then the output of every expression). Patterns start
# with a character they change or need where they can: the search then jumps from one
# such character to the next instead of trying every position of the text.
_FRENCH: tuple[Rule, ...] = (
    (re.compile(r"'(?<=[^\W\d_]')(?=[^\W_])"), "’", "'"),  # l'IA → l’IA, aujourd'hui
    (
        re.compile(r"[ \t\u00a0\u202f](?<=\S[ \t\u00a0\u202f])[ \t\u00a0\u202f]*(?=[:;!?»•%€$£‰])"),
        _space_before,
        "".join(_SPACE_BEFORE),
    ),
    (re.compile(r"«[ \t\u00a0]+"), "«" + NNBSP, "«"),  # « texte » inside the guillemets
    (re.compile(r"°(?<=\b[nN]°)[ \t]+(?=\d)"), "°" + NBSP, "°"),  # n° 12
    # 250 000; digits are ASCII ones, which `_DIGITS` stands for
    (re.compile(r"([0-9])[ \t\u00a0](?=[0-9]{3}(?![0-9]))"), r"\1" + NNBSP, _DIGITS),
)
# Guillemets the editor wrote without their spaces get them.
_FRENCH_INSERT: tuple[Rule, ...] = (
    (re.compile(r"«(?=[^\s\u202f\u00a0])"), "«" + NNBSP, "«"),
    (re.compile(r"»(?<=[^\s\u202f\u00a0]»)"), NNBSP + "»", "»"),
)
# In HTML only: a hyphen next to a digit inside a word does not break ("GPT-4o", "B-1023"),
# and an apostrophe escaped by the template (&#39;) is one too. The text part wraps at
# spaces only, and keeps the plain hyphen for plain-text readers.
_HTML_ONLY: tuple[Rule, ...] = (
    (re.compile(r"-(?:(?<=[^\W_]-)(?=\d)|(?<=\d-)(?=[^\W_]))"), NBHY, "-"),
    (
        re.compile(r"&#39;(?<=[^\W\d_]&#39;)(?=[^\W_])|&#x27;(?<=[^\W\d_]&#x27;)(?=[^\W_])"),
        "’",
        "&",
    ),
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
        spans = _protected_spans(text)
        kept = [text[begin:end] for begin, end in spans]
        if spans:
            # Each span stands as one character that is not a space: "URL :" still reads
            # as a word before a colon.
            pieces = []
            position = 0
            for begin, end in spans:
                pieces.append(text[position:begin])
                position = end
            pieces.append(text[position:])
            work = _KEPT.join(pieces)
        else:
            work = text
        for pattern, replacement, needs in self.rules:
            for char in needs:
                if char in work:
                    work = pattern.sub(replacement, work)
                    break
        if kept:
            originals = iter(kept)
            work = _KEPT_RE.sub(lambda _: next(originals), work)
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
