"""Running the web applications (uvicorn): on a socket bound first, in a thread for tests."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import uvicorn

from qant_mail.errors import ExitCode, QantError


class ServerError(QantError):
    """A server cannot start (the address is taken or not ours)."""

    exit_code = ExitCode.UNAVAILABLE


def listen(host: str, port: int) -> socket.socket:
    """Bind `host`:`port` (port 0: any free one), so that the address is known first."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise ServerError(f"{host}:{port}: {err.strerror}; choose another --port") from None
    sock.listen(128)
    return sock


def run(app: Any, sock: socket.socket, *, proxy_headers: bool = False) -> None:
    """Serve `app` on a bound socket until Ctrl-C."""
    uvicorn.Server(_config(app, proxy_headers)).run(sockets=[sock])


def _config(app: Any, proxy_headers: bool = False) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        log_level="warning",
        lifespan="on",
        access_log=False,
        proxy_headers=proxy_headers,
        # Behind a reverse proxy on this machine, trust its X-Forwarded-* headers only.
        forwarded_allow_ips="127.0.0.1",
    )


class BackgroundServer:
    """An application served from a thread on 127.0.0.1 (tests, embedding)."""

    def __init__(self, app: Any, port: int = 0) -> None:
        self.sock = listen("127.0.0.1", port)
        self.port: int = self.sock.getsockname()[1]
        self.server = uvicorn.Server(_config(app))
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    @property
    def url(self) -> str:
        """Return the server's address."""
        return f"http://127.0.0.1:{self.port}/"

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()
