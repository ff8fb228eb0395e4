"""The `qant-mail` command: parses arguments, calls one use case of the application
layer, prints its result; the one error handler, and the exit codes."""

from __future__ import annotations

import contextlib
import datetime as dt
import enum
import os
import signal
import sys
import traceback
import zoneinfo
from collections.abc import Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
import typer.main
from typer.core import TyperGroup
from typer.models import CommandInfo, TyperInfo

from qant_mail.base.errors import (
    ConfigError,
    ExitCode,
    IssueError,
    Problem,
    QantError,
    Severity,
)

if TYPE_CHECKING:
    from rich.progress import TaskID
    from typer._click import Command as ClickCommand  # Typer's own copy of click

    from qant_mail.app.approval import Approval
    from qant_mail.app.context import Context
    from qant_mail.app.issues import ArchiveReport
    from qant_mail.app.readers import Status
    from qant_mail.app.review import Comparison
    from qant_mail.app.sending import SendStatus, SendSummary, State, Waiting
    from qant_mail.base.config import Settings


class _Commands(TyperGroup):
    """The command group, which turns the errors a user can cause into one line,
    `error: …`, and the exit status the README documents: the one error handler."""

    def invoke(self, ctx: typer.Context) -> Any:  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except IssueError as err:
            _report(ctx, err)
            for problem in err.problems:
                typer.echo(str(problem), err=True)
            raise typer.Exit(err.exit_code) from err
        except QantError as err:
            _report(ctx, err)
            raise typer.Exit(err.exit_code) from err
        except KeyboardInterrupt as err:
            _error("interrupted")
            raise typer.Exit(ExitCode.INTERRUPTED) from err


def _report(ctx: typer.Context, err: QantError) -> None:
    options = ctx.find_object(Options)
    if options is not None and options.debug:
        traceback.print_exc()
    _error(str(err))


app = typer.Typer(
    name="qant-mail",
    help="Write, check, preview and send a newsletter issue by email.",
    cls=_Commands,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


@dataclass
class Options:
    """The options every command shares, kept on the command line's context."""

    config: Path | None = None
    debug: bool = False
    contexts: list[Context] = field(default_factory=list)  # the one a command made


def _version(value: bool) -> None:
    if value:
        import qant_mail

        typer.echo(f"qant-mail {qant_mail.__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    ctx: typer.Context,
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
    ctx.obj = Options(config or None, debug)


def _error(message: str) -> None:
    typer.echo(f"error: {message}", err=True)


def _options(ctx: typer.Context) -> Options:
    return ctx.find_object(Options) or Options()


def _context(ctx: typer.Context) -> Context:
    """Return the installation the command works on: its settings, read once."""
    from qant_mail.app.context import Context

    options = _options(ctx)
    if not options.contexts:
        options.contexts.append(Context.load(options.config))
    return options.contexts[0]


@app.command()
def init(
    folder: Annotated[Path, typer.Argument(help="The folder to write (created if need be).")],
    name: Annotated[str, typer.Option(help="The newsletter's name.")] = "Ma lettre",
    sender: Annotated[
        str, typer.Option(help="The From address of its emails.")
    ] = "lettre@example.com",
    base_url: Annotated[
        str, typer.Option(help="Its public site (links in emails start with it).")
    ] = "https://lettre.example.com",
    timezone: Annotated[str, typer.Option(help="Where its editors are.")] = "Europe/Paris",
    locale: Annotated[str, typer.Option(help="The readers' language: fr or en.")] = "fr",
) -> None:
    """Start a newsletter of your own in FOLDER: settings, a sample issue, a welcome."""
    from qant_mail.app.starter import Starter, init_newsletter

    starter = Starter(name, sender, base_url, timezone, locale)
    written = init_newsletter(folder, starter)
    for path in written:
        typer.echo(f"wrote {_shown(path)}")
    sample = next(p for p in written if p.parent.name == "issues" and p.stem[:1].isdigit())
    issue = sample.relative_to(folder).as_posix()
    steps = [
        (f"qant-mail check {issue}", "every problem at once"),
        (f"qant-mail preview {issue}", "the email as readers will see it"),
        ("qant-mail demo", "the whole job, into a local test inbox"),
    ]
    width = max(len(command) for command, _ in steps) + 2
    typer.echo(f"\nNext: cd {_shown(folder)}, then")
    for command, what in steps:
        typer.echo(f"  {command.ljust(width)}# {what}")
    typer.echo("and fill in qant.toml (name, sender, base_url, postal_address) when ready.")


@app.command()
def new(
    ctx: typer.Context,
    date: Annotated[
        str | None,
        typer.Argument(help="Date of the issue, YYYY-MM-DD (default: today).", show_default=False),
    ] = None,
) -> None:
    """Write a commented skeleton issue for DATE in the issues folder."""
    from qant_mail.app import issues

    path = issues.new_issue(_context(ctx), _parse_date(date) if date else None)
    typer.echo(f"wrote {_shown(path)}")


@app.command()
def schema(
    ctx: typer.Context,
    output: Annotated[
        Path | None,
        typer.Option("-o", "--output", help="File to write (default: standard output)."),
    ] = None,
) -> None:
    """Print the JSON Schema of an issue file, for editors' YAML plugins."""
    from qant_mail.app import issues

    if output is None:
        typer.echo(issues.schema(), nl=False)
        return
    issues.write_schema(output)
    typer.echo(f"wrote {_shown(output)}")


@app.command()
def check(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="The issue's YAML file.")],
    strict: Annotated[bool, typer.Option("--strict", help="Fail on warnings too.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Validate an issue and lint its email; print every problem as FILE:LINE:COL."""
    import json

    from qant_mail.app import issues

    report = issues.check(_context(ctx), file)
    errors, warnings = len(report.errors), len(report.warnings)
    failed = bool(errors or (strict and warnings))
    if as_json:
        rendered = report.rendered
        typer.echo(
            json.dumps(
                {
                    "file": str(file),
                    "ok": not failed,
                    "errors": [_problem_json(p) for p in report.errors],
                    "warnings": [_problem_json(p) for p in report.warnings],
                    "html_bytes": len(rendered.html.encode()) if rendered else None,
                    "words": rendered.words if rendered else None,
                },
                ensure_ascii=False,
                indent=2,
            )
        )
    else:
        for problem in report.errors + report.warnings:
            typer.echo(_tagged(problem), err=True)
        if errors or warnings:
            typer.echo(f"{_count(errors, 'error')}, {_count(warnings, 'warning')}", err=True)
        elif report.rendered is not None:
            size = len(report.rendered.html.encode()) / 1000
            words = report.rendered.words
            typer.echo(f"{_shown(file)}: ok ({size:.1f} KB of HTML, {words} words)", err=True)
    if failed:
        raise typer.Exit(ExitCode.INVALID)


def _problem_json(problem: Problem) -> dict[str, object]:
    return {
        "line": problem.line,
        "column": problem.column,
        "field": problem.field,
        "message": problem.message,
    }


@app.command()
def render(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="The issue's YAML file.")],
    output: Annotated[
        Path | None,
        typer.Option("-o", "--output", help="Folder to write to (default: paths.output)."),
    ] = None,
) -> None:
    """Write NAME.html, NAME.txt and NAME.eml, as a sample subscriber gets them."""
    from qant_mail.app import issues

    written = issues.render_sample(_context(ctx), file, output)
    for path in written:
        typer.echo(f"wrote {_shown(path)} ({path.stat().st_size / 1000:.1f} KB)")


@app.command()
def diff(
    ctx: typer.Context,
    before: Annotated[
        str, typer.Argument(help="FILE, FILE@REV (a git revision) or approved:ISSUE.")
    ],
    after: Annotated[str, typer.Argument(help="The same kinds: the version to compare with.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the changes as JSON.")] = False,
    color: Annotated[
        bool | None,
        typer.Option("--color/--no-color", help="Colour (default: on a terminal only)."),
    ] = None,
    exit_code: Annotated[
        bool, typer.Option("--exit-code", help="Exit 1 when readers would see a change.")
    ] = False,
) -> None:
    """Show what readers would see change between two versions of an issue: subject,
    preheader, each section's words, links, pictures, the message's size."""
    import json

    from qant_mail.app import review

    found = review.diff(_context(ctx), before, after)
    if as_json:
        typer.echo(json.dumps(found.to_json(), ensure_ascii=False, indent=2))
    else:
        styled = sys.stdout.isatty() if color is None else color
        for line in _diff_lines(found, styled):
            typer.echo(line)
    if exit_code and not found.empty:
        raise typer.Exit(ExitCode.INVALID)


def _diff_lines(found: Comparison, styled: bool) -> list[str]:
    """Return the changes as lines: words removed [-…-] and added {+…+} (in red and
    green on a terminal), links and pictures added (+) and removed (-)."""

    def removed(text: str) -> str:
        return typer.style(text, fg="red", strikethrough=True) if styled else f"[-{text}-]"

    def added(text: str) -> str:
        return typer.style(text, fg="green", bold=True) if styled else f"{{+{text}+}}"

    def heading(text: str) -> str:
        return typer.style(text, bold=True) if styled else text

    lines: list[str] = []
    for label, change in (("Subject", found.subject), ("Preheader", found.preheader)):
        if change is not None:
            lines += [
                heading(f"{label}:"),
                f"  {removed(change.before)}",
                f"  {added(change.after)}",
            ]
    for section in found.sections:
        lines.append(heading(f"{section.title} ({section.status})"))
        for paragraph in section.paragraphs:
            words = [
                removed(text) if op == "-" else added(text) if op == "+" else text
                for op, text in paragraph
            ]
            lines.append("  " + " ".join(w for w in words if w))
    if found.links_added or found.links_removed:
        lines.append(heading("Links:"))
        lines += [f"  + {added(url)}" for url in found.links_added]
        lines += [f"  - {removed(url)}" for url in found.links_removed]
    if found.images_added or found.images_removed or found.images_changed:
        lines.append(heading("Pictures:"))
        lines += [f"  + {added(alt or src)}" for src, alt in found.images_added]
        lines += [f"  - {removed(alt or src)}" for src, alt in found.images_removed]
        for src, change in found.images_changed:
            lines.append(f"  {src}: alt {removed(change.before)} {added(change.after)}")
    if found.size is not None:
        before, after = int(found.size.before), int(found.size.after)
        delta = after - before
        moved = f"{delta:+,} bytes" if abs(delta) < 1000 else f"{delta / 1000:+.1f} KB"
        lines.append(f"Size: {before / 1000:.1f} KB → {after / 1000:.1f} KB ({moved})")
    if found.empty:
        lines.append("nothing a reader sees changed")
    return lines


@app.command()
def preview(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="The issue's YAML file.")],
    port: Annotated[
        int, typer.Option("--port", min=0, max=65535, help="Port on 127.0.0.1 (0: a free one).")
    ] = 0,
    no_open: Annotated[
        bool, typer.Option("--no-open", help="Do not open the page in a browser.")
    ] = False,
) -> None:
    """Serve a live preview of an issue that reloads as you edit it."""
    import webbrowser

    from qant_mail.web.preview import Preview, create_app
    from qant_mail.web.webserver import listen, run

    # Settings that do not load are an error now, not a blank page.
    settings_path = _context(ctx).settings.path
    sock = listen("127.0.0.1", port)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/"
    typer.echo(f"preview of {_shown(file)} at {url} (Ctrl-C to stop)", err=True)
    if not no_open:
        webbrowser.open(url)
    try:
        run(create_app(Preview(file, settings_path)), sock)
    finally:
        sock.close()


@app.command()
def doctor(
    ctx: typer.Context,
    file: Annotated[
        Path | None,
        typer.Argument(help="The issue's YAML file (its message and links are checked too)."),
    ] = None,
    offline: Annotated[
        bool, typer.Option("--offline", help="Only the checks that need no network.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Check before a send: DNS (DKIM, SPF, DMARC, MX), the public side, links, the relay."""
    import json

    from qant_mail.app import doctor as checkup

    report = checkup.run(_context(ctx), file, offline=offline)
    if as_json:
        typer.echo(json.dumps(report.as_json(), ensure_ascii=False, indent=2))
    else:
        marks = {"ok": "✓", "warning": "!", "blocking": "✗", "skipped": "-"}
        for check in report.checks:
            typer.echo(f"{marks[check.status]} {check.name}: {check.detail}")
            if check.advice and check.status != "ok":
                typer.echo(f"    → {check.advice}")
        typer.echo(report.summary())
    raise typer.Exit(report.exit_code)


@app.command()
def send(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="The issue's YAML file.")],
    to: Annotated[
        str | None,
        typer.Option(
            "--to",
            help="Send a test to these addresses (comma-separated) instead of the list.",
            show_default=False,
        ),
    ] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Compose every message into a folder; send none.")
    ] = False,
    output: Annotated[
        Path | None,
        typer.Option("-o", "--output", help="Folder of --dry-run (default: out/dry-run/NAME)."),
    ] = None,
    limit: Annotated[
        int | None, typer.Option("--limit", min=1, help="Send to the next N recipients only.")
    ] = None,
    no_wait: Annotated[
        bool,
        typer.Option("--no-wait", help="Do not wait for deferred messages to be due; stop."),
    ] = False,
    accept_changes: Annotated[
        bool,
        typer.Option(
            "--accept-changes",
            help="Resume a send even though the issue changed since it started.",
        ),
    ] = False,
    new_subscribers: Annotated[
        bool,
        typer.Option(
            "--new-subscribers",
            help="Send an issue sent before to the readers who joined since, once each.",
        ),
    ] = False,
) -> None:
    """Send an issue to every active subscriber, or a test to some addresses (--to)."""
    from qant_mail.app import issues, sending

    context = _context(ctx)
    if to is not None:
        addresses = [a for a in to.split(",") if a.strip()]
        if not addresses:
            raise typer.BadParameter("give at least one address", param_hint="--to")
        prepared = sending.prepare_test(context, file)
        _warn(prepared.warnings)
        tested = sending.send_test(context, prepared, addresses)
        for address, reply in tested.results:
            typer.echo(f"{address}: {reply}")
        if tested.failed:
            raise typer.Exit(ExitCode.PARTIAL)
        return
    prepared = issues.prepare(context, file)
    _warn(prepared.warnings)
    if dry_run:
        folder = output or context.settings.output_dir / "dry-run" / file.stem
        with _progress() as bar, _terminate_as_interrupt():
            report = sending.dry_run(context, prepared, folder, progress=bar, limit=limit)
        typer.echo(report.summary())
        typer.echo(f"messages written to {_shown(folder / 'new')}")
        return
    plan = sending.plan(context, prepared, new_subscribers=new_subscribers)
    if new_subscribers and not plan.resuming:
        raise typer.BadParameter(
            f"{file.stem} has not been sent yet: `qant-mail send {file}` sends it to every "
            "active subscriber",
            param_hint="--new-subscribers",
        )
    if plan.recipients == 0:
        why, code = sending.nothing_left(plan, file)
        typer.echo(why)
        raise typer.Exit(code)
    count = min(plan.recipients, limit) if limit else plan.recipients
    where = "not served yet" if plan.resuming else "active subscribers"
    if new_subscribers:
        where += f", {plan.joined} of them joined since it was planned"
    typer.echo(f"Subject:    {plan.subject}", err=True)
    typer.echo(
        f"Recipients: {count} {where}" + (f" (of {plan.recipients})" if limit else ""), err=True
    )
    typer.echo(f"Server:     {plan.server}", err=True)
    typer.echo(f"DKIM:       {plan.signing}", err=True)
    for check in plan.warnings:
        typer.echo(f"warning: {check.name}: {check.detail}", err=True)
    if plan.blocking:
        for check in plan.blocking:
            advice = f" ({check.advice})" if check.advice else ""
            _error(f"{check.name}: {check.detail}{advice}")
        typer.echo("nothing sent (`qant-mail doctor` checks the rest)", err=True)
        raise typer.Exit(ExitCode.BLOCKING)
    if not yes:
        try:
            confirmed = typer.confirm("Send?", err=True)
        except typer.Abort as err:
            _error("no answer to “Send?” (no terminal?): add --yes to send without asking")
            raise typer.Exit(ExitCode.INVALID) from err
        if not confirmed:
            typer.echo("nothing sent", err=True)
            raise typer.Exit(ExitCode.OK)
    with _progress() as bar, _terminate_as_interrupt():
        report = sending.send(
            context,
            prepared,
            progress=bar,
            limit=limit,
            wait_for_retries=not no_wait,
            accept_changes=accept_changes,
            new_subscribers=new_subscribers,
        )
    typer.echo(report.summary())
    if report.exit_code != ExitCode.OK:
        typer.echo(sending.hints(report, file), err=True)
    if report.joined:
        typer.echo(sending.joined_hint(report.joined, file), err=True)
    raise typer.Exit(report.exit_code)


@app.command()
def status(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="The issue's YAML file.")],
    requeue_unknown: Annotated[
        bool, typer.Option("--requeue-unknown", help="Send the unknown ones again next run.")
    ] = False,
    mark_unknown_sent: Annotated[
        bool, typer.Option("--mark-unknown-sent", help="Count the unknown ones as sent.")
    ] = False,
    requeue_failed: Annotated[
        bool,
        typer.Option(
            "--requeue-failed",
            help="Send the failed ones again next run (hard bounces only with --force).",
        ),
    ] = False,
    reason: Annotated[
        str,
        typer.Option("--reason", help="With --requeue-failed: only those whose reply holds this."),
    ] = "",
    address: Annotated[
        list[str] | None,
        typer.Option("--address", help="With --requeue-failed: only this address (repeatable)."),
    ] = None,
    force: Annotated[
        bool,
        typer.Option("--force", help="With --requeue-failed: hard bounces too (re-activated)."),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the state as JSON.")] = False,
) -> None:
    """Show where the send of an issue stands: counts, failures, unknowns."""
    import json

    from qant_mail.app import sending
    from qant_mail.app.sending import State

    context = _context(ctx)
    settings = context.settings
    if requeue_unknown and mark_unknown_sent:
        raise typer.BadParameter("choose one of --requeue-unknown and --mark-unknown-sent")
    if (reason or address or force) and not requeue_failed:
        raise typer.BadParameter("--reason, --address and --force go with --requeue-failed")
    issue = file.stem
    if requeue_unknown or mark_unknown_sent:
        changed = sending.resolve_unknown(context, issue, sent=mark_unknown_sent)
        verb = "marked sent" if mark_unknown_sent else "re-queued"
        typer.echo(f"{changed} unknown {verb}", err=True)
    if requeue_failed:
        result = sending.requeue_failed(
            context, issue, containing=reason, addresses=address or (), force=force
        )
        typer.echo(
            f"{result.requeued} failed re-queued: `qant-mail send {file}` sends them", err=True
        )
        for email, state in result.refused:
            hint = " (--force sends it anyway)" if state == "bounced" else ""
            typer.echo(f"  {email}: not re-queued, the subscriber is {state}{hint}", err=True)
        for email in result.missing:
            typer.echo(f"  {email}: no failed message to it in this send", err=True)
    found = sending.status(context, issue)
    send = found.send
    if as_json:
        typer.echo(json.dumps(_status_json(found), ensure_ascii=False, indent=2))
        return
    if send is None:
        typer.echo(f"{issue} has not been sent (no send planned).")
        _approval_line(found, file, _zone(settings, None))
        _waiting(found.waiting, _zone(settings, None))
        return
    zone = _zone(settings, send.newsletter)
    of = f" ({send.newsletter})" if len(settings.editions) > 1 else ""
    typer.echo(
        f"{send.issue}{of}: “{send.subject}”, planned {_time(send.created_at, zone)}, "
        + _standing(found, file, zone)
    )
    typer.echo("  " + ", ".join(f"{state.value} {found.counts[state]}" for state in State))
    _approval_line(found, file, zone)
    if found.relays:
        typer.echo(f"  carried by {_carried(found.relays)}")
    for name, started, alive, held in found.senders:
        doing = f"at work, holding {held}" if alive else "gone"
        typer.echo(f"  sender {name}: since {_time(started, zone)}, {doing}")
    if found.expected_finish is not None:
        typer.echo(
            f"  running at {found.rate * 60:.0f} messages a minute over the last minute: "
            f"expected to finish around {_time(found.expected_finish, zone)}"
        )
    if found.bounced or found.soft_bounced or found.complaints:
        typer.echo(
            f"  afterwards: {found.bounced} bounced, {found.soft_bounced} bounced for now "
            f"(soft), {found.complaints} complaints (`qant-mail bounces` reads them)"
        )
    for state, rows in found.rows.items():
        if rows:
            typer.echo(f"{state.value}:")
            for row in rows:
                typer.echo(f"  {row.email}: {row.last_reply} ({row.attempts} attempts)")
    for note in found.notes:
        if not (requeue_failed and note.startswith("failed:")):
            typer.echo(note, err=True)
    _waiting(found.waiting, zone)


def _approval_line(found: SendStatus, file: Path, zone: str) -> None:
    """Say who approved the issue, and when; or that a send needs an approval."""
    approval = found.approval
    if approval is not None:
        typer.echo(
            f"  approved by {approval.approver} {_time(approval.approved_at, zone)} "
            f"(message {approval.digest[:12]}, {approval.size / 1000:.0f} KB)"
        )
    elif found.review_required:
        typer.echo(f"  not approved: `qant-mail approve {file} --by NAME` before the send")


def _approval_json(approval: Approval | None) -> dict[str, object] | None:
    if approval is None:
        return None
    return {
        "approver": approval.approver,
        "approved_at": approval.approved_at,
        "digest": approval.digest,
        "size": approval.size,
    }


def _standing(found: SendStatus, file: Path, zone: str) -> str:
    """Say how far a send got: sent and finished, running, or stopped unfinished."""
    from qant_mail.app.sending import State, left

    assert found.send is not None
    if found.running:
        return "running now"
    if found.send.finished_at:
        return f"sent {_time(found.send.finished_at, zone)} (finished)"
    todo = left(found.counts)
    if todo:
        return f"stopped unfinished, {todo} left (`qant-mail send {file}` goes on)"
    return f"stopped unfinished, {found.counts[State.FAILED]} failed (see below)"


def _waiting(waiting: Waiting, zone: str) -> None:
    """Say what waits in the outbox's queue, if anything does."""
    if not waiting.total:
        return
    kinds = ", ".join(f"{kind} {n}" for kind, n in waiting.by_kind.items())
    oldest = _time(waiting.oldest, zone)
    line = f"outbox: {waiting.total} waiting ({kinds}), the oldest since {oldest}"
    if waiting.last_reply:
        line += f"; last try: {waiting.last_reply}"
    typer.echo(line + " (`qant-mail outbox`)")


sends_app = typer.Typer(
    help="List the sends of every issue, the latest first, with what came back since; "
    "`sends show ISSUE --eml ADDRESS`: the message a reader got.",
)
app.add_typer(sends_app, name="sends")


@sends_app.callback(invoke_without_command=True)
def sends(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print the sends as JSON.")] = False,
) -> None:
    """List the sends of every issue, the latest first, with what came back since."""
    import json

    from qant_mail.app import sending
    from qant_mail.app.sending import State, left

    if ctx.invoked_subcommand is not None:
        return
    context = _context(ctx)
    settings = context.settings
    history = sending.history(context)
    found = history.sends
    approvals = history.approvals
    several = len(settings.editions) > 1  # a newsletter column, then
    if as_json:
        listed = [
            sending.summary_json(s) | {"approval": _approval_json(approvals.get(_key(s)))}
            for s in found
        ]
        typer.echo(json.dumps(listed, ensure_ascii=False, indent=2))
        return
    if not found:
        typer.echo("No send yet.")
        _waiting(history.waiting, _zone(settings, None))
        return
    zones = [_zone(settings, summary.send.newsletter) for summary in found]
    # Each time carries its offset; the header names the zone when every row shares it.
    shown_in = zones[0] if len(set(zones)) == 1 else "newsletter's zone"
    header: tuple[str, ...] = ("issue", *(["newsletter"] if several else []))
    header += (f"started ({shown_in})", f"finished ({shown_in})", "readers", "sent")
    header += ("failed", "unknown", "left", "bounced", "complaints", "unsubscribed")
    header += ("carried by", "approved by")
    rows = [header]
    for summary, zone in zip(found, zones, strict=True):
        send, counts = summary.send, summary.counts
        finished = "running" if summary.running else _time(send.finished_at, zone) or "stopped"
        rows.append(
            (
                send.issue,
                *([send.newsletter] if several else []),
                _time(send.created_at, zone),
                finished,
                *map(str, (summary.recipients, counts[State.SENT], counts[State.FAILED])),
                *map(
                    str, (counts[State.UNKNOWN], left(counts), summary.bounced, summary.complaints)
                ),
                str(summary.unsubscribed),
                _carried(summary.relays) or "-",
                _approver(approvals.get(_key(summary)), zone),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        cells = [
            cell.ljust(width) if i < 4 + several or i == len(header) - 1 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        typer.echo("  ".join(cells).rstrip())
    _waiting(history.waiting, _zone(settings, None))


@app.command()
def schedule(
    ctx: typer.Context,
    file: Annotated[
        Path | None, typer.Argument(help="The issue's YAML file (none: list the schedule).")
    ] = None,
    at: Annotated[
        str | None,
        typer.Option("--at", help="When: YYYY-MM-DD HH:MM, in newsletter.timezone."),
    ] = None,
    cancel: Annotated[bool, typer.Option("--cancel", help="Cancel its scheduled send.")] = False,
) -> None:
    """Set an issue to go to the list at a time; `qant-mail run-due` sends it then."""
    from qant_mail.app import schedule as schedules

    context = _context(ctx)
    if file is None:
        if at or cancel:
            raise typer.BadParameter("--at and --cancel go with an issue's file")
        found = schedules.schedules(context)
        if not found:
            typer.echo("Nothing scheduled.")
        for item in found:
            zone = schedules.time_zone(context, item.path)
            when = _time(item.due_at, zone)
            outcome = item.outcome.splitlines()[0] if item.outcome else ""
            typer.echo(f"{item.issue}  {when} ({zone})  {item.state}  {outcome}".rstrip())
        return
    if cancel == (at is not None):
        raise typer.BadParameter("give either --at TIME or --cancel")
    if cancel:
        schedules.cancel(context, file.stem)
        typer.echo(f"{file.stem}: its scheduled send is cancelled")
        return
    assert at is not None
    zone = schedules.time_zone(context, file)
    item = schedules.schedule(context, file, schedules.parse_time(context, at, zone))
    typer.echo(
        f"{item.issue} goes to the list at {_time(item.due_at, zone)} ({zone}), checked "
        "again then; `qant-mail run-due` sends it (run it from cron or a systemd timer: see "
        "the README)"
    )


@app.command("run-due")
def run_due(ctx: typer.Context) -> None:
    """Send the scheduled issues whose time has come, and what waits in the outbox
    (for cron or a systemd timer)."""
    from qant_mail.app import schedule as schedules

    with _terminate_as_interrupt():
        outcomes = schedules.run_due(_context(ctx))
    if outcomes is None:
        typer.echo("another `qant-mail run-due` is running: it sends what is due", err=True)
        return
    if not outcomes:
        typer.echo("nothing due")
    for outcome in outcomes:
        if outcome.state == "sent" and outcome.exit_code == ExitCode.OK:
            typer.echo(outcome.message)
        else:
            _error(outcome.message)
    raise typer.Exit(max((o.exit_code for o in outcomes), default=ExitCode.OK))


def _zone(settings: Settings, newsletter: str | None) -> str:
    """Return the time zone the times of `newsletter` are shown in: its own; the main
    newsletter's for a key the settings no longer name (a store from before a rename)."""
    try:
        return settings.for_newsletter(newsletter).newsletter.timezone
    except ConfigError:
        return settings.for_newsletter(None).newsletter.timezone


def _time(moment: str | float | dt.datetime | None, zone: str) -> str:
    """Return a time as every command shows it: in `zone`, to the minute, with its
    offset from UTC ("2026-12-05 15:42 +01:00"); "" for none."""
    if moment is None or moment == "":
        return ""
    if isinstance(moment, str):
        # As the store keeps them: ISO 8601 text, in UTC (an offset absent means UTC).
        moment = dt.datetime.fromisoformat(moment)
    elif not isinstance(moment, dt.datetime):
        moment = dt.datetime.fromtimestamp(moment, dt.UTC)  # a Unix time
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    local = moment.astimezone(zoneinfo.ZoneInfo(zone))
    # Written out: strftime's %z has no colon ("+0100") before Python 3.12's %:z.
    minutes = (local.utcoffset() or dt.timedelta()) // dt.timedelta(minutes=1)
    sign = "-" if minutes < 0 else "+"
    hours, minutes = divmod(abs(minutes), 60)
    return f"{local:%Y-%m-%d %H:%M} {sign}{hours:02d}:{minutes:02d}"


def _key(summary: SendSummary) -> tuple[str, str]:
    return (summary.send.newsletter, summary.send.issue)


def _approver(approval: Approval | None, zone: str) -> str:
    """Say who approved a sent issue, and when ("-": nobody)."""
    return f"{approval.approver}, {_time(approval.approved_at, zone)}" if approval else "-"


@sends_app.command("show")
def sends_show(
    ctx: typer.Context,
    issue: Annotated[str, typer.Argument(help="The issue (its file's name, or the file).")],
    eml: Annotated[
        str | None,
        typer.Option("--eml", help="The message this reader got, made again (.eml)."),
    ] = None,
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Write it to this file.")
    ] = None,
) -> None:
    """Show one send: the message a reader got (--eml ADDRESS), byte for byte but the
    signature's timestamp, made again from the message the send kept."""
    from qant_mail.app import approval

    if eml is None:
        raise typer.BadParameter("say whose message: --eml ADDRESS", param_hint="--eml")
    data = approval.reader_copy(_context(ctx), Path(issue).stem, eml)
    if output is None:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    from qant_mail.base.files import write_all

    write_all({output: data})
    typer.echo(f"wrote {_shown(output)}", err=True)


@app.command()
def approve(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="The issue's YAML file.")],
    by: Annotated[str, typer.Option("--by", help="Who approves (a name the team knows).")],
) -> None:
    """Approve exactly what goes out: the issue's message as it renders now, named by a
    digest; with [review] required, a send to the list goes only if it is unchanged."""
    from qant_mail.app import approval

    context = _context(ctx)
    done = approval.approve(context, file, by)
    approved = done.approval
    zone = _zone(context.settings, approved.newsletter)
    typer.echo(
        f"{approved.issue}: approved by {approved.approver} {_time(approved.approved_at, zone)}"
        f" (message {approved.digest[:12]}, {approved.size / 1000:.0f} KB)"
    )
    if done.previous is not None and not done.unchanged:
        typer.echo(
            f"  replaces the approval of {done.previous.approver} "
            f"{_time(done.previous.approved_at, zone)}, of another version",
            err=True,
        )
    if not done.required:
        typer.echo("  (review.required is not set: sends do not wait for an approval)", err=True)


def _carried(relays: Mapping[str, int]) -> str:
    """Say which relay took how many messages: "smtp.example.com:587 1200, …"."""
    return ", ".join(f"{relay} {number}" for relay, number in relays.items())


def _status_json(found: SendStatus) -> dict[str, object]:
    send = found.send
    approval = {
        "approval": _approval_json(found.approval),
        "review_required": found.review_required,
    }
    if send is None:
        return {"issue": found.issue, "planned": False, **approval}
    return {
        "issue": found.issue,
        "planned": True,
        **approval,
        "newsletter": send.newsletter,
        "subject": send.subject,
        "created_at": send.created_at,
        "finished_at": send.finished_at,
        "running": found.running,
        "rate": found.rate,
        "expected_finish": (
            found.expected_finish.isoformat(timespec="seconds") if found.expected_finish else None
        ),
        "counts": {state.value: n for state, n in found.counts.items()},
        "senders": [
            {"name": name, "started_at": started, "at_work": alive, "holding": held}
            for name, started, alive, held in found.senders
        ],
        "bounced": found.bounced,
        "soft_bounced": found.soft_bounced,
        "complaints": found.complaints,
        "relays": found.relays,
        "rows": {
            state.value: [
                {"email": r.email, "reply": r.last_reply, "attempts": r.attempts} for r in rows
            ]
            for state, rows in found.rows.items()
        },
    }


class _LogFormat(enum.StrEnum):
    TEXT = "text"
    JSON = "json"


_LogFormatOption = Annotated[
    _LogFormat,
    typer.Option("--log-format", help="The log on stdout: text, or json (an object a line)."),
]


@app.command()
def inbox(
    ctx: typer.Context,
    port: Annotated[
        int, typer.Option("--port", min=1, max=65535, help="Port to listen on, on 127.0.0.1.")
    ] = 2525,
    folder: Annotated[
        Path | None,
        typer.Option("--folder", help="Maildir to store messages in (default: data/inbox)."),
    ] = None,
    log_format: _LogFormatOption = _LogFormat.TEXT,
) -> None:
    """Run a local SMTP server that stores every message it gets as a .eml file."""
    import time

    from qant_mail.app.demo import local_inbox
    from qant_mail.base import logs

    local = local_inbox(_context(ctx), folder, port)
    target = local.folder
    logs.setup(log_format.value)
    with local as server:
        typer.echo(f"test inbox listening on {server.host}:{server.port}", err=True)
        typer.echo(f"messages are stored in {_shown(target / 'new')} (Ctrl-C to stop)", err=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            typer.echo(f"stopped; {server.received} messages received", err=True)


@app.command()
def demo(
    ctx: typer.Context,
    issue: Annotated[
        Path | None,
        typer.Option("--issue", help="The issue to send (default: the latest dated one)."),
    ] = None,
) -> None:
    """Render the sample and send it to the demo list through a local test inbox."""
    from qant_mail.app.demo import run_demo

    with _progress() as bar:
        result = run_demo(_context(ctx), issue, progress=bar)
    for path in result.rendered:
        typer.echo(f"rendered {_shown(path)}")
    imported = result.imported
    typer.echo(f"demo list: {imported.added} subscribers imported")
    if imported.rejected:
        # The repository's demo list holds a bad line on purpose: say what it shows.
        typer.echo("  as any import does, it left out what cannot be an address, saying why:")
    for line, reason in imported.rejected:
        typer.echo(f"  line {line} left out: {reason}")
    typer.echo(result.report.summary())
    count = len(result.delivered)
    typer.echo(f"{count} messages delivered to the test inbox; open them in any mail client:")
    for path in result.delivered:
        typer.echo(f"  {_shown(path)}")
    raise typer.Exit(result.report.exit_code)


@app.command()
def archive(
    ctx: typer.Context,
    output: Annotated[
        Path | None,
        typer.Option("-o", "--output", help="Folder of the site (default: out/archive)."),
    ] = None,
) -> None:
    """Write the web archive: an index of every issue, a page each, an Atom feed."""
    from qant_mail.app import issues

    report = issues.build_archive(_context(ctx), output)
    _left_out(report)
    typer.echo(f"archive of {len(report.entries)} issues in {_shown(report.folder)}")


def _left_out(report: ArchiveReport) -> None:
    for path, reason in report.left_out:
        typer.echo(f"left out {_shown(path)}: {reason}", err=True)


@app.command()
def serve(
    ctx: typer.Context,
    host: Annotated[
        str, typer.Option("--host", help="Address to listen on (a reverse proxy's upstream).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="Port.")] = 8000,
    site: Annotated[
        Path | None,
        typer.Option("--archive", help="Serve this built archive instead of building one."),
    ] = None,
    proxy_headers: Annotated[
        bool,
        typer.Option("--proxy-headers", help="Trust X-Forwarded-* from a proxy on 127.0.0.1."),
    ] = False,
    log_format: _LogFormatOption = _LogFormat.TEXT,
) -> None:
    """Serve the unsubscribe links, the signup forms and the reader's page, the archive
    and a health check; deliver what the outbox's queue holds."""
    from qant_mail.app import issues
    from qant_mail.base import logs
    from qant_mail.web.serve import create_app, request_log
    from qant_mail.web.webserver import listen, run

    context = _context(ctx)
    context.secret()  # no secret, no links: said now, not at the first request
    for key, why in context.outbox.sendable()[1].items():
        _warn([f"the outbox leaves the mail of {key} for a host that can send it: {why}"])
    if site is None:
        report = issues.build_archive(context)
        _left_out(report)
        site = report.folder
    sock = listen(host, port)
    bound = sock.getsockname()[1]
    typer.echo(f"serving {_shown(site)} and unsubscriptions on http://{host}:{bound}/", err=True)
    # No reader's address in the log, whatever logs it (a failed confirmation names one).
    logs.setup(log_format.value, hide_addresses=True)
    try:
        public = create_app(context, site)
        run(public, sock, proxy_headers=proxy_headers, access_log=request_log(context.settings))
    finally:
        sock.close()


@app.command()
def bounces(
    ctx: typer.Context,
    source: Annotated[
        str,
        typer.Argument(
            help="A Maildir, an mbox file, imaps://USER@HOST/FOLDER (password in "
            "QANT_BOUNCES_PASSWORD), or - for one message on standard input (a mail pipe)."
        ),
    ],
) -> None:
    """Read bounces and complaints; mark bounced and complained readers; record them."""
    from qant_mail.app.bounces import Outcome, process_source

    report = process_source(_context(ctx), source)
    for finding in report.findings:
        who = f" {finding.address}" if finding.address else ""
        issue = f" ({finding.issue})" if finding.issue else ""
        detail = f": {finding.detail}" if finding.detail else ""
        typer.echo(f"{finding.source}: {finding.outcome.value}{who}{issue}{detail}")
    counts = report.counts
    summary = ", ".join(
        f"{outcome.value} {counts[outcome]}" for outcome in Outcome if counts[outcome]
    )
    typer.echo(f"{len(report.findings)} read: {summary or 'nothing'}", err=True)


class _KeyKind(enum.StrEnum):
    RSA = "rsa"
    ED25519 = "ed25519"


dkim_app = typer.Typer(help="DKIM keys.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(dkim_app, name="dkim")


@dkim_app.command("keygen")
def dkim_keygen(
    ctx: typer.Context,
    kind: Annotated[
        _KeyKind, typer.Option("--type", help="rsa (2048 bits, read everywhere) or ed25519.")
    ] = _KeyKind.RSA,
    selector: Annotated[
        str | None,
        typer.Option("--selector", help="The key's name in DNS (default: qant + the year)."),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "-o",
            "--out",
            help="The private key's file, or a folder for SELECTOR.private.pem (default: "
            "$XDG_CONFIG_HOME or ~/.config, then qant-mail/keys/DOMAIN/).",
            show_default=False,
        ),
    ] = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="Replace an existing key; write in the project or a git work tree."
        ),
    ] = False,
) -> None:
    """Write a DKIM key pair and print the DNS records to publish (DKIM, SPF, DMARC)."""
    from qant_mail.app.keys import keygen

    key = keygen(_context(ctx), kind.value, selector, out, force=force)
    dkim_record, spf, dmarc = key.dns
    typer.echo(f"wrote {_shown(key.path)} (the private key, readable by you only)")
    typer.echo("")
    typer.echo("Publish in DNS:")
    typer.echo(dkim_record)
    typer.echo("")
    typer.echo("and, if not there already (adapt SPF to the relays you send through):")
    typer.echo(spf)
    typer.echo(dmarc)
    typer.echo("")
    typer.echo(
        f'Then, in qant.toml: [dkim] {key.setting} = "{key.selector}"; and in the environment:'
    )
    typer.echo(f"{key.variable}_FILE={key.path.resolve()}")


db_app = typer.Typer(
    help="The store itself: its schema version, migrations, and copies between SQLite and "
    "PostgreSQL.",
    no_args_is_help=True,
)
app.add_typer(db_app, name="db")


@db_app.command("status")
def db_status(ctx: typer.Context) -> None:
    """Say which store the settings name, its schema version and its rows per table."""
    from qant_mail.app import database

    found = database.status(_context(ctx))
    typer.echo(f"{found.description} ({found.dialect}), schema {found.version}")
    for table, rows in found.rows.items():
        typer.echo(f"  {table}\t{rows}")


@db_app.command("migrate")
def db_migrate(ctx: typer.Context) -> None:
    """Bring the store to this qant-mail's schema (a PostgreSQL store is never migrated
    by another command: run this once, from one host, when upgrading)."""
    from qant_mail.app import database

    described, version = database.migrate(_context(ctx))
    typer.echo(f"{described}: at schema {version}")


@db_app.command("copy")
def db_copy(
    source: Annotated[str, typer.Argument(help="The store to copy: a file or a URL.")],
    target: Annotated[str, typer.Argument(help="An empty store to copy into.")],
) -> None:
    """Copy every row of one store into another, empty one (SQLite into PostgreSQL and
    back), in one transaction, checked by the counts of each table."""
    from qant_mail.app import database

    copied = database.copy(source, target)
    total = sum(copied.counts.values())
    typer.echo(
        f"copied {total} rows into {copied.description}: "
        + ", ".join(f"{table} {n}" for table, n in copied.counts.items() if n)
    )


subscribers_app = typer.Typer(
    help="Manage the subscriber list.", no_args_is_help=True, rich_markup_mode=None
)
app.add_typer(subscribers_app, name="subscribers")


_TEST_DOMAINS = typer.Option(
    "--allow-test-domains", help="Accept the reserved .test domains (for trying things out)."
)
_NEWSLETTER = typer.Option(
    "--newsletter",
    "-n",
    help="The newsletter's key, as in [newsletters.NAME] (default: the main one).",
    show_default=False,
)


@subscribers_app.command("import")
def subscribers_import(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="CSV with an `email` column, `name` optional.")],
    source: Annotated[
        str | None, typer.Option("--source", help="Where these people came from.")
    ] = None,
    test_domains: Annotated[bool, _TEST_DOMAINS] = False,
    newsletter: Annotated[str | None, _NEWSLETTER] = None,
) -> None:
    """Import subscribers from a CSV file; re-importing changes nothing."""
    from qant_mail.app import readers

    report = readers.import_csv(
        _context(ctx), file, source, test_domains=test_domains, newsletter=newsletter
    )
    typer.echo(
        f"added {report.added}, updated {report.renamed}, unchanged {report.unchanged}, "
        f"kept inactive {report.inactive}, removed earlier {report.suppressed}, "
        f"duplicates {report.duplicates}, rejected {report.rejected_count}"
    )
    for line, reason in report.rejected:
        typer.echo(f"{file}:{line}: {reason}", err=True)
    if report.rejected_count > len(report.rejected):
        typer.echo(f"… and {report.rejected_count - len(report.rejected)} more", err=True)
    if report.rejected_count:
        raise typer.Exit(ExitCode.PARTIAL)


@subscribers_app.command("add")
def subscribers_add(
    ctx: typer.Context,
    address: Annotated[str, typer.Argument(help="Email address.")],
    name: Annotated[str, typer.Option("--name", help="Their name.")] = "",
    resubscribe: Annotated[
        bool,
        typer.Option("--resubscribe", help="Re-activate an unsubscribed or removed address."),
    ] = False,
    test_domains: Annotated[bool, _TEST_DOMAINS] = False,
    newsletter: Annotated[str | None, _NEWSLETTER] = None,
) -> None:
    """Add one subscriber."""
    from qant_mail.app import readers

    subscriber = readers.add(
        _context(ctx),
        address,
        name,
        resubscribe=resubscribe,
        test_domains=test_domains,
        newsletter=newsletter,
    )
    typer.echo(f"{subscriber.email}: {subscriber.status}")


@subscribers_app.command("remove")
def subscribers_remove(
    ctx: typer.Context, address: Annotated[str, typer.Argument(help="Email address.")]
) -> None:
    """Delete a subscriber and their data."""
    from qant_mail.app import readers

    subscriber = readers.remove(_context(ctx), address)
    typer.echo(f"{subscriber.email}: removed")


@subscribers_app.command("unsubscribe")
def subscribers_unsubscribe(
    ctx: typer.Context,
    newsletter: Annotated[str | None, _NEWSLETTER] = None,
    address: Annotated[
        str | None, typer.Argument(help="Email address (or --from-message).", show_default=False)
    ] = None,
    reason: Annotated[str, typer.Option("--reason", help="Why.")] = "command line",
    from_message: Annotated[
        bool,
        typer.Option(
            "--from-message",
            help="Read an email on standard input and unsubscribe its sender (mailto links); "
            "exits with sysexits codes for a mail server's pipe.",
        ),
    ] = False,
) -> None:
    """Mark a subscriber unsubscribed (kept, so that no import re-activates them)."""
    if from_message:
        _unsubscribe_from_message(ctx, newsletter)
        return
    from qant_mail.app import readers

    if not address:
        raise typer.BadParameter("give an ADDRESS, or --from-message")
    subscriber = readers.unsubscribe(_context(ctx), address, reason, newsletter=newsletter)
    typer.echo(f"{subscriber.email}: {subscriber.status} ({subscriber.status_reason})")


def _unsubscribe_from_message(ctx: typer.Context, newsletter: str | None) -> None:
    """Unsubscribe the sender of the message on standard input (a mail alias), with the
    status a mail server reads (sysexits)."""
    from qant_mail.app import readers

    message = sys.stdin.buffer.read(readers.MAX_MESSAGE + 1)
    outcome = readers.unsubscribe_by_mail(lambda: _context(ctx), message, newsletter)
    if not outcome.ok:
        _error(outcome.message)
        raise typer.Exit(outcome.exit_code)
    typer.echo(outcome.message)


@subscribers_app.command("list")
def subscribers_list(
    ctx: typer.Context,
    newsletter: Annotated[str | None, _NEWSLETTER] = None,
    status: Annotated[
        str | None, typer.Option("--status", help="Only this status (active, unsubscribed…).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="As JSON lines, for scripts.")] = False,
) -> None:
    """List subscribers: address, name, status, since when."""
    import json

    from qant_mail.app import readers

    context = _context(ctx)
    zone = _zone(context.settings, newsletter)
    for subscriber in readers.listing(context, _status(status), newsletter=newsletter):
        if as_json:
            typer.echo(
                json.dumps(
                    {
                        "email": subscriber.email,
                        "name": subscriber.name,
                        "status": subscriber.status.value,
                        "since": subscriber.status_changed_at,
                        "joined": subscriber.created_at,
                    },
                    ensure_ascii=False,
                )
            )
        else:
            typer.echo(
                f"{subscriber.email}\t{subscriber.name}\t{subscriber.status}\t"
                f"{_time(subscriber.status_changed_at, zone)}"
            )


@subscribers_app.command("count")
def subscribers_count(
    ctx: typer.Context,
    newsletter: Annotated[str | None, _NEWSLETTER] = None,
    as_json: Annotated[bool, typer.Option("--json", help="As JSON, for scripts.")] = False,
) -> None:
    """Count subscribers by status."""
    import json

    from qant_mail.app import readers

    counts = readers.count(_context(ctx), newsletter=newsletter)
    total = sum(counts.values())
    if as_json:
        typer.echo(json.dumps({**{s.value: n for s, n in counts.items()}, "total": total}))
        return
    for state, number in counts.items():
        typer.echo(f"{state.value}\t{number}")
    typer.echo(f"total\t{total}")


@subscribers_app.command("export")
def subscribers_export(
    ctx: typer.Context,
    newsletter: Annotated[str | None, _NEWSLETTER] = None,
    file: Annotated[
        Path | None, typer.Argument(help="CSV file to write (default: standard output).")
    ] = None,
    status: Annotated[str | None, typer.Option("--status", help="Only this status.")] = None,
) -> None:
    """Export subscribers as CSV."""
    from qant_mail.app import readers

    context = _context(ctx)
    if file is None:
        readers.export(context, sys.stdout, _status(status), newsletter=newsletter)
        return
    written = readers.export_file(context, file, _status(status), newsletter=newsletter)
    typer.echo(f"wrote {written} subscribers to {_shown(file)}")


@subscribers_app.command("rename-newsletter")
def subscribers_rename_newsletter(
    ctx: typer.Context,
    old: Annotated[str, typer.Argument(help="The key the store has now.")],
    new: Annotated[str, typer.Argument(help="The newsletter's key in the settings.")],
) -> None:
    """Move a newsletter's subscriptions and sends to a new key, after changing its key
    (or the main newsletter's `id`) in the settings."""
    from qant_mail.app import readers

    moved = readers.rename_newsletter(_context(ctx), old, new)
    typer.echo(f"{old} → {new}: {moved} subscriptions moved")


@app.command("stats")
def stats(
    ctx: typer.Context,
    newsletter: Annotated[str | None, _NEWSLETTER] = None,
    since: Annotated[
        str | None,
        typer.Option(
            "--since",
            help="The first day, YYYY-MM-DD (default: twelve weeks ago, or the first reader's).",
            show_default=False,
        ),
    ] = None,
    by: Annotated[
        str | None,
        typer.Option(
            "--by", help="day or week (default: by day up to two months).", show_default=False
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the figures as JSON.")] = False,
    html_dir: Annotated[
        Path | None,
        typer.Option("--html", metavar="DIR", help="Write a report with charts: DIR/index.html."),
    ] = None,
) -> None:
    """Show each newsletter's readers, joins by source, leaves by way, bounces and
    complaints over a period, and what became of each send: counts the store keeps, no
    tracking of readers."""
    import json

    from qant_mail.app import report
    from qant_mail.app import stats as figures

    if by not in (None, "day", "week"):
        raise typer.BadParameter("day or week", param_hint="--by")
    try:
        first = dt.date.fromisoformat(since) if since else None
    except ValueError as err:
        raise typer.BadParameter("a day written YYYY-MM-DD", param_hint="--since") from err
    context = _context(ctx)
    period: figures.By | None = "week" if by == "week" else "day" if by == "day" else None
    found = figures.stats(context, newsletter, first, period)
    if html_dir is not None:
        typer.echo(f"{report.write_report(context, found, html_dir)}", err=as_json)
    if as_json:
        typer.echo(json.dumps(found.to_json(), ensure_ascii=False, indent=2))
    elif html_dir is None:
        _print_stats(found)


def _print_stats(found: Any) -> None:
    """Print the figures of `app.stats.Stats` as tables with small bars (rich)."""
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False)
    for news in found.newsletters:
        console.print(
            f"[bold]{news.name}[/bold] ({news.key}): {news.active} readers now, "
            f"{news.active_at_start} on {found.since.isoformat()}"
        )
        console.print(f"by {found.by} to {found.until.isoformat()}, days in {news.timezone}")
        periods = Table(box=None, pad_edge=False)
        for name in ("period", "readers", "", "joined", "", "left", "bounced", "complained"):
            periods.add_column(
                name, justify="left" if name in ("period", "") else "right", no_wrap=True
            )
        top_active = max((p.active for p in news.periods), default=0)
        top_moves = max((max(p.joins, p.leaves) for p in news.periods), default=0)
        for p in news.periods:
            periods.add_row(
                p.start.isoformat(),
                str(p.active),
                f"[blue]{_bar(p.active, top_active, 12)}[/blue]",
                str(p.joins),
                f"[green]{_bar(p.joins, top_moves, 6)}[/green]",
                str(sum(p.left.values())),
                str(p.bounced),
                str(p.complained),
            )
        console.print(periods)
        joined = ", ".join(f"{k} {n}" for k, n in news.joined.items() if n) or "none"
        left = ", ".join(f"{k} {n}" for k, n in news.left.items() if n) or "none"
        console.print(f"joined by source: {joined}")
        console.print(f"left by way: {left}; bounced {news.bounced}; complained {news.complained}")
        if not news.sends:
            console.print("No send in the period.\n")
            continue
        sends = Table(box=None, pad_edge=False, collapse_padding=True)
        for name in ("issue", "sent on", "readers", "delivered", "", "failed", "bounced"):
            sends.add_column(
                name, justify="left" if name in ("issue", "sent on", "") else "right", no_wrap=True
            )
        sends.add_column("spam", justify="right")  # complaints: "this is spam" reports
        sends.add_column("left ≤7d", justify="right")
        top = max(s.recipients for s in news.sends)
        for s in news.sends:
            sends.add_row(
                s.issue,
                s.started_at.date().isoformat(),
                str(s.recipients),
                str(s.delivered),
                f"[blue]{_bar(s.delivered, top, 6)}[/blue]",
                str(s.failed),
                str(s.bounced),
                str(s.complained),
                str(s.unsubscribed),
            )
        console.print(sends)
        if news.links:  # counted links ([audience] count_clicks): counts, never who
            most = sorted(news.links, key=lambda c: -c.clicks)[:5]
            shown = ", ".join(f"{c.url} {c.clicks}" for c in most)
            console.print(f"links most followed: {shown}", soft_wrap=True, markup=False)
        console.print()


def _bar(value: int, top: int, width: int) -> str:
    """Return a bar of `value` out of `top` in `width` characters, to an eighth of one."""
    eighths = round(8 * width * value / top) if top else 0
    return "█" * (eighths // 8) + ("", "▏", "▎", "▍", "▌", "▋", "▊", "▉")[eighths % 8]


@app.command("newsletters")
def newsletters(ctx: typer.Context) -> None:
    """List the newsletters of the settings with their active readers, and any key the
    store has subscriptions to that the settings no longer name."""
    from qant_mail.app import readers

    found = readers.newsletters(_context(ctx))
    for key, name, main, active in found.known:
        typer.echo(f"{key}{' (main)' if main else ''}\t{name}\t{active} active")
    for key, subscriptions in found.unknown.items():
        _error(
            f"the store has {subscriptions} subscriptions to {key!r}, which the settings do "
            f"not name: rename it with `qant-mail subscribers rename-newsletter {key} NEW`"
        )


def _status(value: str | None) -> Status | None:
    from qant_mail.app.readers import parse_status

    if value is None:
        return None
    try:
        return parse_status(value)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from err


@app.command("outbox")
def outbox(
    ctx: typer.Context,
    deliver: Annotated[
        bool, typer.Option("--deliver", help="Deliver what is due now, then list.")
    ] = False,
    everything: Annotated[
        bool, typer.Option("--all", help="List the messages done too (sent, failed, expired).")
    ] = False,
) -> None:
    """List the messages to one reader (confirmations, welcomes, tests) that wait in the
    outbox's queue, and the latest done with --all; --deliver sends what is due."""
    from qant_mail.app import sending

    context = _context(ctx)
    settings = context.settings
    if deliver:
        report = sending.deliver_queued(context)
        typer.echo(
            f"delivered {report.sent}, to try again {report.deferred}, failed {report.failed}",
            err=True,
        )
        for problem in report.problems:
            typer.echo(f"  {problem}", err=True)
    found = sending.queue(context, everything=everything)
    if not found.entries:
        typer.echo("Nothing waits in the outbox." if not everything else "The outbox is empty.")
        return
    for entry in found.entries:
        due = ""
        if entry.state.value == "pending":
            due = f", next try {_time(entry.next_attempt_at, _zone(settings, entry.newsletter))}"
        reply = f": {entry.last_reply}" if entry.last_reply else ""
        typer.echo(
            f"{entry.id}\t{entry.kind}\t{entry.newsletter}\t{entry.recipient}\t"
            f"{entry.state.value} ({entry.attempts} tries{due}){reply}"
        )


def _warn(warnings: list[str]) -> None:
    for warning in warnings:
        typer.echo(f"warning: {warning}", err=True)


class _Notes:
    """The progress of a send without a terminal to draw on (a timer, a pipe, a log):
    no bar, only its notes, a line each on standard error."""

    def __enter__(self) -> _Notes:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def start(self, total: int) -> None:
        pass

    def advance(self, state: State) -> None:
        pass

    def note(self, message: str) -> None:
        typer.echo(message, err=True)


def _progress() -> _ProgressBar | _Notes:
    """Return the progress of a long job: a bar on a terminal, its notes elsewhere (a
    bar there shows nothing, and rich is a tenth of a send's start-up). As rich itself,
    TTY_COMPATIBLE (1 or 0) or FORCE_COLOR, set, say what the terminal is."""
    said = os.environ.get("TTY_COMPATIBLE", "")
    if said in ("0", "1"):
        terminal = said == "1"
    else:
        terminal = bool(os.environ.get("FORCE_COLOR")) or sys.stderr.isatty()
    return _ProgressBar() if terminal else _Notes()


class _ProgressBar:
    """A progress bar on standard error (rich), with rate and time left."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(
            TextColumn("sending"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        self.task: TaskID | None = None
        self.started = self.shown_at = 0.0
        self.done = self.unshown = 0

    def __enter__(self) -> _ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.stop()

    def start(self, total: int) -> None:
        import time

        self.started = time.monotonic()
        self.task = self.bar.add_task("send", total=total, rate="")
        self.bar.start()

    def advance(self, state: State) -> None:
        import time

        self.done += 1
        self.unshown += 1
        now = time.monotonic()
        # The bar is redrawn ten times a second: an update per message (rich takes a lock
        # and keeps speed samples) would cost more than the bar shows.
        if now - self.shown_at < 0.1 or self.task is None:
            return
        elapsed = now - self.started
        rate = f"{self.done / elapsed:.0f} msg/s" if elapsed > 0.5 else ""
        self.bar.update(self.task, advance=self.unshown, rate=rate)
        self.unshown, self.shown_at = 0, now

    def note(self, message: str) -> None:
        self.bar.console.print(message, markup=False, highlight=False)


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """Make SIGTERM (a `kill`, a service manager stopping us) stop a send as Ctrl-C does:
    the messages in flight are recorded and the summary printed."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _parse_date(value: str) -> dt.date:
    try:
        return dt.date.fromisoformat(value)
    except ValueError as err:
        raise typer.BadParameter(f"{value!r} is not a date written YYYY-MM-DD") from err


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


class _LazyCommands(MutableMapping[str, "ClickCommand"]):
    """The command table of the command line, each command built from its function the
    first time it is looked up.

    Typer builds every command before parsing anything: the signatures of some 40
    functions read, their annotations evaluated, a fifth of `qant-mail render`'s own
    start-up. A run looks up one command (`--help` lists them all, built then)."""

    def __init__(self, typer_app: typer.Typer) -> None:
        self._app = typer_app
        self._infos: dict[str, CommandInfo | TyperInfo] = {}
        for command in typer_app.registered_commands:
            assert command.callback is not None
            self._infos[command.name or typer.main.get_command_name(command.callback.__name__)] = (
                command
            )
        for group in typer_app.registered_groups:
            assert isinstance(group.name, str), "every group of the command line has a name"
            self._infos[group.name] = group
        self._built: dict[str, ClickCommand] = {}

    def __getitem__(self, name: str) -> ClickCommand:
        built = self._built.get(name)
        if built is None:
            info = self._infos[name]  # KeyError: no such command, as a dict says it
            if isinstance(info, TyperInfo):
                built = typer.main.get_group_from_info(
                    info,
                    pretty_exceptions_short=self._app.pretty_exceptions_short,
                    rich_markup_mode=self._app.rich_markup_mode,
                    suggest_commands=self._app.suggest_commands,
                )
            else:
                built = typer.main.get_command_from_info(
                    info,
                    pretty_exceptions_short=self._app.pretty_exceptions_short,
                    rich_markup_mode=self._app.rich_markup_mode,
                )
            self._built[name] = built
        return built

    def __setitem__(self, name: str, command: ClickCommand) -> None:
        self._built[name] = command
        self._infos.setdefault(name, TyperInfo(name=name))

    def __delitem__(self, name: str) -> None:
        del self._infos[name]
        self._built.pop(name, None)

    def __iter__(self) -> Iterator[str]:
        return iter(self._infos)

    def __len__(self) -> int:
        return len(self._infos)


def command_line(typer_app: typer.Typer = app) -> ClickCommand:
    """Return the click command of `typer_app` whose subcommands are built as they are
    looked up: what `main` runs (Typer's own build, which tests use, makes them all)."""
    commands, groups = typer_app.registered_commands, typer_app.registered_groups
    typer_app.registered_commands, typer_app.registered_groups = [], []
    try:
        group = typer.main.get_command(typer_app)  # the group: its options and callback
    finally:
        typer_app.registered_commands, typer_app.registered_groups = commands, groups
    assert isinstance(group, TyperGroup)
    group.commands = _LazyCommands(typer_app)
    return group


def main() -> None:
    """Run the command line."""
    # qant-mail uses no pydantic plugin; looking for them scans the metadata of every
    # installed package, a quarter of a render's start-up. Users who want one can say so.
    os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")
    try:
        command_line()(prog_name="qant-mail")
        code: object = 0
    except SystemExit as done:
        code = done.code
    if not isinstance(code, int):
        if code is not None:
            print(code, file=sys.stderr)
        code = 0 if code is None else 1
    # Every command has closed its files and databases by now (each opens them in a
    # `with`), so the interpreter's own tear-down, collecting some 50,000 objects one by
    # one, is pure waste: a sixth of a render's time. Flush what is written, and leave.
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (BrokenPipeError, ValueError):
        pass  # whoever read the output stopped reading (`| head`): nothing left to say
    os._exit(code)
