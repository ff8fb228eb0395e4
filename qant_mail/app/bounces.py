"""The use case of what comes back: bounces and complaints, read (`delivery.bounces`),
matched to the reader and the message they are about, and recorded on the ledger's row
and the reader."""

from __future__ import annotations

from collections.abc import Iterator

from qant_mail.app.context import Context
from qant_mail.audience import tokens
from qant_mail.base.config import Settings
from qant_mail.base.errors import ConfigError, ExitCode, QantError
from qant_mail.delivery.bounces import (
    BounceReport,
    Finding,
    Outcome,
    Reading,
    identity,
    read,
    read_source,
)
from qant_mail.store.db import StoreError
from qant_mail.store.ledger import Ledger
from qant_mail.store.subscribers import Subscribers

__all__ = ["BounceReport", "Finding", "Outcome", "process", "process_source"]


class TryLater(QantError):
    """A report from a mail server's pipe that cannot be recorded now (the store or the
    settings in trouble): the server keeps it and tries again; never a bounce of a bounce."""

    exit_code = ExitCode.TEMPFAIL


def process_source(ctx: Context, source: str) -> BounceReport:
    """Read the reports of `source` (a Maildir, an mbox, imaps://…, or - for one
    message on standard input, from a mail server's pipe) and record what each says."""
    try:
        return process(ctx, read_source(source, ctx.env))
    except (StoreError, ConfigError) as err:
        if source != "-":
            raise
        raise TryLater(f"{err} (the mail server will try again later)") from err


def process(ctx: Context, messages: Iterator[tuple[str, bytes]]) -> BounceReport:
    """Read each (source, message) and record what it says: a hard bounce or a
    complaint takes the address off every newsletter; soft bounces count towards
    `bounces.soft_limit`."""
    settings, secret = ctx.settings, ctx.secret()
    report = BounceReport()
    ledger = Ledger(ctx.store)
    try:
        for source, data in messages:
            report.findings.extend(_process_one(settings, ledger, secret, source, data))
    finally:
        ledger.close()
    return report


def _process_one(
    settings: Settings, ledger: Ledger, secret: bytes, source: str, data: bytes
) -> list[Finding]:
    digest = identity(data)
    if ledger.feedback_seen(digest):
        return [Finding(source, Outcome.ALREADY)]
    reading = read(data, secret, settings)
    findings = _apply(settings, ledger, secret, source, reading)
    ledger.note_feedback(digest, ", ".join(sorted({f.outcome.value for f in findings})))
    return findings


def _verified_subscriber(ledger: Ledger, secret: bytes, token: str) -> int | None:
    """Return the subscriber a genuine unsubscribe token names (a complaint's copy)."""
    number = tokens.subscriber_id(token) if token else None
    if number is None:
        return None
    subscriber = Subscribers(ledger.db).by_id(number)
    if subscriber is None or not tokens.verify(secret, token, number, subscriber.email):
        return None
    return number


def _apply(
    settings: Settings, ledger: Ledger, secret: bytes, source: str, reading: Reading
) -> list[Finding]:
    if reading.outcome in (Outcome.NOT_A_BOUNCE, Outcome.FORGED, Outcome.NOT_SPAM):
        return [Finding(source, reading.outcome, detail=reading.detail)]
    targets = ledger.feedback_targets(
        verp=reading.verp,
        issue=reading.issue,
        addresses=reading.addresses,
        subscriber_id=_verified_subscriber(ledger, secret, reading.unsubscribe_token),
    )
    if not targets:
        shown = ", ".join(reading.addresses)
        return [Finding(source, Outcome.UNMATCHED, shown, reading.issue, reading.detail)]
    findings = []
    for target in targets:
        outcome = ledger.record_feedback(
            target, reading.outcome.name.lower(), reading.detail, settings.bounces.soft_limit
        )
        findings.append(
            Finding(source, Outcome[outcome.upper()], target.email, target.issue, reading.detail)
        )
    return findings
