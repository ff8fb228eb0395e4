"""French typography, applied by the tool to every text a reader sees."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qant_mail.authoring import prose
from qant_mail.authoring.load import load
from qant_mail.authoring.render import Renderer, Slot
from qant_mail.authoring.typography import (
    _UNITS,
    NBSP,
    NNBSP,
    NOWRAP_CLOSE,
    NOWRAP_OPEN,
    Typographer,
    for_locale,
)
from qant_mail.base.config import Settings
from tests.conftest import ROOT, SAMPLE

TEXT = for_locale("fr", html=False)
HTML = for_locale("fr", html=True)

CASES = [
    # (written, in the text part, in the HTML)
    ("Pourquoi ?", f"Pourquoi{NNBSP}?", f"Pourquoi{NNBSP}?"),
    ("Attention !", f"Attention{NNBSP}!", f"Attention{NNBSP}!"),
    ("deux ; trois", f"deux{NNBSP}; trois", f"deux{NNBSP}; trois"),
    ("Note : la suite", f"Note{NBSP}: la suite", f"Note{NBSP}: la suite"),
    ("« Bonjour »", f"«{NNBSP}Bonjour{NNBSP}»", f"«{NNBSP}Bonjour{NNBSP}»"),
    ("«Bonjour»", f"«{NNBSP}Bonjour{NNBSP}»", f"«{NNBSP}Bonjour{NNBSP}»"),
    ("l'IA d'aujourd'hui", "l’IA d’aujourd’hui", "l’IA d’aujourd’hui"),
    # The text's own hyphen, in both parts (the HTML keeps the word whole with markup).
    ("GPT-4o et Albert-40B-1023", "GPT-4o et Albert-40B-1023", "GPT-4o et Albert-40B-1023"),
    ("le n° 12", f"le n°{NBSP}12", f"le n°{NBSP}12"),
    ("250 000 euros", f"250{NNBSP}000{NBSP}euros", f"250{NNBSP}000{NBSP}euros"),
    ("49 %", f"49{NBSP}%", f"49{NBSP}%"),
    ("A • B • C", f"A{NBSP}• B{NBSP}• C", f"A{NBSP}• B{NBSP}• C"),
    ("start-up et open-source", "start-up et open-source", "start-up et open-source"),
    # The space the editor left out is added: narrow before ; ! ?, full before :.
    ("Qant: la suite", f"Qant{NBSP}: la suite", f"Qant{NBSP}: la suite"),
    ("QANT:", f"QANT{NBSP}:", f"QANT{NBSP}:"),
    ("Vraiment?! Oui!", f"Vraiment{NNBSP}?! Oui{NNBSP}!", f"Vraiment{NNBSP}?! Oui{NNBSP}!"),
    ("deux; trois", f"deux{NNBSP}; trois", f"deux{NNBSP}; trois"),
    ("(pourquoi?)", f"(pourquoi{NNBSP}?)", f"(pourquoi{NNBSP}?)"),
    (
        "« Attention: x »",
        f"«{NNBSP}Attention{NNBSP}: x{NNBSP}»".replace(f"n{NNBSP}:", f"n{NBSP}:"),
        None,
    ),
    # Numbers keep their units; three full stops are an ellipsis.
    ("6 nm, 3 GHz et 11 milliards", f"6{NBSP}nm, 3{NBSP}GHz et 11{NBSP}milliards", None),
    ("25 ans, 10 min", f"25{NBSP}ans, 10{NBSP}min", None),
    ("le 3 mars, de 1 à 2", "le 3 mars, de 1 à 2", "le 3 mars, de 1 à 2"),
    ("Et puis...", "Et puis…", "Et puis…"),
    ("Et puis....", "Et puis....", "Et puis...."),
    # Left as written: links, addresses, placeholders, times, ratios, code-like words.
    ("https://x.example/l'a?b=1 : ok", f"https://x.example/l'a?b=1{NBSP}: ok", None),
    ("https://x.example/a?b=1", "https://x.example/a?b=1", "https://x.example/a?b=1"),
    ("écrire à jean.d'arc@example.com !", f"écrire à jean.d'arc@example.com{NNBSP}!", None),
    ("<https://x.example/a-1> ?", f"<https://x.example/a-1>{NNBSP}?", None),
    ("%%qant:email%%", "%%qant:email%%", "%%qant:email%%"),
    ("à 10:30, 3:2, std::vector, a:b", "à 10:30, 3:2, std::vector, a:b", None),
    ("Tom &amp; Jerry; la suite", None, f"Tom &amp; Jerry{NNBSP}; la suite"),
    ("&amp; &#39; &#x27;", None, "&amp; &#39; &#x27;"),
]


@pytest.mark.parametrize(("written", "text", "html"), CASES)
def test_french_typography(written: str, text: str | None, html: str | None) -> None:
    if text is not None:
        assert TEXT(written) == text
    if html is not None:
        assert HTML(written) == html


@pytest.mark.parametrize(("written", "text", "html"), CASES)
def test_typography_applied_twice_changes_nothing(
    written: str, text: str | None, html: str | None
) -> None:
    assert TEXT(TEXT(written)) == TEXT(written)
    assert HTML(HTML(written)) == HTML(written)


def _inserted(match: re.Match[str]) -> str:
    before = match.string[max(0, match.start() - 12) : match.start()]
    if match.group() == ";" and re.search(
        r"&(?:#[0-9]+|#[xX][0-9a-fA-F]+|[A-Za-z][A-Za-z0-9]*)$", before
    ):
        return ";"
    return NNBSP + match.group()


# The rules as first written: each pattern led by its lookbehind and tried on every text.
# The typographer's own are reordered for speed and skip texts that cannot match; both
# must typeset every text alike.
PLAIN_RULES = (
    (r"(?<=[^\W\d_])'(?=[^\W_])", "’"),
    (r"(?<=\S)[ \t\u202f]+(?=:)", NBSP),
    (r"(?<=\S)[ \t\u00a0]+(?=[;!?»])", NNBSP),
    (r"(?<=«)[ \t\u00a0]+", NNBSP),
    (r"(?<=\S)[ \t]+(?=•)", NBSP),
    (r"(?<=\b[nN]°)[ \t]+(?=\d)", NBSP),
    (r"(?<=[0-9])[ \t\u00a0](?=[0-9]{3}(?![0-9]))", NNBSP),
    (r"(?<=\d)[ \t]+(?=[%€$£‰])", NBSP),
    (r"«(?=[^\s\u202f\u00a0])", "«" + NNBSP),
    (r"(?<=[^\s\u202f\u00a0])»", NNBSP + "»"),
    (r"(?<=[^\s\u00a0\u202f\x1c:;!?(\[{«“‘/]):(?=[\s\u00a0\x1c]|$)", NBSP + ":"),
    (
        r"(?<=[^\s\u00a0\u202f\x1c:;!?(\[{«“‘/])[;!?](?=[\s\u00a0\u202f\x1c»”)\]!?;.,…\"']|$)",
        _inserted,
    ),
    (r"(?<=[0-9])[ \t](?=(?:" + _UNITS + r")(?![\w/]))", NBSP),
    (r"(?<!\.)\.\.\.(?!\.)", "…"),
    (r"(?<=[^\W\d_])&#(?:39|x27);(?=[^\W_])", "’"),
)
ALPHABET = "aéZ09 \t\n\u00a0\u202f'’:;!?«»•°%€-&#x@.<>/nNmsh()" + "3٣²_"


@settings(max_examples=300, derandomize=True, deadline=None)
@given(st.text(alphabet=ALPHABET, min_size=1, max_size=40))
def test_fast_rules_typeset_as_the_plain_ones(written: str) -> None:
    # A "needs" of the whole alphabet: the plain rules are tried on every text.
    plain = Typographer(tuple((re.compile(p), r, ALPHABET) for p, r in PLAIN_RULES))
    assert HTML(written) == plain(written)


TAGS = st.sampled_from(["<b>", "</b>", '<a href="l\'a : b">', "</a>", "<br/>", "<!-- : -->"])
TEXTS = st.text(alphabet=ALPHABET.replace("<", "").replace(">", ""), max_size=12)


@settings(max_examples=200, derandomize=True, deadline=None)
@given(st.lists(st.tuples(TEXTS, TAGS), max_size=8), TEXTS)
def test_a_document_is_typeset_as_its_texts_one_by_one(
    pieces: list[tuple[str, str]], last: str
) -> None:
    document = "".join(text + tag for text, tag in pieces) + last
    texts = [HTML(text) for text, _ in pieces] + [HTML(last)]
    tags = [tag for _, tag in pieces]
    # A mark that opens a text after an inline tag follows the word before that tag.
    for number in range(1, len(texts)):
        text, before, tag = texts[number], texts[number - 1], tags[number - 1]
        inline = re.match(r"</?(a|b)\b", tag)
        follows = bool(before) and not before[-1].isspace() and before[-1] not in "(«[{“"
        if inline and follows and re.match(r"[:;!?](?=[\s\u00a0]|$)", text):
            texts[number] = (NBSP if text[0] == ":" else NNBSP) + text
    expected = "".join(t + tag for t, tag in zip(texts, [*tags, ""], strict=True))
    assert HTML.markup(document) == expected


@settings(max_examples=200, derandomize=True, deadline=None)
@given(st.lists(st.tuples(TEXTS, TAGS), max_size=8), TEXTS)
def test_markup_gives_each_text_it_typeset_as_typeset_alone(
    pieces: list[tuple[str, str]], last: str
) -> None:
    document = "".join(text + tag for text, tag in pieces) + last
    found: dict[str, str] = {}
    HTML.markup(document, found)
    assert {text: HTML(text) for text in [*(t for t, _ in pieces), last]} == found
    # What the text part takes from it: without an "&", both typographers agree.
    assert all(TEXT(text) == done for text, done in found.items() if "&" not in text)


def test_the_text_part_is_the_same_without_the_html_parts_typesetting(
    renderer: Renderer, monkeypatch: pytest.MonkeyPatch
) -> None:
    issues = [SAMPLE, *sorted((ROOT / "tests" / "corpus").glob("*.yaml"))]
    shared = [renderer.render(load(path).issue).text for path in issues]
    monkeypatch.setattr(Renderer, "_typeset", lambda self, text: self.typeset_text(text))
    assert [renderer.render(load(path).issue).text for path in issues] == shared


# Protected spans as first written: one alternation, tried at every position.
PLAIN_PROTECTED = re.compile(
    "\ue001[^\ue002]*\ue002|"
    r"%%qant:\w+%%"
    r"|<[^\s<>]+>"
    r"|\b(?:https?|ftp|mailto|tel|cid|data|file):[^\s<>\"]+"
    r"|\bwww\.[^\s<>\"]+"
    r"|(?<![\w.+-])[\w.+-]+@[\w-]+(?:\.[\w-]+)+",
    re.IGNORECASE,
)
URLISH = st.text(alphabet='aéW w.:/%<>@q_+-\n"' + "hTtpsmailoqnſK1", max_size=40)


@settings(max_examples=1000, derandomize=True, deadline=None)
@given(
    st.one_of(
        URLISH,
        st.lists(
            st.sampled_from(
                [
                    "%%qant:email%%",
                    "%%QANT:x%%",
                    "<a@b.c>",
                    "https://x.y/a",
                    "mailto:a@b.c",
                    "www.x.y",
                    "WWW.x",
                    "a.b+c@d-e.f",
                    "@",
                    ":",
                    " ",
                    "é",
                    "x",
                    "10:30",
                    "<",
                    "%%",
                    "\ue001Why? x:\ue002",
                    "\ue001",
                ]
            ),
            max_size=12,
        ).map("".join),
    )
)
def test_protected_spans_are_those_of_one_search(written: str) -> None:
    from qant_mail.authoring import typography

    expected = [m.span() for m in PLAIN_PROTECTED.finditer(written)]
    assert typography._protected_spans(written) == expected


def test_other_locales_are_left_as_written() -> None:
    for html in (False, True):
        english = for_locale("en", html=html)
        assert english("Why ? « x » l'IA GPT-4o") == "Why ? « x » l'IA GPT-4o"
        assert not english.active


def test_markup_is_typeset_between_tags_only() -> None:
    document = (
        '<p title="a : b" data-x="GPT-4o">l&#39;IA : <a href="2023-11-20/l\'a">GPT-4o</a></p>'
        "<style>a : b { color: red }</style><!-- l'IA : -->"
    )
    assert HTML.markup(document) == (
        f'<p title="a : b" data-x="GPT-4o">l’IA{NBSP}: '
        f'<a href="2023-11-20/l\'a">{NOWRAP_OPEN}GPT-4o{NOWRAP_CLOSE}</a></p>'
        "<style>a : b { color: red }</style><!-- l'IA : -->"
    )


def test_markdown_text_keeps_links_and_code_and_typesets_emphasis() -> None:
    written = "*Vraiment ?* Voir [l'article : ici](https://x.example/l'a?b) et `a : b`."
    assert prose.to_text(written, typeset=TEXT) == (
        f"Vraiment{NNBSP}? Voir l’article{NBSP}: ici <https://x.example/l'a?b> et a : b."
    )


def test_the_email_is_typeset_in_both_parts_labels_and_settings_included(
    renderer: Renderer, write_issue: Callable[..., Path]
) -> None:
    document = load(
        write_issue(
            """\
            subject: "Pourquoi ? L'IA"
            preheader: "Une question : pourquoi ?"
            sections:
              - text: "*Vraiment ?* Voir [l'article : ici](https://x.example/l'a) et GPT-4o."
              - letter: {body: "Texte", ps: "À demain !"}
            """
        )
    )
    rendered = renderer.render(document.issue)
    html, text = rendered.fill(dict.fromkeys(Slot, "x"))
    assert rendered.subject == f"Pourquoi{NNBSP}? L’IA"
    assert f"<em>Vraiment{NNBSP}?</em>" in html
    assert ">l’article&nbsp;: ici</a>" in html  # the serialiser writes NBSP as &nbsp;
    assert 'href="https://x.example/l\'a"' in html
    assert "GPT-4o</span>" in html
    assert "\u2011" not in html  # the text's own hyphen
    assert "PS&nbsp;:" in html  # a label, from the settings
    assert f"Vraiment{NNBSP}? Voir l’article{NBSP}: ici <https://x.example/l'a>" in text
    assert f"À demain{NNBSP}!" in text


def test_an_english_newsletter_is_not_typeset(
    project_settings: Settings, project: Path, write_issue: Callable[..., Path]
) -> None:
    settings_file = project / "qant.toml"
    settings_file.write_text(
        settings_file.read_text().replace('locale = "fr"', 'locale = "en"'), encoding="utf-8"
    )
    from qant_mail.base.config import load_settings

    renderer = Renderer(load_settings(settings_file, env={}))
    document = load(write_issue('subject: "Why ? GPT-4o"\nsections: [text: "It\'s : fine"]\n'))
    rendered = renderer.render(document.issue)
    assert rendered.subject == "Why ? GPT-4o"
    assert "It's : fine" in rendered.text


LETTERS = st.text(
    alphabet="aéZ09 \t\n\u00a0\u202f'’:;!?«»“”•°%€$-&#.,()/@_nmsGHzk" + "3٣²",
    max_size=60,
)


def _letters(text: str) -> list[str]:
    return [char for char in text if char.isalnum()]


@settings(max_examples=400, derandomize=True, deadline=None)
@given(LETTERS)
def test_typography_never_changes_a_letter_or_a_digit(written: str) -> None:
    assert _letters(TEXT(written)) == _letters(written)
    document = HTML.markup(f"<p>{written.replace('<', '').replace('>', '')}</p>")
    shown = re.sub(r"<[^>]*>", "", document)
    assert _letters(shown) == _letters(written.replace("<", "").replace(">", ""))


def test_code_and_passages_in_another_language_keep_what_was_written() -> None:
    document = (
        '<p>Voir <code>a: b; c!</code> et <span lang="en">Why? Because: it is!</span> '
        'puis <span lang="fr">Bon: ok</span></p><pre>x: 1</pre>'
    )
    assert HTML.markup(document) == (
        '<p>Voir <code>a: b; c!</code> et <span lang="en">Why? Because: it is!</span> '
        f'puis <span lang="fr">Bon{NBSP}: ok</span></p><pre>x: 1</pre>'
    )


def test_a_title_is_typeset_without_markup() -> None:
    assert HTML.markup("<mj-title>GPT-4o: le point</mj-title><p>GPT-4o</p>") == (
        f"<mj-title>GPT-4o{NBSP}: le point</mj-title><p>{NOWRAP_OPEN}GPT-4o{NOWRAP_CLOSE}</p>"
    )


def test_a_mark_after_a_link_follows_the_word_before_it() -> None:
    assert HTML.markup('<p>Lire <a href="u">l&#39;article</a>: la suite</p>') == (
        f'<p>Lire <a href="u">l’article</a>{NBSP}: la suite</p>'
    )
    assert HTML.markup("<p>fin.</p><p>: début</p>") == "<p>fin.</p><p>: début</p>"


def test_an_english_quotation_keeps_its_own_typography(
    renderer: Renderer, write_issue: Callable[..., Path]
) -> None:
    document = load(
        write_issue(
            """\
            subject: S
            preheader: P
            sections:
              - quote: {text: "Why? Because: it is...", author: "Ada", lang: en}
              - quote: {text: "Pourquoi? Parce que", author: "Ada"}
            """
        )
    )
    rendered = renderer.render(document.issue)
    html, text = rendered.fill(dict.fromkeys(Slot, "x"))
    assert '<span lang="en">Why? Because: it is...</span>' in html
    assert "Why? Because: it is..." in text
    assert "\ue001" not in text
    assert "\ue002" not in text
    assert f"Pourquoi{NNBSP}? Parce que" in text
    assert f"Pourquoi{NNBSP}? Parce que" in html
