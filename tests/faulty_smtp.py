"""An SMTP server on loopback that misbehaves on purpose, the way real ones have been seen
to: answering DATA with 250, trickling reply lines, going silent, greylisting, closing
mid-session, refusing sizes, counting errors like Postfix. aiosmtpd is too polite for
this, so the protocol is spoken here by hand."""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest


@dataclass
class Behaviour:
    """What the server does wrong (all off: a plain, correct server)."""

    data_reply: str = "354 End data with <CR><LF>.<CR><LF>"  # "250 OK": never opens DATA
    final_reply: str = "250 2.0.0 queued"  # the verdict after the message
    trickle_after_data: float = 0.0  # send "250-" every N seconds instead of a verdict
    silent_after_data: bool = False  # a black hole: read the message, never answer
    greylist_seconds: float = 0.0  # refuse a new (sender, recipient) pair this long
    close_after_messages: int = 0  # answer 421 and close after N messages on a session
    reject_recipients: frozenset[str] = frozenset()  # 550 5.1.1 at RCPT
    close_after_reject: bool = False  # close the connection after a 5.1.1
    goodbye_after_reject: str = ""  # and say this first ("421 …"), as the next reply
    data_despite_refusal: bool = False  # open DATA (354) after refusing every RCPT
    error_limit: int = 0  # Postfix's smtpd_hard_error_limit: close after N errors
    pipelining: bool = True
    greeting: str = "220 faulty.test ESMTP"  # "421 …": refuses every connection
    stop_after_messages: int = 0  # the server stops (as if killed) after N messages


@dataclass
class Received:
    """A message the server accepted."""

    sender: str
    recipients: list[str]
    data: bytes


@dataclass
class FaultyServer:
    """A running misbehaving server; counts what it saw."""

    host: str
    port: int
    behaviour: Behaviour
    received: list[Received] = field(default_factory=list)
    data_after_refusal: int = 0  # DATA commands that came after every RCPT was refused
    data_for_no_one: list[bytes] = field(default_factory=list)  # data sent after those
    connections: int = 0
    errors: int = 0
    first_seen: dict[tuple[str, str], float] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stopped: threading.Event = field(default_factory=threading.Event)

    def recipients(self) -> Counter[str]:
        """Return how many messages each address received."""
        with self.lock:
            return Counter(r for message in self.received for r in message.recipients)


class _Session(socketserver.StreamRequestHandler):
    server: _Server

    def handle(self) -> None:
        state = self.server.state
        rules = state.behaviour
        with state.lock:
            state.connections += 1
        sender, refused, messages, errors = "", 0, 0, 0
        recipients: list[str] = []
        self.reply(rules.greeting)
        if not rules.greeting.startswith("220"):
            return
        while True:
            line = self.rfile.readline(4096)
            if not line or state.stopped.is_set():
                return  # a stopped server answers nothing more: the connection drops
            command = line.decode("ascii", "replace").strip()
            verb = command[:4].upper()
            if verb in ("EHLO", "HELO"):
                extensions = ["PIPELINING"] if rules.pipelining else []
                lines = ["faulty.test", *extensions, "8BITMIME"]
                self.reply_lines("250", lines)
            elif verb == "MAIL":
                sender, recipients, refused = command.partition(":")[2].strip(" <>"), [], 0
                self.reply("250 2.1.0 OK")
            elif verb == "RCPT":
                recipient = command.partition(":")[2].strip(" <>")
                answer = self.rcpt(sender, recipient)
                if answer.startswith("2"):
                    recipients.append(recipient)
                else:
                    refused += 1
                    errors += 1
                self.reply(answer)
                if answer.startswith("550") and rules.close_after_reject:
                    if rules.goodbye_after_reject:
                        self.reply(rules.goodbye_after_reject)
                    return
            elif verb == "DATA":
                if not recipients and refused and rules.data_despite_refusal:
                    # What RFC 2920 forbids, and some servers do: what comes is for no one.
                    with state.lock:
                        state.data_after_refusal += 1
                    self.reply("354 End data with <CR><LF>.<CR><LF>")
                    data = self.read_data()
                    if data is None:
                        return
                    with state.lock:
                        state.data_for_no_one.append(data)
                    errors += 1
                    self.reply("554 5.5.1 Error: no valid recipients")
                elif not recipients:
                    with state.lock:
                        state.data_after_refusal += int(refused > 0)
                    errors += 1
                    self.reply("554 5.5.1 Error: no valid recipients")
                elif not rules.data_reply.startswith("354"):
                    self.reply(rules.data_reply)
                else:
                    self.reply(rules.data_reply)
                    data = self.read_data()
                    if data is None:
                        return
                    if not self.verdict(sender, recipients, data):
                        return
                    messages += 1
                    if rules.close_after_messages and messages >= rules.close_after_messages:
                        self.reply("421 4.3.2 Service shutting down")
                        return
                recipients = []
            elif verb == "RSET":
                sender, recipients = "", []
                self.reply("250 2.0.0 OK")
            elif verb == "NOOP":
                self.reply("250 2.0.0 OK")
            elif verb == "QUIT":
                self.reply("221 2.0.0 Bye")
                return
            else:
                errors += 1
                self.reply("502 5.5.2 Error: command not recognized")
            if rules.error_limit and errors >= rules.error_limit:
                with state.lock:
                    state.errors += errors
                self.reply("421 4.7.0 Error: too many errors")
                return

    def rcpt(self, sender: str, recipient: str) -> str:
        state, rules = self.server.state, self.server.state.behaviour
        if recipient in rules.reject_recipients:
            return f"550 5.1.1 <{recipient}>: Recipient address rejected: User unknown"
        if rules.greylist_seconds:
            now = time.monotonic()
            with state.lock:
                first = state.first_seen.setdefault((sender, recipient), now)
            if now - first < rules.greylist_seconds:
                return f"450 4.7.1 <{recipient}>: Recipient address rejected: Greylisted"
        return "250 2.1.5 OK"

    def verdict(self, sender: str, recipients: list[str], data: bytes) -> bool:
        """Answer the end of a message; False when the session is over."""
        state, rules = self.server.state, self.server.state.behaviour
        if rules.silent_after_data:
            while self.rfile.read(1):  # until the client gives up and closes
                pass
            return False
        if rules.trickle_after_data:
            while True:
                time.sleep(rules.trickle_after_data)
                if not self.reply("250-still thinking"):
                    return False
        if state.stopped.is_set():
            return False  # stopped while the message came in: no verdict
        if rules.final_reply.startswith("2"):
            with state.lock:
                state.received.append(Received(sender, list(recipients), data))
                accepted = len(state.received)
            if rules.stop_after_messages and accepted >= rules.stop_after_messages:
                self.reply(rules.final_reply)
                state.stopped.set()
                # Off this thread: shutdown() waits for the serving loop.
                threading.Thread(target=self.server.stop, daemon=True).start()
                return False
        self.reply(rules.final_reply)
        return True

    def read_data(self) -> bytes | None:
        chunks: list[bytes] = []
        while True:
            line = self.rfile.readline(1 << 20)
            if not line:
                return None
            if line == b".\r\n":
                return b"".join(chunks)
            chunks.append(line[1:] if line.startswith(b"..") else line)

    def reply(self, text: str) -> bool:
        try:
            self.wfile.write(text.encode() + b"\r\n")
            self.wfile.flush()
        except OSError:
            return False
        return True

    def reply_lines(self, code: str, lines: list[str]) -> None:
        body = "".join(f"{code}-{line}\r\n" for line in lines[:-1]) + f"{code} {lines[-1]}\r\n"
        self.wfile.write(body.encode())
        self.wfile.flush()


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, state: FaultyServer) -> None:
        self.state = state
        self.closed = False
        super().__init__((state.host, 0), _Session)
        state.port = self.server_address[1]

    def stop(self) -> None:
        """Stop listening: new connections are refused, as by a relay that is down."""
        if not self.closed:
            self.closed = True
            self.shutdown()
            self.server_close()


@dataclass
class FaultyServerFactory:
    """Starts misbehaving servers for a test; stops them all at its end."""

    servers: list[_Server] = field(default_factory=list)

    def __call__(self, behaviour: Behaviour | None = None) -> FaultyServer:
        state = FaultyServer("127.0.0.1", 0, behaviour or Behaviour())
        server = _Server(state)
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        self.servers.append(server)
        return state

    def stop(self) -> None:
        for server in self.servers:
            server.state.stopped.set()
            server.stop()


@pytest.fixture
def faulty_smtp() -> Iterator[FaultyServerFactory]:
    """A factory of misbehaving SMTP servers on loopback."""
    factory = FaultyServerFactory()
    try:
        yield factory
    finally:
        factory.stop()


def wait_port(host: str, port: int, timeout: float = 5.0) -> None:
    """Wait until something listens on host:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex((host, port)) == 0:
                return
        time.sleep(0.02)
    raise TimeoutError(f"{host}:{port} does not answer")
