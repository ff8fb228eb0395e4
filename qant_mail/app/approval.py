"""Approval of exactly what goes out: `qant-mail approve` names the message of an issue
by a digest (its render, composed, before personalisation: not its YAML), and keeps it;
a send to the list with `[review] required` goes only if its message is that one. And
each reader's copy of a sent issue, made again from the message the send kept."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from qant_mail.app import review
from qant_mail.app.context import Context
from qant_mail.base.addresses import strip_controls
from qant_mail.base.errors import QantError, SendError
from qant_mail.delivery.compose import MessageTemplate, Recipient
from qant_mail.store.approvals import Approval as Approval  # re-exported for the edges
from qant_mail.store.approvals import Approvals
from qant_mail.store.ledger import Ledger, State

_MAX_NAME = 100


class ApprovalError(QantError):
    """An approval that cannot be recorded (no name, an issue with errors)."""


@dataclass(frozen=True)
class Approved:
    """An approval just recorded, and the one it replaces, if any."""

    approval: Approval
    previous: Approval | None
    required: bool  # whether the newsletter's sends need one ([review] required)

    @property
    def unchanged(self) -> bool:
        """Return whether the message is the one approved before."""
        return self.previous is not None and self.previous.digest == self.approval.digest


def approve(ctx: Context, path: Path, approver: str) -> Approved:
    """Record that `approver` approved the issue at `path` as it renders now: the
    approver, the time, the digest of its message, and the message itself."""
    name = " ".join(strip_controls(approver).split())
    if not name:
        raise ApprovalError("--by: say who approves (a name, as the team knows it)")
    if len(name) > _MAX_NAME:
        raise ApprovalError(f"--by: a name of at most {_MAX_NAME} characters")
    made = review.composed(ctx, path)  # errors and drafts are refused here
    key, newsletter, rendered, template = made.key, made.newsletter, made.rendered, made.template
    with ctx.db() as db:
        approvals = Approvals(db)
        previous = approvals.latest(newsletter, key)
        approval = approvals.add(
            issue=key,
            newsletter=newsletter,
            digest=template.digest(),
            approver=name,
            subject=rendered.subject,
            preheader=rendered.preheader,
            html=rendered.html,
            text=rendered.text,
            size=template.size,
            message=template.frozen(),
        )
    required = ctx.settings.for_newsletter(newsletter).review_required
    return Approved(approval, previous, required)


def latest(ctx: Context, issue: str, newsletter: str | None = None) -> Approval | None:
    """Return the last approval of `issue` (its file's name) of `newsletter` (None: the
    main one)."""
    with ctx.db() as db:
        return Approvals(db).latest(newsletter or ctx.settings.main_id, issue)


def all_latest(ctx: Context) -> dict[tuple[str, str], Approval]:
    """Return the last approval of each approved issue, by (newsletter, issue)."""
    with ctx.db() as db:
        return Approvals(db).latest_of_each()


def reader_copy(ctx: Context, issue: str, address: str) -> bytes:
    """Return the message the send of `issue` made for `address`, made again from the
    message the send kept: byte for byte, but the signatures' timestamps."""
    ledger = Ledger(ctx.store)
    try:
        send = ledger.find(issue)
        if send is None:
            raise SendError(f"{issue} has not been sent (no send planned)")
        kept = Approvals(ledger.db).sent(send.id)
        wanted = address.strip().lower()
        row = next((d for d in ledger.deliveries(send, *State) if d.email.lower() == wanted), None)
    finally:
        ledger.close()
    if kept is None:
        raise SendError(
            f"the send of {issue} started before qant-mail kept the messages it sends: "
            "its readers' copies cannot be made again"
        )
    if row is None:
        raise SendError(f"{address} is not among the readers of the send of {issue}")
    if row.state is not State.SENT:
        raise SendError(f"{address} was not sent {issue} (its row is {row.state.value})")
    keys = ctx.outbox.rules(send.newsletter).keys
    template = MessageTemplate.thaw(kept, secret=ctx.secret(), keys=keys)
    return template.personalise(Recipient(row.email, row.name, row.subscriber_id or 0))
