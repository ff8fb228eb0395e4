"""Running the web applications (uvicorn): on a socket bound first, in a thread for tests,
with limits that keep a slow or greedy client from holding the server, and a log of
each request that shows what the application allows of it."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import uvicorn
from starlette.exceptions import HTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from qant_mail.base import logs
from qant_mail.base.errors import ExitCode, QantError

# A request's headers must arrive within this; its body within the request timeout.
HEADER_TIMEOUT = 10.0
REQUEST_TIMEOUT = 20.0
MAX_BODY = 64 * 1024
MAX_HEADERS = 16 * 1024

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
# What a request's log line shows of it: its path and its client, as the application sees
# fit (a path may hold a token, a query an address).
Describe = Callable[[Scope], tuple[str, str]]

log = logging.getLogger(__name__)


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
        raise ServerError(f"{host}:{port}: {err.strerror}; choose another --port") from err
    sock.listen(128)
    return sock


class GuardedH11(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, closing a connection whose request headers do not all
    arrive within `HEADER_TIMEOUT` (uvicorn waits for them forever)."""

    header_timeout = HEADER_TIMEOUT
    _guard: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._between_requests():
            self._arm()  # not re-armed by each byte: a trickle does not buy time
        super().data_received(data)
        if not self._between_requests():
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _between_requests(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _arm(self) -> None:
        if self._guard is None:
            self._guard = self.loop.call_later(self.header_timeout, self._expire)

    def _disarm(self) -> None:
        if self._guard is not None:
            self._guard.cancel()
            self._guard = None

    def _expire(self) -> None:
        self._guard = None
        if self._between_requests() and not self.transport.is_closing():
            self.transport.close()


class RequestLimits:
    """ASGI middleware: a body of at most `max_body` bytes, read within `timeout` seconds
    of the request (413 and 408 otherwise), never buffered whole beforehand."""

    def __init__(self, app: Any, max_body: int | None = None, timeout: float | None = None):
        self.app = app
        self.max_body = MAX_BODY if max_body is None else max_body
        self.timeout = REQUEST_TIMEOUT if timeout is None else timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = scope.get("headers") or []
        if sum(len(name) + len(value) for name, value in headers) > MAX_HEADERS:
            await _plain(send, 431, "request headers too large\n")
            return
        declared = dict(headers).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body):
            await _plain(send, 413, "request body too large\n")
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        received = 0
        complete = False

        async def limited() -> Message:
            nonlocal received, complete
            if complete:  # past the body: waiting for a disconnect (a stream) is fine
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.001))
            except TimeoutError as err:
                raise HTTPException(408, "the request body came too slowly") from err
            received += len(message.get("body", b""))
            if received > self.max_body:
                raise HTTPException(413, "request body too large")
            complete = message["type"] != "http.request" or not message.get("more_body")
            return message

        await self.app(scope, limited, send)


class AccessLog:
    """ASGI middleware: one `request` event a request, once answered: its method, path
    and client as `describe` shows them, its status and how long it took (ms)."""

    def __init__(self, app: Any, describe: Describe) -> None:
        self.app = app
        self.describe = describe

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 0

        async def watched(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except BaseException:
            status = status or 500  # what uvicorn answers when the application said nothing
            raise
        finally:
            path, client = self.describe(scope)
            logs.event(
                log,
                "request",
                method=scope["method"],
                path=path,
                status=status,
                duration_ms=round((time.perf_counter() - started) * 1000, 1),
                client=client,
            )


async def _plain(send: Send, status: int, text: str) -> None:
    body = text.encode()
    headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"connection", b"close")]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def run(
    app: Any,
    sock: socket.socket,
    *,
    proxy_headers: bool = False,
    access_log: Describe | None = None,
) -> None:
    """Serve `app` on a bound socket until Ctrl-C; with `access_log`, log each request."""
    uvicorn.Server(_config(app, proxy_headers, access_log)).run(sockets=[sock])


def _config(
    app: Any, proxy_headers: bool = False, access_log: Describe | None = None
) -> uvicorn.Config:
    limited = RequestLimits(app)
    return uvicorn.Config(
        # Outside the limits, so that what they refuse is logged too.
        limited if access_log is None else AccessLog(limited, access_log),
        http=GuardedH11,
        log_level="warning",
        # uvicorn's records go to the process's log, in its format; its handlers would
        # write text of their own to stderr.
        log_config=None,
        lifespan="on",
        # uvicorn's access log would show the raw path, tokens and all.
        access_log=False,
        proxy_headers=proxy_headers,
        # Behind a reverse proxy on this machine, trust its X-Forwarded-* headers only.
        forwarded_allow_ips="127.0.0.1",
        # An idle keep-alive connection, and a header block larger than any honest one.
        timeout_keep_alive=5,
        h11_max_incomplete_event_size=MAX_HEADERS,
        limit_concurrency=1000,
    )


class BackgroundServer:
    """An application served from a thread on 127.0.0.1 (tests, embedding)."""

    def __init__(self, app: Any, port: int = 0, *, access_log: Describe | None = None) -> None:
        self.sock = listen("127.0.0.1", port)
        self.port: int = self.sock.getsockname()[1]
        self.server = uvicorn.Server(_config(app, access_log=access_log))
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
