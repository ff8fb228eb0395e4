"""Issues of every shape the newsletter has had: each renders what its editor wrote, in
order, and nothing else (beyond the settings' fixed texts)."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from bs4 import BeautifulSoup, Comment
from ruamel.yaml import YAML

from qant_mail.authoring.archive import build_archive
from qant_mail.authoring.load import load
from qant_mail.authoring.model import SCHEMA_FILE, json_schema
from qant_mail.authoring.render import RenderedIssue, Renderer, Slot
from qant_mail.base.config import Settings
from tests.conftest import ROOT, SAMPLE, check

CORPUS = sorted((ROOT / "tests" / "corpus").glob("*.yaml"))
ISSUES = [SAMPLE, *CORPUS]
IDS = [path.stem for path in ISSUES]

# Fields that hold no text a reader sees (or, for `alt`, none in the HTML's text).
NOT_SHOWN = {"url", "src", "link", "layout", "date", "draft", "width", "height", "lang"}
MARKDOWN = {"body", "lede", "intro", "closing", "ps", "text"}
# Labels a section repeats for each of its items: checked by the vocabulary, not in order.
REPEATED = {"separator", "sources_label", "links_label"}
SAMPLE_VALUES = {
    Slot.NAME: "Camille Lecteur",
    Slot.EMAIL: "camille@example.com",
    Slot.UNSUBSCRIBE_URL: "https://lettre.qant.example/unsubscribe/AA.jeton",
    Slot.PREFERENCES_URL: "https://lettre.qant.example/subscriptions/AA.jeton",
}


def test_the_corpus_has_the_shapes_the_newsletter_has_had() -> None:
    assert len(CORPUS) >= 8
    kinds = {kind for path in ISSUES for kind in section_kinds(raw(path))}
    assert kinds >= {"text", "quote", "letter", "event", "story", "special", "essentials"}


@pytest.mark.parametrize("path", ISSUES, ids=IDS)
def test_every_issue_passes_a_strict_check(path: Path, renderer: Renderer) -> None:
    report = check(path, renderer)
    assert report.problems == [], [str(p) for p in report.problems]


@pytest.mark.parametrize("path", ISSUES, ids=IDS)
def test_every_issue_is_valid_against_the_published_schema(path: Path) -> None:
    schema = json.loads(json_schema())
    jsonschema.validate(json_loadable(raw(path)), schema)


def test_the_published_schema_describes_every_field_and_is_up_to_date() -> None:
    schema = json.loads(json_schema())
    for name, definition in [("Issue", schema), *schema["$defs"].items()]:
        assert definition.get("description"), name
        for field, spec in definition.get("properties", {}).items():
            assert spec.get("description"), f"{name}.{field}"
    assert (ROOT / "issues" / SCHEMA_FILE).read_text(encoding="utf-8") == json_schema()


def test_the_schema_flags_a_mistake_the_editors_plugin_would_show() -> None:
    schema = json.loads(json_schema())
    wrong = {"subject": "S", "sections": [{"evnt": {"title": "T"}}]}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(wrong, schema)


@pytest.mark.parametrize("path", ISSUES, ids=IDS)
def test_nothing_lost_nothing_added(path: Path, renderer: Renderer, settings: Settings) -> None:
    data = raw(path)
    document = load(path)
    rendered = renderer.render(document.issue, key=document.key)
    html, text = filled(rendered)
    shown_html = words(visible(html))
    shown_text = words(text)

    # Nothing lost: each section's texts, in order, in both parts.
    written = [w for s in data["sections"] for w in words_of(s, html=True, ordered=True)]
    assert_in_order(written, shown_html, "HTML")
    written = [w for s in data["sections"] for w in words_of(s, html=False, ordered=True)]
    assert_in_order(written, shown_text, "text")
    for key in ("subject", "preheader", "title", "tagline", "masthead", "byline"):
        if data.get(key):
            assert_in_order(words(str(data[key])), shown_html, f"HTML {key}")
    headline = data.get("title", data["subject"])
    for key in ("tagline", "masthead", "byline"):
        if data.get(key):
            assert_in_order(words(str(data[key])), shown_text, f"text {key}")
    assert_in_order(words(str(headline)), shown_text, "text headline")

    # Nothing added: every word comes from the issue, the settings or the recipient.
    vocabulary = set(words_of(data, html=False)) | settings_words(settings, rendered)
    assert set(shown_html) - vocabulary == set()
    assert set(shown_text) - vocabulary - set(words(" ".join(urls(data)))) == set()

    # No label the issue removed, none it did not ask for.
    expected = expected_labels(data, settings)
    page = normalise(visible(html))
    plain = normalise(" ".join(text.split()))
    for label, count in expected.items():
        written_too = normalise(" ".join(texts(data))).count(label)
        assert page.count(label) == count + written_too, (label, "HTML")
        assert plain.count(label) == count + written_too, (label, "text")


# A careful French editor's faults, written apart from the typographer's own rules (a
# second reading of the same conventions): each as it shows in the text a reader gets.
_UNITS = r"(?:nm|mm|cm|km|kg|g|W|kW|MW|GW|TWh|GWh|Hz|MHz|GHz|Go|Mo|To|ans?|jours|mois|h|min"
_UNITS += r"|millions?|milliards?|euros|dollars|%|€)"
TYPOGRAPHY_FAULTS = {
    "no space before a colon": re.compile(r"[^\s\u00a0\u202f:/]:(?=[ \t\n]|$)"),
    "no space before ; ! ?": re.compile(r"[^\s\u00a0\u202f;!?(]+[;!?](?=[\s»)]|$)"),
    "a breakable space before : ; ! ?": re.compile(r"[ \t][:;!?]"),
    "U+2011 instead of the text's hyphen": re.compile("\u2011"),
    "three full stops": re.compile(r"(?<!\.)\.\.\.(?!\.)"),
    "a number apart from its unit": re.compile(r"\d[ \t]" + _UNITS + r"(?!\w)"),
    "doubled guillemets": re.compile(r"«[\s\u00a0\u202f]*«|»[\s\u00a0\u202f]*»"),
    "a guillemet without its space": re.compile(r"«(?=\S)|(?<=\S)»"),
}


@pytest.mark.parametrize("path", ISSUES, ids=IDS)
def test_no_typography_fault_reaches_a_reader(path: Path, renderer: Renderer) -> None:
    rendered = renderer.render(load(path).issue)
    html, text = filled(rendered)
    shown = {
        "html": visible(html),
        "text": text,
        "subject": rendered.subject,
        "preheader": rendered.preheader,
    }
    faults = [
        f"{part}: {name}: …{value[max(0, m.start() - 20) : m.end() + 10]!r}…"
        for part, value in shown.items()
        for name, pattern in TYPOGRAPHY_FAULTS.items()
        for m in pattern.finditer(value)
        if not (name == "no space before a colon" and "://" in value[m.start() - 10 : m.end() + 3])
    ]
    assert faults == []


@pytest.mark.parametrize("path", ISSUES, ids=IDS)
def test_view_in_browser_points_where_the_archive_publishes_the_issue(
    path: Path, project_settings: Settings, tmp_path: Path
) -> None:
    folder = project_settings.issues_dir
    shutil.copy(path, folder / path.name)
    if (path.parent / "2025-03-10").is_dir():
        shutil.copytree(path.parent / "2025-03-10", folder / "2025-03-10", dirs_exist_ok=True)
    document = load(folder / path.name)
    rendered = Renderer(project_settings).render(document.issue, key=document.key)
    site = tmp_path / "site"
    build_archive(project_settings, site)
    base = project_settings.newsletter.base_url + "/"
    assert rendered.web_url.startswith(base)
    page = site / rendered.web_url.removeprefix(base) / "index.html"
    assert page.is_file(), rendered.web_url
    html, text = filled(rendered)
    assert f'href="{rendered.web_url}"' in html
    assert rendered.web_url in text


def test_two_issues_of_one_day_have_two_addresses(
    project_settings: Settings, tmp_path: Path
) -> None:
    folder = project_settings.issues_dir
    for name in ("2024-05-01-matin.yaml", "2024-05-01-soir.yaml"):
        (folder / name).write_text("date: 2024-05-01\nsubject: S\nsections: [text: T]\n")
    report = build_archive(project_settings, tmp_path / "site")
    keys = {entry.key for entry in report.entries}
    assert {"2024-05-01-matin", "2024-05-01-soir"} <= keys
    renderer = Renderer(project_settings)
    urls_seen = {
        renderer.render(load(folder / f"{key}.yaml").issue, key=key).web_url
        for key in ("2024-05-01-matin", "2024-05-01-soir")
    }
    assert len(urls_seen) == 2


# ---- helpers --------------------------------------------------------------------------


def raw(path: Path) -> dict[str, Any]:
    data = YAML(typ="safe").load(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def json_loadable(value: Any) -> Any:
    """Return the YAML data as JSON would hold it (dates as strings)."""
    return json.loads(json.dumps(value, default=str))


def section_kinds(data: dict[str, Any]) -> Iterator[str]:
    for section in data["sections"]:
        yield from section


def filled(rendered: RenderedIssue) -> tuple[str, str]:
    return rendered.fill({**SAMPLE_VALUES, Slot.BROWSER_URL: rendered.web_url})


def normalise(text: str) -> str:
    text = text.replace("’", "'").replace("\u2011", "-")
    return re.sub(r"[\s\u00a0\u202f]+", " ", text)


def words(text: str) -> list[str]:
    return re.findall(r"\w+", normalise(text))


def visible(html: str) -> str:
    """Return the text a reader sees in an HTML part (alt texts and styles excluded)."""
    soup = BeautifulSoup(html, "html.parser")
    for tag in soup(["style", "script"]):
        tag.decompose()
    for comment in soup.find_all(string=lambda s: isinstance(s, Comment)):
        comment.extract()
    return soup.get_text(" ")


def strip_markdown(text: str) -> str:
    return re.sub(r"\]\([^)]*\)", "]", text)


def texts(value: Any, key: str = "", *, html: bool = False, ordered: bool = False) -> Iterator[str]:
    """Yield the texts of YAML data a reader sees, in the order written; `ordered` leaves
    out the labels repeated for each item."""
    if isinstance(value, dict):
        for name, item in value.items():
            if not (ordered and name in REPEATED):
                yield from texts(item, str(name), html=html, ordered=ordered)
    elif isinstance(value, list):
        for item in value:
            yield from texts(item, key, html=html, ordered=ordered)
    elif isinstance(value, str) and key not in NOT_SHOWN and not (html and key == "alt"):
        yield strip_markdown(value) if key in MARKDOWN else value


def words_of(value: Any, *, html: bool, ordered: bool = False) -> list[str]:
    return [w for text in texts(value, html=html, ordered=ordered) for w in words(text)]


def urls(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        for name, item in value.items():
            if name in ("url", "link") and isinstance(item, str):
                yield item
            else:
                yield from urls(item)
    elif isinstance(value, list):
        for item in value:
            yield from urls(item)
    elif isinstance(value, str):
        yield from re.findall(r"\]\(([^)]*)\)", value)


def settings_words(settings: Settings, rendered: RenderedIssue) -> set[str]:
    newsletter = settings.newsletter
    fixed = [
        newsletter.name,
        newsletter.title,
        newsletter.tagline,
        newsletter.masthead,
        newsletter.byline,
        newsletter.postal_address,
        rendered.reading_time,
        rendered.web_url,
        *SAMPLE_VALUES.values(),
        *(str(value) for value in settings.labels.model_dump().values()),
        Renderer(settings).format_date(rendered.issue.date),
    ]
    return {w for text in fixed for w in words(text)} | {str(n) for n in range(100)}


def expected_labels(data: dict[str, Any], settings: Settings) -> dict[str, int]:
    """Count how often each of the settings' default labels must be shown."""
    labels = settings.labels.model_dump()
    counts: dict[str, int] = {}

    def expect(kind: str, given: dict[str, Any]) -> None:
        if "label" not in given and labels.get(kind):
            label = normalise(labels[kind]).strip(" :")
            counts[label] = counts.get(label, 0) + 1

    for section in data["sections"]:
        for kind, content in section.items():
            if not isinstance(content, dict):
                continue
            expect(kind, content)
            for article in content.get("articles", []):
                expect("story", article)
    for kind in ("event", "special", "essentials", "expert", "letter"):
        counts.setdefault(normalise(labels[kind]).strip(" :"), 0)
    return counts


def assert_in_order(expected: list[str], shown: list[str], where: str) -> None:
    """Assert that `expected` is a subsequence of `shown`, naming the first word lost."""
    position = 0
    for index, word in enumerate(expected):
        try:
            position = shown.index(word, position) + 1
        except ValueError:
            context = " ".join(expected[max(0, index - 6) : index + 6])
            pytest.fail(f"{where}: {word!r} not found in order, near: {context}")
