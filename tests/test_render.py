"""The rendered email: parsed with an HTML parser and checked part by part."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import pytest
from bs4 import BeautifulSoup, Comment, Tag

from qant_mail.authoring.lint import SAMPLE_VALUES
from qant_mail.authoring.load import Document, load
from qant_mail.authoring.model import Issue
from qant_mail.authoring.render import PLACEHOLDER, RenderedIssue, Renderer, Slot
from qant_mail.base.config import Images, Settings
from qant_mail.base.errors import TemplateError
from tests.conftest import own_template

LABELS = ["L’ÉVÉNEMENT", "NUMÉRO SPÉCIAL", "L’ESSENTIEL", "EXPERT"]


def soup_of(rendered: RenderedIssue) -> BeautifulSoup:
    return BeautifulSoup(rendered.html, "html.parser")


def attr(tag: Tag | None, name: str) -> str:
    """Return an attribute of a tag that must exist, as a string."""
    assert tag is not None
    value = tag.get(name)
    assert isinstance(value, str), (name, value)
    return value


def text_part(rendered: RenderedIssue) -> str:
    """Return the text part as the sample subscriber gets it."""
    values = {slot: f"<{slot.value}>" for slot in Slot}
    return rendered.fill(values)[1]


def visible_text(soup: BeautifulSoup) -> str:
    # Only ASCII whitespace collapses: the no-break spaces of French typography stay.
    return re.sub(r"[ \t\r\n]+", " ", soup.get_text(" ")).strip()


def test_html_declares_french_a_title_and_the_preheader(sample_rendered: RenderedIssue) -> None:
    soup = soup_of(sample_rendered)
    assert attr(soup.html, "lang") == "fr"
    assert soup.title is not None
    assert soup.title.get_text() == "D’OpenAI à Kyutai, une question de gouvernance"
    hidden = soup.find("div", style=re.compile("display:none"))
    assert hidden is not None
    assert hidden.get_text().startswith("Sam Altman évincé d’OpenAI")


def test_sections_appear_with_their_labels_in_the_reference_order(
    sample_rendered: RenderedIssue,
) -> None:
    kickers = [p.get_text() for p in soup_of(sample_rendered).select("p.kicker")]
    assert [k.split("\u00a0:")[0] for k in kickers] == LABELS
    # Written so by the editor: the tool joins no heading to a label.
    assert kickers[1] == "NUMÉRO SPÉCIAL\u00a0: L’IA Pulse à Paris"
    assert kickers[3] == "EXPERT\u00a0: Elizabeth Seger, Centre for AI Governance"


def test_masthead_quote_byline_date_and_reading_time_are_shown(
    sample_rendered: RenderedIssue,
) -> None:
    text = visible_text(soup_of(sample_rendered))
    for expected in (
        "Qant\u00a0: Révolution cognitive et Avenir du numérique",
        "Chaque jour, les tendances de la tech et l’IA par Jean Rognetta et Maurice de Rambuteau",
        "« Le progrès est devant nous, à condition de dépasser sa propagande »",
        "Paul Virilio",
        "Par QANT\u00a0: Révolution cognitive et Avenir du numérique",
        "lundi 20 novembre 2023 · 7 mn à lire",
        "Chaque jour, les journalistes de Qant illustrent les tendances de fond",
    ):
        assert expected.replace("« ", "«\u202f").replace(" »", "\u202f»") in text, expected


def test_reading_time_is_computed_from_the_words(
    sample_rendered: RenderedIssue, settings: Settings
) -> None:
    assert sample_rendered.words > 1500
    expected = round(sample_rendered.words / settings.newsletter.words_per_minute)
    assert sample_rendered.reading_minutes == expected == 7


def test_every_image_has_alt_text_width_and_height(sample_rendered: RenderedIssue) -> None:
    images = soup_of(sample_rendered).find_all("img")
    assert len(images) == 7  # the logo, its dark-mode variant and the five illustrations
    for image in images:
        assert attr(image, "alt").strip()
        assert 0 < int(attr(image, "width")) <= 600
        assert int(attr(image, "height")) > 0


def test_local_images_are_referenced_as_embedded_parts(sample_rendered: RenderedIssue) -> None:
    sources = [attr(img, "src") for img in soup_of(sample_rendered).find_all("img")]
    assert all(src.startswith("cid:") for src in sources)
    assert {a.url for a in sample_rendered.assets} == set(sources)


def test_captions_and_credits_are_shown_as_written(sample_rendered: RenderedIssue) -> None:
    captions = [p.get_text() for p in soup_of(sample_rendered).select("p.caption")]
    assert "“Sam Altman prend la porte” (Qant, M. de R. avec Midjourney)" in captions
    credits = soup_of(sample_rendered).select("p.caption span.credit")
    assert credits[0].get_text() == "(Qant, M. de R. avec Midjourney)"
    # In a style of its own: upright, where the caption is in italics.
    assert "font-style:normal" in attr(credits[0], "style").replace(" ", "")
    assert "La gouvernance d’OpenAI" in captions
    assert len(captions) == 5


def test_sources_of_short_items_are_linked(sample_rendered: RenderedIssue) -> None:
    sources = soup_of(sample_rendered).select("p.sources a")
    assert [a.get_text() for a in sources] == [
        "The Register",
        "Le Monde Informatique",
        "Le Monde Informatique",
    ]
    assert all(attr(a, "href").startswith("https://") for a in sources)


def test_unsubscribe_and_view_in_browser_are_placeholders(sample_rendered: RenderedIssue) -> None:
    soup = soup_of(sample_rendered)
    links = {a.get_text(): attr(a, "href") for a in soup.find_all("a")}
    assert links["Se désinscrire"] == Slot.UNSUBSCRIBE_URL.token
    assert links["Voir dans le navigateur"] == Slot.BROWSER_URL.token
    assert Slot.EMAIL.token in soup.get_text()


def test_placeholders_are_filled_and_escaped_per_recipient(sample_rendered: RenderedIssue) -> None:
    values = {
        Slot.NAME: "Zoé",
        Slot.EMAIL: "zoe+<tag>@example.com",
        Slot.UNSUBSCRIBE_URL: "https://x.example/u/a?b=1&c=2",
        Slot.PREFERENCES_URL: "https://x.example/p/a",
        Slot.BROWSER_URL: sample_rendered.web_url,
    }
    html, text = sample_rendered.fill(values)
    assert not PLACEHOLDER.search(html)
    assert not PLACEHOLDER.search(text)
    soup = BeautifulSoup(html, "html.parser")
    assert attr(soup.find("a", string="Se désinscrire"), "href") == "https://x.example/u/a?b=1&c=2"
    assert "zoe+&lt;tag&gt;@example.com" in html
    assert "zoe+<tag>@example.com" in text


def test_outlook_conditionals_and_responsive_rules_are_kept(sample_rendered: RenderedIssue) -> None:
    soup = soup_of(sample_rendered)
    comments = soup.find_all(string=lambda s: isinstance(s, Comment))
    assert any("[if mso" in c for c in comments)
    styles = " ".join(s.get_text() for s in soup.find_all("style"))
    assert "@media only screen and (min-width:480px)" in styles
    assert "prefers-color-scheme: dark" in styles
    assert attr(soup.find("meta", attrs={"name": "color-scheme"}), "content") == "light dark"


def test_the_preheader_is_hidden_without_a_colour(sample_rendered: RenderedIssue) -> None:
    # SpamAssassin's HTML_FONT_LOW_CONTRAST fires on text the colour of its background,
    # as MJML's own preview writes it; hiding it by size and display does not.
    hidden = soup_of(sample_rendered).select_one("div.preheader")
    assert hidden is not None
    style = attr(hidden, "style")
    assert "display:none" in style
    assert "color" not in style
    assert hidden.get_text().startswith("Sam Altman évincé d’OpenAI")


def test_headings_make_an_outline(sample_rendered: RenderedIssue) -> None:
    soup = soup_of(sample_rendered)
    outline = [(tag.name, tag.get_text()) for tag in soup.find_all(["h1", "h2", "h3", "h4"])]
    assert outline[0] == ("h1", "D’OpenAI à Kyutai, une question de gouvernance")
    assert [name for name, _ in outline].count("h1") == 1
    titles = {text: name for name, text in outline}
    assert titles["Sam Altman : ça s’en va et ça revient et ça s’en va…"] == "h2"
    assert titles["Idéalisme efficace"] == "h3"  # a subheading of the event
    assert titles["Les fondations des modèles de fondation"] == "h3"


def test_css_is_inlined(sample_rendered: RenderedIssue) -> None:
    kicker = soup_of(sample_rendered).select_one("p.kicker")
    assert "text-transform: uppercase" in attr(kicker, "style")


def test_email_is_600_px_wide(sample_rendered: RenderedIssue) -> None:
    soup = soup_of(sample_rendered)
    widths = {
        attr(div, "style") for div in soup.find_all("div", style=re.compile("max-width:600px"))
    }
    assert widths


def test_sample_html_stays_under_70_kb(sample_rendered: RenderedIssue) -> None:
    # As a subscriber gets it: 86.4 KB before MJML's reset stayed out of the inline
    # styles, the rules moved into the sections they open and the columns lost a table.
    html, _ = sample_rendered.fill(SAMPLE_VALUES)
    assert len(html.encode("utf-8")) <= 70_000


# What MJML's reset sets: kept in <style>, no longer inlined.
MJML_RESET = {
    "table": {"border-collapse", "mso-table-lspace", "mso-table-rspace"},
    "td": {"border-collapse", "mso-table-lspace", "mso-table-rspace"},
    "p": {"display", "margin"},
    "img": {"border", "height", "line-height", "outline", "text-decoration"}
    | {"-ms-interpolation-mode"},
    "body": {"margin", "padding", "-webkit-text-size-adjust", "-ms-text-size-adjust"},
}


def declarations(tag: Tag) -> dict[str, str]:
    """Return the inline style of `tag`, property by property."""
    style = tag.get("style")
    assert style is None or isinstance(style, str)
    pairs = (part.split(":", 1) for part in (style or "").split(";") if ":" in part)
    return {name.strip().lower(): value.strip() for name, value in pairs}


def outlook_markup(soup: BeautifulSoup) -> tuple[str, list[str]]:
    """Return what Outlook's conditional comments hold, run together, and the others."""
    comments = [str(c) for c in soup.find_all(string=lambda s: isinstance(s, Comment))]
    opening, closing = "[if mso | IE]>", "<![endif]"
    outlook = [c for c in comments if c.startswith(opening) and c.endswith(closing)]
    others = [c for c in comments if c not in outlook]
    return "".join(c[len(opening) : -len(closing)] for c in outlook), others


def test_the_compact_html_drops_only_mjmls_reset_from_the_inline_styles(
    settings: Settings, sample_document: Document, sample_rendered: RenderedIssue
) -> None:
    loose = soup_of(Renderer(settings, compact=False).render(sample_document.issue))
    compact = soup_of(sample_rendered)
    before, after = loose.find_all(True), compact.find_all(True)
    assert [(t.name, t.get("class")) for t in before] == [(t.name, t.get("class")) for t in after]
    for old, new in zip(before, after, strict=True):
        was, now = declarations(old), declarations(new)
        assert now.items() <= was.items(), new.name
        assert set(was) - set(now) <= MJML_RESET.get(new.name, set()), new.name
    # Every element keeps what makes it look as it does where <style> is dropped.
    kicker = compact.select_one("p.kicker")
    assert "text-transform: uppercase" in attr(kicker, "style")
    # Outlook gets the same tables, from fewer comments; MJML's reset is still there.
    assert outlook_markup(compact) == outlook_markup(loose)
    assert len(str(compact).split("[if mso | IE]")) < len(str(loose).split("[if mso | IE]"))
    reset = " ".join(s.get_text() for s in compact.find_all("style"))
    assert "mso-table-lspace: 0pt" in reset
    assert "data-css-inline" not in str(compact)


@pytest.mark.parametrize("mode", ["embed", "host"])
def test_both_logos_have_their_alt_text_embedded_or_hosted(
    settings: Settings, sample_document: Document, mode: Literal["embed", "host"]
) -> None:
    hosted = dataclasses.replace(settings, images=Images(mode=mode))
    soup = soup_of(Renderer(hosted).render(sample_document.issue))
    logos = soup.select("td.logo img, div.logo img")
    assert [attr(img, "alt") for img in logos] == ["Qant", "Qant"]
    scheme = "cid:" if mode == "embed" else "https://lettre.qant.example/"
    assert all(attr(img, "src").startswith(scheme) for img in logos)


def test_text_part_writes_every_link_out(
    sample_rendered: RenderedIssue, sample_document: Document
) -> None:
    hrefs = {
        attr(a, "href")
        for a in soup_of(sample_rendered).find_all("a")
        if not PLACEHOLDER.fullmatch(attr(a, "href")) and a.find_parent(class_="topbar") is None
    }
    hrefs.discard("https://lettre.qant.example/")  # the logo's link
    missing = [href for href in hrefs if f"<{href}>" not in sample_rendered.text]
    assert missing == []
    assert len(hrefs) >= 20


def test_text_part_has_the_sections_in_order(sample_rendered: RenderedIssue) -> None:
    text = text_part(sample_rendered)
    positions = [text.index(label) for label in LABELS]
    assert positions == sorted(positions)
    assert "lundi 20 novembre 2023 · 7 mn à lire" in text
    assert "• *Scaleway n’Ampere pas une*\u00a0: Ampere Computing" in text
    assert max(len(line) for line in text.splitlines() if "<http" not in line) <= 72


def test_text_part_indents_news_items_and_their_sources(sample_rendered: RenderedIssue) -> None:
    text = text_part(sample_rendered)
    start = text.index("• *Scaleway")
    item = text[start : text.index("\n\n", start)].splitlines()
    assert all(line.startswith("  ") for line in item[1:]), item
    assert "  Pour en savoir plus\u00a0:" in item
    assert "  - The Register" in item


def test_no_line_of_the_text_part_starts_with_a_lone_colon_or_bullet(
    renderer: Renderer, write_issue: Callable[..., Path]
) -> None:
    # Each " :" and " •" falls where a naive wrap at 72 columns would break before it.
    words = " ".join(["mot"] * 17)
    document = load(
        write_issue(
            f"""\
            subject: S
            sections:
              - text: "{words} ensemble : la suite • et encore • {words} fin : oui ? non !"
            """
        )
    )
    text = text_part(renderer.render(document.issue))
    for line in text.splitlines():
        assert not line.lstrip().startswith((":", "•", "?", "!")), line


def test_the_footer_is_wrapped_after_the_address_is_filled(
    sample_rendered: RenderedIssue,
) -> None:
    values = dict.fromkeys(Slot, "x") | {Slot.EMAIL: "a" * 40 + "@example.com"}
    _, text = sample_rendered.fill(values)
    footer = text[text.index("Vous recevez") :].splitlines()
    assert max(len(line) for line in footer) <= 72, footer


def test_an_issue_with_only_subject_and_event_renders_cleanly(
    renderer: Renderer, write_issue: Callable[..., Path]
) -> None:
    document = load(write_issue("subject: Court\nsections:\n- event: {title: Seul titre}\n"))
    rendered = renderer.render(document.issue)
    soup = soup_of(rendered)
    assert [p.get_text() for p in soup.select("p.kicker")] == ["L’ÉVÉNEMENT"]
    text = visible_text(soup)
    for absent in ("NUMÉRO SPÉCIAL", "EXPERT", "« ", "Partager"):
        assert absent not in text
    assert "Pour en savoir plus" not in rendered.text


def test_letter_and_blocks_layout_render(
    renderer: Renderer, write_issue: Callable[..., Path]
) -> None:
    document = load(
        write_issue(
            """\
            subject: Lettre
            sections:
              - text: "Titre un • Titre deux • Titre trois"
              - letter:
                  title: Chers lecteurs
                  body: Nous changeons de formule.
                  signature: Jean Rognetta
                  ps: Écrivez-nous.
              - event: {title: T}
              - essentials:
                  layout: blocks
                  items:
                    - title: Une brève
                      text: "**Gras** en tête : la suite."
                      sources: [{title: Source, url: "https://example.com/b"}]
            """
        )
    )
    rendered = renderer.render(document.issue)
    soup = soup_of(rendered)
    signature = soup.select_one("p.signature")
    assert signature is not None
    assert signature.get_text() == "Jean Rognetta"
    assert "PS\u00a0: Écrivez-nous." in visible_text(soup)
    assert soup.find("h3", string="Une brève") is not None
    assert "Titre un\u00a0• Titre deux\u00a0• Titre trois" in rendered.text


def test_template_error_names_the_template_and_line(project_settings: Settings) -> None:
    template = own_template(project_settings.root, "email.mjml.j2")
    lines = template.read_text().splitlines()
    lines[5] += "{{ issue.no_such_field }}"
    template.write_text("\n".join(lines))
    issue = Issue.model_validate(
        {"date": "2024-01-15", "subject": "S", "sections": [{"text": "T"}]}
    )
    with pytest.raises(TemplateError) as caught:
        Renderer(project_settings).render(issue)
    assert f"{template}:6:" in str(caught.value)
    assert "no_such_field" in str(caught.value)


def test_template_syntax_error_names_the_template_and_line(project_settings: Settings) -> None:
    template = own_template(project_settings.root, "email.txt.j2")
    template.write_text("ligne\n{% if %}\n")
    issue = Issue.model_validate(
        {"date": "2024-01-15", "subject": "S", "sections": [{"text": "T"}]}
    )
    with pytest.raises(TemplateError, match=r"email\.txt\.j2:2:"):
        Renderer(project_settings).render(issue)


def test_invalid_mjml_is_a_template_error(project_settings: Settings) -> None:
    template = own_template(project_settings.root, "email.mjml.j2")
    template.write_text("<mjml><mj-body><mj-nonsense></mj-body></mjml>")
    issue = Issue.model_validate(
        {"date": "2024-01-15", "subject": "S", "sections": [{"text": "T"}]}
    )
    with pytest.raises(TemplateError, match="invalid MJML"):
        Renderer(project_settings).render(issue)
