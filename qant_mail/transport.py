"""Carrying messages: SMTP connections (TLS, login, pipelining), the rate limiter, and the
transports that write files instead (dry run) or keep messages in memory (tests)."""

from __future__ import annotations

import os
import re
import smtplib
import socket
import ssl
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from qant_mail.config import Settings
from qant_mail.errors import ConfigError, ExitCode, QantError

PASSWORD_VARIABLE = "QANT_SMTP_PASSWORD"
_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})\b")


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
    """An SMTP reply: its code, enhanced status code if any, and text."""

    code: int
    text: str

    @property
    def enhanced(self) -> str | None:
        """Return the enhanced status code (RFC 3463), such as "5.1.1"."""
        match = _ENHANCED.match(self.text)
        return ".".join(match.groups()) if match else None

    @property
    def ok(self) -> bool:
        """Return whether the server accepted."""
        return 200 <= self.code < 300

    @property
    def temporary(self) -> bool:
        """Return whether trying again later may work (4xx)."""
        return 400 <= self.code < 500

    @property
    def slow_down(self) -> bool:
        """Return whether the server asks us to send more slowly (421, 4.7.x)."""
        enhanced = self.enhanced or ""
        return self.code == 421 or enhanced.startswith("4.7.")

    def __str__(self) -> str:
        return f"{self.code} {self.text}".strip()


class Connection(Protocol):
    """An open connection that sends messages one after the other."""

    def send(self, sender: str, recipient: str, data: bytes) -> Reply:
        """Send one message; return the server's verdict, or raise `ConnectionLost`."""
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

    def __init__(self, settings: Settings, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        smtp = settings.smtp
        self.host, self.port, self.security = smtp.host, smtp.port, smtp.security
        self.timeout = smtp.timeout
        self.username = smtp.username
        self._password = env.get(PASSWORD_VARIABLE, "")
        if self.username and not self._password:
            raise ConfigError(
                f"smtp.username is set but {PASSWORD_VARIABLE} is not: export the password"
            )
        self.helo = smtp.helo_name or None
        self.context: ssl.SSLContext | None = None
        if self.security != "none":
            self.context = ssl.create_default_context()
            if not smtp.verify_certificates:
                self.context.check_hostname = False
                self.context.verify_mode = ssl.CERT_NONE
        how = {"tls": "TLS", "starttls": "STARTTLS", "none": "no encryption"}[self.security]
        login = f", as {self.username}" if self.username else ""
        self.description = f"{self.host}:{self.port} ({how}{login})"

    def __repr__(self) -> str:
        # Never the password: this object may end up in a traceback or a log.
        return f"SmtpTransport({self.description})"

    def connect(self) -> SmtpConnection:
        """Open, secure and log in a connection."""
        where = f"{self.host}:{self.port}"
        try:
            if self.security == "tls":
                client: smtplib.SMTP = smtplib.SMTP_SSL(
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
            client.ehlo()
            if self.security == "starttls":
                if not client.has_extn("starttls"):
                    client.close()
                    raise TransportUnavailable(f"{where} does not offer STARTTLS")
                client.starttls(context=self.context)
                client.ehlo()
            if self.username:
                client.login(self.username, self._password)
        except smtplib.SMTPAuthenticationError as err:
            raise TransportUnavailable(
                f"{where} refused the login of {self.username!r}: {_reply_text(err)}"
            ) from None
        except ssl.SSLCertVerificationError as err:
            raise TransportUnavailable(
                f"{where}: certificate not trusted ({err.verify_message}); "
                "smtp.verify_certificates = false only for a relay you control"
            ) from None
        except (ssl.SSLError, smtplib.SMTPException, OSError) as err:
            raise TransportUnavailable(f"cannot connect to {where}: {_describe(err)}") from None
        return SmtpConnection(client, where)


class SmtpConnection:
    """One SMTP session, reused for many messages, pipelining when the server allows."""

    def __init__(self, client: smtplib.SMTP, where: str) -> None:
        self.client = client
        self.where = where
        self.pipelining = client.has_extn("pipelining")

    def send(self, sender: str, recipient: str, data: bytes) -> Reply:
        """Send one message in one transaction; RSET after a refusal."""
        commands = [f"MAIL FROM:<{sender}>", f"RCPT TO:<{recipient}>", "DATA"]
        try:
            if self.pipelining:
                # RFC 2920: the three commands in one write, the replies read in turn.
                self.client.send("\r\n".join(commands) + "\r\n")
                replies = [self._reply() for _ in commands]
            else:
                replies = []
                for command in commands:
                    self.client.send(command + "\r\n")
                    replies.append(self._reply())
                    if not replies[-1].ok and replies[-1].code != 354:
                        break
        except (smtplib.SMTPServerDisconnected, OSError) as err:
            raise ConnectionLost(_describe(err), after_data=False) from None
        refusal = next((r for r in replies[:2] if not r.ok), None)
        if refusal is None and replies[-1].code != 354:
            refusal = replies[-1]
        if refusal is not None:
            if replies[-1].code == 354:
                # A server that opened DATA anyway gets an empty message it will refuse.
                self._quietly(".")
            self._quietly("RSET")
            return refusal
        if data.startswith(b".") or b"\r\n." in data:
            data = re.sub(rb"(?m)^\.", b"..", data)  # dot-stuffing (RFC 5321 4.5.2)
        ending = b".\r\n" if data.endswith(b"\r\n") else b"\r\n.\r\n"
        try:
            if self.client.sock is None:
                raise smtplib.SMTPServerDisconnected("connection closed")
            self.client.sock.sendall(data)
            self.client.sock.sendall(ending)
        except (smtplib.SMTPServerDisconnected, OSError) as err:
            # The terminating dot was not written: the server cannot have accepted.
            raise ConnectionLost(_describe(err), after_data=False) from None
        try:
            return self._reply()
        except (smtplib.SMTPServerDisconnected, OSError) as err:
            raise ConnectionLost(_describe(err), after_data=True) from None

    def _reply(self) -> Reply:
        code, text = self.client.getreply()
        if code == -1:
            raise smtplib.SMTPServerDisconnected("connection closed")
        return Reply(code, text.decode("utf-8", "replace").replace("\n", " "))

    def _quietly(self, command: str) -> None:
        """Send a command whose reply does not matter; close the connection if it fails."""
        try:
            self.client.send(command + "\r\n")
            self._reply()
        except (smtplib.SMTPException, OSError):
            self.close()

    def close(self) -> None:
        """Quit politely, or just close."""
        try:
            self.client.quit()
        except (smtplib.SMTPException, OSError):
            self.client.close()


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
            raise TransportUnavailable(f"{self.folder}: cannot write: {err.strerror}") from None
        return MaildirConnection(self.folder)


class MaildirConnection:
    """Writes messages to a Maildir."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def send(self, sender: str, recipient: str, data: bytes) -> Reply:
        """Store the message as a delivery agent would (Return-Path, Delivered-To)."""
        name = store_in_maildir(self.folder, sender, recipient, data)
        return Reply(250, f"2.0.0 stored as {name}")

    def close(self) -> None:
        """Nothing to close."""


def make_maildir(folder: Path) -> None:
    """Create the three folders of a Maildir (raises OSError)."""
    for sub in ("tmp", "new", "cur"):
        (folder / sub).mkdir(parents=True, exist_ok=True)


def store_in_maildir(folder: Path, sender: str, recipient: str, data: bytes) -> str:
    """Write one message into `folder`/new as a .eml file, atomically; return its name."""
    name = f"{time.time():.6f}.{uuid.uuid4().hex[:12]}.{socket.gethostname()}.eml"
    envelope = f"Return-Path: <{sender}>\r\nDelivered-To: {recipient}\r\n".encode()
    temporary = folder / "tmp" / name
    with temporary.open("wb") as out:
        out.write(envelope + data)
    temporary.replace(folder / "new" / name)
    return name


@dataclass
class MemoryTransport:
    """Keeps messages in memory, answering with `answer` (tests)."""

    answer: Callable[[str, bytes], Reply] = lambda recipient, data: Reply(250, "2.0.0 OK")
    messages: list[tuple[str, str, bytes]] = field(default_factory=list)
    description: str = "memory"

    def connect(self) -> MemoryTransport:
        """The transport is its own connection."""
        return self

    def send(self, sender: str, recipient: str, data: bytes) -> Reply:
        """Keep the message; answer as told."""
        reply = self.answer(recipient, data)
        if reply.ok:
            self.messages.append((sender, recipient, data))
        return reply

    def close(self) -> None:
        """Nothing to close."""


class RateLimiter:
    """One limiter shared by every connection: per second, per hour and per day."""

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
        self.clock, self.wall = clock, wall
        self.lock = threading.Lock()
        self.rate = per_second  # lowered when the server asks us to slow down
        self.next_slot = clock()
        self.paused_until = 0.0
        self.minutes: dict[int, int] = dict(history or {})
        self.sent_times: deque[float] = deque()

    def acquire(self, stop: threading.Event) -> int | None:
        """Wait for the right to send one message; return its minute (for the quota),
        or None when the daily quota is used up or `stop` is set."""
        while not stop.is_set():
            with self.lock:
                now = self.clock()
                wait = max(self.paused_until - now, 0.0)
                if not wait and self.rate > 0:
                    wait = max(self.next_slot - now, 0.0)
                if not wait:
                    minute = int(self.wall() // 60)
                    if self.per_day and self._since(minute - 24 * 60 + 1) >= self.per_day:
                        return None
                    if self.per_hour and self._since(minute - 59) >= self.per_hour:
                        wait = 60 - self.wall() % 60  # until the oldest minute falls off
                    else:
                        if self.rate > 0:
                            self.next_slot = max(self.next_slot, now) + 1 / self.rate
                        self.minutes[minute] = self.minutes.get(minute, 0) + 1
                        return minute
            stop.wait(min(wait, 1.0))
        return None

    def slow_down(self) -> None:
        """Halve the rate and pause everyone a moment: the server asked (421, 4.7.x)."""
        with self.lock:
            base = self.rate or self.per_second or 20.0
            self.rate = max(base / 2, 0.5)
            self.paused_until = self.clock() + min(60.0, 10.0 / self.rate)

    def speed_up(self) -> None:
        """Creep back towards the configured rate after a success."""
        with self.lock:
            if self.per_second == 0 and self.rate > 0:
                self.rate = self.rate * 1.02 if self.rate < 500 else 0.0
            elif self.rate < self.per_second:
                self.rate = min(self.per_second, self.rate * 1.02)

    def _since(self, minute: int) -> int:
        return sum(n for m, n in self.minutes.items() if m >= minute)


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
