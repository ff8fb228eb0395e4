"""The public web application: one-click unsubscription (RFC 8058), the signup forms and
their confirmation (double opt-in), the reader's page of subscriptions, the archive, a
health check. Run it with `qant-mail serve`, behind a reverse proxy for the world."""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import parse_qsl

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from qant_mail.app import links, readers
from qant_mail.app.context import Context
from qant_mail.app.readers import Signup, SignupError, Status
from qant_mail.app.sending import QueueWorker
from qant_mail.base.config import Settings
from qant_mail.base.errors import QantError
from qant_mail.web.api import PREFIX, Api, ApiRequest, api_tokens
from qant_mail.web.api import shown_path as api_shown_path
from qant_mail.web.api import unavailable as api_unavailable
from qant_mail.web.webserver import Describe, Scope

log = logging.getLogger(__name__)

PAGE = "unsubscribe.html.j2"
SUBSCRIBE_PAGE = "subscribe.html.j2"
CONFIRM_PAGE = "confirm.html.j2"
READER_PAGE = "subscriptions.html.j2"
ONE_CLICK = b"List-Unsubscribe=One-Click"
# What a mail provider's one-click POST gets: no page, no redirect, no cookie (RFC 8058).
ONE_CLICK_DONE = "unsubscribed\n"
# A signup form is a few short fields: anything larger is not one.
MAX_FORM_BYTES = 8 * 1024
# The paths that end in a signed token, which the log never shows (whoever reads the log
# could unsubscribe a reader, or open their page, with it).
TOKEN_PATHS = ("/unsubscribe/", "/confirm/", "/subscriptions/")
# Anywhere in a path, whatever the case: a mangled link that misses the route (a prefix,
# a capital) still holds the token.
_TOKEN_PATH = re.compile("|".join(map(re.escape, TOKEN_PATHS)), re.IGNORECASE)
_HEADERS = {
    "Cache-Control": "no-store",
    # The links carry tokens: no page of ours tells another site where it came from.
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' https: data:; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
}


def create_app(ctx: Context, archive: Path | None, *, drain: bool = True) -> Starlette:
    """Return the public application: unsubscribe pages, signup forms, confirmation
    links, the reader's page, health check, the archive. The mail a request causes is
    queued in the outbox before the answer, and a worker of the application delivers it
    (`drain`; without it, `qant-mail run-due` does)."""
    settings = ctx.settings
    renderer = ctx.renderer
    worker = QueueWorker(ctx)
    signup = Signup(ctx, queued=worker.wake)
    # Read now: a token too short or written wrong stops `serve` before it listens.
    keys = api_tokens(ctx.env)
    api = Api(ctx, keys, queued=worker.wake) if keys else None

    def html(
        template: str, key: str | None = None, status: int = 200, **context: object
    ) -> HTMLResponse:
        own = renderer.for_newsletter(key if key in settings.editions else None)
        page = own.render_page(template, **context)
        return HTMLResponse(page, status_code=status, headers=_HEADERS)

    # -- unsubscribe -----------------------------------------------------------------

    def page(state: str, token: str, email: str = "", status: int = 200) -> HTMLResponse:
        key = readers.token_newsletter(ctx, token)
        return html(PAGE, key, status, state=state, email=email)

    def unsubscribe_page(request: Request) -> Response:
        token = request.path_params["token"]
        subscriber = readers.unsubscribing(ctx, token)
        if subscriber is None:
            # Forged, altered, truncated or unknown: one answer, that names nobody.
            return page("invalid", token, status=404)
        if subscriber.status is not Status.ACTIVE:
            return page("done", token, subscriber.email)
        return page("confirm", token, subscriber.email)

    async def unsubscribe(request: Request) -> Response:
        one_click = (await request.body()).strip() == ONE_CLICK
        reason = "one-click" if one_click else "page"
        token = request.path_params["token"]
        subscriber = await anyio.to_thread.run_sync(readers.unsubscribe_by_link, ctx, token, reason)
        if one_click:
            if subscriber is None:
                return PlainTextResponse("invalid link\n", status_code=404, headers=_HEADERS)
            return PlainTextResponse(ONE_CLICK_DONE, headers=_HEADERS)
        if subscriber is None:
            return page("invalid", token, status=404)
        return page("done", token, subscriber.email)

    # -- signup ----------------------------------------------------------------------

    def form(
        key: str | None, status: int = 200, error: SignupError | None = None, **values: object
    ) -> HTMLResponse:
        offered = signup.offered()
        shown = [s for s in offered if key is None or s.newsletter.id == key]
        return html(
            SUBSCRIBE_PAGE,
            key,
            status,
            state="form",
            form_key=key or "all",
            offered=[s.newsletter for s in shown],
            single=key is not None,
            error=error,
            values=values,
        )

    def subscribe_form(request: Request) -> Response:
        key = request.path_params.get("newsletter")
        if key is not None and key not in {s.newsletter.id for s in signup.offered()}:
            return PlainTextResponse("no such newsletter\n", status_code=404, headers=_HEADERS)
        return form(key)

    async def subscribe(request: Request) -> Response:
        items = await _form(request)
        if isinstance(items, Response):
            return items
        fields = dict(items)
        chosen = [value for key, value in items if key == "newsletter"]
        form_key = fields.get("form", "all")
        single = form_key if form_key in settings.editions else None
        try:
            valid = signup.validate(
                fields.get("email", ""),
                fields.get("name", ""),
                chosen,
                form_key,
                _client(request, settings.signup.trust_proxy),
                fields.get("website", ""),
            )
        except SignupError as err:
            values = {"email": fields.get("email", "")[:320], "name": fields.get("name", "")[:200]}
            return form(single, 400, err, chosen=chosen, **values)
        # The same answer whoever the address is: what is done about it (a mail queued,
        # or nothing when a limit or the trap says so) says nothing of who is subscribed.
        try:
            await anyio.to_thread.run_sync(signup.request, valid)
        except QantError as err:
            # Not recorded (the store is down, the secret unset): said now, not lost.
            log.error("signup: not recorded: %s", err)
            unavailable = SignupError(settings.labels.subscribe_unavailable, "")
            values = {"email": valid.email, "name": valid.name}
            return form(single, 503, unavailable, chosen=list(valid.newsletters), **values)
        return html(SUBSCRIBE_PAGE, single, state="sent", single=single is not None)

    # -- confirmation ----------------------------------------------------------------

    def confirm_page(request: Request) -> Response:
        pending = signup.pending(request.path_params["token"])
        if pending is None:
            return html(CONFIRM_PAGE, state="invalid", status=404)
        names = renderer.format_list([_name(settings, k) for k in pending.newsletters])
        key = pending.newsletters[0] if pending.newsletters else None
        return html(CONFIRM_PAGE, key, state="question", email=pending.email, names=names)

    async def confirm(request: Request) -> Response:
        done = await anyio.to_thread.run_sync(signup.confirm, request.path_params["token"])
        if done is None:
            return html(CONFIRM_PAGE, state="invalid", status=404)
        pending, reader_url = done
        names = renderer.format_list([_name(settings, k) for k in pending.newsletters])
        key = pending.newsletters[0] if pending.newsletters else None
        return html(
            CONFIRM_PAGE, key, state="done", email=pending.email, names=names, reader_url=reader_url
        )

    # -- the reader's page -----------------------------------------------------------

    def reader_page(request: Request) -> Response:
        found = signup.reader(request.path_params["token"])
        if found is None:
            return html(READER_PAGE, state="invalid", status=404)
        saved = request.query_params.get("saved") == "1"
        return html(READER_PAGE, state="page", reader=found, saved=saved)

    async def reader_choose(request: Request) -> Response:
        token = request.path_params["token"]
        items = await _form(request)
        if isinstance(items, Response):
            return items
        data = dict(items)
        key, action = data.get("newsletter", ""), data.get("action", "")
        if action not in ("join", "leave"):
            return html(READER_PAGE, state="invalid", status=400)
        found = await anyio.to_thread.run_sync(signup.choose, token, key, action == "join")
        if found is None:
            return html(READER_PAGE, state="invalid", status=404)
        # Post/redirect/get: a reload does not send the choice again.
        return RedirectResponse(f"{request.url.path}?saved=1", status_code=303, headers=_HEADERS)

    async def follow(request: Request) -> Response:
        # A counted link ([audience] count_clicks): one more for it today, then on. No
        # cookie, and the log line of this request shows no client (see request_log).
        issue, number = request.path_params["issue"], request.path_params["number"]
        counted = request.method == "GET"  # a HEAD is a link checker's, not a reader's
        target = await anyio.to_thread.run_sync(
            lambda: links.follow(ctx, issue, number, count=counted)
        )
        if target is None:
            return PlainTextResponse("no such link\n", status_code=404, headers=_HEADERS)
        return RedirectResponse(target, status_code=302, headers=_HEADERS)

    async def health(request: Request) -> JSONResponse:
        trouble = await anyio.to_thread.run_sync(readers.health, ctx)
        if trouble is not None:
            return JSONResponse({"status": "error", "store": trouble}, status_code=503)
        return JSONResponse({"status": "ok"})

    # -- the API (/api/v1/, JSON; on when QANT_API_TOKEN holds a token) ---------------

    async def api_endpoint(request: Request) -> Response:
        assert api is not None
        asked = ApiRequest(
            method=request.method,
            path="/" + request.path_params["path"],
            query=request.url.query,
            authorization=request.headers.get("authorization", ""),
            content_type=request.headers.get("content-type", ""),
            body=await request.body(),
            client=_client(request, settings.signup.trust_proxy),
        )
        try:
            answer = await anyio.to_thread.run_sync(api.handle, asked)
        except QantError as err:
            log.error("%s %s: %s", request.method, shown_path(request.scope), err)
            answer = api_unavailable()
        return JSONResponse(
            answer.body,
            status_code=answer.status,
            headers=answer.all_headers,
            media_type=answer.media_type,
        )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # One pool of connections to the store for the process: a request takes one.
        with ctx.pooled():
            if drain:
                worker.start()
            try:
                yield
            finally:
                await anyio.to_thread.run_sync(worker.stop)

    routes: list[Route | Mount] = [
        Route("/healthz", health),
        Route("/l/{issue}/{number:int}", follow, methods=["GET", "HEAD"]),
        Route("/unsubscribe/{token}", unsubscribe_page, methods=["GET", "HEAD"]),
        Route("/unsubscribe/{token}", unsubscribe, methods=["POST"]),
        Route("/subscribe", subscribe_form, methods=["GET", "HEAD"]),
        Route("/subscribe", subscribe, methods=["POST"]),
        Route("/subscribe/{newsletter}", subscribe_form, methods=["GET", "HEAD"]),
        Route("/subscribe/{newsletter}", subscribe, methods=["POST"]),
        Route("/confirm/{token}", confirm_page, methods=["GET", "HEAD"]),
        Route("/confirm/{token}", confirm, methods=["POST"]),
        Route("/subscriptions/{token}", reader_page, methods=["GET", "HEAD"]),
        Route("/subscriptions/{token}", reader_choose, methods=["POST"]),
    ]
    if api is not None:
        methods = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]
        routes.append(Route(PREFIX + "/{path:path}", api_endpoint, methods=methods))
    if archive is not None:
        routes.append(Mount("/", StaticFiles(directory=archive, html=True), name="archive"))

    async def unavailable(request: Request, err: Exception) -> Response:
        # The store cannot be used now (a server restarting, a full disk): said plainly,
        # with when to try again; the operator's log has why.
        log.error("%s %s: %s", request.method, shown_path(request.scope), err)
        return PlainTextResponse(
            "unavailable for a moment; try again in a minute\n",
            status_code=503,
            headers={**_HEADERS, "Retry-After": "60"},
        )

    return Starlette(routes=routes, lifespan=lifespan, exception_handlers={QantError: unavailable})


async def _form(request: Request) -> list[tuple[str, str]] | Response:
    """Return the fields of a small URL-encoded form, or the answer to anything else
    (too large, another type, too many fields)."""

    def refuse(status: int, why: str) -> Response:
        return PlainTextResponse(f"{why}\n", status_code=status, headers=_HEADERS)

    length = request.headers.get("content-length", "")
    if not length.isdigit():
        return refuse(411, "a Content-Length is required")
    if int(length) > MAX_FORM_BYTES:
        return refuse(413, "form too large")
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/x-www-form-urlencoded":
        return refuse(415, "a form is expected")
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        return refuse(413, "form too large")
    try:
        return parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True, max_num_fields=40)
    except ValueError:
        return refuse(400, "too many fields")


def _name(settings: Settings, key: str) -> str:
    return settings.for_newsletter(key).newsletter.name if key in settings.editions else key


def request_log(settings: Settings) -> Describe:
    """Return what the log shows of a request: its path without token or query, and its
    client as the signup limits count it."""
    trust_proxy = settings.signup.trust_proxy

    def describe(scope: Scope) -> tuple[str, str]:
        path = shown_path(scope)
        if path.startswith("/l/"):
            return path, "-"  # a counted link keeps nothing of who followed it
        return path, _client(Request(scope), trust_proxy)

    return describe


def shown_path(scope: Scope) -> str:
    """Return the path of a request as a log may show it: a token as "…", and "?…" for
    a query (a link's query may hold a token or an address)."""
    path = str(scope.get("path", ""))
    token = _TOKEN_PATH.search(path)
    if path.lower().startswith("/api/"):
        # A client may paste a token anywhere in a path of the API, in any case.
        path = api_shown_path(path)
    elif token is not None:
        path = f"{path[: token.end()]}…"
    return f"{path}?…" if scope.get("query_string") else path


def _client(request: Request, trust_proxy: bool) -> str:
    """Return the client's address: the peer's, or behind a proxy of ours the last
    address of X-Forwarded-For (the one our proxy added; earlier ones can be forged)."""
    if trust_proxy:
        forwarded = request.headers.get("x-forwarded-for", "")
        last = forwarded.split(",")[-1].strip()
        if last:
            return last
    return request.client.host if request.client else "unknown"
