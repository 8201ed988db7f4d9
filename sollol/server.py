"""Serving the app with Hypercorn on a socket SOLLOL binds itself.

Binding first lets ``--port 0`` pick a free port and lets callers learn the
real address before the first request, which the demo and the tests rely on.
"""

import asyncio
import gc
import logging
import signal
import socket
import sys
from collections.abc import Callable, Coroutine
from typing import Any

import orjson
from hypercorn.asyncio import serve
from hypercorn.config import Config
from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import openai_error_body

log = logging.getLogger(__name__)
access_log = logging.getLogger("sollol.access")


def tune_interpreter() -> None:
    """Shorten the pauses the history writer thread can cause on the event loop.

    ``gc.freeze`` takes every object alive after start-up (modules, the app)
    out of the collector's reach, so full collections scan only what requests
    create. A 1 ms switch interval (5 ms by default) bounds how long the loop
    waits for the GIL while the writer thread runs. Measured with
    benchmarks/history_store.py; figures in docs/benchmarks.md.
    """
    gc.freeze()
    sys.setswitchinterval(0.001)


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(1024)
    sock.set_inheritable(True)
    return sock


def base_url_of(sock: socket.socket, *, tls: bool = False) -> str:
    host, port = sock.getsockname()[:2]
    scheme = "https" if tls else "http"
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


async def serve_app(
    app: ASGIApp,
    sock: socket.socket,
    *,
    shutdown_event: asyncio.Event,
    graceful_timeout_s: float = 10.0,
    max_header_bytes: int = 16 * 1024,
    certfile: str = "",
    keyfile: str = "",
) -> None:
    """Serve ``app`` on ``sock`` until ``shutdown_event`` is set.

    Hypercorn takes ownership of the socket and closes it when it stops.
    With ``certfile`` and ``keyfile`` (PEM) it serves HTTPS, with HTTP/2
    offered through ALPN.
    """
    config = Config()
    if certfile:
        config.certfile = certfile
        config.keyfile = keyfile
    config.bind = [f"fd://{sock.detach()}"]
    config.graceful_timeout = graceful_timeout_s
    # h11 rejects a request head with 431 when it is still incomplete after a
    # read and longer than this. That bounds the memory one head can take,
    # since no head over max_header_bytes + one read gets through, and
    # HeaderSizeLimit makes the limit exact for the heads that do. HTTP/2
    # advertises the same number as SETTINGS_MAX_HEADER_LIST_SIZE.
    # NOTE: only the HTTP/1.1 limit is tested.
    config.h11_max_incomplete_size = max_header_bytes
    config.h2_max_header_list_size = max_header_bytes
    config.keep_alive_timeout = 75
    config.accesslog = None  # SOLLOL writes its own access line per request
    config.errorlog = logging.getLogger("hypercorn.error")
    limited = HeaderSizeLimit(app, max_header_bytes=max_header_bytes)
    await serve(limited, config, shutdown_trigger=shutdown_event.wait)  # type: ignore[arg-type]


class HeaderSizeLimit:
    """Reject with 431 a request whose head is larger than ``max_header_bytes``.

    The head is counted as HTTP/1.1 sends it: the request line, then each
    header as ``name: value`` and CRLF. Hypercorn's own check only catches heads
    that span more than one read of up to 64 KiB, so smaller ones need this.
    """

    def __init__(self, app: ASGIApp, *, max_header_bytes: int) -> None:
        self.app = app
        self.max_header_bytes = max_header_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        size = request_head_bytes(scope)
        if size <= self.max_header_bytes:
            await self.app(scope, receive, send)
            return
        message = (
            f"request line and headers of {size} bytes exceed the limit of "
            f"{self.max_header_bytes} bytes (max_header_bytes)"
        )
        access_log.info("%s %s status=431 error=%s", scope["method"], scope["path"], message)
        if scope["path"].startswith("/api/"):
            body = orjson.dumps({"error": message})  # Ollama's error shape on its routes
        else:
            body = openai_error_body(message, "invalid_request_error")
        await send(
            {
                "type": "http.response.start",
                "status": 431,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def request_head_bytes(scope: Scope) -> int:
    """Return the size of the request line and headers as HTTP/1.1 writes them."""
    target = len(scope.get("raw_path") or scope["path"].encode())
    if scope["query_string"]:
        target += 1 + len(scope["query_string"])
    # "METHOD TARGET HTTP/1.1\r\n", then "name: value\r\n" per header, then "\r\n".
    size = len(scope["method"]) + 1 + target + len(" HTTP/1.1\r\n") + 2
    for name, value in scope["headers"]:
        size += len(name) + 2 + len(value) + 2
    return size


def install_signal_handlers(shutdown_event: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, shutdown_event.set)


def run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run a coroutine function on uvloop when it is installed, else on asyncio."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main())
    else:
        uvloop.run(main())
