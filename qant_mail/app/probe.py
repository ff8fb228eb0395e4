"""Whether web addresses answer (the standard library's urllib): HEAD, then GET where a
server refuses HEAD; redirects followed up to a limit, loops named; a timeout on each
request; many links asked at once by a few threads; each address asked once a run, and
those that answered well kept on disk for a while."""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from urllib.parse import urljoin, urlsplit

from qant_mail.base.errors import QantError
from qant_mail.base.files import write_all

MAX_REDIRECTS = 10
# Enough that fifty links take a few timeouts' time, not fifty; few enough not to look
# like an attack to the sites of one issue.
WORKERS = 8
_REDIRECTS = (301, 302, 303, 307, 308)
_CACHE_VERSION = 1


@dataclass(frozen=True)
class Visit:
    """How an address answered: the last HTTP status (None: no answer), where its
    redirects led, and what is wrong, in words ("" when it answered 2xx)."""

    url: str
    status: int | None
    problem: str = ""
    final: str = ""
    redirects: int = 0
    body: bytes = b""  # the first bytes of a GET's or POST's answer

    @property
    def ok(self) -> bool:
        """Return whether the address answered with a success, after its redirects."""
        return not self.problem


class _Unfollowed(urllib.request.HTTPRedirectHandler):
    """Leaves redirects to `Web`, which counts them and sees loops."""

    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


class Web:
    """Asks web addresses how they answer, each request within `timeout` seconds, as
    `user_agent`; keeps what answered well in `cache` (JSON) for `max_age` seconds."""

    def __init__(
        self,
        timeout: float,
        user_agent: str,
        *,
        cache: Path | None = None,
        max_age: float = 0.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.timeout = timeout
        self.user_agent = user_agent
        self.cache, self.max_age, self.clock = cache, max_age, clock
        self._opener = urllib.request.build_opener(
            _Unfollowed, urllib.request.HTTPSHandler(context=ssl.create_default_context())
        )
        self._visits: dict[str, Visit] = {}
        self._lock = threading.Lock()
        self._kept = self._load() if cache is not None and max_age > 0 else {}

    # -- links ---------------------------------------------------------------------------

    def check_all(self, urls: Iterable[str]) -> dict[str, Visit]:
        """Return how each address answers, asked a few at a time; keep those that
        answered well on disk."""
        wanted = list(dict.fromkeys(urls))
        with ThreadPoolExecutor(max_workers=WORKERS) as pool:
            found = dict(zip(wanted, pool.map(self.check, wanted), strict=True))
        self._save()
        return found

    def check(self, url: str) -> Visit:
        """Return how `url` answers: HEAD, then GET when HEAD fails (servers that refuse
        it, 405 or 501, and those that answer it wrongly); once a run, and not again
        while the disk remembers a success."""
        with self._lock:
            seen = self._visits.get(url) or self._remembered(url)
        if seen is not None:
            return seen
        visit = self.fetch(url, "HEAD")
        if visit.status is not None and visit.status >= 400:
            visit = self.fetch(url, "GET")
        with self._lock:
            self._visits[url] = visit
        return visit

    # -- one request, its redirects followed -----------------------------------------

    def fetch(
        self,
        url: str,
        method: str = "GET",
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        *,
        follow: bool = True,
    ) -> Visit:
        """Ask `url` with `method`, following redirects (unless `follow` is off, or the
        request has a body); a 2xx at the end is a success."""
        visited = [url]
        current = url
        while True:
            status, location, head = self._request(current, method, body, headers)
            if isinstance(status, str):  # no answer: why
                return Visit(url, None, status, current, len(visited) - 1)
            if status in _REDIRECTS and location and follow and body is None:
                target = urljoin(current, location)
                if target in visited:
                    loop = " → ".join([*visited[visited.index(target) :], target])
                    return Visit(url, status, f"redirect loop: {loop}", target, len(visited))
                if len(visited) > MAX_REDIRECTS:
                    problem = f"more than {MAX_REDIRECTS} redirects (the last to {target})"
                    return Visit(url, status, problem, target, len(visited))
                visited.append(target)
                current = target
                if status == 303:
                    method = "GET" if method != "HEAD" else method
                continue
            redirects = len(visited) - 1
            if 200 <= status < 300:
                return Visit(url, status, "", current, redirects, head)
            reason = http.client.responses.get(status, "")
            return Visit(url, status, f"{status} {reason}".strip(), current, redirects, head)

    def _request(
        self, url: str, method: str, body: bytes | None, headers: Mapping[str, str] | None
    ) -> tuple[int | str, str, bytes]:
        """Send one request; return (status, Location, the first KB of the answer), or
        (why there is no answer, "", b"")."""
        if urlsplit(url).scheme not in ("http", "https"):
            return f"not a web address: {url}", "", b""
        request = urllib.request.Request(url, data=body, method=method)
        request.add_header("User-Agent", self.user_agent)
        for name, value in (headers or {}).items():
            request.add_header(name, value)
        try:
            with self._opener.open(request, timeout=self.timeout) as answer:
                head = answer.read(1024) if method != "HEAD" else b""
                return answer.status, "", head
        except urllib.error.HTTPError as err:
            location = _location(err.headers)
            err.close()
            return err.code, location, b""
        except urllib.error.URLError as err:
            return _why(err.reason), "", b""
        except (OSError, http.client.HTTPException, ValueError) as err:
            return _why(err), "", b""

    # -- the disk's memory ---------------------------------------------------------------

    def _remembered(self, url: str) -> Visit | None:
        kept = self._kept.get(url)
        if kept is None:
            return None
        status, final = kept
        return Visit(url, status, "", final)

    def _load(self) -> dict[str, tuple[int, str]]:
        """Return the successes on disk still young enough: url → (status, final url)."""
        assert self.cache is not None
        try:
            data = json.loads(self.cache.read_bytes())
        except (OSError, ValueError):
            return {}  # none yet, or unreadable: every link is asked
        if not isinstance(data, dict) or data.get("version") != _CACHE_VERSION:
            return {}
        now, kept = self.clock(), {}
        for url, entry in dict(data.get("links", {})).items():
            try:
                status, final, at = int(entry[0]), str(entry[1]), float(entry[2])
            except (TypeError, ValueError, IndexError, KeyError):
                continue
            if 0 <= now - at < self.max_age:
                kept[str(url)] = (status, final)
        return kept

    def _save(self) -> None:
        """Write the successes of this run, with those still young from earlier runs."""
        if self.cache is None or self.max_age <= 0:
            return
        now = self.clock()
        links: dict[str, list[object]] = {}
        try:
            earlier = json.loads(self.cache.read_bytes()).get("links", {})
        except (OSError, ValueError, AttributeError):
            earlier = {}
        for url, entry in earlier.items() if isinstance(earlier, dict) else ():
            if url in self._kept:
                links[url] = entry
        with self._lock:
            for url, visit in self._visits.items():
                if visit.ok and visit.status is not None:
                    links[url] = [visit.status, visit.final, now]
        data = json.dumps({"version": _CACHE_VERSION, "links": links}, indent=0)
        # A cache that cannot be written only costs the next run its time.
        with contextlib.suppress(QantError):
            write_all({self.cache: data.encode("utf-8")})


def _location(headers: Message | None) -> str:
    return (headers.get("Location") or "").strip() if headers is not None else ""


def _why(err: object) -> str:
    """Say why a request got no answer."""
    if isinstance(err, TimeoutError | socket.timeout):
        return "no answer in time (timed out)"
    if isinstance(err, socket.gaierror):
        return f"unknown host ({err.strerror})"
    if isinstance(err, ssl.SSLCertVerificationError):
        return f"certificate not trusted ({err.verify_message})"
    if isinstance(err, ssl.SSLError):
        return f"TLS failed ({err.reason or err})"
    if isinstance(err, ConnectionRefusedError):
        return "connection refused (nothing listens there)"
    if isinstance(err, http.client.HTTPException):
        return f"the server broke off the answer ({type(err).__name__})"
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return str(err) or type(err).__name__
