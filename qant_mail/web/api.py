"""The API of `serve` (`/api/v1/`, JSON): readers added, read, changed, unsubscribed and
listed a page at a time; sends listed, and where one stands. Bearer tokens from
`QANT_API_TOKEN`, each with a scope (read or write), compared in constant time; limits
per token and, for failed attempts, per client; errors as problem details (RFC 9457).

No web framework here: `serve` hands each request over as an `ApiRequest` and writes
the `Answer` back, so that the whole of the API runs, and is fuzzed, as plain calls."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

from qant_mail.app import sending, subscribers_api
from qant_mail.app.context import Context
from qant_mail.app.readers import Status, Subscriber
from qant_mail.app.subscribers_api import ConsentRecord, Invalid, Reader, TooMany
from qant_mail.base import logs
from qant_mail.base.errors import ConfigError
from qant_mail.base.secrets import origin, secret
from qant_mail.web import openapi

log = logging.getLogger(__name__)

PREFIX = "/api/v1"
TOKEN_VARIABLE = "QANT_API_TOKEN"
SCOPES = ("read", "write")
# 32 characters of base64 are 192 bits: beyond guessing, whatever the limits.
MIN_TOKEN = 32
# RFC 6750's b64token: what a Bearer header can carry as it is.
_TOKEN = re.compile(r"[A-Za-z0-9._~+/=-]+")
MAX_TOKEN = 512
MAX_BODY = 64 * 1024
DEFAULT_LIMIT = 100
MAX_LIMIT = 500
# Each token: this many requests a minute on average, in bursts of up to BURST.
PER_MINUTE = 300
BURST = 60
# Each client: this many requests without a valid token a minute; past it, every
# request of that client waits, valid token or not (a guess is no cheaper than a call).
FAILURES_PER_MINUTE = 10
# Clients whose failures are remembered at once: a flood of addresses cannot fill memory.
MAX_CLIENTS = 10_000
# The largest reader or send number a request may name (a BIGINT's).
MAX_ID = 2**63 - 1
_ID = re.compile(r"[1-9][0-9]{0,18}")
_JSON = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}
_TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    422: "Unprocessable Content",
    429: "Too Many Requests",
    503: "Service Unavailable",
}


@dataclass(frozen=True)
class ApiToken:
    """A token of `QANT_API_TOKEN`: what a log may call it, its scope, its digest."""

    label: str  # "write #2": its place in the variable, never any of its characters
    scope: str
    digest: bytes = field(repr=False)

    def allows(self, scope: str) -> bool:
        """Return whether this token may do what needs `scope` (write includes read)."""
        return self.scope == "write" or scope == "read"


def api_tokens(env: Mapping[str, str] | None) -> list[ApiToken]:
    """Return the tokens of `QANT_API_TOKEN` (or the file `QANT_API_TOKEN_FILE` names):
    `SCOPE:TOKEN` entries, separated by commas, spaces or lines; none when unset. Raise
    ConfigError for an entry that is not one, naming it by its place only."""
    text = secret(env, TOKEN_VARIABLE)
    if text is None:
        return []
    where = origin(env, TOKEN_VARIABLE)
    found: list[ApiToken] = []
    for number, entry in enumerate(text.replace(",", " ").split(), 1):
        scope, colon, token = entry.partition(":")
        # The messages name the entry by its place: the variable is a secret.
        if not colon or scope not in SCOPES:
            raise ConfigError(f"{where}: entry {number}: write it read:TOKEN or write:TOKEN")
        if len(token) < MIN_TOKEN:
            raise ConfigError(
                f"{where}: entry {number}: the token has {len(token)} characters, fewer than "
                f"{MIN_TOKEN}; make one with: python3 -c 'import secrets; "
                "print(secrets.token_urlsafe(32))'"
            )
        if len(token) > MAX_TOKEN or not _TOKEN.fullmatch(token):
            raise ConfigError(
                f"{where}: entry {number}: a token is up to {MAX_TOKEN} letters, digits "
                "and - . _ ~ + / ="
            )
        digest = _digest(token)
        if any(hmac.compare_digest(digest, other.digest) for other in found):
            raise ConfigError(f"{where}: entry {number}: the same token as an earlier entry")
        found.append(ApiToken(f"{scope} #{number}", scope, digest))
    if not found:
        raise ConfigError(f"{where} is set but holds no token")
    return found


def _digest(token: str) -> bytes:
    # Compared as digests: of one length whatever was sent, so the comparison's time
    # says nothing of a token's length either.
    return hashlib.sha256(token.encode()).digest()


@dataclass(frozen=True)
class ApiRequest:
    """One request to the API, as `serve` received it."""

    method: str
    path: str  # below /api/v1: "/subscribers/12"
    query: str = ""
    authorization: str = ""
    content_type: str = ""
    body: bytes = b""
    client: str = "unknown"  # the client's address, as the signup limits see it


@dataclass(frozen=True)
class Answer:
    """What the API answers: a status, a JSON body, headers of its own."""

    status: int
    body: object
    headers: Mapping[str, str] = field(default_factory=dict)

    @property
    def media_type(self) -> str:
        """Return the type of the body: JSON, or problem details for an error."""
        return "application/problem+json" if self.status >= 400 else "application/json"

    @property
    def all_headers(self) -> dict[str, str]:
        """Return every header of the answer."""
        return {**_JSON, **self.headers}


class Refused(Exception):
    """A request answered with an error (raised where it is found, answered once)."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        errors: Sequence[tuple[str, str]] = (),
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.answer = problem(status, detail, errors=errors, headers=headers)


def problem(
    status: int,
    detail: str,
    *,
    errors: Sequence[tuple[str, str]] = (),
    headers: Mapping[str, str] | None = None,
) -> Answer:
    """Return an error as problem details (RFC 9457), with its field errors if any."""
    body: dict[str, object] = {
        "type": "about:blank",
        "title": _TITLES.get(status, "Error"),
        "status": status,
        "detail": detail,
    }
    if errors:
        body["errors"] = [{"field": name, "message": message} for name, message in errors]
    return Answer(status, body, headers or {})


_RESOURCES = ("subscribers", "sends", "openapi.json")


def shown_path(path: str) -> str:
    """Return a path of the API as a log may show it: the resource and a reader's number
    as they are, any other part as "…" (a client may paste a token anywhere)."""
    if not path.startswith(PREFIX + "/"):
        return "/api/…"
    parts = path.removeprefix(PREFIX + "/").split("/")
    shown = [parts[0] if parts[0] in _RESOURCES else "…"]
    if len(parts) > 1:
        shown.append(parts[1] if _ID.fullmatch(parts[1]) else "…")
    if len(parts) > 2:
        shown.append("…")
    return "/".join([PREFIX, *shown])


def unavailable() -> Answer:
    """Return the answer while the store cannot be used (a server restarting, a full
    disk): when to try again; the operator's log has why."""
    detail = "unavailable for a moment; try again in a minute"
    return problem(503, detail, headers={"Retry-After": "60"})


class Buckets:
    """Token buckets by key: each holds up to `burst` and refills `per_minute` a minute;
    the emptiest are forgotten past `size` keys (a bucket forgotten is a full one)."""

    def __init__(
        self, per_minute: float, burst: int, *, size: int = MAX_CLIENTS, clock: Callable[[], float]
    ) -> None:
        self.rate = per_minute / 60
        self.burst = float(burst)
        self.size = size
        self.clock = clock
        self._levels: dict[str, tuple[float, float]] = {}  # key → (level, when)
        self._lock = threading.Lock()

    def wait(self, key: str) -> float:
        """Return how long `key` must wait before its next request (0: none)."""
        with self._lock:
            level = self._level(key, self.clock())
            return 0.0 if level >= 1 else (1 - level) / self.rate

    def take(self, key: str) -> float:
        """Take one from `key`'s bucket; return 0, or how long to wait when it is empty
        (nothing is taken then)."""
        with self._lock:
            now = self.clock()
            level = self._level(key, now)
            if level < 1:
                return (1 - level) / self.rate
            self._levels[key] = (level - 1, now)
            if len(self._levels) > self.size:
                self._forget(now)
            return 0.0

    def _level(self, key: str, now: float) -> float:
        level, when = self._levels.get(key, (self.burst, now))
        return min(self.burst, level + (now - when) * self.rate)

    def _forget(self, now: float) -> None:
        fullest = sorted(self._levels, key=lambda k: self._level(k, now), reverse=True)
        for key in fullest[: len(fullest) - self.size // 2]:
            del self._levels[key]


Handler = Callable[[ApiRequest, ApiToken, tuple[str, ...]], Answer]


class Api:
    """The API of one installation: its routes, tokens and limits."""

    def __init__(
        self,
        ctx: Context,
        tokens: Sequence[ApiToken],
        *,
        queued: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ctx = ctx
        self.tokens = list(tokens)
        self.queued = queued
        self.per_token = Buckets(PER_MINUTE, BURST, size=len(self.tokens) + 1, clock=clock)
        self.failures = Buckets(FAILURES_PER_MINUTE, FAILURES_PER_MINUTE, clock=clock)
        self._openapi = openapi.document()
        # Path pattern → {method: (scope, handler)}.
        self.routes: list[tuple[re.Pattern[str], dict[str, tuple[str, Handler]]]] = [
            (
                re.compile(r"/subscribers"),
                {"GET": ("read", self.list_readers), "POST": ("write", self.create)},
            ),
            (
                re.compile(r"/subscribers/([^/]*)"),
                {
                    "GET": ("read", self.read),
                    "PATCH": ("write", self.change),
                    "DELETE": ("write", self.unsubscribe),
                },
            ),
            (re.compile(r"/sends"), {"GET": ("read", self.list_sends)}),
            (re.compile(r"/sends/([^/]+)"), {"GET": ("read", self.send_state)}),
        ]

    def handle(self, request: ApiRequest) -> Answer:
        """Answer one request: authenticate, limit, route, check the scope, act."""
        method = "GET" if request.method == "HEAD" else request.method
        if request.path == "/openapi.json" and method == "GET":
            return Answer(200, self._openapi)
        try:
            token = self._authenticate(request)
            waiting = self.per_token.take(token.label)
            if waiting:
                raise _too_many(waiting, "this token's requests are limited")
            handler, scope, groups = self._route(method, request.path)
            if not token.allows(scope):
                raise Refused(403, f"this token's scope is {token.scope}; this needs {scope}")
            if len(request.body) > MAX_BODY:
                raise Refused(413, f"a body is at most {MAX_BODY} bytes")
            return handler(request, token, groups)
        except Refused as refused:
            return refused.answer

    # -- authentication and routing ------------------------------------------------------

    def _authenticate(self, request: ApiRequest) -> ApiToken:
        client = request.client
        waiting = self.failures.wait(client)
        if waiting:
            raise _too_many(waiting, "too many requests without a valid token")
        scheme, _, credentials = request.authorization.strip().partition(" ")
        found = self._token(credentials.strip()) if scheme.lower() == "bearer" else None
        if found is None:
            self.failures.take(client)
            why = "unknown token" if scheme.lower() == "bearer" else "no bearer token"
            logs.event(log, "api_refused", logging.WARNING, status=401, why=why, client=client)
            detail = "a valid token is needed: Authorization: Bearer TOKEN"
            raise Refused(401, detail, headers={"WWW-Authenticate": 'Bearer realm="qant-mail"'})
        return found

    def _token(self, candidate: str) -> ApiToken | None:
        """Return the token `candidate` is, comparing it with every one (constant time)."""
        digest = _digest(candidate)
        found = None
        for token in self.tokens:
            # No early exit: the time taken says nothing of which token matched, or when.
            if hmac.compare_digest(digest, token.digest):
                found = token
        return found

    def _route(self, method: str, path: str) -> tuple[Handler, str, tuple[str, ...]]:
        for pattern, methods in self.routes:
            matched = pattern.fullmatch(path)
            if matched is None:
                continue
            if method not in methods:
                allowed = ", ".join(sorted(methods))
                raise Refused(405, f"{method} is not one of {allowed}", headers={"Allow": allowed})
            scope, handler = methods[method]
            return handler, scope, matched.groups()
        raise Refused(404, "no such resource in /api/v1 (see /api/v1/openapi.json)")

    # -- readers -------------------------------------------------------------------------

    def create(self, request: ApiRequest, token: ApiToken, groups: tuple[str, ...]) -> Answer:
        """POST /subscribers: a confirmation mailed (202), or a confirmed reader (201)."""
        data = _object(request)
        email, name, newsletters, consent = _creation(data)
        try:
            created = subscribers_api.create(
                self.ctx,
                email,
                name,
                newsletters,
                consent=consent,
                client=token.label,
                queued=self.queued,
            )
        except Invalid as err:
            raise Refused(422, "the request cannot be done as it is", errors=err.problems) from err
        except TooMany as err:
            raise _too_many(err.retry_after, str(err)) from err
        if created.reader is None:
            logs.event(log, "api_signup", token=token.label, newsletters=list(created.newsletters))
            return Answer(
                202,
                {
                    "status": "pending",
                    "email": email.strip(),
                    "newsletters": list(created.newsletters),
                    "detail": "a confirmation was mailed; nothing is stored until it is used",
                },
            )
        reader = created.reader
        logs.event(log, "api_subscribe", token=token.label, reader=reader.id)
        headers = {"Location": f"{PREFIX}/subscribers/{reader.id}"}
        return Answer(201 if created.new else 200, _reader(reader), headers)

    def read(self, request: ApiRequest, token: ApiToken, groups: tuple[str, ...]) -> Answer:
        """GET /subscribers/{id}: one reader, with each of their newsletters."""
        found = subscribers_api.get(self.ctx, _number(groups[0]))
        if found is None:
            raise _no_reader()
        return Answer(200, _reader(found))

    def change(self, request: ApiRequest, token: ApiToken, groups: tuple[str, ...]) -> Answer:
        """PATCH /subscribers/{id}: a new name, or the newsletters they get."""
        number = _number(groups[0])
        data = _object(request)
        problems: list[tuple[str, str]] = _unknown(data, {"name", "newsletters"})
        name = _text(data, "name", problems, required=False, default=None)
        newsletters = _keys(data, problems)
        if not problems and name is None and newsletters is None:
            problems.append(("body", 'give "name", "newsletters" or both'))
        if problems:
            raise Refused(422, "the request cannot be done as it is", errors=problems)
        try:
            found = subscribers_api.change(self.ctx, number, name=name, newsletters=newsletters)
        except Invalid as err:
            raise Refused(422, "the request cannot be done as it is", errors=err.problems) from err
        if found is None:
            raise _no_reader()
        logs.event(log, "api_change", token=token.label, reader=number)
        return Answer(200, _reader(found))

    def unsubscribe(self, request: ApiRequest, token: ApiToken, groups: tuple[str, ...]) -> Answer:
        """DELETE /subscribers/{id}: unsubscribed from every newsletter (or `newsletter`);
        kept, so that no import brings them back."""
        number = _number(groups[0])
        query = _query(request, {"newsletter"})
        try:
            found = subscribers_api.leave(self.ctx, number, query.get("newsletter"))
        except Invalid as err:
            raise Refused(422, "the request cannot be done as it is", errors=err.problems) from err
        if found is None:
            raise _no_reader()
        logs.event(log, "api_unsubscribe", token=token.label, reader=number)
        return Answer(200, _reader(found))

    def list_readers(self, request: ApiRequest, token: ApiToken, groups: tuple[str, ...]) -> Answer:
        """GET /subscribers: a newsletter's readers by number, a page at a time."""
        query = _query(request, {"newsletter", "status", "limit", "after", "email"})
        limit, after = _paging(query)
        if "email" in query and not _printable(query["email"]):
            raise Refused(422, "bad query", errors=[("email", "not an address")])
        status = None
        if "status" in query:
            try:
                status = Status(query["status"])
            except ValueError as err:
                choices = ", ".join(s.value for s in Status)
                raise Refused(422, "bad query", errors=[("status", f"one of {choices}")]) from err
        try:
            found = subscribers_api.page(
                self.ctx,
                query.get("newsletter"),
                status=status,
                after=after,
                limit=limit,
                email=query.get("email"),
            )
        except Invalid as err:
            raise Refused(422, "bad query", errors=err.problems) from err
        newsletter = query.get("newsletter") or self.ctx.settings.main_id
        return Answer(
            200,
            {
                "newsletter": newsletter,
                "data": [_listed(reader) for reader in found.readers],
                "next_after": found.next_after,
            },
        )

    # -- sends ---------------------------------------------------------------------------

    def list_sends(self, request: ApiRequest, token: ApiToken, groups: tuple[str, ...]) -> Answer:
        """GET /sends: every send, the latest first, a page at a time."""
        query = _query(request, {"limit", "after"})
        limit, after = _paging(query)
        sends = sorted(sending.history(self.ctx).sends, key=lambda s: s.send.id, reverse=True)
        if after:
            sends = [s for s in sends if s.send.id < after]
        shown = sends[:limit]
        more = len(sends) > limit
        return Answer(
            200,
            {
                "data": [sending.summary_json(summary) for summary in shown],
                "next_after": shown[-1].send.id if more else None,
            },
        )

    def send_state(self, request: ApiRequest, token: ApiToken, groups: tuple[str, ...]) -> Answer:
        """GET /sends/{issue}: where the send of an issue stands."""
        issue = groups[0]
        found = sending.status(self.ctx, issue) if _printable(issue) else None
        if found is None or found.send is None:
            raise Refused(404, "no send of that issue")
        return Answer(200, _state(found))


# -- what a request holds --------------------------------------------------------------


def _object(request: ApiRequest) -> dict[str, Any]:
    """Return the JSON object a request's body holds, or refuse it."""
    kind = request.content_type.split(";")[0].strip().lower()
    if kind != "application/json":
        raise Refused(415, "the body is JSON: Content-Type: application/json")
    try:
        data = json.loads(request.body, parse_constant=_no_constant)
    except (ValueError, RecursionError) as err:
        # (UnicodeDecodeError is a ValueError.) What the parser says names no value.
        raise Refused(400, "the body is not JSON") from err
    if not isinstance(data, dict):
        raise Refused(422, "the body is a JSON object", errors=[("body", "a JSON object")])
    return data


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _creation(
    data: dict[str, Any],
) -> tuple[str, str, list[str] | None, ConsentRecord | None]:
    """Return what a creation asks for, or refuse it with each field that is wrong."""
    problems = _unknown(data, {"email", "name", "newsletters", "confirmed", "consent"})
    email = _text(data, "email", problems, required=True) or ""
    name = _text(data, "name", problems, required=False) or ""
    newsletters = _keys(data, problems)
    confirmed = data.get("confirmed", False)
    if not isinstance(confirmed, bool):
        problems.append(("confirmed", "true or false"))
        confirmed = False
    consent = None
    given = data.get("consent")
    if confirmed and given is None:
        problems.append(
            ("consent", 'required with "confirmed": true: where and when the reader gave it')
        )
    elif given is not None and not confirmed:
        problems.append(("consent", 'only with "confirmed": true'))
    elif given is not None and not isinstance(given, dict):
        problems.append(("consent", "an object: source, at, and confirmed_at, ip if known"))
    elif isinstance(given, dict):
        wrong = _unknown(given, {"source", "at", "confirmed_at", "ip"}, prefix="consent.")
        problems += wrong
        source = _text(given, "source", problems, required=True, prefix="consent.")
        at = _text(given, "at", problems, required=True, prefix="consent.")
        confirmed_at = _text(given, "confirmed_at", problems, required=False, prefix="consent.")
        ip = _text(given, "ip", problems, required=False, prefix="consent.")
        consent = ConsentRecord(source or "", at or "", confirmed_at or "", ip or "")
    if problems:
        raise Refused(422, "the request cannot be done as it is", errors=problems)
    return email, name, newsletters, consent


def _unknown(data: dict[str, Any], known: set[str], prefix: str = "") -> list[tuple[str, str]]:
    return [(f"{prefix}{_shown(key)}", "unknown field") for key in sorted(set(data) - known)[:10]]


def _text(
    data: dict[str, Any],
    key: str,
    problems: list[tuple[str, str]],
    *,
    required: bool,
    default: str | None = "",
    prefix: str = "",
    limit: int = 1000,
) -> str | None:
    """Return the text at `key`, or note what is wrong with it."""
    value = data.get(key)
    if value is None:
        if required:
            problems.append((prefix + key, "required"))
        return default
    if not isinstance(value, str):
        problems.append((prefix + key, "a string"))
        return default
    if len(value) > limit:
        problems.append((prefix + key, f"longer than {limit} characters"))
        return default
    if not _encodable(value):
        problems.append((prefix + key, "not valid Unicode (a lone surrogate)"))
        return default
    return value


def _keys(data: dict[str, Any], problems: list[tuple[str, str]]) -> list[str] | None:
    value = data.get("newsletters")
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(k, str) for k in value):
        problems.append(("newsletters", "a list of newsletter keys"))
        return None
    if not all(_encodable(k) and len(k) <= 100 for k in value):
        problems.append(("newsletters", "a list of newsletter keys"))
        return None
    return value


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _printable(text: str) -> bool:
    return len(text) <= 200 and _encodable(text) and text.isprintable()


def _shown(key: str) -> str:
    """Return a key of the request as an error may repeat it: short, printable."""
    cut = key[:40]
    return cut if _printable(cut) else json.dumps(cut)


def _query(request: ApiRequest, known: set[str]) -> dict[str, str]:
    """Return the parameters of a request's query (each once), or refuse it."""
    try:
        parsed = parse_qs(request.query, keep_blank_values=True, max_num_fields=20)
    except ValueError as err:
        raise Refused(422, "bad query", errors=[("query", "too many parameters")]) from err
    problems = [(_shown(key), "unknown parameter") for key in sorted(set(parsed) - known)]
    problems += [(key, "given more than once") for key in sorted(parsed) if len(parsed[key]) > 1]
    problems += [
        (key, "not valid Unicode")
        for key, values in sorted(parsed.items())
        if key in known and not all(_encodable(v) for v in values)
    ]
    if problems:
        raise Refused(422, "bad query", errors=problems[:10])
    return {key: values[0] for key, values in parsed.items()}


def _paging(query: dict[str, str]) -> tuple[int, int]:
    problems = []
    limit, after = DEFAULT_LIMIT, 0
    if "limit" in query:
        text = query["limit"]
        if not (text.isascii() and text.isdigit() and 1 <= int(text[:4]) <= MAX_LIMIT):
            problems.append(("limit", f"a whole number from 1 to {MAX_LIMIT}"))
        else:
            limit = int(text)
    if "after" in query:
        text = query["after"]
        if not (text == "0" or _ID.fullmatch(text)) or int(text) > MAX_ID:
            problems.append(("after", "the number of the last item of the previous page"))
        else:
            after = int(text)
    if problems:
        raise Refused(422, "bad query", errors=problems)
    return limit, after


def _number(text: str) -> int:
    """Return the reader number a path names; refuse anything else as unknown."""
    if not _ID.fullmatch(text) or int(text) > MAX_ID:
        raise _no_reader()
    return int(text)


def _no_reader() -> Refused:
    return Refused(404, "no such reader")


def _too_many(seconds: float, detail: str) -> Refused:
    wait = max(1, math.ceil(seconds))
    return Refused(429, f"{detail}; try again in {wait} s", headers={"Retry-After": str(wait)})


# -- what an answer holds --------------------------------------------------------------


def _reader(reader: Reader) -> dict[str, object]:
    return {
        "id": reader.id,
        "email": reader.email,
        "name": reader.name,
        "status": reader.status.value,
        "created_at": reader.created_at,
        "newsletters": [
            {
                "id": s.newsletter,
                "status": s.status.value,
                "since": s.since,
                "reason": s.reason,
                "source": s.source,
                "consent": None
                if s.consent is None
                else {
                    "asked_at": s.consent.requested_at,
                    "form": s.consent.form,
                    "confirmed_at": s.consent.confirmed_at or None,
                },
            }
            for s in reader.subscriptions
        ],
    }


def _listed(reader: Subscriber) -> dict[str, object]:
    return {
        "id": reader.id,
        "email": reader.email,
        "name": reader.name,
        "status": reader.status.value,
        "since": reader.status_changed_at,
        "reason": reader.status_reason,
        "created_at": reader.created_at,
        "source": reader.source,
    }


def _counts(counts: Mapping[Any, int]) -> dict[str, int]:
    return {str(state): number for state, number in counts.items()}


def _state(status: sending.SendStatus) -> dict[str, object]:
    send = status.send
    assert send is not None
    counts = _counts(status.counts)
    approval = status.approval
    return {
        **sending.send_json(send),
        "running": status.running,
        "recipients": sum(counts.values()),
        "left": sending.left(status.counts),
        "counts": counts,
        "bounced": status.bounced,
        "soft_bounced": status.soft_bounced,
        "complaints": status.complaints,
        "rate_per_second": round(status.rate, 3),
        "expected_finish": None
        if status.expected_finish is None
        else status.expected_finish.isoformat(timespec="seconds"),
        "relays": dict(status.relays),
        "approved": None
        if approval is None
        else {"by": approval.approver, "at": approval.approved_at, "digest": approval.digest},
    }
