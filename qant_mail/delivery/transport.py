"""Carrying messages: SMTP connections (TLS, login, pipelining), the rate limiter, and the
transports that write files instead (dry run) or keep messages in memory (tests)."""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import math
import os
import re
import select
import smtplib
import socket
import ssl
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

from qant_mail.base import secrets
from qant_mail.base.config import Settings
from qant_mail.base.errors import ConfigError, ExitCode, QantError

PASSWORD_VARIABLE = "QANT_SMTP_PASSWORD"
_T = TypeVar("_T")
_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})\b")
_GREYLIST = re.compile(r"gr[ae]y-?list", re.IGNORECASE)
_THROTTLE = re.compile(
    r"\brate\b|too many|throttl|slow down|server busy|limit (exceeded|reached)", re.IGNORECASE
)


class TransportUnavailable(QantError):
    """The server cannot be reached, or refuses us (TLS, login)."""

    exit_code = ExitCode.UNAVAILABLE


class ConnectionLost(Exception):
    """The connection broke during a transaction; `after_data` if the whole message had
    been written and only the server's verdict was missing (it may have been delivered)."""

    def __init__(self, reason: str, *, after_data: bool) -> None:
        super().__init__(reason)
        self.after_data = after_data


@dataclass(frozen=True)
class Reply:
    """An SMTP reply: its code, enhanced status code if any, and text; `protocol_error`
    when the server broke the protocol (a 250 where only 354 is right): not a delivery,
    and worth trying again."""

    code: int
    text: str
    protocol_error: bool = False

    @property
    def enhanced(self) -> str | None:
        """Return the enhanced status code (RFC 3463), such as "5.1.1"."""
        match = _ENHANCED.match(self.text)
        return ".".join(match.groups()) if match else None

    @property
    def ok(self) -> bool:
        """Return whether the server accepted."""
        return 200 <= self.code < 300 and not self.protocol_error

    @property
    def temporary(self) -> bool:
        """Return whether trying again later may work (4xx, or a protocol error)."""
        return 400 <= self.code < 500 or self.protocol_error

    @property
    def greylisted(self) -> bool:
        """Return whether this is greylisting: this recipient, later; not a reason to slow."""
        return self.temporary and bool(_GREYLIST.search(self.text))

    @property
    def slow_down(self) -> bool:
        """Return whether the server asks us to send more slowly (421, a rate limit,
        a 4.7.x policy refusal that is not greylisting)."""
        if self.code == 421:
            return True
        if not self.temporary or self.protocol_error or self.greylisted:
            return False
        return (self.enhanced or "").startswith("4.7.") or bool(_THROTTLE.search(self.text))

    def __str__(self) -> str:
        return f"{self.code} {self.text}".strip()


@dataclass(frozen=True, slots=True)
class Wait:
    """What an exchange waits for: its socket readable (or `writable`), until `deadline`
    (time.monotonic()). It is resumed when the socket is ready or the deadline has
    passed, and judges which by trying its read or write first."""

    sock: socket.socket
    writable: bool
    deadline: float


Exchange = Generator[Wait, None, _T]


def finish(exchange: Exchange[_T]) -> _T:
    """Run `exchange` to its end, waiting on its socket each time it asks: a send that
    waits for one connection alone (a send loop waits on all of its own)."""
    poller = select.poll()
    try:
        wait = next(exchange)
        while True:
            poller.register(wait.sock, select.POLLOUT if wait.writable else select.POLLIN)
            remaining = wait.deadline - time.monotonic()
            if remaining > 0:
                poller.poll(math.ceil(remaining * 1000))
            wait = exchange.send(None)
    except StopIteration as end:
        return end.value  # type: ignore[no-any-return]


def exchange_of(
    connection: Connection, sender: str, recipient: str, data: bytes, *, dot_safe: bool = False
) -> Exchange[Reply]:
    """Return the exchange of one message on `connection`: its own, which waits on its
    socket, or for a connection that has none (a folder, memory), one that sends at
    once."""
    own = getattr(connection, "exchange", None)
    if own is not None:
        return own(sender, recipient, data, dot_safe=dot_safe)  # type: ignore[no-any-return]
    return _at_once(connection, sender, recipient, data, dot_safe)


def _at_once(
    connection: Connection, sender: str, recipient: str, data: bytes, dot_safe: bool
) -> Exchange[Reply]:
    yield from ()
    return connection.send(sender, recipient, data, dot_safe=dot_safe)


class Connection(Protocol):
    """An open connection that sends messages one after the other, to `relay` (what
    the records name as having carried them: host:port for SMTP)."""

    relay: str

    def send(self, sender: str, recipient: str, data: bytes, *, dot_safe: bool = False) -> Reply:
        """Send one message; return the server's verdict, or raise `ConnectionLost`.
        `dot_safe`: no line of `data` starts with "." (the composer sees to it), so the
        message needs no dot-stuffing, and no scan for it."""
        ...

    def close(self) -> None:
        """Say goodbye and close."""
        ...


class Transport(Protocol):
    """Something that opens connections to carry messages."""

    description: str

    def connect(self) -> Connection:
        """Open a connection, or raise `TransportUnavailable`."""
        ...


class SmtpTransport:
    """An SMTP relay: implicit TLS, STARTTLS or plain, with an optional login."""

    def __init__(
        self,
        settings: Settings,
        env: Mapping[str, str] | None = None,
        *,
        relay: tuple[str, int] | None = None,
    ) -> None:
        env = os.environ if env is None else env
        smtp = settings.smtp
        self.host, self.port = relay or (smtp.host, smtp.port)
        self.security = smtp.security
        self.timeout = smtp.timeout
        self.message_timeout = smtp.message_timeout
        self.username = smtp.username
        self._password = secrets.secret(env, PASSWORD_VARIABLE) or ""
        if self.username and not self._password:
            raise ConfigError(
                f"smtp.username is set but {PASSWORD_VARIABLE} is not: export the password"
            )
        # A relay elsewhere: what leaves this machine must be signed and encrypted.
        self.remote = not is_loopback(self.host)
        cleartext = self.username and self.security == "none" and self.remote
        if cleartext and not smtp.allow_plaintext_login:
            raise ConfigError(
                f'smtp.username is set but smtp.security is "none": the password would '
                f'cross the network to {self.host} in clear. Use security = "starttls" '
                '(port 587) or "tls" (465); or, for a relay on a network you trust, '
                "allow_plaintext_login = true"
            )
        self.helo = smtp.helo_name or None
        self.context: ssl.SSLContext | None = None
        if self.security != "none":
            self.context = ssl.create_default_context()
            if smtp.ca_file:
                self._trust(settings.root / smtp.ca_file, settings.path)
            if not smtp.verify_certificates:
                self.context.check_hostname = False
                self.context.verify_mode = ssl.CERT_NONE
        how = {"tls": "TLS", "starttls": "STARTTLS", "none": "no encryption"}[self.security]
        login = f", as {self.username}" if self.username else ""
        self.description = f"{self.where} ({how}{login})"

    def __repr__(self) -> str:
        # Never the password: this object may end up in a traceback or a log.
        return f"SmtpTransport({self.description})"

    def _trust(self, ca_file: Path, settings_file: Path) -> None:
        """Trust the certificate authorities of `ca_file` too (a private CA)."""
        assert self.context is not None
        where = f"{settings_file}: smtp.ca_file"
        try:
            self.context.load_verify_locations(cafile=ca_file)
        except FileNotFoundError as err:
            raise ConfigError(f"{where}: no such file {ca_file}") from err
        except (ssl.SSLError, OSError, ValueError) as err:
            raise ConfigError(
                f"{where}: {ca_file} holds no certificate in PEM form ({err})"
            ) from err

    @property
    def where(self) -> str:
        """Return the relay's host:port (an IPv6 address in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def connect(self) -> SmtpConnection:
        """Open, secure and log in a connection."""
        return SmtpConnection(self._session(), self.where, self.timeout, self.message_timeout)

    def features(self) -> dict[str, str]:
        """Open, secure and log in a session as a send does, and close it; return the
        extensions the relay offers then, by lower-case name ("size": its limit in
        bytes, "" when it states none), or raise `TransportUnavailable` saying which
        step failed."""
        client = self._session()
        try:
            return dict(client.esmtp_features)
        finally:
            with contextlib.suppress(smtplib.SMTPException, OSError):
                client.quit()
            client.close()

    def _session(self) -> smtplib.SMTP:
        """Return a session opened, secured and logged in; raise TransportUnavailable."""
        where = self.where
        try:
            return self._open(where)
        except smtplib.SMTPAuthenticationError as err:
            raise TransportUnavailable(
                f"{where} refused the login of {self.username!r}: {_reply_text(err)}"
            ) from err
        except ssl.SSLCertVerificationError as err:
            raise TransportUnavailable(
                f"{where}: certificate not trusted ({err.verify_message}); for a relay "
                "whose certificate a private CA signed, smtp.ca_file = that CA's certificate "
                "(PEM); smtp.verify_certificates = false only for a relay you control"
            ) from err
        except (ssl.SSLError, smtplib.SMTPException, OSError) as err:
            hint = ""
            if isinstance(err, ConnectionRefusedError) and self.port == 2525 and not self.remote:
                # The shipped settings send to the local test inbox: it is not running.
                hint = " (the local test inbox: is `qant-mail inbox` running?)"
            raise TransportUnavailable(
                f"cannot connect to {where}: {_describe(err)}{hint}"
            ) from err

    def _open(self, where: str) -> smtplib.SMTP:
        """Connect, greet, secure and log in; close the connection if any step fails."""
        client: smtplib.SMTP
        if self.security == "tls":
            client = smtplib.SMTP_SSL(
                self.host,
                self.port,
                local_hostname=self.helo,
                timeout=self.timeout,
                context=self.context,
            )
        else:
            client = smtplib.SMTP(
                self.host, self.port, local_hostname=self.helo, timeout=self.timeout
            )
        try:
            client.ehlo()
            if self.security == "starttls":
                if not client.has_extn("starttls"):
                    raise TransportUnavailable(f"{where} does not offer STARTTLS")
                client.starttls(context=self.context)
                client.ehlo()
            if self.username:
                client.login(self.username, self._password)
        except BaseException:
            client.close()
            raise
        return client


class Relays:
    """Several relays, tried in order: the first, then each fallback when the ones
    before it cannot be reached or refuse the connection (421, TLS, login). A relay that
    failed, or lost a connection in the middle of a send, rests: the next connections
    try the others first, and it again after `RESTING` seconds, so that a send moves back
    to the main relay when it returns."""

    RESTING = 60.0

    def __init__(
        self, transports: Sequence[SmtpTransport], clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.transports = list(transports)
        self.clock = clock
        self.description = ", then ".join(t.description for t in self.transports)
        self._resting: dict[str, float] = {}  # host:port → until when
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Relays({self.description})"

    @property
    def remote(self) -> bool:
        """Return whether any of the relays is elsewhere than this machine."""
        return any(t.remote for t in self.transports)

    def connect(self) -> Connection:
        """Open a connection to the first relay that takes one, those resting last; raise
        TransportUnavailable naming why each refused."""
        now = self.clock()
        with self._lock:
            order = sorted(self.transports, key=lambda t: self._resting.get(t.where, 0) > now)
        failures: list[str] = []
        for transport in order:
            try:
                connection = transport.connect()
            except TransportUnavailable as err:
                self.rest(transport.where)
                failures.append(str(err))
                continue
            with self._lock:
                self._resting.pop(transport.where, None)
            return _Watched(connection, self)
        raise TransportUnavailable("; ".join(failures))

    def rest(self, relay: str) -> None:
        """Let `relay` rest: it is tried after the others for a while."""
        with self._lock:
            self._resting[relay] = self.clock() + self.RESTING


class _Watched:
    """A connection to one of several relays, that tells them when its relay fails
    mid-send (the connection is lost, or it says 421: closing)."""

    def __init__(self, connection: SmtpConnection, relays: Relays) -> None:
        self.connection, self.relays = connection, relays
        self.relay = connection.relay

    @property
    def worn(self) -> bool:
        """Return whether the relay has refused enough here (see SmtpConnection)."""
        return self.connection.worn

    def send(self, sender: str, recipient: str, data: bytes, *, dot_safe: bool = False) -> Reply:
        """Send through the relay, waiting for the end (see `exchange`)."""
        return finish(self.exchange(sender, recipient, data, dot_safe=dot_safe))

    def exchange(
        self, sender: str, recipient: str, data: bytes, *, dot_safe: bool = False
    ) -> Exchange[Reply]:
        """Send through the relay; let it rest if it fails."""
        try:
            reply = yield from self.connection.exchange(sender, recipient, data, dot_safe=dot_safe)
        except ConnectionLost:
            self.relays.rest(self.relay)
            raise
        if reply.code == 421:
            self.relays.rest(self.relay)
        return reply

    def close(self) -> None:
        """Close the connection."""
        self.connection.close()


def relay_transport(
    settings: Settings, env: Mapping[str, str] | None = None
) -> SmtpTransport | Relays:
    """Return what carries the messages of the newsletter `settings` are seen by: its
    relay, or its relays in order when it has fallbacks."""
    relays = settings.relays
    if len(relays) == 1:
        return SmtpTransport(settings, env, relay=relays[0])
    return Relays([SmtpTransport(settings, env, relay=relay) for relay in relays])


# What a server's reply may not carry into our records and terminals: the control
# characters (a NUL, which PostgreSQL's text refuses; escape sequences), tab aside.
_CONTROLS = dict.fromkeys([*range(0, 9), *range(10, 32), 127])


class SmtpConnection:
    """One SMTP session, reused for many messages, pipelining when the server allows.

    Its socket is non-blocking: an exchange (`exchange`) yields each time it must wait,
    so that one thread can carry many connections, waiting on all their sockets at once
    (see outbox._Run); `send` is the same exchange, waiting on this socket alone."""

    # Postfix slows a client down after 10 errors (smtpd_soft_error_limit) and drops it
    # after 20: a connection the server has answered this many errors is closed and a
    # fresh one opened. A refused recipient is two of them: its RCPT, and the DATA
    # pipelined behind it. (Postfix forgives a client's errors when it accepts a message;
    # this count does not, which replaces a connection sooner than needed, never later.)
    MAX_ERRORS = 8

    def __init__(
        self, client: smtplib.SMTP, where: str, timeout: float, message_timeout: float
    ) -> None:
        self.client = client
        self.where = self.relay = where
        self.pipelining = client.has_extn("pipelining")
        self.timeout = timeout
        self.message_timeout = message_timeout
        self.errors = 0  # the error replies the server has given in this session
        if client.sock is None:
            raise ConnectionLost("connection closed", after_data=False)
        self.sock = client.sock
        self.tls = isinstance(self.sock, ssl.SSLSocket)
        with contextlib.suppress(OSError):
            self.sock.setblocking(False)
        self.buffer = b""
        self.broken = False  # after a lost exchange: no QUIT, the session is out of step
        self.gone = False  # the socket is closed: no message can go this way any more
        self.closing = threading.Lock()
        self.closed = False

    @property
    def worn(self) -> bool:
        """Return whether this connection should be replaced: the server has answered
        enough errors here to count us as a nuisance, or it is closed (the server hung
        up, or said 421, after refusing a message)."""
        return self.gone or self.errors >= self.MAX_ERRORS

    def send(self, sender: str, recipient: str, data: bytes, *, dot_safe: bool = False) -> Reply:
        """Send one message in one transaction, waiting for its end (see `exchange`)."""
        return finish(self.exchange(sender, recipient, data, dot_safe=dot_safe))

    def exchange(
        self, sender: str, recipient: str, data: bytes, *, dot_safe: bool = False
    ) -> Exchange[Reply]:
        """Send one message in one transaction; RSET after a refusal. Yields a `Wait`
        each time the socket must be ready; returns the server's verdict, or raises
        `ConnectionLost`. The whole exchange has `message_timeout` seconds, and each
        wait at most `timeout`: a server that trickles its reply lines cannot hold a
        send forever. `dot_safe`: no line of `data` starts with "." (the composer sees
        to it), so the message needs no dot-stuffing, and no scan for it."""
        deadline = time.monotonic() + self.message_timeout
        envelope = [f"MAIL FROM:<{sender}>", f"RCPT TO:<{recipient}>", "DATA"]
        self.broken = True  # until this exchange ends in step
        try:
            if self.pipelining:
                # RFC 2920: MAIL, RCPT and DATA in one write, their replies read in turn:
                # one round trip before the message instead of two. (Postfix's client
                # does the same.)
                yield from self._write(deadline, ("\r\n".join(envelope) + "\r\n").encode())
                replies = []
                for _ in envelope:
                    try:
                        replies.append((yield from self._reply(deadline)))
                    except (OSError, _ProtocolError):
                        if all(r.ok for r in replies):
                            raise
                        # Refused, then gone (some servers hang up on an unknown
                        # user): the refusal is this message's verdict all the same.
                        self._close_socket()
                        break
                    if replies[-1].code == 421:
                        break  # the server is closing: no more replies will come
            else:
                replies = []
                for command in envelope:
                    yield from self._write(deadline, command.encode() + b"\r\n")
                    replies.append((yield from self._reply(deadline)))
                    if not replies[-1].ok:
                        break  # (DATA's 354 too, but it is the last)
            refusal = next((r for r in replies[:2] if not r.ok), None)
            opened = replies[2] if len(replies) == 3 else None
            if refusal is not None:
                opened_anyway = opened is not None and opened.code == 354
                refused = sum(not r.ok for r in replies[:2])
                self.errors += refused + (opened is not None and not opened_anyway)
                self.broken = False
                # Closed (and so `worn`) when the server is closing (421), or opened the
                # data although it refused the envelope (RFC 2920 says it must not): data
                # cut off by a hang-up is never delivered; even an empty message might
                # be, to whoever it kept.
                if opened_anyway or any(r.code == 421 for r in replies):
                    self._close_socket()
                if not self.gone:
                    yield from self._quietly("RSET", deadline)
                return refusal
            assert opened is not None
        except (OSError, _ProtocolError) as err:
            raise ConnectionLost(_describe(err), after_data=False) from err
        if opened.code != 354:
            # Only 354 lets the message go. Anything else is the verdict; a 2xx here is
            # a protocol error (the server received nothing), never a delivery.
            self.errors += 1
            yield from self._quietly("RSET", deadline)
            self.broken = False
            if opened.ok:
                return Reply(
                    opened.code,
                    f"{opened.text} (protocol error: DATA answered without 354; nothing was sent)",
                    protocol_error=True,
                )
            return opened
        if not dot_safe and (data.startswith(b".") or b"\n." in data):
            data = re.sub(rb"(?m)^\.", b"..", data)  # dot-stuffing (RFC 5321 4.5.2)
        ending = b".\r\n" if data.endswith(b"\r\n") else b"\r\n.\r\n"
        try:
            # One write: a separate small write of the final dot would wait for the
            # server's delayed ACK (Nagle), some 40 ms a message.
            yield from self._write(deadline, data, ending)
        except OSError as err:
            # The terminating dot was not written: the server cannot have accepted.
            raise ConnectionLost(_describe(err), after_data=False) from err
        try:
            verdict = yield from self._reply(deadline)
        except (OSError, _ProtocolError) as err:
            raise ConnectionLost(_describe(err), after_data=True) from err
        self.broken = False
        if not verdict.ok:
            self.errors += 1
        return verdict

    def _write(self, deadline: float, data: bytes, *more: bytes) -> Exchange[None]:
        """Send `data` and then `more`, in as few system calls as the socket allows;
        raise TimeoutError when the server takes nothing for `timeout` seconds, or the
        message's `deadline` passes."""
        if self.tls:
            # An SSL write retried after "want write" must be given the same bytes: one
            # buffer, the message and its dot joined.
            pieces = [memoryview(b"".join((data, *more)) if more else data)]
        else:
            # Gathered by the kernel: a message and its final dot leave in one write
            # without a copy of the message made to join them.
            pieces = [memoryview(piece) for piece in (data, *more)]
        until = 0.0  # set at the first wait: most writes need none
        while pieces:
            try:
                sent = self.sock.send(pieces[0]) if self.tls else self.sock.sendmsg(pieces)
            except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError) as err:
                now = time.monotonic()
                if not until:
                    until = min(deadline, now + self.timeout)
                elif now >= until:
                    raise TimeoutError("timed out") from None
                yield Wait(self.sock, not isinstance(err, ssl.SSLWantReadError), until)
                continue
            until = 0.0  # taken: the next wait has `timeout` seconds again
            while pieces and sent >= len(pieces[0]):
                sent -= len(pieces.pop(0))
            if pieces and sent:
                pieces[0] = pieces[0][sent:]

    def _reply(self, deadline: float) -> Exchange[Reply]:
        """Read one reply, all its lines, before `deadline`."""
        lines: list[bytes] = []
        while True:
            end = self.buffer.find(b"\n")
            if end < 0:
                yield from self._fill(deadline)
                continue
            line = self.buffer[:end].rstrip(b"\r")
            self.buffer = self.buffer[end + 1 :]
            if len(line) < 3 or not line[:3].isdigit():
                raise _ProtocolError(f"not an SMTP reply: {line[:40]!r}")
            lines.append(line[4:])
            if len(line) == 3 or line[3:4] == b" ":
                break
            if len(lines) >= 100:
                raise _ProtocolError("a reply of more than 100 lines")
        text = b" ".join(lines).decode("utf-8", "replace").translate(_CONTROLS)
        return Reply(int(line[:3]), text)

    def _fill(self, deadline: float) -> Exchange[None]:
        """Read what the server has written next into the buffer, waiting for it at
        most `timeout` seconds, and not past `deadline`."""
        if len(self.buffer) > 4096:
            raise _ProtocolError("a reply line of more than 4 KB")
        now = time.monotonic()
        until = min(deadline, now + self.timeout)
        # The reply to what was just written is seldom there yet: wait, then read. (Under
        # TLS, bytes already decrypted are not seen by a poll: read them first. Past the
        # deadline, after a stall of the loop, read once before judging: the reply may
        # be there.)
        wait = Wait(self.sock, False, until)
        ready = now >= deadline or (self.tls and self.sock.pending() > 0)  # type: ignore[attr-defined]
        while True:
            if not ready:
                yield wait
            ready = False
            try:
                chunk = self.sock.recv(8192)
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError) as err:
                if time.monotonic() >= until:
                    raise TimeoutError("no complete reply in time") from None
                wait = Wait(self.sock, isinstance(err, ssl.SSLWantWriteError), until)
                continue
            if not chunk:
                raise _ProtocolError("connection closed")
            self.buffer += chunk
            return

    def _quietly(self, command: str, deadline: float) -> Exchange[None]:
        """Send a command whose reply does not matter; close the connection if it fails."""
        try:
            yield from self._write(deadline, command.encode() + b"\r\n")
            yield from self._reply(deadline)
        except (OSError, _ProtocolError):
            self._close_socket()

    def close(self) -> None:
        """Quit politely, or just close (a session out of step gets no QUIT). Once: a
        second call, from wherever, does nothing."""
        with self.closing:
            if self.closed:
                return
            self.closed = True
        if not self.broken and self.client.sock is not None:
            finish(self._quietly("QUIT", time.monotonic() + min(self.timeout, 5.0)))
        self._close_socket()

    def _close_socket(self) -> None:
        self.gone = True
        # smtplib's own reader (a makefile) holds the socket open too: close both.
        with contextlib.suppress(OSError):
            self.client.close()


class _ProtocolError(Exception):
    """The server said something that is not SMTP, or hung up mid-reply."""


class MaildirTransport:
    """Writes each message to a Maildir folder as NAME.eml (dry runs, the local inbox)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.description = f"the folder {folder}"

    def connect(self) -> MaildirConnection:
        """Make sure the folder exists."""
        try:
            make_maildir(self.folder)
        except OSError as err:
            raise TransportUnavailable(f"{self.folder}: cannot write: {err.strerror}") from err
        return MaildirConnection(self.folder)


class MaildirConnection:
    """Writes messages to a Maildir."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.relay = str(folder)

    def send(self, sender: str, recipient: str, data: bytes, *, dot_safe: bool = False) -> Reply:
        """Store the message as a delivery agent would (Return-Path, Delivered-To)."""
        try:
            (name,) = store_in_maildir(self.folder, sender, [recipient], data)
        except OSError as err:
            return disk_reply(err)
        return Reply(250, f"2.0.0 stored as {name}")

    def close(self) -> None:
        """Nothing to close."""


def make_maildir(folder: Path) -> None:
    """Create the three folders of a Maildir (raises OSError)."""
    for sub in ("tmp", "new", "cur"):
        (folder / sub).mkdir(parents=True, exist_ok=True)


def store_in_maildir(folder: Path, sender: str, recipients: list[str], data: bytes) -> list[str]:
    """Write one copy of a message per recipient into `folder`/new as .eml files; return
    their names. All or none: every copy is written to tmp/ first and moved to new/ only
    when all are there (a move needs no space), so that a full disk half-way leaves
    nothing a retry would deliver twice. Raises OSError."""
    host = socket.gethostname()
    written: list[tuple[Path, str]] = []
    try:
        for recipient in recipients:
            name = f"{time.time():.6f}.{uuid.uuid4().hex[:12]}.{host}.eml"
            envelope = f"Return-Path: <{sender}>\r\nDelivered-To: {recipient}\r\n".encode()
            temporary = folder / "tmp" / name
            written.append((temporary, name))
            with temporary.open("wb") as out:
                out.write(envelope + data)
    except OSError:
        for temporary, _ in written:
            with contextlib.suppress(OSError):
                temporary.unlink()
        raise
    for temporary, name in written:
        temporary.replace(folder / "new" / name)
    return [name for _, name in written]


def disk_reply(err: OSError) -> Reply:
    """The SMTP answer of a delivery agent whose disk failed: temporary, so that the
    message is tried again (RFC 3463: 4.3.1 for a full disk)."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return Reply(452, "4.3.1 Insufficient system storage")
    return Reply(451, f"4.3.0 Local error in processing: {err.strerror or 'cannot write'}")


@dataclass
class MemoryTransport:
    """Keeps messages in memory, answering with `answer` (tests)."""

    answer: Callable[[str, bytes], Reply] = lambda recipient, data: Reply(250, "2.0.0 OK")
    messages: list[tuple[str, str, bytes]] = field(default_factory=list)
    description: str = "memory"
    relay: str = "memory"

    def connect(self) -> MemoryTransport:
        """The transport is its own connection."""
        return self

    def send(self, sender: str, recipient: str, data: bytes, *, dot_safe: bool = False) -> Reply:
        """Keep the message; answer as told."""
        reply = self.answer(recipient, data)
        if reply.ok:
            self.messages.append((sender, recipient, data))
        return reply

    def close(self) -> None:
        """Nothing to close."""


class RateLimiter:
    """One limiter shared by every connection: per second, per hour and per day."""

    RECOVERY = 5.0

    def __init__(
        self,
        per_second: float,
        per_hour: int,
        per_day: int,
        history: Mapping[int, int] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.per_second, self.per_hour, self.per_day = per_second, per_hour, per_day
        self.configured = per_second  # for the whole send, whatever the senders' number
        self.clock, self.wall = clock, wall
        self.lock = threading.Lock()
        self.rate = per_second  # lowered when the server asks us to slow down
        self.next_slot = clock()
        self.paused_until = 0.0
        self.slowed_at = -1e9  # when the server last asked us to slow down
        self.minutes: dict[int, int] = dict(history or {})
        self.sent_times: deque[float] = deque()

    def acquire(self, stop: threading.Event) -> int | None:
        """Wait for the right to send one message; return its minute (for the quota),
        or None when the daily quota is used up or `stop` is set."""
        while not stop.is_set():
            minute, wait = self.poll()
            if minute is not None:
                return minute
            if wait == math.inf:
                return None
            stop.wait(min(wait, 1.0))
        return None

    def poll(self) -> tuple[int | None, float]:
        """Take the right to send one message now, if there is one: return its minute
        (for the quota) and 0; else None and how long to wait before asking again
        (infinity: the daily quota is used up)."""
        with self.lock:
            now = self.clock()
            wait = max(self.paused_until - now, 0.0)
            if not wait and self.rate > 0:
                wait = max(self.next_slot - now, 0.0)
            if wait:
                return None, wait
            minute = int(self.wall() // 60)
            if self.per_day and self._since(minute - 24 * 60 + 1) >= self.per_day:
                return None, math.inf
            if self.per_hour and self._since(minute - 59) >= self.per_hour:
                return None, 60 - self.wall() % 60  # until the oldest minute falls off
            if self.rate > 0:
                self.next_slot = max(self.next_slot, now) + 1 / self.rate
            self.minutes[minute] = self.minutes.get(minute, 0) + 1
            return minute, 0.0

    def slow_down(self) -> None:
        """Halve the rate and pause everyone a moment: the server asked (421, a limit)."""
        with self.lock:
            now = self.clock()
            if now - self.slowed_at < 1.0:
                return  # the connections all heard it at once: one signal, one halving
            base = self.rate or self.per_second or 20.0
            self.rate = max(base / 2, 0.5)
            self.slowed_at = now
            self.paused_until = now + min(10.0, 2.0 / self.rate)

    def speed_up(self) -> None:
        """Get back to the configured rate after a success: the rate doubles every
        `RECOVERY` seconds without a new request to slow down."""
        with self.lock:
            target = self.per_second
            if self.rate == target or (target == 0 and self.rate == 0):
                return
            now = self.clock()
            if now - self.slowed_at < self.RECOVERY:
                return
            self.slowed_at = now - self.RECOVERY / 2  # the next doubling, half as soon
            doubled = self.rate * 2
            if target == 0:
                self.rate = 0.0 if doubled > 200 else doubled  # 0: no limit again
            else:
                self.rate = min(target, doubled)

    def share(self, senders: int, history: Mapping[int, int]) -> None:
        """Hold the limits for `senders` senders together: this one takes its part of
        the rate a second, and counts the hour's and day's messages of all of them
        (`history`, the shared quota, plus its own not yet written there)."""
        with self.lock:
            part = self.configured / max(1, senders)
            if self.rate == self.per_second or self.rate > part:
                self.rate = part  # unless the server asked for slower still
            self.per_second = part
            own = {m: n for m, n in self.minutes.items() if n > history.get(m, 0)}
            self.minutes = {**history, **own}

    def _since(self, minute: int) -> int:
        return sum(n for m, n in self.minutes.items() if m >= minute)


def is_loopback(host: str) -> bool:
    """Return whether `host` names this machine (localhost, or a loopback address)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _reply_text(err: smtplib.SMTPResponseException) -> str:
    text = (
        err.smtp_error.decode("utf-8", "replace")
        if isinstance(err.smtp_error, bytes)
        else str(err.smtp_error)
    )
    return f"{err.smtp_code} {text}"


def _describe(err: BaseException) -> str:
    if isinstance(err, smtplib.SMTPResponseException):
        return _reply_text(err)
    if isinstance(err, socket.gaierror):
        return f"unknown host ({err.strerror})"
    if isinstance(err, TimeoutError | socket.timeout):
        return "timed out"
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return str(err) or type(err).__name__
