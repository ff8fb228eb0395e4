"""Sending to servers that misbehave: nothing recorded `sent` that was not, no send held
forever, the server's error limits respected, greylisting not mistaken for a rate limit."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import socket
import threading
import time

import pytest
from hypothesis import event, given, settings, strategies

from qant_mail.audience.tokens import SECRET_VARIABLE
from qant_mail.base.config import Sending, Settings
from qant_mail.base.errors import ExitCode
from qant_mail.delivery.outbox import SendReport
from qant_mail.delivery.transport import (
    ConnectionLost,
    RateLimiter,
    Reply,
    SmtpConnection,
    SmtpTransport,
)
from qant_mail.store.ledger import Ledger, State
from tests.conftest import prepare_send, send_to_list
from tests.faulty_smtp import Behaviour, FaultyServer, FaultyServerFactory
from tests.test_send import SAMPLE, subscribe

pytestmark = pytest.mark.usefixtures("secret")


@pytest.fixture
def secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRET_VARIABLE, "a-test-secret-that-is-long-enough")


def towards(settings: Settings, server: FaultyServer, **smtp: object) -> Settings:
    changed = settings.smtp.model_copy(
        update={"host": server.host, "port": server.port, "security": "none", **smtp}
    )
    sending = Sending(retry_after_seconds=0.05, max_attempts=3)
    return dataclasses.replace(settings, smtp=changed, sending=sending)


def send(settings: Settings, *, wait: bool = True) -> SendReport:
    prepared = prepare_send(settings.root / SAMPLE, settings)
    return send_to_list(prepared, settings, SmtpTransport(settings, env={}), wait_for_retries=wait)


def states(settings: Settings) -> dict[State, int]:
    ledger = Ledger(settings.store_path)
    found = ledger.find("2023-11-20")
    assert found is not None
    counts = {state: n for state, n in ledger.counts(found).items() if n}
    ledger.close()
    return counts


def test_a_250_answer_to_data_is_never_recorded_sent(
    project_settings: Settings, faulty_smtp: FaultyServerFactory
) -> None:
    server = faulty_smtp(Behaviour(data_reply="250 2.0.0 OK"))
    settings = towards(project_settings, server)
    subscribe(settings, 3)
    report = send(settings)
    assert server.received == []
    assert states(settings) == {State.FAILED: 3}
    assert report.exit_code == ExitCode.PARTIAL
    ledger = Ledger(settings.store_path)
    found = ledger.find("2023-11-20")
    assert found is not None
    (row, *_) = ledger.deliveries(found, State.FAILED)
    assert "protocol error" in row.last_reply


def test_a_server_that_trickles_its_reply_cannot_hold_a_send(
    project_settings: Settings, faulty_smtp: FaultyServerFactory
) -> None:
    server = faulty_smtp(Behaviour(trickle_after_data=0.2))
    settings = towards(project_settings, server, message_timeout=1.0, timeout=5.0)
    subscribe(settings, 6)
    started = time.monotonic()
    report = send(settings)
    elapsed = time.monotonic() - started
    # Each message that got its data out is `unknown`; after three silences in a row the
    # run stops, resumable, instead of paying a timeout per reader.
    assert report.stopped == "unavailable"
    assert report.exit_code == ExitCode.UNAVAILABLE
    counts = states(settings)
    assert counts[State.UNKNOWN] >= 3
    assert sum(counts.values()) == 6
    assert elapsed < 10, elapsed


def test_a_black_hole_after_data_stops_the_run_after_three_timeouts(
    project_settings: Settings, faulty_smtp: FaultyServerFactory
) -> None:
    server = faulty_smtp(Behaviour(silent_after_data=True))
    settings = towards(project_settings, server, timeout=0.5, connections=1)
    subscribe(settings, 10)
    started = time.monotonic()
    report = send(settings)
    assert time.monotonic() - started < 8
    assert report.stopped == "unavailable"
    assert states(settings) == {State.UNKNOWN: 3, State.PENDING: 7}


@pytest.mark.parametrize(
    ("how", "data_after_refusal", "connections"),
    [
        # MAIL, RCPT and DATA leave together (RFC 2920): the server refuses the DATA too.
        ({}, 1, 1),
        # Each command waits for the last one's reply: a refusal is the end of it.
        ({"pipelining": False}, 0, 1),
        # A server that opens the data anyway (RFC 2920 says it must not) is hung up on:
        # data cut off is never delivered; even an empty message might be.
        ({"data_despite_refusal": True}, 1, 2),
    ],
    ids=["pipelined", "not-pipelined", "data-opened-anyway"],
)
def test_a_refused_recipient_gets_no_message_and_the_others_theirs(
    project_settings: Settings,
    faulty_smtp: FaultyServerFactory,
    how: dict[str, bool],
    data_after_refusal: int,
    connections: int,
) -> None:
    refused = frozenset({"reader1@example.com"})
    server = faulty_smtp(Behaviour(reject_recipients=refused, **how))  # type: ignore[arg-type]
    settings = towards(project_settings, server, connections=1)
    subscribe(settings, 4)
    report = send(settings, wait=False)
    assert report.done == {State.SENT: 3, State.FAILED: 1}
    assert "reader1@example.com" not in server.recipients()
    assert server.data_for_no_one == []
    assert server.data_after_refusal == data_after_refusal
    assert server.connections == connections


def test_many_refusals_stay_under_the_servers_error_limit(
    project_settings: Settings, faulty_smtp: FaultyServerFactory
) -> None:
    unknown = frozenset(f"reader{n}@example.com" for n in range(0, 40, 2))
    server = faulty_smtp(Behaviour(reject_recipients=unknown, error_limit=10))
    settings = towards(project_settings, server, connections=1)
    subscribe(settings, 40)
    report = send(settings)
    # Postfix would have dropped us after 10 errors (a refusal is two: RCPT, then the
    # pipelined DATA); we start afresh after 8.
    assert report.done[State.SENT] == 20
    assert report.done[State.FAILED] == 20
    assert server.errors == 0  # the limit was never reached
    assert server.connections >= 5


def test_a_server_closing_with_421_midsession_loses_nothing(
    project_settings: Settings, faulty_smtp: FaultyServerFactory
) -> None:
    server = faulty_smtp(Behaviour(close_after_messages=3))
    settings = towards(project_settings, server, connections=2)
    addresses = subscribe(settings, 12)
    report = send(settings)
    assert report.exit_code == ExitCode.OK
    assert server.recipients() == dict.fromkeys(addresses, 1)


def test_a_552_fails_the_message_and_is_counted_once(
    project_settings: Settings, faulty_smtp: FaultyServerFactory
) -> None:
    server = faulty_smtp(Behaviour(final_reply="552 5.3.4 Message size exceeds fixed limit"))
    settings = towards(project_settings, server)
    subscribe(settings, 3)
    report = send(settings)
    assert report.done == {State.FAILED: 3}
    assert report.exit_code == ExitCode.PARTIAL


@pytest.mark.parametrize("goodbye", ["", "421 4.7.0 Error: too many errors"])
def test_an_unknown_user_then_a_closed_connection_costs_the_next_reader_nothing(
    project_settings: Settings, faulty_smtp: FaultyServerFactory, goodbye: str
) -> None:
    server = faulty_smtp(
        Behaviour(
            reject_recipients=frozenset({"reader0@example.com"}),
            close_after_reject=True,
            goodbye_after_reject=goodbye,
        )
    )
    settings = towards(project_settings, server, connections=1)
    subscribe(settings, 3)
    # Not waiting for retries: a reader put off by the spent connection would show.
    report = send(settings, wait=False)
    assert report.done == {State.FAILED: 1, State.SENT: 2}
    assert server.connections == 2


def test_greylisting_defers_without_slowing_the_whole_send(
    project_settings: Settings, faulty_smtp: FaultyServerFactory
) -> None:
    server = faulty_smtp(Behaviour(greylist_seconds=0.5))
    settings = towards(project_settings, server)
    settings = dataclasses.replace(
        settings, sending=Sending(retry_after_seconds=0.6, max_attempts=4)
    )
    addresses = subscribe(settings, 24)
    started = time.monotonic()
    report = send(settings)
    assert report.exit_code == ExitCode.OK
    assert server.recipients() == dict.fromkeys(addresses, 1)
    assert time.monotonic() - started < 5


@pytest.mark.parametrize(
    ("reply", "slows"),
    [
        (Reply(421, "4.7.0 Try again later, closing connection"), True),
        (Reply(450, "4.7.1 <a@b.c>: Recipient address rejected: Greylisted"), False),
        (Reply(451, "4.7.1 Please try again later (greylisting)"), False),
        (Reply(451, "4.7.500 Server busy. Please try again later"), True),
        (Reply(450, "4.2.1 The user is receiving mail at a rate that prevents more"), True),
        (Reply(452, "4.2.2 Mailbox full"), False),
        (Reply(250, "2.0.0 OK", protocol_error=True), False),
    ],
)
def test_which_replies_slow_the_send_down(reply: Reply, slows: bool) -> None:
    assert reply.slow_down is slows


def test_the_rate_recovers_within_seconds_of_the_last_slow_down() -> None:
    now = [0.0]
    limiter = RateLimiter(20, 0, 0, clock=lambda: now[0])
    for _ in range(5):
        limiter.slow_down()
        now[0] += 1.1
    assert limiter.rate == pytest.approx(20 / 32)
    recovered_at = None
    while recovered_at is None:
        now[0] += 0.5
        limiter.speed_up()
        if limiter.rate == 20:
            recovered_at = now[0]
    assert recovered_at < 30


class _Client:
    """What SmtpConnection takes of smtplib's session: its socket (here an end of a
    socket pair), the extensions offered (pipelining), and its close."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def has_extn(self, name: str) -> bool:
        return name == "pipelining"

    def close(self) -> None:
        self.sock.close()


def _over(sock: socket.socket, *, timeout: float, message_timeout: float = 30.0) -> SmtpConnection:
    """Return a session over `sock`, as if greeted and secured."""
    return SmtpConnection(_Client(sock), "pair", timeout, message_timeout)  # type: ignore[arg-type]


def _narrow_pair() -> tuple[socket.socket, socket.socket]:
    """Return a socket pair whose buffers hold little: a message fills them."""
    ours, theirs = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    return ours, theirs


def _up_to_the_data(stream: io.BufferedRWPair) -> None:
    """Answer MAIL, RCPT and DATA as a server that takes the message."""
    for reply in (b"250 sender ok", b"250 recipient ok", b"354 go ahead"):
        stream.readline()
        stream.write(reply + b"\r\n")
        stream.flush()


def test_a_message_larger_than_the_socket_buffers_arrives_whole_to_a_reader_that_pauses() -> None:
    # The message and its final dot leave in gathered writes (sendmsg) that the kernel
    # may take in part: whatever it took, the rest follows, in order, nothing twice.
    ours, theirs = _narrow_pair()
    message = b"".join(
        b"line %06d " % n + os.urandom(20).hex().encode() + b"\r\n" for n in range(6000)
    )
    received = bytearray()

    def server() -> None:
        with theirs, theirs.makefile("rwb") as stream:
            _up_to_the_data(stream)
            received.extend(stream.read1(3000))
            # A reader that stops a while (less than the writer's timeout): the write
            # under way has had part of the message taken, and waits; the rest must
            # follow.
            time.sleep(0.6)
            while not received.endswith(b"\r\n.\r\n"):
                received.extend(stream.read1(3000))
            stream.write(b"250 2.0.0 queued\r\n")
            stream.flush()

    reader = threading.Thread(target=server)
    reader.start()
    connection = _over(ours, timeout=1.0)
    reply = connection.send("lettre@qant.example", "reader@example.com", message, dot_safe=True)
    reader.join()
    ours.close()
    assert reply.code == 250
    assert bytes(received) == message + b".\r\n"


def test_a_reader_that_stops_taking_the_message_times_the_write_out_as_not_delivered() -> None:
    # The write of the message waits at most the connection's timeout for the server to
    # take more: then the exchange ends, lost before its final dot (nothing delivered).
    ours, theirs = _narrow_pair()
    message = b"x" * 78 + b"\r\n"
    message *= 20_000
    released = threading.Event()

    def server() -> None:
        with theirs, theirs.makefile("rwb") as stream:
            _up_to_the_data(stream)
            stream.read1(3000)
            released.wait(10)  # and reads no more

    reader = threading.Thread(target=server, daemon=True)
    reader.start()
    connection = _over(ours, timeout=0.5)
    started = time.monotonic()
    with pytest.raises(ConnectionLost) as lost:
        connection.send("lettre@qant.example", "reader@example.com", message, dot_safe=True)
    took = time.monotonic() - started
    released.set()
    reader.join()
    ours.close()
    assert not lost.value.after_data
    assert "timed out" in str(lost.value)
    assert 0.4 < took < 3


@pytest.mark.parametrize(
    ("said", "verdict"),
    [
        ([b"250 sender ok", b"550 5.1.1 unknown user"], 550),  # and hangs up
        ([b"250 sender ok", b"421 4.7.0 too many errors, closing"], 421),
        ([b"553 5.7.1 sender refused"], 553),
        ([b"250 sender ok", b"250 recipient ok"], None),  # gone before DATA's reply
    ],
)
def test_a_refusal_then_a_hang_up_is_the_verdict_not_a_lost_connection(
    said: list[bytes], verdict: int | None
) -> None:
    # MAIL, RCPT and DATA leave together; a server may refuse one and close at once
    # without answering the rest. Its refusal is the message's verdict (nothing was
    # sent); only a hang-up with no refusal leaves the message's fate to a new try.
    ours, theirs = socket.socketpair()

    def server() -> None:
        with theirs, theirs.makefile("rwb") as stream:
            while stream.readline() != b"DATA\r\n":
                pass
            stream.write(b"".join(line + b"\r\n" for line in said))

    talker = threading.Thread(target=server, daemon=True)
    talker.start()
    connection = _over(ours, timeout=1.0)
    reply: Reply | ConnectionLost
    try:
        reply = connection.send("lettre@qant.example", "reader@example.com", b"x\r\n")
    except ConnectionLost as lost:
        reply = lost
    finally:
        talker.join()
        connection.close()
        ours.close()
    if verdict is None:
        assert isinstance(reply, ConnectionLost)
        assert not reply.after_data
    else:
        assert isinstance(reply, Reply)
        assert reply.code == verdict
        assert connection.worn  # spent: the next message goes by a new connection


_REPLIES = strategies.sampled_from(
    [
        *(b"250 2.1.0 ok\r\n", b"354 go ahead\r\n", b"250-first\r\n250 last\r\n"),
        *(b"550 5.1.1 no\r\n", b"421 4.3.2 closing\r\n", b"250 ok\n", b"25", b"\r\n"),
        *(b"x" * 5000, b"\x00\xff\r\n"),
    ]
)


_WELL_SAID = [b"250 2.1.0 ok\r\n", b"250-2.1.5 ok\r\n250 2.1.5 go on\r\n", b"354 go\r\n"]
_WELL_SAID.append(b"250 2.0.0 queued\r\n")


@settings(max_examples=80, derandomize=True, deadline=None)
@given(
    changes=strategies.lists(
        strategies.tuples(strategies.integers(0, 5), _REPLIES | strategies.binary(max_size=40)),
        max_size=3,
    ),
    cuts=strategies.lists(strategies.integers(1, 30), max_size=8),
)
def test_whatever_a_server_says_in_whatever_pieces_an_exchange_ends_in_a_reply_or_lost(
    changes: list[tuple[int, bytes]], cuts: list[int]
) -> None:
    # The exchange reads replies out of a non-blocking socket, in the pieces the kernel
    # hands it: whatever comes, it ends, soon, with the server's verdict or
    # ConnectionLost, never another exception.
    talk = list(_WELL_SAID)
    for where, what in changes:  # a reply replaced, or something said in between
        talk[where % 4 : where % 4 + (where < 4)] = [what]
    ours, theirs = socket.socketpair()
    said = b"".join(talk)

    def server() -> None:
        pieces = []
        rest = said
        for cut in cuts:
            pieces.append(rest[:cut])
            rest = rest[cut:]
        # The client may hang up first (it should, on what is not SMTP).
        with contextlib.suppress(OSError):
            for piece in [*pieces, rest]:
                if piece:
                    theirs.sendall(piece)
                    time.sleep(0.001)
            theirs.shutdown(socket.SHUT_WR)

    talker = threading.Thread(target=server, daemon=True)
    talker.start()
    connection = _over(ours, timeout=0.3, message_timeout=2.0)
    started = time.monotonic()
    try:
        reply = connection.send("lettre@qant.example", "r@example.com", b"Subject: x\r\n\r\nhi\r\n")
    except ConnectionLost:
        reply = None
    finally:
        talker.join()
        connection.close()
        theirs.close()
    assert time.monotonic() - started < 2.5
    event("a verdict" if reply is not None else "connection lost")
    if reply is not None:
        assert 200 <= reply.code < 600
