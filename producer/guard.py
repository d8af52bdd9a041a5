"""The gateway's outer guard: an ASGI middleware every request passes before any route, and
before its body is read. In order:

1. Host allow-list (``allowed_hosts``; DNS rebinding): 421 for a Host the gateway does not
   answer to. /health, /ready and /metrics answer any Host (probes and scrapers use addresses).
2. Authentication and scope (producer/access.py): the key in ``X-API-Key`` or ``Authorization:
   Bearer``; 401 without a valid one, 429 after too many failures from one address, 403 when the
   key lacks the route's scope; then one token of the key's rate limit. Open routes: /health,
   /ready, /metrics, the live page and its static files, the OpenAPI pages.
3. Content type (cross-site requests): a POST, PUT or PATCH, and a DELETE with a body, must be
   ``application/json`` (415 otherwise: a form or ``text/plain`` POST from a web page is refused).
4. Body size: refused (413) from its Content-Length, or while it streams in as soon as the
   bytes read pass the limit (``max_request_bytes``; /identify: 2 x ``max_frame_bytes`` + 1
   MiB), so memory never holds more than the limit.

Every answer also carries ``X-Content-Type-Options: nosniff``, ``X-Frame-Options: DENY``,
``Referrer-Policy: no-referrer`` and, unless the route set its own (the live page does), a
``Content-Security-Policy`` that allows nothing (the OpenAPI pages, which load Swagger UI, have
none).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import anyio.to_thread
from fastapi import HTTPException, Request

from ..common.settings import Settings
from .access import Access, Caller, Refused

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

PROBES = frozenset({"/health", "/ready", "/metrics"})  # any Host: liveness, readiness, scrape
OPEN_PATHS = PROBES | {"/live", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}
OPEN_PREFIXES = ("/live/static/",)
DOC_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc"})
LOCAL_HOSTS = ("localhost", "127.0.0.1", "[::1]")
JSON_ONLY = frozenset({"POST", "PUT", "PATCH"})
STRICT_CSP = "default-src 'none'; frame-ancestors 'none'"
SECURITY_HEADERS = ((b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
                    (b"referrer-policy", b"no-referrer"))


def route_scope(path: str) -> str | None:
    """The scope a path needs; None for the open routes. A path not listed needs admin."""
    if path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
        return None
    if path == "/identify":
        return "identify"
    if path.startswith("/live/") or path in ("/results/events", "/ask") or (
            path.startswith("/sources/") and path.endswith("/ask") and path.count("/") == 3):
        return "read"
    return "admin"  # /sources, control routes, and any route added later: fail closed


def allowed_hosts(settings: Settings, bind_host: str) -> frozenset[str] | None:
    """The Host names the gateway answers (lower case, IPv6 in brackets); None: any."""
    names = [h.strip().lower() for h in settings.allowed_hosts.split(",") if h.strip()]
    if "*" in names:
        return None
    if not names:
        names = list(LOCAL_HOSTS)
        bind = bind_host.strip().lower()
        if bind and bind not in ("0.0.0.0", "::", "[::]"):
            names.append(f"[{bind.strip('[]')}]" if ":" in bind else bind)
    return frozenset(names)


def host_name(header: str) -> str:
    """The name of a Host header without its port ("[::1]:5004" -> "[::1]")."""
    header = header.strip().lower()
    if header.startswith("["):
        return header.split("]", 1)[0] + "]"
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class BodyTooLarge(HTTPException):
    """Raised from the counted ``receive`` once a body passes its limit (a FastAPI
    HTTPException, so FastAPI's own body parsing lets it through as a 413)."""

    def __init__(self, limit: int, read: int) -> None:
        super().__init__(413, f"request body is over the {limit}-byte limit (stopped reading "
                              f"at {read} bytes)", headers={"Connection": "close"})


def require(scope: str) -> Callable[[Request], Caller]:
    """A route dependency: the caller the guard let in, which must hold ``scope`` (the guard
    already checked; this keeps a route closed should it ever run without the guard)."""
    def dependency(request: Request) -> Caller:
        caller = getattr(request.state, "caller", None)
        if not isinstance(caller, Caller):
            raise HTTPException(401, "a valid API key is required",
                                headers={"WWW-Authenticate": "Bearer"})
        if not caller.can(scope):
            raise HTTPException(403, f"this API key lacks the {scope!r} scope")
        return caller
    return dependency


class Guard:
    """The middleware (see the module docstring)."""

    def __init__(self, app: ASGIApp, *, access: Access, settings: Settings,
                 bind_host: str, identify_max_bytes: int) -> None:
        self.app = app
        self.access = access
        self.hosts = allowed_hosts(settings, bind_host)
        self.max_bytes = settings.max_request_bytes
        self.identify_max_bytes = identify_max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        send = _with_security_headers(send, scope["path"])
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers") or []}
        try:
            limit = await self._check(scope, headers)
        except Refused as exc:
            await _answer(send, exc.status, str(exc), exc.headers, _has_body(headers))
            return
        read = 0

        async def counted() -> Message:
            nonlocal read
            message = await receive()
            if message["type"] == "http.request":
                read += len(message.get("body", b""))
                if read > limit:
                    raise BodyTooLarge(limit, read)
            return message

        started = False

        async def tracking(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, tracking)
        except BodyTooLarge as exc:  # raised where no handler turned it into an answer
            if started:
                raise
            await _answer(send, 413, str(exc.detail), {}, True)

    async def _check(self, scope: Scope, headers: dict[str, str]) -> int:
        """Everything but the body; the body limit to apply. Refused says why not."""
        path, method = scope["path"], scope["method"]
        if self.hosts is not None and path not in PROBES:
            name = host_name(headers.get("host", ""))
            if name not in self.hosts:
                raise Refused(421, f"this gateway does not answer to Host {name[:100]!r} "
                              "(allowed_hosts)")
        needed = route_scope(path)
        if needed is not None:
            caller = await anyio.to_thread.run_sync(self._authenticate, scope, headers,
                                                    needed)
            scope.setdefault("state", {})["caller"] = caller
        if method in JSON_ONLY or (method == "DELETE" and _has_body(headers)):
            media = headers.get("content-type", "").split(";", 1)[0].strip().lower()
            if media != "application/json":
                raise Refused(415, f"{method} needs Content-Type: application/json, got "
                              f"{media[:60] or 'none'!r}")
        limit = self.identify_max_bytes if path == "/identify" else self.max_bytes
        check_length(headers.get("content-length"), limit)
        return limit

    def _authenticate(self, scope: Scope, headers: dict[str, str], needed: str) -> Caller:
        key = headers.get("x-api-key")
        if not key:
            auth = headers.get("authorization", "")
            scheme, _, credentials = auth.partition(" ")
            key = credentials.strip() if scheme.lower() == "bearer" else None
        client = scope.get("client")
        caller = self.access.authenticate(key or None, client[0] if client else "unknown")
        if not caller.can(needed):
            raise Refused(403, f"this API key lacks the {needed!r} scope")
        self.access.admit(caller, 1)
        return caller


def check_length(length: str | None, limit: int) -> None:
    """Refuse a body from its Content-Length header before a byte of it is read: 400 where the
    header is not a number, 413 where it is over ``limit``. No header passes (it streams)."""
    if length is None:
        return
    if not length.isdigit():
        raise Refused(400, f"invalid Content-Length {length[:40]!r}")
    if int(length) > limit:
        raise Refused(413, f"request body of {int(length)} bytes is over the {limit}-byte limit")


def _has_body(headers: dict[str, str]) -> bool:
    return headers.get("content-length", "0") not in ("", "0") or "transfer-encoding" in headers


def _with_security_headers(send: Send, path: str) -> Send:
    csp = path not in DOC_PATHS

    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = list(message.get("headers") or [])
            names = {k.lower() for k, _ in headers}
            headers += [(k, v) for k, v in SECURITY_HEADERS if k not in names]
            if csp and b"content-security-policy" not in names:
                headers.append((b"content-security-policy", STRICT_CSP.encode()))
            message["headers"] = headers
        await send(message)
    return wrapped


async def _answer(send: Send, status: int, message: str, headers: dict[str, str],
                  close: bool) -> None:
    """A JSON error answer ``{"error": ...}``; ``close``: the body was not read, so the
    connection is closed rather than the rest parsed as a next request."""
    body = json.dumps({"error": message}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
    if close:
        raw.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
