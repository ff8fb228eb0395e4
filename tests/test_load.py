"""The loader: every problem of an issue file at once, each at its line and column."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from qant_mail.authoring.load import MAX_BYTES, load
from qant_mail.base.errors import IssueError, Problem
from tests.conftest import MINIMAL_ISSUE

WriteIssue = Callable[..., Path]


def problems_of(path: Path) -> list[Problem]:
    with pytest.raises(IssueError) as caught:
        load(path)
    return caught.value.problems


def test_minimal_issue_loads(write_issue: WriteIssue) -> None:
    document = load(write_issue(MINIMAL_ISSUE))
    assert document.issue.subject == "Un sujet"
    assert [section.kind for section in document.issue.sections] == ["event"]


def test_every_problem_is_reported_at_once_with_its_position(write_issue: WriteIssue) -> None:
    path = write_issue(
        """\
        subject: Sujet
        sections:
          - event:
              titel: Faute de frappe
              lede: 12
              image:
                src: https://example.com/a.png
                alt: ""
              links:
                - title: Source
                  url: pas une adresse
        """
    )
    found = {(p.field, p.line, p.column): p.message for p in problems_of(path)}
    assert found == {
        ("sections.0.event.title", 3, 5): "required, but missing",
        ("sections.0.event.titel", 4, 7): "unknown key 'titel'; did you mean 'title'?",
        ("sections.0.event.lede", 5, 13): "input should be a valid string",
        ("sections.0.event.image.alt", 8, 14): "must not be empty",
        ("sections.0.event.links.0.url", 11, 16): (
            "'pas une adresse' is not a full address (https://…)"
        ),
    }


def test_problems_print_as_file_line_column_field_message(write_issue: WriteIssue) -> None:
    path = write_issue("subject: Sujet\nsections:\n- event:\n    title: T\n    colour: red\n")
    (problem,) = problems_of(path)
    assert str(problem) == (
        f"{path}:5:5: sections.0.event.colour: unknown key 'colour'; expected one of: "
        "body, image, label, lede, links, links_label, title"
    )


def test_missing_subject_is_located_at_the_top(write_issue: WriteIssue) -> None:
    (problem,) = problems_of(write_issue("sections: [text: T]\n"))
    assert (problem.field, problem.line, problem.column) == ("subject", 1, 1)


def test_date_defaults_to_the_file_name(write_issue: WriteIssue) -> None:
    document = load(write_issue("subject: S\nsections: [text: T]\n", name="2024-03-04.yaml"))
    assert document.issue.date.isoformat() == "2024-03-04"


def test_date_is_required_when_the_file_name_has_none(write_issue: WriteIssue) -> None:
    (problem,) = problems_of(write_issue("subject: S\nsections: [text: T]\n", name="demain.yaml"))
    assert problem.field == "date"
    assert "YYYY-MM-DD" in problem.message


def test_yaml_syntax_error_points_at_the_line(write_issue: WriteIssue) -> None:
    (problem,) = problems_of(
        write_issue("subject: S\nsections:\n- event:\n    title: [unclosed\n    lede: x\n")
    )
    assert problem.line == 5
    assert problem.message.startswith("YAML syntax:")


def test_duplicate_key_is_an_error(write_issue: WriteIssue) -> None:
    (problem,) = problems_of(write_issue("subject: A\nsubject: B\nsections: [text: T]\n"))
    assert (problem.line, problem.message) == (
        2,
        "duplicate key 'subject' (the mapping starts at line 1)",
    )


def test_file_that_is_not_utf8_is_located_at_the_bad_byte(project: Path) -> None:
    path = project / "issues" / "2024-01-15.yaml"
    path.write_bytes("subject: Été\nsections: [text: Café]\n".encode("latin-1"))
    (problem,) = problems_of(path)
    assert (problem.line, problem.column) == (1, 10)
    assert "not UTF-8" in problem.message


def test_utf8_byte_order_mark_is_accepted(project: Path) -> None:
    path = project / "issues" / "2024-01-15.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + MINIMAL_ISSUE.encode())
    assert load(path).issue.subject == "Un sujet"


@pytest.mark.parametrize("content", ["", "   \n\n", "# only a comment\n"])
def test_empty_file_is_an_error(write_issue: WriteIssue, content: str) -> None:
    (problem,) = problems_of(write_issue(content))
    assert "empty" in problem.message or "only comments" in problem.message


def test_file_over_5_mb_is_refused_without_reading_it(project: Path) -> None:
    path = project / "issues" / "2024-01-15.yaml"
    with path.open("wb") as handle:
        handle.truncate(MAX_BYTES + 1)
    (problem,) = problems_of(path)
    assert "at most 5 MB" in problem.message


def test_alias_bomb_is_refused(write_issue: WriteIssue) -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for level in range(1, 9):
        refs = ", ".join([f"*a{level - 1}"] * 10)
        lines.append(f"a{level}: &a{level} [{refs}]")
    path = write_issue("\n".join(lines) + "\nsubject: S\nsections: [text: T]\n")
    (problem,) = problems_of(path)
    assert "aliases" in problem.message


def test_small_aliases_are_fine(write_issue: WriteIssue) -> None:
    path = write_issue(
        """\
        subject: S
        sections:
          - event:
              title: T
              links: &sources
                - {title: Source, url: "https://example.com/"}
          - expert:
              author: {name: X}
              title: Y
              links: *sources
        """
    )
    event, expert = (section.content for section in load(path).issue.sections)
    assert expert.links == event.links


def test_top_level_must_be_a_mapping(write_issue: WriteIssue) -> None:
    (problem,) = problems_of(write_issue("- subject: S\n"))
    assert "mapping" in problem.message


def test_missing_image_file_names_the_file(write_issue: WriteIssue) -> None:
    path = write_issue(
        """\
        subject: S
        sections:
          - event:
              title: T
              image: {src: nulle-part.png, alt: Rien}
        """
    )
    (problem,) = problems_of(path)
    assert (problem.field, problem.line) == ("sections.0.event.image.src", 5)
    assert "nulle-part.png" in problem.message


def test_image_path_cannot_leave_the_issue_folder(write_issue: WriteIssue) -> None:
    path = write_issue(
        """\
        subject: S
        sections:
          - event:
              title: T
              image: {src: ../qant.toml, alt: Rien}
        """
    )
    (problem,) = problems_of(path)
    assert "inside the issue's folder" in problem.message


def test_raw_html_in_markdown_points_at_its_line(write_issue: WriteIssue) -> None:
    path = write_issue(
        """\
        subject: S
        sections:
          - event:
              title: T
              body: |
                Premier paragraphe.

                Deuxième avec <span style="color:red">du HTML</span>.
        """
    )
    (problem,) = problems_of(path)
    assert (problem.field, problem.line, problem.column) == ("sections.0.event.body.0", 8, 9)
    assert "raw HTML" in problem.message


def test_missing_file_is_an_issue_error(project: Path) -> None:
    (problem,) = problems_of(project / "issues" / "absent.yaml")
    assert problem.message == "no such file"
