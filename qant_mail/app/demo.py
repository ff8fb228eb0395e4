"""The whole job on the bundled sample, with nothing to set up: render the issue, start
the local test inbox, send the issue to the demo list through it over SMTP."""

from __future__ import annotations

import dataclasses
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

from qant_mail.app.pipeline import prepare_send, render_sample
from qant_mail.base.config import Settings
from qant_mail.delivery.inbox import Inbox
from qant_mail.delivery.send import Progress, SendReport, send_to_list
from qant_mail.delivery.transport import SmtpTransport
from qant_mail.store.subscribers import ImportReport, Subscribers

DEMO_LIST = "demo-subscribers.csv"


@dataclass(frozen=True)
class DemoResult:
    """What the demo did and where to look."""

    rendered: list[Path]
    imported: ImportReport
    report: SendReport
    inbox: Path
    delivered: list[Path]


def run_demo(settings: Settings, issue: Path, progress: Progress | None = None) -> DemoResult:
    """Render `issue`, then send it to the demo list through a local inbox, in `out/demo`."""
    folder = settings.output_dir / "demo"
    if folder.exists():
        shutil.rmtree(folder)  # every demo starts from an empty list and inbox
    rendered = render_sample(issue, settings, settings.output_dir)
    store = folder / "subscribers.db"
    subscribers = Subscribers.open(store)
    try:
        imported = subscribers.import_csv(settings.issues_dir / DEMO_LIST, source="demo")
    finally:
        subscribers.close()
    with Inbox(folder / "inbox", port=0) as inbox:
        smtp = settings.smtp.model_copy(
            update={"host": inbox.host, "port": inbox.port, "security": "none", "username": ""}
        )
        local = dataclasses.replace(settings, smtp=smtp)
        # The demo's unsubscribe links are signed with a throwaway secret.
        prepared = prepare_send(issue, local, secret=secrets.token_bytes(32))
        report = send_to_list(
            prepared, local, SmtpTransport(local, env={}), progress=progress, store_path=store
        )
    delivered = sorted((folder / "inbox" / "new").glob("*.eml"))
    return DemoResult(rendered, imported, report, folder / "inbox", delivered)
