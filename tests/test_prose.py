"""Markdown bodies: markdown-it-pyrs gives what markdown-it-py, the reference, gives."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from markdown_it import MarkdownIt
from markdown_it.token import Token

from qant_mail.authoring import prose
from qant_mail.authoring.load import load

ROOT = Path(__file__).resolve().parent.parent

# markdown-it-py with the rules qant-mail uses: CommonMark, raw HTML parsed, strikethrough
# and tables, no indented code.
REFERENCE = MarkdownIt("commonmark", {"html": True}).enable(["strikethrough", "table"])
REFERENCE.disable("code")
WORD = re.compile(r"\w+(?:[-‑’']\w+)*")


def reference_html(text: str) -> str:
    html = REFERENCE.render(text)
    return re.sub(r"<(/?)h([1-6])>", lambda m: f"<{m[1]}h{min(int(m[2]) + 1, 6)}>", html)


def reference_links(text: str) -> list[str]:
    return [
        str(child.attrs.get("href", ""))
        for token in REFERENCE.parse(text)
        for child in token.children or ()
        if child.type == "link_open"
    ]


def reference_words(text: str) -> int:
    def pieces(tokens: list[Token]) -> Iterator[str]:
        for token in tokens:
            for child in token.children or ():
                if child.type in ("text", "code_inline"):
                    yield child.content
            if token.type == "fence":
                yield token.content

    return sum(len(WORD.findall(piece)) for piece in pieces(REFERENCE.parse(text)))


def corpus_bodies() -> list[str]:
    paths = [
        ROOT / "issues" / "2023-11-20.yaml",
        *sorted((ROOT / "tests" / "corpus").glob("*.yaml")),
    ]
    return sorted(
        {text for path in paths for text, markdown in load(path).issue.texts() if markdown}
    )


# Bodies as editors write them: paragraphs, headings, lists, quotes, code, tables, with
# emphasis, links (international names included), entities and escapes inside. Where
# markdown-it-pyrs and markdown-it-py part is in malformed text only (an empty quote, a
# fence left open at the end, an empty list item after a table), which no issue holds.
WORDS = st.sampled_from(
    [
        *("mot", "Été", "l'IA", "aujourd\\'hui", ":", "?", "« x »", "49 %", "n° 12", "250 000"),
        *("&amp;", "&nbsp;", "\\*", "a@b.fr", "https://nu.e", "GPT-4o", "—", "…"),
    ]
)
INLINE = st.one_of(
    WORDS,
    WORDS.map(lambda w: f"**{w}**"),
    WORDS.map(lambda w: f"*{w}*"),
    WORDS.map(lambda w: f"~~{w}~~"),
    WORDS.map(lambda w: f"`{w}`"),
    st.sampled_from(
        [
            "[a](https://x.y/é?b=1&c=2)",
            "[b **c**](<https://x.y/a b>)",
            "<https://exémple.fr/é>",
            "<mailto:a@b.fr>",
            "[c](mailto:jean@exémple.fr)",
            "[d](https://EXÉMPLE.fr/)",
            "[e](https://ex%C3%A9mple.fr/)",
            "[https://x.y](https://x.y)",
        ]
    ),
)
LINE = st.lists(INLINE, min_size=1, max_size=8).map(" ".join)
BLOCK = st.one_of(
    st.lists(LINE, min_size=1, max_size=3).map("\n".join),
    LINE.map(lambda line: "## " + line),
    LINE.map(lambda line: "### " + line),
    st.lists(LINE, min_size=1, max_size=3).map(lambda lines: "\n".join("- " + x for x in lines)),
    st.lists(LINE, min_size=1, max_size=3).map(
        lambda lines: "\n".join(f"{n}. {x}" for n, x in enumerate(lines, 3))
    ),
    LINE.map(lambda line: "> " + line),
    LINE.map(lambda line: f"```\n{line}\n```"),
    st.just("---"),
    st.tuples(LINE, LINE).map(lambda cells: f"| {cells[0]} | x |\n|---|---|\n| {cells[1]} | y |"),
    st.just("[r][ref]\n\n[ref]: https://exémple.fr/r"),
)
MARKDOWN = st.lists(BLOCK, min_size=1, max_size=5).map("\n\n".join)


@pytest.mark.parametrize("text", corpus_bodies(), ids=lambda t: t[:30])
def test_every_corpus_body_renders_as_the_reference_renders_it(text: str) -> None:
    assert prose.to_html(text) == reference_html(text)
    assert prose.links(text) == reference_links(text)
    assert prose.words(text) == reference_words(text)


@settings(max_examples=400, derandomize=True, deadline=None)
@given(MARKDOWN)
def test_any_body_renders_as_the_reference_renders_it(text: str) -> None:
    assert prose.to_html(text) == reference_html(text)
    assert prose.links(text) == reference_links(text)
    assert prose.words(text) == reference_words(text)


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("<div>\nx</div>", 0),
        ("Un\n\n<div>x</div>\n", 2),
        ("a\nb <b>c</b>", 1),
        ("a\n\n![i](x.png)", 2),
    ],
)
def test_what_a_body_may_not_hold_is_reported_on_its_line(text: str, line: int) -> None:
    assert [problem.line for problem in prose.problems(text)][:1] == [line]


def test_a_body_as_plain_text_writes_links_out_and_keeps_lists_and_quotes() -> None:
    text = (
        "## Titre\n\nUn [lien](https://x.y/a) et <https://z.fr> puis `code` et **gras**.\n\n"
        "1. un\n2. deux\n   - sous\n\n> cité\n"
    )
    assert prose.to_text(text, width=40) == (
        "Titre\n-----\n\n"
        "Un lien <https://x.y/a> et\n<https://z.fr> puis code et gras.\n\n"
        "1. un\n2. deux\n  • sous\n\n"
        "> cité"
    )
