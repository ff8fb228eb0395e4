"""The `qant-mail` command: parses arguments, calls the library, reports errors."""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import os
import signal
import traceback
from collections.abc import Callable, Iterator
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
            raise typer.Exit(err.exit_code) from err
        except QantError as err:
            if _options.debug:
                traceback.print_exc()
            _error(str(err))
            raise typer.Exit(err.exit_code) from err
        except KeyboardInterrupt as err:
            _error("interrupted")
            raise typer.Exit(ExitCode.INTERRUPTED) from err

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
def schema(
    output: Annotated[
        Path | None,
        typer.Option("-o", "--output", help="File to write (default: standard output)."),
    ] = None,
) -> None:
    """Print the JSON Schema of an issue file, for editors' YAML plugins."""
    from qant_mail.draft import write_schema
    from qant_mail.model import json_schema

    if output is None:
        typer.echo(json_schema(), nl=False)
        return
    write_schema(output)
    typer.echo(f"wrote {_shown(output)}")


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


@app.command()
@_handled
def preview(
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

    from qant_mail.config import find_config
    from qant_mail.preview import Preview, create_app
    from qant_mail.webserver import listen, run

    settings_path = _options.config or find_config()
    _settings()  # settings that do not load are an error now, not a blank page
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
@_handled
def send(
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
) -> None:
    """Send an issue to every active subscriber, or a test to some addresses (--to)."""
    from qant_mail import send as sending
    from qant_mail.addresses import normalise_address
    from qant_mail.transport import SmtpTransport

    settings = _settings()
    if to is not None:
        addresses = [normalise_address(a) for a in to.split(",") if a.strip()]
        if not addresses:
            raise typer.BadParameter("give at least one address", param_hint="--to")
        prepared = sending.prepare(file, settings, test=True)
        _warn(prepared.warnings)
        transport = SmtpTransport(settings)
        sending.require_signature(settings, prepared.template.keys, transport)
        failed = 0
        for address, reply in sending.send_test(prepared, settings, transport, addresses):
            typer.echo(f"{address}: {reply}")
            failed += not reply.ok
        if failed:
            raise typer.Exit(ExitCode.PARTIAL)
        return
    prepared = sending.prepare(file, settings)
    _warn(prepared.warnings)
    if dry_run:
        folder = output or settings.output_dir / "dry-run" / file.stem
        with _ProgressBar() as bar, _terminate_as_interrupt():
            report = sending.dry_run(prepared, settings, folder, progress=bar, limit=limit)
        typer.echo(_summary(report))
        typer.echo(f"messages written to {_shown(folder / 'new')}")
        return
    transport = SmtpTransport(settings)
    plan = sending.plan(prepared, settings, transport)
    if plan.recipients == 0:
        typer.echo(_already_done(file, plan))
        raise typer.Exit(ExitCode.OK if not plan.already else _settled_code(plan))
    count = min(plan.recipients, limit) if limit else plan.recipients
    where = "not served yet" if plan.resuming else "active subscribers"
    typer.echo(f"Subject:    {plan.subject}", err=True)
    typer.echo(
        f"Recipients: {count} {where}" + (f" (of {plan.recipients})" if limit else ""), err=True
    )
    typer.echo(f"Server:     {plan.server}", err=True)
    typer.echo(f"DKIM:       {plan.signing}", err=True)
    if not yes:
        try:
            confirmed = typer.confirm("Send?", err=True)
        except typer.Abort as err:
            _error("no answer to “Send?” (no terminal?): add --yes to send without asking")
            raise typer.Exit(ExitCode.INVALID) from err
        if not confirmed:
            typer.echo("nothing sent", err=True)
            raise typer.Exit(ExitCode.OK)
    with _ProgressBar() as bar, _terminate_as_interrupt():
        report = sending.send_to_list(
            prepared,
            settings,
            transport,
            progress=bar,
            limit=limit,
            wait_for_retries=not no_wait,
            accept_changes=accept_changes,
        )
    typer.echo(_summary(report))
    if report.exit_code != ExitCode.OK:
        typer.echo(_hint(file, report), err=True)
    raise typer.Exit(report.exit_code)


@app.command()
@_handled
def status(
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
) -> None:
    """Show where the send of an issue stands: counts, failures, unknowns."""
    from qant_mail.ledger import Ledger, State

    settings = _settings()
    ledger = Ledger(settings.store_path)
    send = ledger.find(file.stem)
    if send is None:
        typer.echo(f"{file.stem} has not been sent (no send planned).")
        return
    if requeue_unknown and mark_unknown_sent:
        raise typer.BadParameter("choose one of --requeue-unknown and --mark-unknown-sent")
    if (reason or address or force) and not requeue_failed:
        raise typer.BadParameter("--reason, --address and --force go with --requeue-failed")
    if requeue_unknown or mark_unknown_sent:
        changed = ledger.resolve_unknown(send, State.PENDING if requeue_unknown else State.SENT)
        verb = "re-queued" if requeue_unknown else "marked sent"
        typer.echo(f"{changed} unknown {verb}")
    if requeue_failed:
        result = ledger.requeue_failed(
            send, containing=reason, addresses=address or (), force=force
        )
        typer.echo(f"{result.requeued} failed re-queued: `qant-mail send {file}` sends them")
        for email, state in result.refused:
            hint = " (--force sends it anyway)" if state == "bounced" else ""
            typer.echo(f"  {email}: not re-queued, the subscriber is {state}{hint}", err=True)
        for email in result.missing:
            typer.echo(f"  {email}: no failed message to it in this send", err=True)
    counts = ledger.counts(send)
    typer.echo(f"{send.issue}: “{send.subject}”, planned {send.created_at}")
    typer.echo("  " + ", ".join(f"{state.value} {counts[state]}" for state in State))
    hard, soft, complaints = ledger.feedback_counts(send)
    if hard or soft or complaints:
        typer.echo(
            f"  afterwards: {hard} bounced, {soft} bounced for now (soft), "
            f"{complaints} complaints (`qant-mail bounces` reads them)"
        )
    for state in (State.FAILED, State.UNKNOWN, State.DEFERRED):
        rows = ledger.deliveries(send, state)
        if rows:
            typer.echo(f"{state.value}:")
            for row in rows:
                typer.echo(f"  {row.email}: {row.last_reply} ({row.attempts} attempts)")
    if counts[State.SENDING]:
        if ledger.running(send.issue):
            typer.echo(
                f"sending: {counts[State.SENDING]} in flight in a `send` running now", err=True
            )
        else:
            typer.echo(
                f"sending: {counts[State.SENDING]} were in flight when a run stopped without "
                "finishing (killed?); the next `send` sends them again, and each may arrive "
                "twice",
                err=True,
            )
    if counts[State.UNKNOWN]:
        typer.echo(
            "unknown: the connection broke after the message was sent, so it may have "
            "arrived; --requeue-unknown sends them again, --mark-unknown-sent does not",
            err=True,
        )
    if counts[State.FAILED] and not requeue_failed:
        typer.echo(
            "failed: --requeue-failed [--reason TEXT] [--address A] sends them again "
            "(after a full mailbox, a size limit, a server that gave up)",
            err=True,
        )


@app.command()
@_handled
def inbox(
    port: Annotated[
        int, typer.Option("--port", min=1, max=65535, help="Port to listen on, on 127.0.0.1.")
    ] = 2525,
    folder: Annotated[
        Path | None,
        typer.Option("--folder", help="Maildir to store messages in (default: data/inbox)."),
    ] = None,
) -> None:
    """Run a local SMTP server that stores every message it gets as a .eml file."""
    import time

    from qant_mail.inbox import Inbox

    settings = _settings()
    target = folder or settings.root / "data" / "inbox"
    with Inbox(target, port=port) as server:
        typer.echo(f"test inbox listening on {server.host}:{server.port}", err=True)
        typer.echo(f"messages are stored in {_shown(target / 'new')} (Ctrl-C to stop)", err=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            typer.echo(f"stopped; {server.received} messages received", err=True)


@app.command()
@_handled
def demo(
    issue: Annotated[Path, typer.Option("--issue", help="The issue to send.")] = Path(
        "issues/2023-11-20.yaml"
    ),
) -> None:
    """Render the sample and send it to the demo list through a local test inbox."""
    from qant_mail.demo import run_demo

    settings = _settings()
    with _ProgressBar() as bar:
        result = run_demo(settings, issue, progress=bar)
    for path in result.rendered:
        typer.echo(f"rendered {_shown(path)}")
    imported = result.imported
    typer.echo(f"demo list: {imported.added} subscribers imported")
    for line, reason in imported.rejected:
        typer.echo(f"  line {line} rejected: {reason}")
    typer.echo(_summary(result.report))
    count = len(result.delivered)
    typer.echo(f"{count} messages delivered to the test inbox; open them in any mail client:")
    for path in result.delivered:
        typer.echo(f"  {_shown(path)}")
    raise typer.Exit(result.report.exit_code)


@app.command()
@_handled
def archive(
    output: Annotated[
        Path | None,
        typer.Option("-o", "--output", help="Folder of the site (default: out/archive)."),
    ] = None,
) -> None:
    """Write the web archive: an index of every issue, a page each, an Atom feed."""
    from qant_mail.archive import build_archive

    settings = _settings()
    folder = output or settings.output_dir / "archive"
    report = build_archive(settings, folder)
    _left_out(report)
    typer.echo(f"archive of {len(report.entries)} issues in {_shown(folder)}")


def _left_out(report: Any) -> None:
    for path, reason in report.left_out:
        typer.echo(f"left out {_shown(path)}: {reason}", err=True)


@app.command()
@_handled
def serve(
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
) -> None:
    """Serve the unsubscribe links, the archive and a health check."""
    from qant_mail import tokens
    from qant_mail.archive import build_archive
    from qant_mail.serve import create_app
    from qant_mail.webserver import listen, run

    settings = _settings()
    secret = tokens.secret_from_env()
    if site is None:
        site = settings.output_dir / "archive"
        _left_out(build_archive(settings, site))
    sock = listen(host, port)
    bound = sock.getsockname()[1]
    typer.echo(f"serving {_shown(site)} and unsubscriptions on http://{host}:{bound}/", err=True)
    try:
        run(create_app(settings, site, secret), sock, proxy_headers=proxy_headers)
    finally:
        sock.close()


@app.command()
@_handled
def bounces(
    source: Annotated[
        str,
        typer.Argument(
            help="A Maildir, an mbox file, imaps://USER@HOST/FOLDER (password in "
            "QANT_BOUNCES_PASSWORD), or - for one message on standard input (a mail pipe)."
        ),
    ],
) -> None:
    """Read bounces and complaints; mark bounced and complained readers; record them."""
    from qant_mail import tokens
    from qant_mail.bounces import Outcome, process, read_source
    from qant_mail.errors import ConfigError
    from qant_mail.store import StoreError

    settings = _settings()
    secret = tokens.secret_from_env()
    try:
        report = process(settings, read_source(source), secret)
    except (StoreError, ConfigError) as err:
        if source != "-":
            raise
        # From a mail server's pipe: try again later, never bounce a bounce.
        _error(f"{err} (the mail server will try again later)")
        raise typer.Exit(EX_TEMPFAIL) from err
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


dkim_app = typer.Typer(help="DKIM keys.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(dkim_app, name="dkim")


@dkim_app.command("keygen")
@_handled
def dkim_keygen(
    kind: Annotated[
        str, typer.Option("--type", help="rsa (2048 bits, read everywhere) or ed25519.")
    ] = "rsa",
    selector: Annotated[
        str | None,
        typer.Option("--selector", help="The key's name in DNS (default: qant + the year)."),
    ] = None,
    output: Annotated[
        Path, typer.Option("-o", "--output", help="Folder for SELECTOR.private.pem.")
    ] = Path(),
) -> None:
    """Write a DKIM key pair and print the DNS records to publish (DKIM, SPF, DMARC)."""
    from qant_mail import dkim
    from qant_mail.files import create_new

    if kind not in ("rsa", "ed25519"):
        raise typer.BadParameter("rsa or ed25519", param_hint="--type")
    settings = _settings()
    name = selector or f"qant{dt.date.today().year}{'e' if kind == 'ed25519' else ''}"
    domain = settings.dkim.domain or settings.sender_domain
    pem, public = dkim.generate(kind)  # type: ignore[arg-type]
    path = output / f"{name}.private.pem"
    create_new(path, pem, mode=0o600)
    record = dkim.dns_record(kind, public)
    # A TXT string holds 255 characters at most: longer records are cut into several.
    strings = " ".join(f'"{record[i : i + 255]}"' for i in range(0, len(record), 255))
    variable = dkim.ED25519_VARIABLE if kind == "ed25519" else dkim.RSA_VARIABLE
    setting = "ed25519_selector" if kind == "ed25519" else "selector"
    typer.echo(f"wrote {_shown(path)} (the private key: keep it secret, out of the project)")
    typer.echo("")
    typer.echo("Publish in DNS:")
    typer.echo(f"{name}._domainkey.{domain}. IN TXT {strings}")
    typer.echo("")
    typer.echo("and, if not there already (adapt SPF to the relays you send through):")
    typer.echo(f'{domain}. IN TXT "v=spf1 mx include:YOUR-RELAY ~all"')
    typer.echo(f'_dmarc.{domain}. IN TXT "v=DMARC1; p=none; rua=mailto:dmarc@{domain}"')
    typer.echo("")
    typer.echo(f'Then, in qant.toml: [dkim] {setting} = "{name}"; and in the environment:')
    typer.echo(f"{variable}_FILE={path.resolve()}")


subscribers_app = typer.Typer(
    help="Manage the subscriber list.", no_args_is_help=True, rich_markup_mode=None
)
app.add_typer(subscribers_app, name="subscribers")


_TEST_DOMAINS = typer.Option(
    "--allow-test-domains", help="Accept the reserved .test domains (for trying things out)."
)


@subscribers_app.command("import")
@_handled
def subscribers_import(
    file: Annotated[Path, typer.Argument(help="CSV with an `email` column, `name` optional.")],
    source: Annotated[
        str | None, typer.Option("--source", help="Where these people came from.")
    ] = None,
    test_domains: Annotated[bool, _TEST_DOMAINS] = False,
) -> None:
    """Import subscribers from a CSV file; re-importing changes nothing."""
    store = _store()
    report = store.import_csv(file, source, test_domains=test_domains)
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
@_handled
def subscribers_add(
    address: Annotated[str, typer.Argument(help="Email address.")],
    name: Annotated[str, typer.Option("--name", help="Their name.")] = "",
    resubscribe: Annotated[
        bool,
        typer.Option("--resubscribe", help="Re-activate an unsubscribed or removed address."),
    ] = False,
    test_domains: Annotated[bool, _TEST_DOMAINS] = False,
) -> None:
    """Add one subscriber."""
    subscriber = _store().add(address, name, resubscribe=resubscribe, test_domains=test_domains)
    typer.echo(f"{subscriber.email}: {subscriber.status}")


@subscribers_app.command("remove")
@_handled
def subscribers_remove(address: Annotated[str, typer.Argument(help="Email address.")]) -> None:
    """Delete a subscriber and their data."""
    subscriber = _store().remove(address)
    typer.echo(f"{subscriber.email}: removed")


@subscribers_app.command("unsubscribe")
@_handled
def subscribers_unsubscribe(
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
        _unsubscribe_from_message()
        return
    if not address:
        raise typer.BadParameter("give an ADDRESS, or --from-message")
    subscriber = _store().unsubscribe(address, reason)
    typer.echo(f"{subscriber.email}: {subscriber.status} ({subscriber.status_reason})")


# sysexits.h, what a mail server expects of a command it pipes mail to: 0 delivered (or
# nothing to do), EX_DATAERR the message is unusable (bounced to its sender),
# EX_TEMPFAIL try again later (the message stays queued; nothing is lost).
EX_DATAERR, EX_TEMPFAIL = 65, 75


def _unsubscribe_from_message() -> None:
    """Unsubscribe the sender of the message on standard input, for a mail alias."""
    import sys

    from qant_mail.errors import ConfigError
    from qant_mail.store import StoreError
    from qant_mail.subscribers import MAX_MESSAGE, SubscriberError, sender_of

    try:
        message = sys.stdin.buffer.read(MAX_MESSAGE + 1)
        address = sender_of(message)
    except SubscriberError as err:
        _error(str(err))
        raise typer.Exit(EX_DATAERR) from err
    try:
        store = _store()
        subscriber = store.get(address)
        if subscriber is None:
            # Not a reader (or not any more): nothing to do, and nothing to bounce back.
            typer.echo(f"{address}: not on the list; nothing to do")
            return
        subscriber = store.unsubscribe(address, "mailto")
    except (StoreError, ConfigError) as err:
        _error(f"{err} (the mail server will try again later)")
        raise typer.Exit(EX_TEMPFAIL) from err
    typer.echo(f"{subscriber.email}: {subscriber.status} ({subscriber.status_reason})")


@subscribers_app.command("list")
@_handled
def subscribers_list(
    status: Annotated[
        str | None, typer.Option("--status", help="Only this status (active, unsubscribed…).")
    ] = None,
) -> None:
    """List subscribers: address, name, status, since when."""
    store = _store()
    for subscriber in store.all(_status(status)):
        typer.echo(
            f"{subscriber.email}\t{subscriber.name}\t{subscriber.status}\t"
            f"{subscriber.status_changed_at}"
        )


@subscribers_app.command("count")
@_handled
def subscribers_count() -> None:
    """Count subscribers by status."""
    counts = _store().count()
    for state, number in counts.items():
        typer.echo(f"{state.value}\t{number}")
    typer.echo(f"total\t{sum(counts.values())}")


@subscribers_app.command("export")
@_handled
def subscribers_export(
    file: Annotated[
        Path | None, typer.Argument(help="CSV file to write (default: standard output).")
    ] = None,
    status: Annotated[str | None, typer.Option("--status", help="Only this status.")] = None,
) -> None:
    """Export subscribers as CSV."""
    import io
    import sys

    from qant_mail.files import write_all

    store = _store()
    if file is None:
        store.export(sys.stdout, _status(status))
        return
    buffer = io.StringIO()
    written = store.export(buffer, _status(status))
    write_all({file: buffer.getvalue().encode("utf-8")})
    typer.echo(f"wrote {written} subscribers to {_shown(file)}")


def _store() -> Any:
    from qant_mail.subscribers import Subscribers

    return Subscribers.open(_settings().store_path)


def _status(value: str | None) -> Any:
    from qant_mail.subscribers import Status

    if value is None:
        return None
    try:
        return Status(value)
    except ValueError as err:
        choices = ", ".join(s.value for s in Status)
        raise typer.BadParameter(f"{value!r} is not one of {choices}") from err


def _warn(warnings: list[str]) -> None:
    for warning in warnings:
        typer.echo(f"warning: {warning}", err=True)


def _summary(report: Any) -> str:
    from qant_mail.ledger import State

    done = report.done
    parts = [
        f"{state.value} {done[state]}"
        for state in (State.SENT, State.DEFERRED, State.FAILED, State.UNKNOWN, State.SKIPPED)
    ]
    line = f"{', '.join(parts)} in {report.elapsed:.1f} s ({report.rate:.0f} messages/s)"
    if report.stopped:
        line += f"; stopped: {report.stopped}"
    return line


def _hint(file: Path, report: Any) -> str:
    from qant_mail.ledger import State

    totals = report.totals
    hints = []
    waiting = (
        totals.get(State.PENDING, 0) + totals.get(State.DEFERRED, 0) + totals.get(State.SENDING, 0)
    )
    if waiting:
        hints.append(f"{waiting} still to send: run `qant-mail send {file}` again to go on")
    if totals.get(State.FAILED):
        hints.append(f"{totals[State.FAILED]} failed for good")
    if totals.get(State.UNKNOWN):
        hints.append(f"{totals[State.UNKNOWN]} unknown (maybe delivered)")
    hints.append(f"`qant-mail status {file}` lists them")
    # Why this run's failures failed, the most common first: the server's own words.
    reasons = [f"  {n} × {reply}" for reply, n in report.failures.most_common(3)]
    return "\n".join(["; ".join(hints), *reasons])


def _already_done(file: Path, plan: Any) -> str:
    from qant_mail.ledger import State

    counts = plan.already
    if not counts:
        return "no active subscriber: nothing to send"
    return (
        f"nothing left to send for {file.stem}: sent {counts[State.SENT]}, "
        f"failed {counts[State.FAILED]}, unknown {counts[State.UNKNOWN]}, "
        f"skipped {counts[State.SKIPPED]} (`qant-mail status {file}`)"
    )


def _settled_code(plan: Any) -> ExitCode:
    from qant_mail.ledger import State

    counts = plan.already
    return ExitCode.PARTIAL if counts[State.FAILED] or counts[State.UNKNOWN] else ExitCode.OK


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
        self.task: Any = None
        self.started = 0.0
        self.done = 0

    def __enter__(self) -> _ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.stop()

    def start(self, total: int) -> None:
        import time

        self.started = time.monotonic()
        self.task = self.bar.add_task("send", total=total, rate="")
        self.bar.start()

    def advance(self, state: Any) -> None:
        import time

        self.done += 1
        elapsed = time.monotonic() - self.started
        rate = f"{self.done / elapsed:.0f} msg/s" if elapsed > 0.5 else ""
        self.bar.update(self.task, advance=1, rate=rate)

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


def main() -> None:
    """Run the command line."""
    # qant-mail uses no pydantic plugin; looking for them scans the metadata of every
    # installed package, a quarter of a render's start-up. Users who want one can say so.
    os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")
    app(prog_name="qant-mail")
