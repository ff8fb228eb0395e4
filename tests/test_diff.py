"""`qant-mail diff`: what readers would see change between two versions of an issue,
read from the render (so that YAML that differs only in layout shows nothing)."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import Result

from qant_mail.app import approval, review
from qant_mail.app.context import Context
from qant_mail.base.config import load_settings
from qant_mail.base.errors import ExitCode

SAMPLE = "issues/2023-11-20.yaml"
Cli = Callable[..., Result]


def edited(project: Path, *changes: tuple[str, str], name: str = "edited.yaml") -> str:
    """Write a copy of the sample beside it with `changes` made; return its path."""
    text = (project / SAMPLE).read_text(encoding="utf-8")
    for old, new in changes:
        assert old in text, old
        text = text.replace(old, new, 1)
    # Named like the sample (its key is its name) in a folder of its own beside it,
    # the sample's pictures with it.
    folder = project / "issues" / Path(name).stem
    folder.mkdir()
    for entry in (project / "issues").iterdir():
        if entry.is_file() and entry.name != "2023-11-20.yaml":
            shutil.copy(entry, folder / entry.name)
        elif entry.is_dir() and entry != folder:
            shutil.copytree(entry, folder / entry.name)
    path = folder / "2023-11-20.yaml"
    path.write_text(text, encoding="utf-8")
    return str(path.relative_to(project))


def test_one_word_changed_shows_as_that_word_in_its_section_only(cli: Cli, project: Path) -> None:
    other = edited(project, ("Kyutai, et fait tapis", "Kyutai, et mise tout"))
    result = cli("diff", SAMPLE, other, "--no-color")
    assert result.exit_code == ExitCode.OK, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "D’OpenAI à Kyutai, une question de gouvernance (changed)"
    assert "[-fait tapis-] {+mise tout+}" in lines[1]
    assert lines[2].startswith("Size: ")
    assert len(lines) == 3


def test_links_pictures_and_the_subject_are_reported(cli: Cli, project: Path) -> None:
    other = edited(
        project,
        ("subject: \"D'OpenAI à Kyutai", 'subject: "De OpenAI à Kyutai'),
        ("https://kyutai.org/", "https://kyutai.org/fr/"),
        ("Illustration : un homme en costume", "Illustration : une femme en costume"),
    )
    found = json.loads(cli("diff", SAMPLE, other, "--json").stdout)
    assert found["changed"] is True
    assert found["subject"]["after"].startswith("De OpenAI")
    assert found["links"] == {
        "added": ["https://kyutai.org/fr/"],
        "removed": ["https://kyutai.org/"],
    }
    (changed,) = found["images"]["alt_changed"]
    assert changed["before"].startswith("Illustration : un homme")
    assert changed["after"].startswith("Illustration : une femme")


def test_yaml_that_differs_only_in_layout_shows_nothing(cli: Cli, project: Path) -> None:
    other = edited(project, ("subject:", "# une note de la rédaction\nsubject:"))
    result = cli("diff", SAMPLE, other, "--no-color", "--exit-code")
    assert result.exit_code == ExitCode.OK, result.output
    assert result.stdout == "nothing a reader sees changed\n"
    assert json.loads(cli("diff", SAMPLE, other, "--json").stdout)["changed"] is False


def test_exit_code_says_that_readers_would_see_a_change(cli: Cli, project: Path) -> None:
    other = edited(project, ("Kyutai, et fait tapis", "Kyutai, et mise tout"))
    assert cli("diff", SAMPLE, other, "--exit-code").exit_code == 1


def test_a_file_at_a_git_revision_is_compared_with_the_file_now(cli: Cli, project: Path) -> None:
    git = ["git", "-C", str(project), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "first draft"], check=True)
    path = project / SAMPLE
    path.write_text(
        path.read_text(encoding="utf-8").replace("fait tapis", "mise tout", 1), encoding="utf-8"
    )
    result = cli("diff", f"{SAMPLE}@HEAD", SAMPLE, "--no-color")
    assert result.exit_code == ExitCode.OK, result.output
    assert "[-fait tapis-] {+mise tout+}" in result.stdout
    missing = cli("diff", f"{SAMPLE}@no-such-revision", SAMPLE)
    assert missing.exit_code == ExitCode.INVALID
    assert missing.stderr.startswith("error: git show")
    assert "Traceback" not in missing.output


def test_the_version_approved_is_compared_with_the_file_now(
    cli: Cli, project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = load_settings(project / "qant.toml", env={})
    ctx = Context(settings, env={})
    approval.approve(ctx, project / SAMPLE, "Marie")
    path = project / SAMPLE
    path.write_text(
        path.read_text(encoding="utf-8").replace("fait tapis", "mise tout", 1), encoding="utf-8"
    )
    found = review.diff(ctx, "approved:2023-11-20", str(path))
    assert not found.empty
    assert [s.status for s in found.sections] == ["changed"]
    result = cli("diff", "approved:2023-11-20", SAMPLE, "--no-color")
    assert "{+mise tout+}" in result.stdout
    never = cli("diff", "approved:2024-01-01", SAMPLE)
    assert never.exit_code == ExitCode.INVALID
    assert "was never approved" in never.stderr


def test_a_file_that_is_not_there_is_an_error_naming_it(cli: Cli, project: Path) -> None:
    result = cli("diff", "issues/nothing.yaml", SAMPLE)
    assert result.exit_code == ExitCode.INVALID
    assert result.stderr == "error: issues/nothing.yaml: no such issue file\n"
