"""A real SMTP server on loopback (aiosmtpd) that answers as a test tells it to."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, Session


@dataclass
class Received:
    """One message as the server accepted it."""

    sender: str
    recipient: str
    data: bytes
    at: float


@dataclass
class ScriptedHandler:
    """Accepts everything, except what `answers` says (a list of replies per recipient,
    used up one per attempt); `drop_after_data` closes the connection instead of the
    final reply; `delay` slows each message down; once `hold_after` messages are in,
    the next ones wait for `release` (a test acts while a send is surely mid-way)."""

    answers: dict[str, list[str]] = field(default_factory=dict)
    drop_after_data: set[str] = field(default_factory=set)
    delay: float = 0.0
    hold_after: int | None = None
    release: threading.Event = field(default_factory=threading.Event)
    received: list[Received] = field(default_factory=list)
    attempts: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: Any
    ) -> str:
        with self.lock:
            self.attempts[address] += 1
            queue = self.answers.get(address)
            answer = queue.pop(0) if queue else None
        if answer and not answer.startswith("2"):
            return answer
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.hold_after is not None:
            while len(self.received) >= self.hold_after and not self.release.is_set():
                await asyncio.sleep(0.005)
        data = envelope.original_content or b""
        for recipient in envelope.rcpt_tos:
            if recipient in self.drop_after_data:
                assert server.transport is not None
                server.transport.close()
                return "421 4.3.0 closing"  # never seen: the connection is gone
        with self.lock:
            for recipient in envelope.rcpt_tos:
                self.received.append(
                    Received(envelope.mail_from or "", recipient, data, time.monotonic())
                )
        return "250 2.0.0 queued"

    def recipients(self) -> Counter[str]:
        """Return how many messages each address received."""
        with self.lock:
            return Counter(r.recipient for r in self.received)


@dataclass
class SmtpServer:
    """A running scripted server."""

    host: str
    port: int
    handler: ScriptedHandler


def _login(
    server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
) -> AuthResult:
    ok = (data.login, data.password) == (b"qant", b"right password")
    # handled=False: aiosmtpd then answers 535 itself (handled=True would leave it silent).
    return AuthResult(success=ok, handled=False)


@pytest.fixture
def smtp_server() -> Iterator[SmtpServer]:
    """A scripted SMTP server on a free loopback port, accepting logins qant/right password."""
    handler = ScriptedHandler()
    port = free_port()
    controller = Controller(
        handler,
        hostname="127.0.0.1",
        port=port,
        authenticator=_login,
        auth_require_tls=False,
        auth_required=False,
    )
    controller.start()
    try:
        yield SmtpServer("127.0.0.1", port, handler)
    finally:
        controller.stop()


def free_port() -> int:
    """Return a loopback port nobody listens on (aiosmtpd cannot be given port 0)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port
