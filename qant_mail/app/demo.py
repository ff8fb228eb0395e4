"""The whole job on the bundled sample, with nothing to set up: render the issue, start
the local test inbox, send the issue to the demo list through it over SMTP. And the
local test inbox itself, for trying sends by hand."""

from __future__ import annotations

import dataclasses
import re
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

from qant_mail.app import issues, readers, sending
from qant_mail.app.context import Context
from qant_mail.base.errors import QantError
from qant_mail.delivery.inbox import DEFAULT_PORT, Inbox
from qant_mail.delivery.outbox import Progress, SendReport
from qant_mail.delivery.transport import SmtpTransport
from qant_mail.store.subscribers import ImportReport

DEMO_LIST = "demo-subscribers.csv"
_DATED = re.compile(r"\d{4}-\d{2}-\d{2}.*\.yaml$")


@dataclass(frozen=True)
class DemoResult:
    """What the demo did and where to look."""

    rendered: list[Path]
    imported: ImportReport
    report: SendReport
    inbox: Path
    delivered: list[Path]


class DemoError(QantError):
    """Nothing to run the demo on."""


def sample_issue(ctx: Context) -> Path:
    """Return the issue the demo sends when not told: the latest dated one (the sample
    of the repository, or the first issue `init` wrote)."""
    folder = ctx.settings.issues_dir
    dated = sorted(p for p in folder.glob("*.yaml") if _DATED.match(p.name))
    if not dated:
        raise DemoError(f"{folder}: no issue (YYYY-MM-DD.yaml) to send; give one with --issue")
    return dated[-1]


def run_demo(
    ctx: Context, issue: Path | None = None, progress: Progress | None = None
) -> DemoResult:
    """Render `issue` (default: `sample_issue`), then send it to the demo list through a
    local inbox, in `out/demo`."""
    settings = ctx.settings
    issue = issue or sample_issue(ctx)
    folder = settings.output_dir / "demo"
    if folder.exists():
        shutil.rmtree(folder)  # every demo starts from an empty list and inbox
    rendered = issues.render_sample(ctx, issue)
    with Inbox(folder / "inbox", port=0) as inbox:
        smtp = settings.smtp.model_copy(
            update={"host": inbox.host, "port": inbox.port, "security": "none", "username": ""}
        )
        local = dataclasses.replace(settings, smtp=smtp)
        # Its own list and store, links signed with a throwaway secret; the DKIM keys
        # of the environment, if any (the demo shows them at work), and nothing else.
        keys = {k: v for k, v in ctx.env.items() if k.startswith("QANT_DKIM_")}
        demo = Context(
            local,
            env=keys,
            clock=ctx.clock,
            transport=SmtpTransport(local, env={}),
            store=folder / "subscribers.db",
            secret=secrets.token_bytes(32),
        )
        imported = readers.import_csv(demo, settings.issues_dir / DEMO_LIST, source="demo")
        report = sending.send(demo, issues.prepare(demo, issue), progress=progress)
    delivered = sorted((folder / "inbox" / "new").glob("*.eml"))
    return DemoResult(rendered, imported, report, folder / "inbox", delivered)


def local_inbox(ctx: Context, folder: Path | None = None, port: int = DEFAULT_PORT) -> Inbox:
    """Return the local test inbox (not started): an SMTP server on 127.0.0.1 that keeps
    every message in a Maildir (default: `data/inbox` of the project)."""
    return Inbox(folder or ctx.settings.root / "data" / "inbox", port=port)
