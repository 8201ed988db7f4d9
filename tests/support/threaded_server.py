"""An aiohttp application served from a thread on 127.0.0.1, on a port picked at run time.

Test doubles of nodes run here so that synchronous tests and router
subprocesses can reach them like any other server.
"""

import asyncio
import threading

from aiohttp import web

START_TIMEOUT_S = 10.0


class ThreadedServer:
    """Serves ``make_app()``; ``url`` is set once ``start`` returns."""

    def __init__(self) -> None:
        self.url = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None

    def make_app(self) -> web.Application:
        raise NotImplementedError

    def start(self):  # type: ignore[no-untyped-def]
        ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(ready,), daemon=True)
        self._thread.start()
        if not ready.wait(START_TIMEOUT_S):
            raise RuntimeError(f"{type(self).__name__} did not start within {START_TIMEOUT_S} s")
        return self

    def stop(self) -> None:
        if self._loop is None or self._runner is None:
            return
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        assert self._thread is not None
        self._thread.join(10)

    def _serve(self, ready: threading.Event) -> None:
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        # Handlers are cancelled when their client disconnects, as in a real
        # server that stops work nobody waits for.
        self._runner = web.AppRunner(self.make_app(), access_log=None, handler_cancellation=True)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        ready.set()
        self._loop.run_forever()
        self._loop.close()
