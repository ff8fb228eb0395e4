"""Locale typography for every text a reader sees: French no-break spaces (added where
the editor left none), apostrophes, ellipses, numbers bound to their units."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass, field

NBSP = "\u00a0"  # no-break space: before ":" and in "n° 12"
NNBSP = "\u202f"  # narrow no-break space: before ; ! ? », after «, between digit groups
# In HTML, a word whose hyphen touches a digit ("GPT-4o", "1890-1941") is kept on one line
# by markup, so that the text keeps its own hyphen: a reader who copies or searches it
# finds what was written (a U+2011 would not match).
NOWRAP_OPEN = '<span style="white-space:nowrap">'
NOWRAP_CLOSE = "</span>"

# Spans left exactly as written: per-recipient placeholders, <bracketed> addresses, links
# (a scheme, or www.) and e-mail addresses. As one alternation, tried at each position of
# each text, they cost most of the typesetting: each kind is found from the character
# that announces it (%, <, :, w, @), which a search reaches by jumping, and the spans are
# then chosen as that alternation would have chosen them (`_protected_spans`).
_PLACEHOLDER = re.compile(r"%%qant:\w+%%", re.IGNORECASE)
# A passage kept as written (words quoted in another language), between two private-use
# characters that the text template puts around it and takes off at the end.
AS_WRITTEN_OPEN, AS_WRITTEN_CLOSE = "\ue001", "\ue002"
_AS_WRITTEN_SPAN = re.compile("\ue001[^\ue002]*\ue002")
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
    for kind, announce, pattern in (
        (-1, AS_WRITTEN_OPEN, _AS_WRITTEN_SPAN),
        (0, "%%", _PLACEHOLDER),
        (1, "<", _BRACKETED),
    ):
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
_MARKS = (_KEPT, AS_WRITTEN_OPEN, AS_WRITTEN_CLOSE)
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
# What may stand right before a double punctuation mark that lacks its space: a word, a
# number, a closing bracket or quote, a kept span; not a space, not another mark (the
# second of "?!" takes none), not an opening bracket, not the start of a text.
_BEFORE_MARK = r"[^\s\u00a0\u202f\x1c:;!?(\[{«“‘/]"
# And right after it: the end of a word. "10:30", "3:2", "std::vector", "a:b" and links
# (kept apart already) go on without a space, so they are left alone.
_AFTER_COLON = r"(?=[\s\u00a0\x1c]|$)"
_AFTER_MARK = r"(?=[\s\u00a0\u202f\x1c»”)\]!?;.,…\"']|$)"
_ENTITY_END = re.compile(r"&(?:#[0-9]+|#[xX][0-9a-fA-F]+|[A-Za-z][A-Za-z0-9]*)$")


def _space_inserted(match: re.Match[str]) -> str:
    mark = match.group()
    if mark == ";" and _ENTITY_END.search(match.string, max(0, match.start() - 12), match.start()):
        return mark  # the end of "&amp;", not a semicolon
    return NNBSP + mark


# Units a number is bound to: "6 nm", "3 GHz", "11 milliards", "25 ans". A list, not a
# pattern: "le 3 mars" and "de 1 à 2" go on breaking where they may.
_UNITS = (
    "nm|µm|mm|cm|dm|km|m|m2|m²|m3|m³|ha|l|ml|cl|mg|g|kg|t|Mt|Gt|W|kW|MW|GW|TW|Wh|kWh|MWh|GWh"
    "|TWh|V|kV|mV|A|mA|Hz|kHz|MHz|GHz|THz|o|Ko|Mo|Go|To|Po|ko|bit|bits|Kb|Mb|Gb|Tb|KB|MB|GB"
    "|TB|PB|Mbit/s|Gbit/s|Mb/s|Gb/s|Mo/s|Go/s|bps|Mbps|Gbps|Tflops|Pflops|flops|°C|°F|K|ms"
    "|µs|ns|s|min|h|j|an|ans|jours?|semaines?|mois|heures?|minutes?|secondes?|années?"
    "|mille|millions?|milliards?|billions?|Md|Mds|Md€|M€|k€|Md\\$|M\\$|euros?|dollars?"
    "|livres|yuans?|yens?|points?|pixels?|px|pts?|qubits?|transistors?|paramètres"
)
_FRENCH_INSERT: tuple[Rule, ...] = (
    # Guillemets the editor wrote without their spaces get them.
    (re.compile(r"«(?=[^\s\u202f\u00a0])"), "«" + NNBSP, "«"),
    (re.compile(r"»(?<=[^\s\u202f\u00a0]»)"), NNBSP + "»", "»"),
    # "Qant: la suite" → "Qant : la suite"; "Vraiment?" → "Vraiment ?".
    (re.compile(rf":(?<={_BEFORE_MARK}:){_AFTER_COLON}"), NBSP + ":", ":"),
    (re.compile(rf"[;!?](?<={_BEFORE_MARK}[;!?]){_AFTER_MARK}"), _space_inserted, ";!?"),
    # "6 nm", "11 milliards": the number never ends a line without its unit.
    (re.compile(rf"([0-9])[ \t](?=(?:{_UNITS})(?![\w/]))"), r"\1" + NBSP, _DIGITS),
    # Three full stops are an ellipsis (four or more are left as written).
    (re.compile(r"\.\.\.(?<!\.\.\.\.)(?!\.)"), "…", "."),
)
# In HTML only: an apostrophe escaped by the template (&#39;) is one too.
_HTML_ONLY: tuple[Rule, ...] = (
    (
        re.compile(r"&#39;(?<=[^\W\d_]&#39;)(?=[^\W_])|&#x27;(?<=[^\W\d_]&#x27;)(?=[^\W_])"),
        "’",
        "&",
    ),
)
# In a document, the text between tags is typeset; tags, comments, styles and scripts
# (and MJML's head blocks) are left alone.
# One group around the whole, so that `split` gives texts and tags, alternating.
_SKIPPED = re.compile(
    r"(<!--.*?-->|<style\b.*?</style\s*>|<script\b.*?</script\s*>"
    r"|<mj-style\b.*?</mj-style\s*>|<mj-attributes\b.*?</mj-attributes\s*>|<[^>]*>)",
    re.DOTALL | re.IGNORECASE,
)
# Elements whose text is kept as written: code, and a passage in another language (its
# `lang` attribute); and those where a tag would show as text (a title). A tag opens
# one by its name, or by its `lang`, which only a tag that holds the word is searched for.
_PLAIN_TEXT = re.compile(r"<(title|mj-title|mj-preview)\b", re.IGNORECASE)
_OPENS_BY_NAME = re.compile(r"<(?:code|pre|kbd|samp|title|mj-title|mj-preview)\b", re.I)
_OTHER_LANGUAGE = re.compile(r"<\w[\w-]*\b[^>]*\blang=\"(?!fr)", re.I)
_OPENING = re.compile(r"<([\w-]+)")
_TAG_NAME = re.compile(r"</?([\w-]+)")
# Tags inside a line of text: a mark after one of them still follows the word before it
# ("[l'article](…): la suite" is "</a>: la suite").
_INLINE = frozenset(("a", "b", "strong", "em", "i", "span", "u", "s", "sup", "sub", "code"))
_MARK_AT_START = re.compile(r"([:;!?])(?=[\s\u00a0]|$)")
# A word with a hyphen next to a digit: "GPT-4o", "Albert-40B-1023", "1890-1941".
_HYPHENED = re.compile(r"[^\W_]+(?:-[^\W_]+)+")
# Led by the hyphen, which the search jumps to: led by a letter, it tried every position.
_DIGIT_HYPHEN = re.compile(r"-(?<=[^\W_]-)[0-9]|-(?<=[0-9]-)[^\W_]")


@dataclass(frozen=True)
class Typographer:
    """Apply one locale's typography to text shown to readers."""

    rules: tuple[Rule, ...] = ()
    # A character of which a text must hold one for any rule to change it.
    _trigger: re.Pattern[str] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        needs = "".join(sorted({char for _, _, chars in self.rules for char in chars}))
        trigger = re.compile(f"[{re.escape(needs)}]") if needs else None
        object.__setattr__(self, "_trigger", trigger)

    def __call__(self, text: str) -> str:
        """Return `text` typeset; links, addresses and placeholders in it are untouched."""
        trigger = self._trigger
        # A text no rule can change (a name, a short label) is most of the text part's
        # calls: it need not be searched for links and addresses either.
        if trigger is None or not text or (not trigger.search(text) and _KEPT not in text):
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

    def markup(self, document: str, found: dict[str, str] | None = None) -> str:
        """Return an HTML (or MJML) document with the text between its tags typeset:
        attribute values (links, file names, alt texts), code, and passages marked as
        in another language keep what was written. A word whose hyphen touches a digit
        is kept on one line by a span. `found`, if given, receives each text between
        tags that was typeset, with what this typographer makes of it alone."""
        if not self.rules:
            return document
        pieces = _SKIPPED.split(document)  # texts and tags, alternating: texts are even
        kept, plain = _contexts(pieces)
        texts = pieces[0::2]
        if kept:
            texts = [t for i, t in enumerate(texts) if i not in kept]
        if _SEPARATOR in document:
            typeset = [self(text) if not text.isspace() else text for text in texts]
        else:
            # The texts are typeset in one pass, joined by a separator that every rule
            # treats as the end of a text (it is a space, and no rule crosses a space
            # that is not one of its own): a thousand short calls cost ten times more.
            typeset = self(_SEPARATOR.join(texts)).split(_SEPARATOR)
            if len(typeset) != len(texts):  # pragma: no cover - a rule crossed a separator
                typeset = [self(text) for text in texts]
        # Typeset in one pass or alone, a text comes out the same; unless a character
        # that marks a span in the work is in the document already.
        if found is not None and not any(m in document for m in _MARKS):
            found.update(zip(texts, typeset, strict=True))
        done = iter(typeset)
        for number in range(len(pieces) // 2 + 1):
            if number in kept:
                continue
            text = next(done)
            if number not in plain and "-" in text:
                text = _nowrap(text)
            pieces[2 * number] = text
        _marks_after_inline_tags(pieces, kept)
        return "".join(pieces)

    @property
    def active(self) -> bool:
        """Return whether this locale changes anything."""
        return bool(self.rules)


def _contexts(pieces: list[str]) -> tuple[set[int], set[int]]:
    """Return the numbers of the texts (pieces[2n]) kept as written (in code, or in an
    element of another language), and of those that must stay plain text (a title)."""
    kept: set[int] = set()
    plain: set[int] = set()
    closing: str | None = None  # the tag that ends what is being kept or held plain
    depth, holds_plain = 0, False
    for index in range(1, len(pieces), 2):
        tag = pieces[index]
        if closing is None:
            opens = _OPENS_BY_NAME.match(tag) or (
                'lang="' in tag.lower() and _OTHER_LANGUAGE.match(tag)
            )
            if opens and not tag.endswith("/>"):
                opened = _OPENING.match(tag)
                assert opened is not None
                closing, depth = opened.group(1).lower(), 1
                holds_plain = bool(_PLAIN_TEXT.match(tag))
        else:
            opened = _OPENING.match(tag)
            if opened and opened.group(1).lower() == closing and not tag.endswith("/>"):
                depth += 1
            elif tag.lower().startswith(f"</{closing}"):
                depth -= 1
                if depth == 0:
                    closing = None
                    continue
        if closing is not None:
            (plain if holds_plain else kept).add((index + 1) // 2)
    return kept, plain


def _nowrap(text: str) -> str:
    """Return `text` with each word whose hyphen touches a digit in a no-wrap span (links
    and addresses in it are left alone)."""
    # A word the span is for holds such a hyphen, so a text without one has none.
    if "-" not in text or not _DIGIT_HYPHEN.search(text):
        return text
    spans = _protected_spans(text)

    def wrapped(match: re.Match[str]) -> str:
        word = match.group()
        start = match.start()
        if not _DIGIT_HYPHEN.search(word) or any(b <= start < e for b, e in spans):
            return word
        return NOWRAP_OPEN + word + NOWRAP_CLOSE

    return _HYPHENED.sub(wrapped, text)


def _marks_after_inline_tags(pieces: list[str], kept: set[int]) -> None:
    """Give a double punctuation mark that opens a text right after an inline tag the
    no-break space its word lacks: "<a>l’article</a>: la suite"."""
    for index in range(2, len(pieces), 2):
        text = pieces[index]
        if index // 2 in kept or not text or text[0] not in ":;!?":
            continue
        tag = pieces[index - 1]
        name = _TAG_NAME.match(tag)
        before = pieces[index - 2]
        if name is None or name.group(1).lower() not in _INLINE or not before:
            continue
        if before[-1].isspace() or before[-1] in "\u00a0\u202f(«[{“":
            continue
        match = _MARK_AT_START.match(text)
        if match:
            pieces[index] = (NBSP if match.group(1) == ":" else NNBSP) + text


@functools.cache
def for_locale(language: str, *, html: bool) -> Typographer:
    """Return the typographer of `language` (`fr`); other languages are left as written."""
    if language != "fr":
        return Typographer()
    rules = _FRENCH + _FRENCH_INSERT
    return Typographer((*rules, *_HTML_ONLY) if html else rules)
