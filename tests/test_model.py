"""The issue schema: what an editor may write, and what is refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from qant_mail.authoring.model import KINDS, EventSection, Figure, Issue
from qant_mail.base.schema import readable_errors

BASE: dict[str, Any] = {"date": "2024-01-15", "subject": "S"}


def validate(data: dict[str, Any], base_dir: Path | None = None) -> Issue:
    return Issue.model_validate(data, context={"base_dir": base_dir} if base_dir else None)


def with_sections(*sections: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {**BASE, **fields, "sections": list(sections)}


def event(**fields: Any) -> dict[str, Any]:
    return {"event": {"title": "T", **fields}}


def messages(data: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(ValidationError) as caught:
        validate(data)
    return {e.dotted: e.message for e in readable_errors(caught.value, Issue)}


def test_only_a_subject_and_one_section_are_required() -> None:
    issue = validate(with_sections({"text": "Bonjour."}))
    assert [s.kind for s in issue.sections] == ["text"]
    assert messages({"date": "2024-01-15"}) == {
        "subject": "required, but missing",
        "sections": "required, but missing",
    }


def test_an_empty_list_of_sections_is_refused() -> None:
    assert messages(with_sections()) == {"sections": "must not be empty"}


def test_any_kind_may_appear_anywhere_and_more_than_once() -> None:
    issue = validate(
        with_sections(
            {"story": {"label": "DOSSIER", "title": "Un"}},
            {"quote": {"text": "Citation", "author": "Quelqu'un"}},
            {"story": {"title": "Deux"}},
            event(),
            {"text": "Fin."},
        )
    )
    assert [s.kind for s in issue.sections] == ["story", "quote", "story", "event", "text"]
    assert issue.sections[0].content.label == "DOSSIER"


def test_a_section_of_an_unknown_kind_gets_a_suggestion() -> None:
    assert messages(with_sections({"evnt": {"title": "T"}})) == {
        "sections.0": "unknown section kind 'evnt'; did you mean 'event'?"
    }
    found = messages(with_sections({"agenda": {"title": "T"}}))
    assert found["sections.0"].startswith("unknown section kind 'agenda'; the kinds are: text")


def test_a_section_with_two_kinds_is_refused() -> None:
    found = messages(with_sections({"event": {"title": "A"}, "story": {"title": "B"}}))
    assert found == {
        "sections.0": "a section has one kind, this one has 2: event, story; start a new "
        "`- ` item for each"
    }


def test_a_field_beside_the_kind_is_told_to_move_inside() -> None:
    found = messages(with_sections({"label": "X", "event": {"title": "A"}}))
    assert found["sections.0"].startswith("'label' belongs inside `event:` (indent it)")


def test_a_section_that_is_not_a_mapping_is_explained() -> None:
    assert messages(with_sections("event")) == {  # type: ignore[arg-type]
        "sections.0": "a section is a mapping of one kind, such as `- event: {title: …}`"
    }


def test_the_first_format_gets_told_how_to_write_it_now() -> None:
    found = messages({**BASE, "intro": "Bonjour", "event": {"title": "T"}})
    assert found["event"] == (
        "unknown key 'event': the event is now a section: `sections: [- event: {title, body}]`"
    )
    assert found["intro"].startswith("unknown key 'intro': the introduction is now a section")


def test_unknown_keys_get_a_suggestion_at_any_depth() -> None:
    found = messages(
        with_sections(
            {"special": {"title": "S", "articles": [{"title": "A", "leed": "x"}]}},
            subjet="x",
        )
    )
    assert found == {
        "subjet": "unknown key 'subjet'; did you mean 'subject'?",
        "sections.0.special.articles.0.leed": "unknown key 'leed'; did you mean 'lede'?",
    }


def test_text_is_markdown_or_a_mapping_with_label_and_title() -> None:
    short = validate(with_sections({"text": "Un paragraphe."}))
    assert short.sections[0].content.body == ["Un paragraphe."]
    full = validate(
        with_sections({"text": {"label": "CETTE SEMAINE", "title": "T", "body": "A • B"}})
    )
    assert (full.sections[0].content.label, full.sections[0].content.title) == (
        "CETTE SEMAINE",
        "T",
    )


def test_body_is_text_or_a_list_of_texts_and_images() -> None:
    as_text = validate(with_sections(event(body="Un paragraphe.")))
    assert as_text.sections[0].content.body == ["Un paragraphe."]
    mixed = validate(
        with_sections(
            event(
                body=[
                    "Avant.",
                    {"image": {"src": "https://example.com/a.png", "alt": "Un schéma"}},
                    "Après.",
                ]
            )
        )
    )
    assert isinstance(mixed.sections[0].content.body[1], Figure)
    assert [img.alt for img in mixed.images()] == ["Un schéma"]


def test_body_block_of_another_kind_is_explained() -> None:
    found = messages(with_sections(event(body=["ok", 42])))
    assert found == {
        "sections.0.event.body.1": "a body block is Markdown text or an `image:` mapping"
    }


def test_markdown_images_are_refused_in_favour_of_image_blocks() -> None:
    found = messages(with_sections({"text": "Voir ![schéma](a.png)"}))
    assert "use an `image:` block" in found["sections.0.text.body.0"]


def test_image_needs_alt_text() -> None:
    image = {"src": "https://example.com/a.png", "alt": "   "}
    found = messages(with_sections(event(image=image)))
    assert found == {"sections.0.event.image.alt": "must not be empty"}


@pytest.mark.parametrize(
    ("src", "reason"),
    [
        ("http://example.com/a.png", "https:// URL or a file"),
        ("data:image/png;base64,AAAA", "https:// URL or a file"),
        ("/etc/passwd", "inside the issue's folder"),
        ("../../secret.png", "inside the issue's folder"),
    ],
)
def test_image_source_is_https_or_a_file_inside_the_folder(src: str, reason: str) -> None:
    found = messages(with_sections(event(image={"src": src, "alt": "a"})))
    assert reason in found["sections.0.event.image.src"]


def test_local_image_size_is_read_from_the_file(tmp_path: Path) -> None:
    # A 40×20 PNG header is all the size probe reads.
    header = (
        b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + (40).to_bytes(4, "big") + (20).to_bytes(4, "big")
    )
    (tmp_path / "a.png").write_bytes(header + b"\x08\x02\x00\x00\x00")
    issue = validate(
        with_sections(event(image={"src": "a.png", "alt": "a", "width": 20})),
        base_dir=tmp_path,
    )
    image = issue.images()[0]
    assert image.file == tmp_path / "a.png"
    assert image.size == (20, 10)
    assert image.mime_type == "image/png"


def test_a_file_that_is_not_an_image_is_refused(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_text("not an image")
    with pytest.raises(ValidationError) as caught:
        validate(with_sections(event(image={"src": "a.png", "alt": "a"})), base_dir=tmp_path)
    (error,) = readable_errors(caught.value, Issue)
    assert "not a PNG, JPEG, GIF or WebP image" in error.message


def test_a_news_list_may_have_its_heading_and_no_items_yet_but_not_nothing() -> None:
    issue = validate(with_sections({"essentials": {"title": "Vide", "intro": "À venir."}}))
    assert issue.sections[0].content.items == []
    assert messages(with_sections({"essentials": {"label": "L'ESSENTIEL"}})) == {
        "sections.0.essentials": "needs a `title`, an `intro`, a `lead` story or some `items`"
    }


def test_a_label_keeps_its_spaces() -> None:
    item = {"title": "T", "text": "x"}
    issue = validate(with_sections({"essentials": {"sources_label": "Source : ", "items": [item]}}))
    assert issue.sections[0].content.sources_label == "Source : "


def test_news_items_keep_the_editors_separator_and_an_image_after_them() -> None:
    item = {
        "title": "Brève",
        "text": "Texte",
        "sources": [{"title": "S", "url": "https://s.fr"}],
        "image": {"src": "https://example.com/b.png", "alt": "B"},
    }
    issue = validate(with_sections({"essentials": {"separator": " — ", "items": [item]}}))
    essentials = issue.sections[0].content
    assert essentials.separator == " — "
    assert essentials.items[0].image is not None


def test_a_letter_holds_salutation_closing_signature_and_a_signed_ps() -> None:
    letter = {
        "label": "",
        "salutation": "Chères lectrices, chers lecteurs,",
        "body": "Nous changeons de formule.",
        "closing": "Écrivez-nous.",
        "signature": "Jean Rognetta",
        "ps_label": "PS. ",
        "ps": "À demain.",
        "ps_signature": "J. R.",
    }
    content = validate(with_sections({"letter": letter})).sections[0].content
    assert (content.label, content.ps_label, content.ps_signature) == ("", "PS. ", "J. R.")


def test_a_quote_places_its_author_inline_or_below() -> None:
    quote = {"text": "Q", "author": "A", "layout": "inline", "separator": " • "}
    content = validate(with_sections({"quote": quote})).sections[0].content
    assert (content.layout, content.separator) == ("inline", " • ")
    found = messages(with_sections({"quote": {"text": "Q", "layout": "side"}}))
    assert "'block' or 'inline'" in found["sections.0.quote.layout"]


def test_the_masthead_marker_takes_nothing() -> None:
    assert validate(with_sections({"masthead": None})).places_masthead
    assert validate(with_sections({"masthead": {}})).places_masthead
    found = messages(with_sections({"masthead": {"text": "x"}}))
    assert found["sections.0.masthead.text"] == "unknown key 'text'"


def test_issue_overrides_tagline_masthead_and_byline() -> None:
    issue = validate(with_sections(event(), tagline="Chaque semaine", masthead="", byline="X"))
    assert (issue.tagline, issue.masthead, issue.byline) == ("Chaque semaine", "", "X")


def test_titles_fit_on_one_line() -> None:
    assert messages(with_sections(event(title="Deux\nlignes"))) == {
        "sections.0.event.title": "must fit on one line"
    }


@pytest.mark.parametrize("text", ["a\rb", "a\x00b", "a\x1bb", "a\u2028b"])
def test_control_characters_are_refused_in_one_line_texts(text: str) -> None:
    found = messages({**with_sections(event()), "subject": text})
    assert set(found) == {"subject"}


def test_every_kind_is_a_section_type() -> None:
    assert set(KINDS) == {
        "text",
        "quote",
        "letter",
        "event",
        "story",
        "special",
        "essentials",
        "expert",
        "masthead",
    }
    assert EventSection.kind == "event"
