"""The use case of what comes back: bounces and complaints, read (`delivery.bounces`),
matched to the message they are about, and recorded on the ledger's row and the reader.

The bounce address is public: anyone can write to it. So a report changes a reader only
with proof that it is about a message of ours to that reader: the signed VERP token of
the message (its return path), or, in the copy the report encloses, the signed
unsubscribe link or the signed Message-ID of that reader's message. An address written
in a report proves nothing: a report without proof is logged, with why, and ignored."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from qant_mail.app.context import Context
from qant_mail.audience import tokens
from qant_mail.base.config import Settings
from qant_mail.base.errors import ConfigError, ExitCode, QantError
from qant_mail.delivery.bounces import (
    ACTING,
    BounceReport,
    Finding,
    Letter,
    Outcome,
    Reading,
    identity,
    read,
    read_source,
)
from qant_mail.store.db import StoreError
from qant_mail.store.ledger import FeedbackTarget, Ledger
from qant_mail.store.subscribers import Subscribers

__all__ = ["BounceReport", "Finding", "Letter", "Outcome", "process", "process_source"]

log = logging.getLogger(__name__)


class TryLater(QantError):
    """A report from a mail server's pipe that cannot be recorded now (the store, the
    settings or the secret in trouble): the server keeps it and tries again; never a
    bounce of a bounce."""

    exit_code = ExitCode.TEMPFAIL


def process_source(ctx: Context, source: str) -> BounceReport:
    """Read the reports of `source` (a Maildir, an mbox, a message's file, imaps://…,
    or - for one message on standard input, from a mail server's pipe) and record what
    each says."""
    try:
        return process(ctx, read_source(source, ctx.env))
    except (StoreError, ConfigError) as err:
        if source != "-":
            raise
        raise TryLater(f"{err} (the mail server will try again later)") from err


def process(ctx: Context, letters: Iterable[Letter]) -> BounceReport:
    """Read each report and record what it proves: a hard bounce or a complaint takes
    the reader off every newsletter; soft bounces count towards `bounces.soft_limit`,
    once a send. A report that cannot be read is counted, and the run goes on."""
    report = BounceReport()

    def secret() -> bytes:
        return tokens.secret_from_env(ctx.env, needed_for="bounces are matched by what it signs")

    ledger = Ledger(ctx.store)
    try:
        for letter in letters:
            if letter.problem:
                report.findings.append(
                    Finding(letter.source, Outcome.UNREADABLE, detail=letter.problem)
                )
                log.info("bounces: %s: skipped: %s", letter.source, letter.problem)
                continue
            found = _process_one(ctx.settings, ledger, secret, letter.source, letter.data)
            report.findings.extend(found)
    finally:
        ledger.close()
    return report


def _process_one(
    settings: Settings, ledger: Ledger, secret: Callable[[], bytes], source: str, data: bytes
) -> list[Finding]:
    digest = identity(data)
    if ledger.feedback_seen(digest):
        return [Finding(source, Outcome.ALREADY)]
    reading = read(data, secret, settings)
    findings = _apply(settings, ledger, secret, source, reading)
    ledger.note_feedback(digest, ", ".join(sorted({f.outcome.value for f in findings})))
    for finding in findings:
        if finding.outcome not in ACTING:
            log.info("bounces: %s: %s: %s", source, finding.outcome.value, finding.detail)
    return findings


def _apply(
    settings: Settings,
    ledger: Ledger,
    secret: Callable[[], bytes],
    source: str,
    reading: Reading,
) -> list[Finding]:
    if reading.outcome not in ACTING:
        return [Finding(source, reading.outcome, detail=reading.detail)]
    target = _proven(ledger, secret, reading)
    if isinstance(target, str):
        shown = ", ".join(reading.addresses)
        return [Finding(source, Outcome.UNPROVEN, shown, reading.issue, target)]
    if target is None:
        shown = ", ".join(reading.addresses)
        return [Finding(source, Outcome.UNMATCHED, shown, reading.issue, reading.detail)]
    outcome = ledger.record_feedback(
        target, reading.outcome.name.lower(), reading.detail, settings.bounces.soft_limit
    )
    return [Finding(source, Outcome[outcome.upper()], target.email, target.issue, reading.detail)]


def _proven(
    ledger: Ledger, secret: Callable[[], bytes], reading: Reading
) -> FeedbackTarget | str | None:
    """Return the message a report proves it is about (None: proven, but no row of the
    ledger is that message), or why it proves nothing."""
    if reading.verp is not None:
        return ledger.feedback_target(verp=reading.verp)
    if reading.unsubscribe_token:
        number = tokens.subscriber_id(reading.unsubscribe_token)
        reader = None if number is None else Subscribers(ledger.db).by_id(number)
        if reader is not None and tokens.verify(
            secret(), reading.unsubscribe_token, reader.id, reader.email
        ):
            found = ledger.feedback_target(issue=reading.issue, email=reader.email)
            return found or FeedbackTarget(reader.email, reader.id, "")
    if reading.message_id:
        named = tokens.read_message_id(secret(), reading.message_id, reading.addresses)
        if named is not None:
            issue, address = named
            return ledger.feedback_target(issue=issue, email=address)
    return (
        "no proof that it is about a message of ours: no signed return path (VERP), and "
        "no signed link or Message-ID for the address it names in the copy it encloses"
    )
