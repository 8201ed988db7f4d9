"""Serving the app with Hypercorn on a socket SOLLOL binds itself.

Binding first lets ``--port 0`` pick a free port and lets callers learn the
real address before the first request, which the demo and the tests rely on.
"""

import asyncio
import logging
import signal
import socket
from collections.abc import Callable, Coroutine
from typing import Any

from hypercorn.asyncio import serve
from hypercorn.config import Config
from starlette.types import ASGIApp

log = logging.getLogger(__name__)


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


def base_url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def serve_app(
    app: ASGIApp,
    sock: socket.socket,
    *,
    shutdown_event: asyncio.Event,
    graceful_timeout_s: float = 10.0,
) -> None:
    """Serve ``app`` on ``sock`` until ``shutdown_event`` is set.

    Hypercorn takes ownership of the socket and closes it when it stops.
    """
    config = Config()
    config.bind = [f"fd://{sock.detach()}"]
    config.graceful_timeout = graceful_timeout_s
    config.keep_alive_timeout = 75
    config.accesslog = None  # SOLLOL writes its own access line per request
    config.errorlog = logging.getLogger("hypercorn.error")
    await serve(app, config, shutdown_trigger=shutdown_event.wait)  # type: ignore[arg-type]


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
