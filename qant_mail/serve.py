"""The public web application: one-click unsubscription (RFC 8058), the archive, a health
check. Run it with `qant-mail serve`, behind a reverse proxy for the world."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from qant_mail import tokens
from qant_mail.config import Settings
from qant_mail.render import Renderer
from qant_mail.store import StoreError
from qant_mail.subscribers import Status, Subscriber, Subscribers

PAGE = "unsubscribe.html.j2"
ONE_CLICK = b"List-Unsubscribe=One-Click"
# What a mail provider's one-click POST gets: no page, no redirect, no cookie (RFC 8058).
ONE_CLICK_DONE = "unsubscribed\n"
_HEADERS = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"}


class _Unsubscriptions:
    """Finds who a token names, and unsubscribes them (in a worker thread: SQLite blocks)."""

    def __init__(self, store_path: Path, secret: bytes) -> None:
        self.store_path, self.secret = store_path, secret

    def find(self, token: str) -> Subscriber | None:
        """Return the subscriber a genuine token names; None for anything else."""
        with Subscribers.open(self.store_path) as store:
            return self._find(store, token)

    def apply(self, token: str, reason: str) -> Subscriber | None:
        """Unsubscribe whom the token names; doing it twice keeps the first date and reason."""
        with Subscribers.open(self.store_path) as store:
            subscriber = self._find(store, token)
            if subscriber is None or subscriber.status is Status.UNSUBSCRIBED:
                return subscriber
            changed = store.set_status_by_id(subscriber.id, Status.UNSUBSCRIBED, reason)
            return changed or subscriber

    def _find(self, store: Subscribers, token: str) -> Subscriber | None:
        number = tokens.subscriber_id(token)
        if number is None:
            return None
        subscriber = store.by_id(number)
        if subscriber is None or not tokens.verify(self.secret, token, number, subscriber.email):
            return None
        return subscriber


def create_app(settings: Settings, archive: Path | None, secret: bytes) -> Starlette:
    """Return the public application: unsubscribe pages, health check, the archive."""
    renderer = Renderer(settings)
    unsubscriptions = _Unsubscriptions(settings.store_path, secret)

    def page(state: str, email: str = "", status: int = 200) -> HTMLResponse:
        html = renderer.render_page(PAGE, state=state, email=email)
        return HTMLResponse(html, status_code=status, headers=_HEADERS)

    def unsubscribe_page(request: Request) -> Response:
        subscriber = unsubscriptions.find(request.path_params["token"])
        if subscriber is None:
            # Forged, altered, truncated or unknown: one answer, that names nobody.
            return page("invalid", status=404)
        if subscriber.status is Status.UNSUBSCRIBED:
            return page("done", subscriber.email)
        return page("confirm", subscriber.email)

    async def unsubscribe(request: Request) -> Response:
        one_click = (await request.body()).strip() == ONE_CLICK
        reason = "one-click" if one_click else "page"
        token = request.path_params["token"]
        subscriber = await anyio.to_thread.run_sync(unsubscriptions.apply, token, reason)
        if one_click:
            if subscriber is None:
                return PlainTextResponse("invalid link\n", status_code=404, headers=_HEADERS)
            return PlainTextResponse(ONE_CLICK_DONE, headers=_HEADERS)
        if subscriber is None:
            return page("invalid", status=404)
        return page("done", subscriber.email)

    def health(request: Request) -> JSONResponse:
        try:
            with Subscribers.open(settings.store_path) as store:
                store.count()
        except (StoreError, sqlite3.Error) as err:
            return JSONResponse({"status": "error", "store": str(err)}, status_code=503)
        return JSONResponse({"status": "ok"})

    routes: list[Route | Mount] = [
        Route("/healthz", health),
        Route("/unsubscribe/{token}", unsubscribe_page, methods=["GET", "HEAD"]),
        Route("/unsubscribe/{token}", unsubscribe, methods=["POST"]),
    ]
    if archive is not None:
        routes.append(Mount("/", StaticFiles(directory=archive, html=True), name="archive"))
    return Starlette(routes=routes)
