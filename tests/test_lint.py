"""Lints of the email an inbox receives, located in the issue file."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest

from qant_mail.authoring.lint import SAMPLE_VALUES, lint, quoted_printable_size
from qant_mail.authoring.load import load
from qant_mail.authoring.render import Renderer
from qant_mail.base.config import Lint, Settings
from qant_mail.base.errors import Severity
from qant_mail.delivery.compose import qp_encode
from tests.conftest import check
from tests.test_corpus import IDS, ISSUES

WriteIssue = Callable[..., Path]


def test_sample_issue_is_clean(renderer: Renderer) -> None:
    report = check(Path(__file__).parent.parent / "issues" / "2023-11-20.yaml", renderer)
    assert report.problems == []


def test_html_past_the_clipping_limit_is_an_error(
    project_settings: Settings, project: Path
) -> None:
    strict = dataclasses.replace(
        project_settings, lint=Lint(html_error_bytes=50_000, html_warning_bytes=40_000)
    )
    report = check(project / "issues" / "2023-11-20.yaml", Renderer(strict))
    (problem,) = report.errors
    assert problem.field == "(email)"
    assert "Gmail clips" in problem.message


def test_html_close_to_the_limit_is_a_warning(project_settings: Settings, project: Path) -> None:
    close = dataclasses.replace(
        project_settings, lint=Lint(html_error_bytes=200_000, html_warning_bytes=50_000)
    )
    report = check(project / "issues" / "2023-11-20.yaml", Renderer(close))
    assert report.errors == []
    assert [p.field for p in report.warnings] == ["(email)"]


def test_the_size_warning_weighs_the_html_as_the_message_carries_it(
    project_settings: Settings, project: Path
) -> None:
    path = project / "issues" / "2023-11-20.yaml"
    document = load(path)
    html, _ = (
        Renderer(project_settings).render(document.issue, key=document.key).fill(SAMPLE_VALUES)
    )
    size = len(html.encode("utf-8"))
    sent = len(qp_encode(html.encode("utf-8"), soft_end=False))
    warned = []
    # A line between the HTML's size and its size in quoted-printable, then past both.
    for line in ((size + sent) // 2, sent + 100):
        limits = Lint(html_error_bytes=200_000, html_warning_bytes=line)
        report = check(path, Renderer(dataclasses.replace(project_settings, lint=limits)))
        assert report.errors == []
        warned.append([p.message for p in report.warnings])
    (message,) = warned[0]
    assert f"is {sent / 1000:.1f} KB as sent ({size / 1000:.1f} KB before" in message
    assert "Gmail clips" in message
    assert warned[1] == []


@pytest.mark.parametrize("path", ISSUES, ids=IDS)
def test_the_size_as_sent_is_what_compose_writes_within_10_bytes(
    renderer: Renderer, path: Path
) -> None:
    document = load(path)
    html, text = renderer.render(document.issue, key=document.key).fill(SAMPLE_VALUES)
    for part in (html.encode("utf-8"), text.encode("utf-8")):
        sent = len(qp_encode(part, soft_end=False))
        assert abs(quoted_printable_size(part) - sent) <= 10


def test_long_subject_missing_preheader_and_draft_are_warnings(
    write_issue: WriteIssue, renderer: Renderer
) -> None:
    path = write_issue(
        "draft: true\nsubject: " + "Un sujet bien trop long " * 5 + "\nsections: [text: T]\n"
    )
    report = check(path, renderer)
    assert report.errors == []
    found = {(p.field, p.line): p.message for p in report.warnings}
    assert ("subject", 2) in found
    assert ("draft", 1) in found
    assert any("no preheader" in message for message in found.values())


def test_links_that_are_not_https_or_mailto(write_issue: WriteIssue, renderer: Renderer) -> None:
    path = write_issue(
        """\
        subject: S
        preheader: P
        sections:
          - event:
              title: T
              body: "Voir [le site](https://example.com/a), [le fichier](ftp://example.com/f)."
              links:
                - {title: Écrire, url: "mailto:redaction@example.com"}
                - {title: Local, url: "file:///etc/passwd"}
                - {title: Script, url: "javascript:alert(1)"}
        """
    )
    report = check(path, renderer)
    errors = {(p.field, p.line): p.message for p in report.errors}
    assert errors == {
        ("sections.0.event.body.0", 6): (
            "'ftp://example.com/f': a link is https://, http:// or mailto:"
        ),
        ("sections.0.event.links.1.url", 9): (
            "'file:///etc/passwd': a link is https://, http:// or mailto:"
        ),
        ("sections.0.event.links.2.url", 10): (
            "'javascript:alert(1)': a link is https://, http:// or mailto:"
        ),
    }


def test_links_that_are_http_are_a_warning(write_issue: WriteIssue, renderer: Renderer) -> None:
    path = write_issue(
        """\
        subject: S
        preheader: P
        sections:
          - event:
              title: T
              body: "Voir [le site](http://example.com/a)."
        """
    )
    report = check(path, renderer)
    assert report.errors == []
    assert [(p.field, p.message) for p in report.warnings] == [
        ("sections.0.event.body.0", "link http://example.com/a is not https")
    ]


def test_duplicate_links_point_at_the_second_one(
    write_issue: WriteIssue, renderer: Renderer
) -> None:
    path = write_issue(
        """\
        subject: S
        preheader: P
        sections:
          - event:
              title: T
              links:
                - {title: Une, url: "https://example.com/a"}
          - expert:
              author: {name: X}
              title: Y
              links:
                - {title: Encore, url: "https://example.com/a"}
        """
    )
    (warning,) = check(path, renderer).warnings
    assert (warning.field, warning.line) == ("sections.1.expert.links.0.url", 12)
    assert "duplicate link" in warning.message
    assert "sections.0.event.links.0.url" in warning.message


def test_remote_image_without_size_is_a_warning(
    write_issue: WriteIssue, renderer: Renderer
) -> None:
    path = write_issue(
        """\
        subject: S
        preheader: P
        sections:
          - event:
              title: T
              image: {src: "https://images.example.com/a.jpg", alt: Une photo}
        """
    )
    (warning,) = check(path, renderer).warnings
    assert (warning.field, warning.line, warning.severity) == (
        "sections.0.event.image",
        6,
        Severity.WARNING,
    )
    assert "width and height" in warning.message


def test_alt_text_that_is_a_file_name_is_a_warning(
    write_issue: WriteIssue, renderer: Renderer, settings: Settings
) -> None:
    path = write_issue(
        """\
        subject: S
        preheader: P
        sections:
          - event:
              title: T
              image:
                {src: "https://i.example.com/a.jpg", alt: IMG_2041.jpg, width: 600, height: 300}
        """
    )
    document = load(path)
    problems = lint(document, renderer.render(document.issue), settings)
    assert [p.message for p in problems] == [
        "alt text 'IMG_2041.jpg' looks like a file name; describe the image"
    ]


def test_a_quote_with_its_own_quotation_marks_is_a_warning(
    write_issue: WriteIssue, renderer: Renderer
) -> None:
    path = write_issue(
        """\
        subject: S
        preheader: P
        sections:
          - quote: {text: "« Le futur est déjà là »", author: W. Gibson}
          - quote: {text: "Le futur est déjà là", author: W. Gibson}
          - quote: {text: "“The future is here”", author: W. Gibson, lang: en}
        """
    )
    warnings = [p for p in check(path, renderer).problems if "quotation marks" in p.message]
    assert [(p.line, p.field) for p in warnings] == [
        (4, "sections.0.quote.text"),
        (6, "sections.2.quote.text"),
    ]
    assert all(p.severity == Severity.WARNING for p in warnings)
    assert "«\u00a0…\u00a0»" in warnings[0].message
