"""Wire pieces of the Ollama double: error bodies, lazy streams, timings, resets."""

import asyncio
import hashlib
import socket
import struct
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web

EMBEDDING_DIMENSIONS = 16
DEFAULT_PREDICT = 12  # reply pieces when the request sets no limit


class InjectedError(Exception):
    """Raised by a reply's generator where the ``error_mid_stream`` fault strikes."""


class LazyStream:
    """A streamed reply whose status line and headers go out with its first write.

    Ollama starts a streamed reply when the first piece is ready, so a client
    that waits for a model load or in the queue receives no status line yet.
    """

    def __init__(self, request: web.Request, content_type: str) -> None:
        self._request = request
        self._response = web.StreamResponse(headers={"Content-Type": content_type})

    @property
    def started(self) -> bool:
        return self._response.prepared

    async def write(self, data: bytes) -> None:
        if not self.started:
            await self._response.prepare(self._request)
        await self._response.write(data)

    async def finish(self) -> web.StreamResponse:
        if not self.started:
            await self._response.prepare(self._request)
        await self._response.write_eof()
        return self._response


@dataclass
class Timings:
    """What one reply simulated, for the counters on Ollama's final ``done`` line."""

    prompt_tokens: int
    max_tokens: int
    started_ns: int = field(default_factory=time.perf_counter_ns)
    load_ns: int = 0
    prompt_eval_ns: int = 0
    eval_ns: int = 0
    produced: int = 0

    @property
    def done_reason(self) -> str:
        return "length" if self.produced >= self.max_tokens else "stop"

    def metrics(self) -> dict[str, int]:
        """Return the duration counters in integer nanoseconds and the token counts."""
        return {
            "total_duration": time.perf_counter_ns() - self.started_ns,
            "load_duration": self.load_ns,
            "prompt_eval_count": self.prompt_tokens,
            "prompt_eval_duration": self.prompt_eval_ns,
            "eval_count": self.produced,
            "eval_duration": self.eval_ns,
        }


# A TCP reset makes the peer's kernel drop bytes it has received but not yet
# handed to the reading program. Waiting this long first lets a busy client
# read the pieces sent before the fault, so tests see them every time.
RESET_GRACE_S = 0.3


async def reset_after_delivery(request: web.Request) -> None:
    """Give the client time to read what was sent, then reset the connection."""
    await asyncio.sleep(RESET_GRACE_S)
    reset_connection(request)


def reset_connection(request: web.Request) -> None:
    """Abort the connection of ``request`` with a TCP reset rather than an orderly close."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        # SO_LINGER with a zero timeout makes close() send RST.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


async def collect_text(pieces: AsyncGenerator[str, None], *, openai: bool) -> str:
    """Return the whole text of a reply that is not streamed.

    Nothing has been sent yet, so an injected error becomes a 500 reply.
    """
    try:
        async with aclosing(pieces):
            return "".join([piece async for piece in pieces])
    except InjectedError as exc:
        if openai:
            raise openai_error(500, "api_error", str(exc)) from None
        raise native_error(500, str(exc)) from None


def json_response(body: dict[str, Any], status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


def native_error(status: int, message: str) -> web.HTTPException:
    return _status_error(status, orjson.dumps({"error": message}))


def openai_error(status: int, error_type: str, message: str) -> web.HTTPException:
    body = {"error": {"message": message, "type": error_type, "param": None, "code": None}}
    return _status_error(status, orjson.dumps(body))


_ERRORS_BY_STATUS: dict[int, type[web.HTTPException]] = {
    400: web.HTTPBadRequest,
    404: web.HTTPNotFound,
    500: web.HTTPInternalServerError,
    503: web.HTTPServiceUnavailable,
}


def _status_error(status: int, body: bytes) -> web.HTTPException:
    return _ERRORS_BY_STATUS[status](text=body.decode(), content_type="application/json")


def embedding(text: str) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    vector = [(byte - 127.5) / 127.5 for byte in digest[:EMBEDDING_DIMENSIONS]]
    norm = sum(value * value for value in vector) ** 0.5 or 1.0
    return [value / norm for value in vector]


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def timestamp_rfc3339(unix_s: float) -> str:
    return datetime.fromtimestamp(unix_s, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
