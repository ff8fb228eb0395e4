"""The `qant-mail` command: parses arguments, calls the library, reports errors."""

from __future__ import annotations

import datetime as dt
import functools
import os
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ParamSpec, TypeVar

import typer

from qant_mail import __version__
from qant_mail.errors import ExitCode, IssueError, Problem, QantError, Severity

P = ParamSpec("P")
R = TypeVar("R")

app = typer.Typer(
    name="qant-mail",
    help="Write, check, preview and send a newsletter issue by email.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


@dataclass
class _Options:
    config: Path | None = None
    debug: bool = False


_options = _Options()


def _version(value: bool) -> None:
    if value:
        typer.echo(f"qant-mail {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            envvar="QANT_CONFIG",
            help="Settings file (default: qant.toml here or in a parent folder).",
        ),
    ] = None,
    debug: Annotated[
        bool, typer.Option("--debug", help="Show tracebacks of errors (for bug reports).")
    ] = False,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Show the version."),
    ] = False,
) -> None:
    """Write, check, preview and send a newsletter issue by email."""
    _options.config = config
    _options.debug = debug


def _handled(command: Callable[P, R]) -> Callable[P, R]:
    """Turn the errors a user can cause into `error: …` and a documented exit status."""

    @functools.wraps(command)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return command(*args, **kwargs)
        except IssueError as err:
            if _options.debug:
                traceback.print_exc()
            _error(str(err))
            for problem in err.problems:
                typer.echo(str(problem), err=True)
            raise typer.Exit(err.exit_code) from None
        except QantError as err:
            if _options.debug:
                traceback.print_exc()
            _error(str(err))
            raise typer.Exit(err.exit_code) from None
        except KeyboardInterrupt:
            _error("interrupted")
            raise typer.Exit(ExitCode.INTERRUPTED) from None

    return wrapper


def _error(message: str) -> None:
    typer.echo(f"error: {message}", err=True)


def _settings() -> Any:
    from qant_mail.config import find_config, load_settings

    path = _options.config or find_config()
    return load_settings(path)


@app.command()
@_handled
def new(
    date: Annotated[
        str | None,
        typer.Argument(help="Date of the issue, YYYY-MM-DD (default: today).", show_default=False),
    ] = None,
) -> None:
    """Write a commented skeleton issue for DATE in the issues folder."""
    from qant_mail.draft import write_skeleton

    settings = _settings()
    day = _parse_date(date) if date else dt.date.today()
    path = write_skeleton(settings, day)
    typer.echo(f"wrote {_shown(path)}")


@app.command()
@_handled
def check(
    file: Annotated[Path, typer.Argument(help="The issue's YAML file.")],
    strict: Annotated[bool, typer.Option("--strict", help="Fail on warnings too.")] = False,
) -> None:
    """Validate an issue and lint its email; print every problem as FILE:LINE:COL."""
    from qant_mail.lint import check as check_issue
    from qant_mail.render import Renderer

    settings = _settings()
    report = check_issue(file, Renderer(settings))
    for problem in report.errors + report.warnings:
        typer.echo(_tagged(problem))
    errors, warnings = len(report.errors), len(report.warnings)
    if errors or warnings:
        typer.echo(f"{_count(errors, 'error')}, {_count(warnings, 'warning')}", err=True)
    else:
        rendered = report.rendered
        assert rendered is not None
        typer.echo(
            f"{_shown(file)}: ok ({len(rendered.html.encode()) / 1000:.1f} KB of HTML, "
            f"{rendered.words} words)",
            err=True,
        )
    if errors or (strict and warnings):
        raise typer.Exit(ExitCode.INVALID)


@app.command()
@_handled
def render(
    file: Annotated[Path, typer.Argument(help="The issue's YAML file.")],
    output: Annotated[
        Path | None,
        typer.Option("-o", "--output", help="Folder to write to (default: paths.output)."),
    ] = None,
) -> None:
    """Write NAME.html, NAME.txt and NAME.eml, as a sample subscriber gets them."""
    from qant_mail.compose import write_sample

    settings = _settings()
    written = write_sample(file, settings, output or settings.output_dir)
    for path in written:
        typer.echo(f"wrote {_shown(path)} ({path.stat().st_size / 1000:.1f} KB)")


def _parse_date(value: str) -> dt.date:
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not a date written YYYY-MM-DD") from None


def _tagged(problem: Problem) -> str:
    if problem.severity is Severity.WARNING:
        where = f"{problem.path}:{problem.line}:{problem.column}"
        return f"{where}: {problem.field}: warning: {problem.message}"
    return str(problem)


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _shown(path: Path) -> str:
    """Return `path` relative to the current folder when it is below it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def main() -> None:
    """Run the command line."""
    # qant-mail uses no pydantic plugin; looking for them scans the metadata of every
    # installed package, a quarter of a render's start-up. Users who want one can say so.
    os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")
    app(prog_name="qant-mail")
