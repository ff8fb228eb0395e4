"""The outbox's queue of messages to one reader: claimed one at a time under a lease,
recorded only by the drain that holds them, retried with bounded backoff until they
expire; tests recorded once done, never left for a drain to take."""

from __future__ import annotations

import dataclasses
import logging
import socket
import threading
import time
from collections.abc import Iterator, Sequence

import pytest

from qant_mail.app import sending
from qant_mail.app.context import Context
from qant_mail.app.readers import Request, Signup
from qant_mail.base.config import Settings
from qant_mail.delivery.outbox import NOTICE_MAX_DELAY, DrainReport, _Background, _Record, _Run
from qant_mail.delivery.transport import SmtpTransport
from qant_mail.store.db import StoreUnavailable
from qant_mail.store.ledger import Outcome, State
from qant_mail.store.mailqueue import Mail, MailQueue
from tests.conftest import SAMPLE
from tests.smtp_server import SmtpServer, free_port

SECRET = b"a-test-secret-that-is-long-enough"


def queue_one(ctx: Context, address: str = "lea@example.com", *, attempts: int = 0) -> int:
    """Queue a confirmation to `address`, as a signup does; return its number."""
    Signup(ctx).request(Request(address, "", ("default",), "all", "1.2.3.4"))
    with ctx.db() as db:
        (number,) = db.execute("SELECT max(id) FROM outbox").fetchone()
        db.execute("UPDATE outbox SET attempts = $1 WHERE id = $2", (attempts, number))
    return int(number)


def entries(ctx: Context) -> list[tuple[str, Mail, int]]:
    with ctx.db() as db:
        return [(e.recipient, e.state, e.attempts) for e in MailQueue(db).entries(list(Mail))]


def test_a_test_send_is_recorded_done_and_no_drain_takes_it(
    local: Settings, smtp_server: SmtpServer
) -> None:
    ctx = Context(local, secret=SECRET)
    prepared = sending.prepare_test(ctx, local.root / "issues" / SAMPLE.name)
    sending.send_test(ctx, prepared, ["ed@example.com"])
    assert entries(ctx) == [("ed@example.com", Mail.SENT, 1)]
    assert ctx.outbox.drain().tried == 0
    assert [r.recipient for r in smtp_server.handler.received] == ["ed@example.com"]
    (message,) = smtp_server.handler.received
    assert len(message.data) > 1000  # the test itself, never an empty message


def test_only_the_drain_that_holds_a_message_records_it(local: Settings) -> None:
    ctx = Context(local, secret=SECRET)
    number = queue_one(ctx)
    with ctx.db() as db:
        queue = MailQueue(db)
        now = time.time()
        first = queue.claim(now, worker="a", lease=0.0, newsletters=["default"])
        assert first is not None
        assert first.id == number
        # a's lease ran out (a slow relay): b takes the message over.
        second = queue.claim(now + 1, worker="b", lease=60.0, newsletters=["default"])
        assert second is not None
        assert second.id == number
        assert not queue.record(number, Mail.SENT, "250 a", worker="a")
        queue.release(number, worker="a")  # a's release gives back nothing of b's
        assert queue.claim(now + 2, worker="c", lease=60.0, newsletters=["default"]) is None
        assert queue.record(number, Mail.SENT, "250 b", worker="b")
    assert entries(ctx) == [("lea@example.com", Mail.SENT, 1)]


def test_backoff_is_bounded_however_many_tries_came_before(local: Settings) -> None:
    down = dataclasses.replace(local, smtp=local.smtp.model_copy(update={"port": free_port()}))
    ctx = Context(down, secret=SECRET)
    queue_one(ctx, attempts=5000)
    before = time.time()
    report = ctx.outbox.drain()
    assert report.deferred == 1
    with ctx.db() as db:
        (due,) = db.execute("SELECT next_attempt_at FROM outbox").fetchone()
    assert before < due <= time.time() + NOTICE_MAX_DELAY


def test_a_message_that_would_retry_past_its_expiry_expires(local: Settings) -> None:
    down = dataclasses.replace(local, smtp=local.smtp.model_copy(update={"port": free_port()}))
    ctx = Context(down, secret=SECRET)
    number = queue_one(ctx)
    with ctx.db() as db:
        db.execute("UPDATE outbox SET expires_at = $1 WHERE id = $2", (time.time() + 0.5, number))
    ctx.outbox.drain()
    assert entries(ctx) == [("lea@example.com", Mail.EXPIRED, 1)]
    with ctx.db() as db:
        assert db.execute("SELECT message FROM outbox").fetchone()[0] == b""  # not kept


def test_a_421_closes_the_connection_and_the_next_message_goes_on_a_new_one(
    local: Settings, smtp_server: SmtpServer
) -> None:
    ctx = Context(local, secret=SECRET)
    queue_one(ctx, "one@example.com")
    queue_one(ctx, "two@example.com")
    smtp_server.handler.answers["one@example.com"] = ["421 4.7.0 closing, too busy"]
    report = ctx.outbox.drain()
    assert (report.sent, report.deferred) == (1, 1)
    assert [r.recipient for r in smtp_server.handler.received] == ["two@example.com"]
    assert ("one@example.com", Mail.PENDING, 1) in entries(ctx)


def test_the_queue_worker_outlives_an_unexpected_error(
    local: Settings, smtp_server: SmtpServer, caplog: pytest.LogCaptureFixture
) -> None:
    ctx = Context(local, secret=SECRET, transport=SmtpTransport(local, env={}))
    real = ctx.outbox.drain
    calls: list[int] = []

    def flaky(
        *, limit: int = 200, ids: Sequence[int] = (), stop: threading.Event | None = None
    ) -> DrainReport:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a bug")
        return real(limit=limit, ids=ids, stop=stop)

    ctx.outbox.drain = flaky  # type: ignore[method-assign]
    worker = sending.QueueWorker(ctx, poll=0.05)
    with caplog.at_level(logging.ERROR):
        worker.start()
        queue_one(ctx)
        worker.wake()
        deadline = time.monotonic() + 10
        while not smtp_server.handler.received and time.monotonic() < deadline:
            time.sleep(0.02)
        worker.stop()
    assert [r.recipient for r in smtp_server.handler.received] == ["lea@example.com"]
    assert "a bug" in caplog.text


def test_stopping_the_worker_does_not_wait_for_the_hours_quota(local: Settings) -> None:
    limited = dataclasses.replace(local, sending=local.sending.model_copy(update={"per_hour": 1}))
    ctx = Context(limited, secret=SECRET)
    with ctx.db() as db:
        db.execute("INSERT INTO quota (minute, messages) VALUES ($1, 1)", (int(time.time() // 60),))
    queue_one(ctx)
    worker = sending.QueueWorker(ctx, poll=0.05)
    worker.start()
    time.sleep(0.3)  # the drain waits for the hour's quota
    stopper = threading.Thread(target=worker.stop, daemon=True)
    stopper.start()
    stopper.join(5)
    assert not stopper.is_alive()
    assert entries(ctx) == [("lea@example.com", Mail.PENDING, 0)]


class _WritingLedger:
    """Writes outcomes to a log, as the ledger's record_many would to its rows; or
    fails, as a database out of reach does."""

    shared = False

    def __init__(self, log: list[tuple[str, object]], *, fails: bool = False) -> None:
        self.log, self.fails = log, fails

    def record_many(self, send: object, outcomes: Sequence[object]) -> None:
        if self.fails:
            raise StoreUnavailable("the disk is full")
        self.log.append(("written", [outcome.position for outcome in outcomes]))  # type: ignore[attr-defined]

    def close(self) -> None:
        """This thread's connection: nothing to close."""


def _loop_of(ledger: _WritingLedger) -> _Run:
    run = _Run.__new__(_Run)
    run.ledger = ledger  # type: ignore[assignment]
    run.send = None  # type: ignore[assignment]
    run.stop = threading.Event()
    run._stored = lambda step: step()  # type: ignore[method-assign]
    return run


def _recording(position: int, log: list[tuple[str, object]]) -> Iterator[object]:
    """A connection's work reduced to one outcome to record, and what comes after."""
    try:
        yield _Record(Outcome(position, State.SENT, "250 ok"))
    except StoreUnavailable as err:
        log.append(("told", (position, str(err))))
        return
    log.append(("went on", position))


def test_outcomes_that_come_in_together_are_written_together_before_either_goes_on() -> None:
    # Exactly-once: a connection's next message waits for its last outcome to be
    # durable. Outcomes that come in the same turn of the send loop share a transaction.
    log: list[tuple[str, object]] = []
    run = _loop_of(_WritingLedger(log))
    ours, theirs = socket.socketpair()
    with ours, theirs:
        run._loop([_recording(1, log), _recording(2, log)], ours)  # type: ignore[list-item]
    assert log == [("written", [1, 2]), ("went on", 1), ("went on", 2)]


def test_a_write_that_fails_is_told_to_every_connection_whose_outcome_it_carried() -> None:
    # None of them may go on as if its outcome were written.
    log: list[tuple[str, object]] = []
    run = _loop_of(_WritingLedger(log, fails=True))
    ours, theirs = socket.socketpair()
    with ours, theirs:
        run._loop([_recording(1, log), _recording(2, log)], ours)  # type: ignore[list-item]
    assert log == [("told", (1, "the disk is full")), ("told", (2, "the disk is full"))]


class _Opened:
    """A connection that says when it is closed."""

    relay = "test"

    def __init__(self, closed: threading.Event) -> None:
        self.closed = closed

    def close(self) -> None:
        self.closed.set()


@pytest.mark.parametrize("when", ["while it opens", "once it is open"])
def test_a_connection_opened_for_a_slot_that_is_gone_is_closed(when: str) -> None:
    # After a bug the send loop closes every slot, some waiting for a connection to be
    # opened in the background: that connection must not be left open.
    opened, closed = threading.Event(), threading.Event()

    def opening() -> _Opened:
        opened.wait(5)
        return _Opened(closed)

    ours, theirs = socket.socketpair()
    with ours, theirs:
        work = _Background(opening, ours)  # type: ignore[arg-type]
        if when == "once it is open":
            opened.set()
            theirs.recv(1)  # rung when it is done
        work.abandon()
        opened.set()
        assert closed.wait(5)
