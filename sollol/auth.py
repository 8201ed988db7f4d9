"""Authentication: which key a request carries, and whether that key may use the route.

``ROUTE_SCOPES`` is the one table of route scopes. A route that is not in it
needs an ordinary key. To make a new route admin-only, put it (or a prefix
ending in ``/*``) in the table, or put it under ``/sollol/``, which is
admin-only as a whole.

With authentication on:

- no key, or an unknown or revoked key: 401, with ``WWW-Authenticate: Bearer``;
- an ordinary key on an admin route: 403;
- ``/health`` stays open for load balancers (it shows node names and health,
  no keys or usage), and so does the ``/dashboard`` page itself, a static file
  without data, so that a browser can show its key form.

A key travels as ``Authorization: Bearer <key>``: the OpenAI SDKs send their
``api_key`` this way, and Ollama's clients send it when given the header. A
browser's EventSource cannot set headers, so the dashboard page posts the key
once to ``/dashboard/session`` and gets a session cookie (HttpOnly,
SameSite=Strict) that the router accepts only for GET requests under
``/dashboard/``. The key never appears in a URL, so no access log can hold it.
"""

import enum
import logging
import secrets
import time
from dataclasses import dataclass

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import AuthenticationError, PermissionDeniedError, SollolError
from .keys import ApiKey
from .tenancy import KeyCache

log = logging.getLogger(__name__)
access_log = logging.getLogger("sollol.access")


class RouteScope(enum.Enum):
    OPEN = "open"  # no key needed
    CLIENT = "client"  # any active key
    ADMIN = "admin"  # an active admin key


# First match wins. A pattern ending in "/*" matches the path before it and
# everything below it; any other pattern matches one path exactly.
ROUTE_SCOPES: tuple[tuple[str, RouteScope], ...] = (
    ("/health", RouteScope.OPEN),
    ("/dashboard", RouteScope.OPEN),
    ("/dashboard/*", RouteScope.ADMIN),
    ("/metrics", RouteScope.ADMIN),
    ("/sollol/*", RouteScope.ADMIN),
)
DEFAULT_SCOPE = RouteScope.CLIENT

SESSION_COOKIE = "sollol_dashboard"
SESSION_PATH = "/dashboard/session"
SESSION_LIFETIME_S = 12 * 3600.0
MAX_SESSIONS = 1024


def scope_of(path: str) -> RouteScope:
    for pattern, scope in ROUTE_SCOPES:
        if pattern.endswith("/*"):
            base = pattern[:-2]
            if path == base or path.startswith(base + "/"):
                return scope
        elif path == pattern:
            return scope
    return DEFAULT_SCOPE


def request_key(request: Request) -> ApiKey | None:
    """Return the key the request was authenticated with; None when authentication is off."""
    return request.scope.get("state", {}).get("api_key")


@dataclass(slots=True)
class _Session:
    key_id: int
    expires_at: float  # time.monotonic()


class DashboardSessions:
    """Session cookies for the dashboard, held in memory, each tied to one admin key."""

    def __init__(self, keys: KeyCache) -> None:
        self._keys = keys
        self._sessions: dict[str, _Session] = {}

    def open(self, key: ApiKey) -> str:
        now = time.monotonic()
        self._sessions = {t: s for t, s in self._sessions.items() if s.expires_at > now}
        if len(self._sessions) >= MAX_SESSIONS:
            oldest = min(self._sessions, key=lambda token: self._sessions[token].expires_at)
            del self._sessions[oldest]
        token = secrets.token_urlsafe(32)
        self._sessions[token] = _Session(key.id, now + SESSION_LIFETIME_S)
        return token

    def key_of(self, token: str) -> ApiKey | None:
        """Return the session's key while both the session and the key are valid."""
        session = self._sessions.get(token)
        if session is None or session.expires_at <= time.monotonic():
            return None
        return self._keys.by_id(session.key_id)

    def route(self) -> Route:
        async def open_session(request: Request) -> Response:
            key = request_key(request)
            response = Response(
                orjson.dumps({"session": "open", "key": key.prefix if key else None}),
                media_type="application/json",
            )
            if key is not None:
                response.set_cookie(
                    SESSION_COOKIE,
                    self.open(key),
                    max_age=int(SESSION_LIFETIME_S),
                    path="/dashboard",
                    httponly=True,
                    samesite="strict",
                    secure=request.url.scheme == "https",
                )
            return response

        return Route(SESSION_PATH, open_session, methods=["POST"])


class AuthGate:
    """ASGI layer that checks the key of every HTTP request against ``ROUTE_SCOPES``.

    The key found is put in ``scope["state"]["api_key"]`` for the handlers
    (see ``request_key``). Rejections are written here, in the OpenAI error
    shape, or in Ollama's on ``/api/*``.
    """

    def __init__(self, app: ASGIApp, *, keys: KeyCache, sessions: DashboardSessions) -> None:
        self.app = app
        self.keys = keys
        self.sessions = sessions

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys.enabled:
            await self.app(scope, receive, send)
            return
        route_scope = scope_of(scope["path"])
        if route_scope is RouteScope.OPEN:
            await self.app(scope, receive, send)
            return
        try:
            key = self._authenticate(scope)
            if route_scope is RouteScope.ADMIN and not key.admin:
                raise PermissionDeniedError(
                    f"{scope['path']} needs an admin key; API key {key.prefix}... is not one",
                    code="admin_key_required",
                )
        except SollolError as exc:
            await _reject(scope, send, exc)
            return
        scope.setdefault("state", {})["api_key"] = key
        await self.app(scope, receive, send)

    def _authenticate(self, scope: Scope) -> ApiKey:
        headers = dict(scope["headers"])
        authorization = headers.get(b"authorization", b"").decode("latin-1").strip()
        if authorization:
            scheme, _, secret = authorization.partition(" ")
            if scheme.lower() != "bearer" or not secret.strip():
                raise AuthenticationError("the Authorization header must be 'Bearer <API key>'")
            key = self.keys.lookup(secret.strip())
            if key is None:
                raise AuthenticationError(
                    "invalid or revoked API key; `sollol keys list` shows the active keys"
                )
            return key
        if scope["method"] == "GET" and scope["path"].startswith("/dashboard/"):
            token = _cookie(headers.get(b"cookie", b""), SESSION_COOKIE)
            key = self.sessions.key_of(token) if token else None
            if key is not None:
                return key
        raise AuthenticationError(
            "this router needs an API key: send 'Authorization: Bearer <API key>' "
            "(the OpenAI SDK's api_key)"
        )


def _cookie(header: bytes, name: str) -> str | None:
    for part in header.decode("latin-1").split(";"):
        cookie_name, _, value = part.strip().partition("=")
        if cookie_name == name and value:
            return value
    return None


async def _reject(scope: Scope, send: Send, error: SollolError) -> None:
    access_log.info(
        "%s %s status=%d error=%s", scope["method"], scope["path"], error.status_code, error.message
    )
    if scope["path"].startswith("/api/"):
        body = orjson.dumps({"error": error.message})  # Ollama's error shape on its routes
    else:
        body = error.to_body()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    headers += [(name.lower().encode(), value.encode()) for name, value in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})
