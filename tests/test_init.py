"""`qant-mail init DIR`: a newsletter of one's own, whose sample checks, renders and goes
through the demo from its folder, with nothing of the repository around it."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from qant_mail.app.starter import InitError, Starter, init_newsletter
from qant_mail.base.config import load_settings
from qant_mail.base.errors import ExitCode


def qant_mail(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run the real command in `cwd`, as a user would, with none of the suite's settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("QANT_")}
    return subprocess.run(
        [sys.executable, "-m", "qant_mail", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_init_writes_a_newsletter_that_checks_renders_and_runs_the_demo(tmp_path: Path) -> None:
    folder = tmp_path / "ma-lettre"
    made = qant_mail("init", str(folder), "--name", "La Lettre", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    assert "qant-mail demo" in made.stdout  # it says what to type next
    written = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    sample = next(name for name in written if name.startswith("issues/2"))
    assert written == {
        "qant.toml",
        sample,
        "issues/welcome.yaml",
        "issues/issue.schema.json",
        "issues/demo-subscribers.csv",
        "assets/logo.png",
        "assets/logo-dark.png",
        ".gitignore",
        "README.md",
    }
    for issue in (sample, "issues/welcome.yaml"):
        checked = qant_mail("check", "--strict", issue, cwd=folder)
        assert checked.returncode == 0, checked.stdout + checked.stderr
    rendered = qant_mail("render", sample, cwd=folder)
    assert rendered.returncode == 0, rendered.stderr
    assert (folder / "out" / f"{Path(sample).stem}.html").exists()
    demo = qant_mail("demo", cwd=folder)
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "3 messages delivered to the test inbox" in demo.stdout
    assert "left out" not in demo.stdout  # the demo list of a new newsletter is clean


def test_the_settings_hold_what_was_given_and_the_rest_is_a_clear_placeholder(
    tmp_path: Path,
) -> None:
    starter = Starter(
        name='La "Lettre" \\ du lundi',
        sender="redaction@lalettre.example",
        base_url="https://lalettre.example/",
        timezone="America/Montreal",
    )
    init_newsletter(tmp_path, starter)
    settings = load_settings(tmp_path / "qant.toml", env={})
    assert settings.newsletter.name == 'La "Lettre" \\ du lundi'
    assert settings.sender.address == "redaction@lalettre.example"
    assert settings.newsletter.base_url == "https://lalettre.example"
    assert settings.newsletter.timezone == "America/Montreal"
    raw = tomllib.loads((tmp_path / "qant.toml").read_text())
    assert raw["smtp"] == {"host": "127.0.0.1", "port": 2525, "security": "none"}
    # Comments explain each part: a newcomer edits it without the README open.
    assert (tmp_path / "qant.toml").read_text().count("\n#") >= 15


def test_init_never_writes_over_a_newsletter(tmp_path: Path) -> None:
    init_newsletter(tmp_path)
    before = (tmp_path / "qant.toml").read_bytes()
    again = qant_mail("init", str(tmp_path), cwd=tmp_path)
    assert again.returncode == ExitCode.INVALID
    assert f"error: {tmp_path / 'qant.toml'}: a newsletter is there already" in again.stderr
    assert (tmp_path / "qant.toml").read_bytes() == before


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("sender", "pas une adresse"),
        ("base_url", "lalettre.example"),
        ("timezone", "Mars/Olympus"),
        ("locale", "tlh"),
        ("name", "deux\nlignes"),
    ],
)
def test_a_value_that_would_not_work_is_named_before_anything_is_written(
    tmp_path: Path, option: str, value: str
) -> None:
    with pytest.raises(InitError) as caught:
        init_newsletter(tmp_path / "n", Starter(**{option: value}))
    assert f"--{option.replace('_', '-')}: {value!r}" in str(caught.value)
    assert not (tmp_path / "n").exists()


def test_the_gitignore_keeps_the_store_output_and_keys_out(tmp_path: Path) -> None:
    init_newsletter(tmp_path)
    ignored = (tmp_path / ".gitignore").read_text().split()
    for pattern in ("/data/", "/out/", "/.cache/", "*.pem", "*.db"):
        assert pattern in ignored


@pytest.mark.parametrize(
    ("zone", "day"),
    [
        ("Europe/Paris", "2026-12-06"),  # already past midnight there
        ("America/Montreal", "2026-12-05"),
        ("Pacific/Auckland", "2026-12-06"),
    ],
)
def test_the_sample_issue_is_dated_today_where_the_editors_are(
    tmp_path: Path, zone: str, day: str
) -> None:
    late_in_utc = dt.datetime(2026, 12, 5, 23, 30, tzinfo=dt.UTC).timestamp()
    written = init_newsletter(tmp_path, Starter(timezone=zone), clock=lambda: late_in_utc)
    assert tmp_path / "issues" / f"{day}.yaml" in written
