"""The issue schema: what an editor may write, and what is refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from qant_mail.model import Figure, Issue
from qant_mail.schema import readable_errors

BASE: dict[str, Any] = {"date": "2024-01-15", "subject": "S", "event": {"title": "T"}}


def validate(data: dict[str, Any], base_dir: Path | None = None) -> Issue:
    return Issue.model_validate(data, context={"base_dir": base_dir} if base_dir else None)


def messages(data: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(ValidationError) as caught:
        validate(data)
    return {e.dotted: e.message for e in readable_errors(caught.value, Issue)}


def test_only_subject_and_event_are_required() -> None:
    issue = validate(BASE)
    assert (issue.quote, issue.special, issue.essentials, issue.expert, issue.letter) == (
        None,
        None,
        None,
        None,
        None,
    )
    assert messages({"date": "2024-01-15"}) == {
        "subject": "required, but missing",
        "event": "required, but missing",
    }


def test_unknown_keys_get_a_suggestion_at_any_depth() -> None:
    found = messages(
        {
            **BASE,
            "subjet": "x",
            "special": {"title": "S", "articles": [{"title": "A", "leed": "x"}]},
        }
    )
    assert found == {
        "subjet": "unknown key 'subjet'; did you mean 'subject'?",
        "special.articles.0.leed": "unknown key 'leed'; did you mean 'lede'?",
    }


def test_body_is_text_or_a_list_of_texts_and_images() -> None:
    as_text = validate({**BASE, "event": {"title": "T", "body": "Un paragraphe."}})
    assert as_text.event.body == ["Un paragraphe."]
    mixed = validate(
        {
            **BASE,
            "event": {
                "title": "T",
                "body": [
                    "Avant.",
                    {"image": {"src": "https://example.com/a.png", "alt": "Un schéma"}},
                    "Après.",
                ],
            },
        }
    )
    assert isinstance(mixed.event.body[1], Figure)
    assert [img.alt for img in mixed.images()] == ["Un schéma"]


def test_body_block_of_another_kind_is_explained() -> None:
    found = messages({**BASE, "event": {"title": "T", "body": ["ok", 42]}})
    assert found == {"event.body.1": "a body block is Markdown text or an `image:` mapping"}


def test_markdown_images_are_refused_in_favour_of_image_blocks() -> None:
    found = messages({**BASE, "intro": "Voir ![schéma](a.png)"})
    assert "use an `image:` block" in found["intro"]


def test_image_needs_alt_text() -> None:
    image = {"src": "https://example.com/a.png", "alt": "   "}
    found = messages({**BASE, "event": {"title": "T", "image": image}})
    assert found == {"event.image.alt": "must not be empty"}


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
    found = messages({**BASE, "event": {"title": "T", "image": {"src": src, "alt": "a"}}})
    assert reason in found["event.image.src"]


def test_local_image_size_is_read_from_the_file(tmp_path: Path) -> None:
    # A 40×20 PNG header is all the size probe reads.
    header = (
        b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + (40).to_bytes(4, "big") + (20).to_bytes(4, "big")
    )
    (tmp_path / "a.png").write_bytes(header + b"\x08\x02\x00\x00\x00")
    issue = validate(
        {**BASE, "event": {"title": "T", "image": {"src": "a.png", "alt": "a", "width": 20}}},
        base_dir=tmp_path,
    )
    image = issue.event.image
    assert image is not None
    assert image.file == tmp_path / "a.png"
    assert image.size == (20, 10)
    assert image.mime_type == "image/png"


def test_a_file_that_is_not_an_image_is_refused(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_text("not an image")
    with pytest.raises(ValidationError) as caught:
        validate(
            {**BASE, "event": {"title": "T", "image": {"src": "a.png", "alt": "a"}}},
            base_dir=tmp_path,
        )
    (error,) = readable_errors(caught.value, Issue)
    assert "not a PNG, JPEG, GIF or WebP image" in error.message


def test_essentials_need_a_lead_or_items() -> None:
    assert messages({**BASE, "essentials": {"title": "Vide"}}) == {
        "essentials": "needs a `lead` story or some `items`"
    }


def test_essentials_layout_is_bullets_or_blocks() -> None:
    item = {"title": "Brève", "text": "Texte", "sources": [{"title": "S", "url": "https://s.fr"}]}
    issue = validate({**BASE, "essentials": {"items": [item], "layout": "blocks"}})
    assert issue.essentials is not None
    assert issue.essentials.layout == "blocks"


def test_a_letter_from_the_editor_with_signature_and_ps() -> None:
    letter = {"body": "Chers lecteurs,", "signature": "La rédaction", "ps": "À demain."}
    issue = validate({**BASE, "letter": letter})
    assert issue.letter is not None
    assert issue.letter.ps == "À demain."


def test_titles_fit_on_one_line() -> None:
    assert messages({**BASE, "event": {"title": "Deux\nlignes"}}) == {
        "event.title": "must fit on one line"
    }
