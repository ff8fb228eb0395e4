"""The command line: exit statuses, messages, files written or not."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import subprocess
import sys
import zoneinfo
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import Result

from qant_mail.app import issues
from qant_mail.app.context import Context
from qant_mail.base.config import Settings
from qant_mail.base.errors import ExitCode
from qant_mail.cli import app
from tests.conftest import own_template

Cli = Callable[..., Result]
ROOT = Path(__file__).resolve().parent.parent
PROBLEM_LINE = re.compile(
    r"^(?P<file>[^:]+):(?P<line>\d+):(?P<col>\d+): (?P<field>\S+): (?P<msg>.+)$"
)


def test_check_on_the_sample_exits_0(cli: Cli) -> None:
    result = cli("check", "issues/2023-11-20.yaml")
    assert result.exit_code == ExitCode.OK
    assert result.stdout == ""
    assert "issues/2023-11-20.yaml: ok" in result.stderr


def test_check_prints_every_problem_errors_first(cli: Cli, project: Path) -> None:
    path = project / "issues" / "2024-01-15.yaml"
    event = "subject: S\nsections:\n- event:\n    title: T\n    body: 'Voir [ici](ftp://x.example/f).'\n"
    path.write_text(event + "    lede: 3\n")
    result = cli("check", "issues/2024-01-15.yaml")
    assert result.exit_code == ExitCode.INVALID
    assert result.stdout == ""  # problems go to stderr; stdout is for data (--json)
    lines = result.stderr.splitlines()
    assert lines == [
        "issues/2024-01-15.yaml:5:11: sections.0.event.body.0: "
        "'ftp://x.example/f': a link is https://, http:// or mailto:",
        "issues/2024-01-15.yaml:6:11: sections.0.event.lede: input should be a valid string",
        "2 errors, 0 warnings",
    ]
    path.write_text(event.replace("ftp:", "http:"))
    result = cli("check", "issues/2024-01-15.yaml")
    lines = result.stderr.splitlines()
    matches = [PROBLEM_LINE.match(line) for line in lines]
    assert [m["field"] for m in matches if m] == ["(document)", "sections.0.event.body.0"]
    assert ": warning: no preheader" in lines[0]
    assert "is not https" in lines[1]
    assert result.exit_code == ExitCode.OK
    assert lines[2] == "0 errors, 2 warnings"


def test_check_speaks_json_for_scripts(cli: Cli, project: Path) -> None:
    path = project / "issues" / "2024-01-15.yaml"
    path.write_text("subject: S\nsections:\n- event: {title: T, lede: 3}\n")
    result = cli("check", "--json", "issues/2024-01-15.yaml")
    assert result.exit_code == ExitCode.INVALID
    report = json.loads(result.stdout)
    assert report["ok"] is False
    assert report["errors"] == [
        {
            "line": 3,
            "column": 27,
            "field": "sections.0.event.lede",
            "message": "input should be a valid string",
        }
    ]
    sample = json.loads(cli("check", "--json", "issues/2023-11-20.yaml").stdout)
    assert (sample["ok"], sample["errors"], sample["warnings"]) == (True, [], [])
    assert sample["words"] > 1500


def test_check_fails_on_warnings_only_when_strict(cli: Cli, project: Path) -> None:
    (project / "issues" / "2024-01-15.yaml").write_text("subject: S\nsections: [text: T]\n")
    assert cli("check", "issues/2024-01-15.yaml").exit_code == ExitCode.OK
    assert cli("check", "--strict", "issues/2024-01-15.yaml").exit_code == ExitCode.INVALID


def test_render_writes_html_text_and_eml(cli: Cli, project: Path) -> None:
    result = cli("render", "issues/2023-11-20.yaml", "-o", "sortie")
    assert result.exit_code == ExitCode.OK, result.output
    names = sorted(p.name for p in (project / "sortie").iterdir())
    assert names == ["2023-11-20.eml", "2023-11-20.html", "2023-11-20.txt"]
    assert "wrote sortie/2023-11-20.eml" in result.stdout


def test_render_defaults_to_the_output_folder(cli: Cli, project: Path) -> None:
    assert cli("render", "issues/2023-11-20.yaml").exit_code == ExitCode.OK
    assert (project / "out" / "2023-11-20.eml").is_file()


def test_render_of_an_invalid_issue_writes_nothing(cli: Cli, project: Path) -> None:
    (project / "issues" / "2024-01-15.yaml").write_text(
        "subject: S\nsections:\n- event: {titre: T}\n"
    )
    result = cli("render", "issues/2024-01-15.yaml", "-o", "sortie")
    assert result.exit_code == ExitCode.INVALID
    assert result.stderr.startswith("error: issues/2024-01-15.yaml: 2 problems\n")
    assert (
        "3:11: sections.0.event.titre: unknown key 'titre'; did you mean 'title'?" in result.stderr
    )
    assert not (project / "sortie").exists()


def test_template_error_writes_nothing(cli: Cli, project: Path) -> None:
    own_template(project, "email.txt.j2").write_text("{{ issue.nope }}\n")
    result = cli("render", "issues/2023-11-20.yaml", "-o", "sortie")
    assert result.exit_code == ExitCode.INVALID
    assert re.match(r"error: .*email\.txt\.j2:1: .*nope", result.stderr)
    assert not (project / "sortie").exists()


def test_new_writes_a_valid_draft_and_refuses_to_overwrite(cli: Cli, project: Path) -> None:
    result = cli("new", "2024-02-29")
    assert result.exit_code == ExitCode.OK
    path = project / "issues" / "2024-02-29.yaml"
    assert "jeudi 29 février 2024" in path.read_text()
    checked = cli("check", "issues/2024-02-29.yaml")
    assert checked.exit_code == ExitCode.OK
    assert "draft" in checked.stderr
    before = path.read_text()
    again = cli("new", "2024-02-29")
    assert again.exit_code == ExitCode.INVALID
    assert "already exists" in again.stderr
    assert path.read_text() == before


def test_new_defaults_to_today_where_the_editors_are(
    cli: Cli, project: Path, project_settings: Settings
) -> None:
    # The editors' day (the newsletter's time zone), not this machine's: between 23:00
    # and midnight UTC, Paris is already on the next day. (Read before and after, in
    # case their midnight falls in between.)
    zone = zoneinfo.ZoneInfo(project_settings.newsletter.timezone)
    before = dt.datetime.now(zone).date()
    assert cli("new").exit_code == ExitCode.OK
    after = dt.datetime.now(zone).date()
    written = sorted(path.name for path in (project / "issues").glob("????-??-??.yaml"))
    assert {f"{before}.yaml", f"{after}.yaml"} & set(written)


def test_today_is_the_day_in_the_newsletters_time_zone(project_settings: Settings) -> None:
    late_in_utc = dt.datetime(2026, 12, 5, 23, 30, tzinfo=dt.UTC).timestamp()
    ctx = Context(project_settings, clock=lambda: late_in_utc)
    assert project_settings.newsletter.timezone == "Europe/Paris"
    assert issues.today(ctx) == dt.date(2026, 12, 6)


def test_new_with_a_bad_date_is_a_usage_error(cli: Cli) -> None:
    result = cli("new", "demain")
    assert result.exit_code == ExitCode.USAGE
    assert "YYYY-MM-DD" in result.output


def test_missing_settings_is_an_error_naming_the_fix(cli: Cli, project: Path) -> None:
    (project / "qant.toml").unlink()
    result = cli("check", "issues/2023-11-20.yaml")
    assert result.exit_code == ExitCode.INVALID
    assert result.stderr.startswith("error: no qant.toml")


def test_every_command_has_help_and_is_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    commands = [("", command) for command in app.registered_commands]
    for group in app.registered_groups:
        assert group.typer_instance is not None
        commands += [(f"{group.name} ", c) for c in group.typer_instance.registered_commands]
    assert len(commands) >= 14
    for prefix, command in commands:
        assert command.callback is not None
        name = prefix + (command.name or command.callback.__name__)
        assert (command.callback.__doc__ or "").strip(), name
        assert f"qant-mail {name}" in readme, name


def test_every_command_runs_as_a_process(project: Path) -> None:
    """One smoke test per command as its own process (the rest run in-process)."""
    from qant_mail.cli import app

    commands = [
        c.name or (c.callback.__name__ if c.callback else "") for c in app.registered_commands
    ]
    for group in app.registered_groups:
        assert group.typer_instance is not None
        commands += [
            f"{group.name} {c.name or ''}" for c in group.typer_instance.registered_commands
        ]
    for command in commands:
        result = subprocess.run(
            [sys.executable, "-m", "qant_mail", *command.split(), "--help"],
            cwd=project,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, (command, result.stderr)
        assert "Usage: qant-mail" in result.stdout


def test_a_process_leaves_with_its_commands_status_and_all_it_printed(project: Path) -> None:
    # The command line skips the interpreter's tear-down (os._exit): nothing written may
    # be lost on the way, and the status must be the command's.
    (project / "issues" / "broken.yaml").write_text("subject: S\nsections: [{evnt: {}}]\n")
    run = [sys.executable, "-m", "qant_mail"]
    bad = subprocess.run(
        [*run, "check", "issues/broken.yaml"], cwd=project, capture_output=True, text=True
    )
    assert bad.returncode == ExitCode.INVALID
    assert "broken.yaml:2:" in bad.stderr
    good = subprocess.run(
        [*run, "render", "issues/2023-11-20.yaml", "-o", "out"],
        cwd=project,
        capture_output=True,
        text=True,
    )
    assert good.returncode == 0, good.stderr
    assert good.stdout.count("wrote ") == 3
    assert (project / "out" / "2023-11-20.eml").stat().st_size > 50_000


def test_a_command_closes_the_list_it_opened(project: Path, project_settings: Settings) -> None:
    # Closed, SQLite folds its journal back into the file: a copy of the file alone (a
    # backup) holds every row. Left open at exit, the rows would sit in the -wal file.
    (project / "list.csv").write_text("email,name\na@example.com,A\nb@example.com,B\n")
    imported = subprocess.run(
        [sys.executable, "-m", "qant_mail", "subscribers", "import", "list.csv"],
        cwd=project,
        capture_output=True,
        text=True,
    )
    assert imported.returncode == 0, imported.stderr
    store = Path(project_settings.store_path)
    assert store.exists()
    assert not Path(f"{store}-wal").exists()


def test_rendering_and_checking_load_nothing_of_the_send_side() -> None:
    # What `render`, `check` and the preview import is their start-up time.
    code = (
        "import sys, qant_mail.cli, qant_mail.app.issues, qant_mail.web.preview; "
        "print(' '.join(sorted(sys.modules)))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    for heavy in (
        "qant_mail.delivery.outbox",
        "qant_mail.store.ledger",
        "qant_mail.delivery.dkim",
        "cryptography",
        "qant_mail.authoring.archive",  # only `archive` builds it
        "rich",  # only a bar on a terminal, and `stats`, draw with it
    ):
        assert heavy not in loaded


def test_a_run_builds_only_the_command_it_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    import typer.main

    from qant_mail.cli import command_line

    built: list[str] = []
    build = typer.main.get_command_from_info

    def counted(command_info: typer.models.CommandInfo, **options: Any) -> Any:
        assert command_info.callback is not None
        built.append(command_info.callback.__name__)
        return build(command_info, **options)

    monkeypatch.setattr(typer.main, "get_command_from_info", counted)
    group = command_line()
    assert built == []
    with pytest.raises(SystemExit) as done:
        group(["render", "--help"], prog_name="qant-mail", standalone_mode=True)
    assert done.value.code == 0
    assert built == ["render"]


def test_the_command_table_built_on_demand_is_typers_own() -> None:
    import typer.main

    from qant_mail.cli import command_line

    def described(command: Any) -> Any:
        params = [(p.name, tuple(p.opts), p.required, repr(p.default)) for p in command.params]
        subcommands = getattr(command, "commands", None)
        inner = {n: described(c) for n, c in subcommands.items()} if subcommands else None
        return command.name, command.help, params, inner

    eager = typer.main.get_command(app)
    lazy = command_line()
    assert list(lazy.commands) == list(eager.commands)  # type: ignore[attr-defined]
    assert described(lazy) == described(eager)


def test_a_send_without_a_terminal_prints_its_notes_without_a_bar() -> None:
    code = (
        "import sys, qant_mail.cli as cli; bar = cli._progress(); bar.start(2); "
        "bar.note('a note'); print(type(bar).__name__, 'rich' in sys.modules)"
    )
    quiet = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE")}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=quiet
    )
    assert done.stdout.split() == ["_Notes", "False"]
    assert done.stderr == "a note\n"
    # As for rich, the environment may say there is a terminal after all (some CI does).
    which = "import qant_mail.cli as cli; print(type(cli._progress()).__name__)"
    for said in ({"FORCE_COLOR": "1"}, {"TTY_COMPATIBLE": "1"}):
        forced = subprocess.run(
            [sys.executable, "-c", which], capture_output=True, text=True, env=quiet | said
        )
        assert forced.stdout.split() == ["_ProgressBar"], (said, forced.stderr)


def test_the_names_the_issues_use_cases_show_the_edges_resolve() -> None:
    from qant_mail.app import issues

    for name in issues.__all__:
        assert getattr(issues, name) is not None
    from qant_mail.app.issues import ArchiveReport  # imported when asked for

    assert ArchiveReport.__name__ == "ArchiveReport"


def test_a_port_out_of_range_is_a_usage_error(cli: Cli) -> None:
    result = cli("inbox", "--port", "99999")
    assert result.exit_code == ExitCode.USAGE
    assert "--port" in result.output
    assert "65535" in result.output


def test_sending_loads_nothing_of_the_network_checks() -> None:
    # `send` runs doctor's offline checks; the DNS and the web probes are `doctor`'s own.
    code = "import sys, qant_mail.app.sending; print(' '.join(sorted(sys.modules)))"
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    for heavy in ("dns", "dns.resolver", "qant_mail.app.probe", "qant_mail.delivery.resolver"):
        assert heavy not in loaded
