"""The live preview: a local page that shows the email as it is written, and reloads
when the issue, one of its images, a template or the settings change."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Route
from watchfiles import Change, DefaultFilter, awatch

from qant_mail.app import issues
from qant_mail.app.context import Context
from qant_mail.app.issues import THEME, Asset, RenderedIssue
from qant_mail.base.addresses import normalise_address
from qant_mail.base.config import load_settings
from qant_mail.base.errors import Problem, QantError, Severity

_NO_SECRET = (
    "QANT_SECRET_KEY n’est pas défini pour l’aperçu : les liens de désinscription du test "
    "doivent être signés. Exportez-le (ou QANT_SECRET_KEY_FILE) puis relancez qant-mail preview."
)
# What the preview serves from the newsletter's folder (its logos): pictures only.
_PICTURES = (".png", ".jpg", ".jpeg", ".gif", ".webp", ".svg")

PAGE = Path(__file__).with_name("preview.html")
GMAIL_CLIP_BYTES = 102_000
# The email is the editors' own text, but it is still kept from running anything.
EMAIL_POLICY = "default-src 'none'; img-src 'self' https: data:; style-src 'unsafe-inline'"


@dataclass
class Snapshot:
    """A good render, filled for the sample subscriber, ready to show."""

    version: int
    subject: str
    preheader: str
    reading_time: str
    words: int
    html: str
    text: str
    html_bytes: int


@dataclass
class PreviewState:
    """What the page shows: the last good render, and what is wrong now."""

    version: int = 0
    good: Snapshot | None = None
    problems: list[Problem] = field(default_factory=list)
    error: str | None = None
    rendered_at: float = 0.0


class Preview:
    """Renders one issue on demand and keeps the result for the page."""

    def __init__(self, issue: Path, settings_path: Path) -> None:
        self.issue = issue.resolve()
        self.settings_path = settings_path.resolve()
        self.state = PreviewState()
        self.lock = threading.Lock()
        self.token = secrets.token_urlsafe(24)
        self._ctx: Context | None = None
        self._settings_stamp: tuple[float | None, bool] | None = None

    @property
    def roots(self) -> dict[str, Path]:
        """Return the folders whose files the page may load: the issue's, and the
        newsletter's (its logos; pictures only, see `asset`)."""
        roots = {"issue": self.issue.parent}
        if self._ctx is not None:
            roots["newsletter"] = self._ctx.settings.root.resolve()
        return roots

    def refresh(self) -> PreviewState:
        """Render the issue again; keep the last good render when this one fails."""
        with self.lock:
            state = self.state
            try:
                ctx = self.context()
                report = issues.check(ctx, self.issue)
            except QantError as err:
                state.version += 1
                state.error, state.problems = str(err), []
                return state
            state.version += 1
            state.error = None
            state.problems = report.problems
            # Lint errors (a clipped email, a bad link) are shown over a render that is
            # still worth seeing; an invalid file keeps the last good one.
            if report.rendered is not None:
                state.good = self._snapshot(state.version, report.rendered)
            state.rendered_at = time.time()
            return state

    def watched(self) -> list[Path]:
        """Return what to watch: the issue's folder, the newsletter's (its settings, its
        own templates, made or not yet, its logos) and the theme; see `ignored`."""
        return [self.issue.parent, self.settings_path.parent, THEME]

    def ignored(self) -> list[Path]:
        """Return the folders whose changes are the tool's own doing (output, caches, the
        store): a render writes there, and must not set off another."""
        if self._ctx is None:
            return []
        settings = self._ctx.settings
        found = [settings.output_dir, settings.cache_dir, settings.root / "data"]
        if isinstance(settings.store_path, Path):
            found.append(settings.store_path.parent)
        return [p.resolve() for p in found]

    def asset(self, root: str, relative: str) -> Path | None:
        """Return the file `relative` under the folder `root`, if it is inside it."""
        base = self.roots.get(root)
        if base is None or "\0" in relative or len(relative) > 1024:
            return None
        if root == "newsletter" and not relative.lower().endswith(_PICTURES):
            return None  # the settings and the store are there too: pictures only
        try:
            candidate = (base / relative).resolve()
            # Resolved, so that neither ".." nor a symbolic link leads out of the folder.
            if not candidate.is_relative_to(base) or not candidate.is_file():
                return None
        except (OSError, RuntimeError):  # a name too long, a symlink loop
            return None
        return candidate

    def context(self) -> Context:
        """Return the context of the settings as they are now (read again when the
        settings file changes)."""
        stamp = self.settings_path.stat().st_mtime if self.settings_path.exists() else None
        # A templates folder made (or removed) while the preview runs changes what the
        # renderer reads from, as the settings do.
        own = self._ctx is not None and self._ctx.settings.templates_dir.is_dir()
        if self._ctx is None or (stamp, own) != self._settings_stamp:
            self._ctx = Context(load_settings(self.settings_path))
            self._settings_stamp = (stamp, self._ctx.settings.templates_dir.is_dir())
        return self._ctx

    def _snapshot(self, version: int, rendered: RenderedIssue) -> Snapshot:
        html, text = issues.sample_fill(self.context(), rendered, self._asset_url)
        return Snapshot(
            version=version,
            subject=rendered.subject,
            preheader=rendered.preheader,
            reading_time=rendered.reading_time,
            words=rendered.words,
            html=html,
            text=text,
            html_bytes=len(html.encode("utf-8")),
        )

    def _asset_url(self, asset: Asset) -> str:
        path = asset.source.resolve()  # the editor's file: the page serves it from there
        for name, base in self.roots.items():
            if path.is_relative_to(base):
                return f"/assets/{name}/{path.relative_to(base).as_posix()}"
        return asset.url  # outside the served folders: not shown, rather than served

    def state_json(self) -> dict[str, Any]:
        """Return the state as the page reads it."""
        state, good = self.state, self.state.good
        problems = [
            {
                "line": p.line,
                "column": p.column,
                "field": p.field,
                "message": p.message,
                "severity": p.severity.value,
                "text": p.short(),
            }
            for p in state.problems
        ]
        return {
            "version": state.version,
            "file": self.issue.name,
            "error": state.error,
            "errors": sum(p.severity is Severity.ERROR for p in state.problems),
            "problems": problems,
            "good": None
            if good is None
            else {
                "version": good.version,
                "subject": good.subject,
                "preheader": good.preheader,
                "reading_time": good.reading_time,
                "words": good.words,
                "html_bytes": good.html_bytes,
                "clip_bytes": GMAIL_CLIP_BYTES,
            },
        }


def create_app(preview: Preview, *, can_send: bool = True) -> Starlette:
    """Return the preview's web application."""
    listeners: set[asyncio.Queue[int]] = set()

    async def publish() -> None:
        state = await anyio.to_thread.run_sync(preview.refresh)
        for queue in list(listeners):
            queue.put_nowait(state.version)

    async def page(request: Request) -> HTMLResponse:
        html = PAGE.read_text(encoding="utf-8")
        html = html.replace("{{token}}", preview.token)
        html = html.replace("{{can_send}}", "true" if can_send else "false")
        return HTMLResponse(html, headers={"Cache-Control": "no-store"})

    async def state(request: Request) -> JSONResponse:
        return JSONResponse(preview.state_json(), headers={"Cache-Control": "no-store"})

    async def email_html(request: Request) -> Response:
        good = preview.state.good
        if good is None:
            return HTMLResponse("<p>Pas encore de rendu.</p>", status_code=503)
        headers = {"Cache-Control": "no-store", "Content-Security-Policy": EMAIL_POLICY}
        return HTMLResponse(good.html, headers=headers)

    async def email_text(request: Request) -> Response:
        good = preview.state.good
        if good is None:
            return PlainTextResponse("", status_code=503)
        return PlainTextResponse(good.text, headers={"Cache-Control": "no-store"})

    async def asset(request: Request) -> Response:
        path = preview.asset(request.path_params["root"], request.path_params["path"])
        if path is None:
            return PlainTextResponse("not found", status_code=404)
        return FileResponse(path, headers={"Cache-Control": "no-store"})

    async def events(request: Request) -> StreamingResponse:
        queue: asyncio.Queue[int] = asyncio.Queue()
        listeners.add(queue)

        async def stream() -> AsyncIterator[str]:
            try:
                yield f"data: {preview.state.version}\n\n"
                while True:
                    try:
                        version = await asyncio.wait_for(queue.get(), timeout=15)
                        yield f"data: {version}\n\n"
                    except TimeoutError:
                        yield ": keep-alive\n\n"  # proxies and browsers drop silent streams
            finally:
                listeners.discard(queue)

        headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
        return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)

    async def send_test(request: Request) -> JSONResponse:
        # The token is in the page only: another site cannot read it, so it cannot make
        # this local server send mail (cross-site request forgery).
        if request.headers.get("x-preview-token") != preview.token:
            return JSONResponse({"ok": False, "message": "jeton invalide"}, status_code=403)
        if not can_send:
            return JSONResponse({"ok": False, "message": "envoi désactivé"}, status_code=403)
        try:
            payload = json.loads(await request.body())
            address = str(payload.get("address", ""))
        except (ValueError, AttributeError, RecursionError):
            return JSONResponse({"ok": False, "message": "requête invalide"}, status_code=400)
        result = await anyio.to_thread.run_sync(_send_test, preview, address)
        return JSONResponse(result, status_code=200 if result["ok"] else 422)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await publish()
        stop = anyio.Event()
        task = asyncio.create_task(_watch(preview, publish, stop))
        try:
            yield
        finally:
            stop.set()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    return Starlette(
        routes=[
            Route("/", page),
            Route("/state.json", state),
            Route("/email.html", email_html),
            Route("/email.txt", email_text),
            Route("/assets/{root}/{path:path}", asset),
            Route("/events", events),
            Route("/send-test", send_test, methods=["POST"]),
        ],
        middleware=[
            # A page of another site that resolves its name to 127.0.0.1 (DNS
            # rebinding) would send another Host: refuse it.
            Middleware(TrustedHostMiddleware, allowed_hosts=["127.0.0.1", "localhost"])
        ],
        lifespan=lifespan,
    )


async def _watch(preview: Preview, publish: Any, stop: anyio.Event) -> None:
    """Re-render whenever a watched file changes (watchfiles; no polling loop)."""
    while not stop.is_set():
        paths = [p for p in preview.watched() if p.exists()]
        async for _ in awatch(
            *paths,
            watch_filter=_Filter(preview.ignored()),
            debounce=100,
            step=20,
            stop_event=stop,
            recursive=True,
        ):
            await publish()
            if set(preview.watched()) != set(paths):
                break  # the settings moved the templates: watch the new folder


class _Filter(DefaultFilter):
    """watchfiles' default filter (editors' swap files, .git…), less the folders the
    tool writes to itself."""

    def __init__(self, ignored: list[Path]) -> None:
        super().__init__()
        self.ignored = ignored

    def __call__(self, change: Change, path: str) -> bool:
        where = Path(path)
        if any(where.is_relative_to(folder) for folder in self.ignored):
            return False
        return super().__call__(change, path)


def _send_test(preview: Preview, address: str) -> dict[str, Any]:
    """Send the current issue as a test to `address` (what `send --to` does)."""
    from qant_mail.app import sending

    try:
        recipient = normalise_address(address)
        ctx = Context(load_settings(preview.settings_path))
        try:
            ctx.secret()
        except QantError:
            # The page speaks the editors' language; this is what they can do about it.
            return {"ok": False, "message": _NO_SECRET}
        prepared = sending.prepare_test(ctx, preview.issue)
        ((_, reply),) = sending.send_test(ctx, prepared, [recipient]).results
    except QantError as err:
        return {"ok": False, "message": str(err).splitlines()[0]}
    return {"ok": reply.ok, "message": f"{recipient} : {reply}"}
