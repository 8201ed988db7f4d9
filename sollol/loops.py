"""Routing loops: a router added as its own node, or two routers that list each other.

Every router sends ``x-sollol-via`` on each request to a node: the routers the
client's request has passed through, its own id last. ``LoopGuard`` returns
508 for a request that names this router already, or that has passed through
``MAX_HOPS`` routers, so a loop ends at once instead of sending the request
round until the connections run out. Probes carry the header too, so a router
probing itself gets 508 and never counts itself as a healthy node.
"""

import contextvars
import logging
import secrets

import orjson
from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import openai_error_body

log = logging.getLogger(__name__)

VIA_HEADER = "x-sollol-via"
MAX_HOPS = 8
LOOP_STATUS = 508  # Loop Detected (RFC 5842)

# The routers the request being handled has passed through, this one excluded.
_via: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("sollol_via", default=())


def new_instance_id() -> str:
    return secrets.token_hex(6)


def via_header(instance_id: str) -> dict[str, str]:
    """Return the header for a request this router sends to a node."""
    return {VIA_HEADER: ",".join((*_via.get(), instance_id))}


class LoopDetected(Exception):
    """A node returned 508: its URL leads back to this router."""


class LoopGuard:
    def __init__(self, app: ASGIApp, *, instance_id: str) -> None:
        self.app = app
        self.instance_id = instance_id

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        via: tuple[str, ...] = ()
        for name, value in scope["headers"]:
            if name == VIA_HEADER.encode():
                via += tuple(part.strip() for part in value.decode("latin-1").split(",") if part)
        if self.instance_id in via or len(via) >= MAX_HOPS:
            log.warning(
                "routing loop rejected: %s %s passed through %s", scope["method"], scope["path"],
                ",".join(via),
            )  # fmt: skip
            await _reject(scope, send, via, self.instance_id)
            return
        token = _via.set(via)
        try:
            await self.app(scope, receive, send)
        finally:
            _via.reset(token)


async def _reject(scope: Scope, send: Send, via: tuple[str, ...], instance_id: str) -> None:
    if instance_id in via:
        message = (
            "routing loop: this request has already passed through this router; a node "
            "URL points back at the router itself or at a router that forwards to it"
        )
    else:
        message = f"routing loop: the request has passed through {len(via)} routers"
    if scope["path"].startswith("/api/"):  # Ollama's error shape on its routes
        body = orjson.dumps({"error": message})
    else:
        body = openai_error_body(message, "invalid_request_error", code="routing_loop")
    await send(
        {
            "type": "http.response.start",
            "status": LOOP_STATUS,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": body})
