"""The local test inbox: an SMTP server on 127.0.0.1 (aiosmtpd) that keeps every message
it receives as a .eml file in a Maildir folder. No account, no relay, nothing leaves."""

from __future__ import annotations

import logging
import socket
import threading
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from qant_mail.base import logs
from qant_mail.base.errors import ExitCode, QantError
from qant_mail.delivery.transport import disk_reply, make_maildir, store_in_maildir

DEFAULT_PORT = 2525
log = logging.getLogger(__name__)


class InboxError(QantError):
    """The inbox cannot start (the port is taken, the folder cannot be written)."""

    exit_code = ExitCode.UNAVAILABLE


class _MaildirHandler:
    """Stores one copy of each message per recipient, as a delivery agent does."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.lock = threading.Lock()
        self.received = 0

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        data = envelope.original_content or b""
        sender = envelope.mail_from or ""
        recipients = list(envelope.rcpt_tos)
        level = logging.INFO
        try:
            names = store_in_maildir(self.folder, sender, recipients, data)
        except OSError as err:
            # A full disk is temporary (452 4.3.1): the sender keeps the message and
            # tries again, where aiosmtpd's own answer (500) would fail it for good.
            names, reply, level = [], str(disk_reply(err)), logging.WARNING
        else:
            with self.lock:
                self.received += len(names)
            reply = f"250 2.0.0 stored as {names[0] if names else 'nothing'}"
        # The addresses are logged as they are: this inbox is the user's own test tool,
        # on loopback, and who got which message is what it is run to show.
        logs.event(
            log,
            "message",
            level,
            sender=sender,
            recipients=recipients,
            bytes=len(data),
            stored=names,
            reply=reply,
        )
        return reply


class Inbox:
    """A running local inbox; a context manager that stops it on exit."""

    def __init__(self, folder: Path, port: int = DEFAULT_PORT, host: str = "127.0.0.1") -> None:
        self.folder = folder
        self.host = host
        self.port = port or _free_port(host)
        self.handler = _MaildirHandler(folder)
        self.controller: Controller | None = None

    @property
    def received(self) -> int:
        """Return the number of messages stored since the start."""
        return self.handler.received

    def start(self) -> Inbox:
        """Create the Maildir and start listening."""
        try:
            make_maildir(self.folder)
        except OSError as err:
            raise InboxError(f"{self.folder}: cannot create the inbox: {err.strerror}") from err
        if not _port_is_free(self.host, self.port):
            raise InboxError(f"{self.host}:{self.port} is in use (another inbox?); choose --port")
        self.controller = Controller(
            self.handler,
            hostname=self.host,
            port=self.port,
            # Big enough for any newsletter, small enough not to fill the disk.
            data_size_limit=32 * 1024 * 1024,
            server_hostname="qant-mail-inbox",
        )
        self.controller.start()
        return self

    def stop(self) -> None:
        """Stop listening."""
        if self.controller is not None:
            self.controller.stop()
            self.controller = None

    def __enter__(self) -> Inbox:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port
