"""The one pooled HTTP client for all traffic to nodes.

aiohttp was chosen over httpx by a side-by-side measurement through a
pass-through proxy (benchmarks/upstream_clients.py; figures in
docs/benchmarks.md). Every aiohttp and timeout error is translated here, at
one boundary, into UpstreamConnectionError, so callers never import aiohttp.
"""

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import orjson


class UpstreamConnectionError(Exception):
    """A node could not be reached, reset the connection, or stopped sending in time."""


class UpstreamResponse:
    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.status = response.status

    async def read(self) -> bytes:
        try:
            return await self._response.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise UpstreamConnectionError(_describe(exc)) from exc

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        """Yield the body in pieces as they arrive, without waiting to fill a buffer."""
        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise UpstreamConnectionError(_describe(exc)) from exc


class UpstreamClient:
    def __init__(
        self, *, connect_timeout_s: float, read_timeout_s: float, max_connections: int
    ) -> None:
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=connect_timeout_s, sock_read=read_timeout_s
        )
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        # llama-server closes idle keep-alive connections after 5 s (its
        # Keep-Alive header says timeout=5), so pooled ones are dropped sooner.
        connector = aiohttp.TCPConnector(
            limit=self._max_connections, keepalive_timeout=4, enable_cleanup_closed=True
        )
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=self._timeout, auto_decompress=False
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("UpstreamClient.start() was not called")
        return self._session

    async def get(self, url: str, *, timeout_s: float) -> tuple[int, Any]:
        """GET a URL and return (status, parsed JSON body or None)."""
        try:
            async with self.session.get(
                url, timeout=aiohttp.ClientTimeout(total=timeout_s)
            ) as response:
                body = await response.read()
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise UpstreamConnectionError(_describe(exc)) from exc
        try:
            return status, orjson.loads(body) if body else None
        except orjson.JSONDecodeError:
            return status, None

    @asynccontextmanager
    async def post(
        self, url: str, body: bytes, *, reuse_connection: bool = True
    ) -> AsyncIterator[UpstreamResponse]:
        """POST a JSON body; the connection is pooled or closed when the block exits.

        Leaving the block before the body was fully read (a client that hung
        up, say) closes the connection, which stops the node's generation.
        With ``reuse_connection`` False the connection is closed even after a
        complete reply: llama-server closes its side after every streamed
        reply without saying so in a header, and a pooled copy of such a
        connection fails the next request.
        """
        response = await self._send_post(url, body)
        try:
            yield UpstreamResponse(response)
        except BaseException:
            # Cancellation included: closing, not pooling, the connection is
            # what tells the node to stop generating.
            response.close()
            raise
        else:
            if reuse_connection:
                response.release()
            else:
                response.close()

    async def _send_post(self, url: str, body: bytes) -> aiohttp.ClientResponse:
        headers = {"Content-Type": "application/json"}
        try:
            return await self.session.post(url, data=body, headers=headers)
        except aiohttp.ClientConnectorError as exc:
            # No connection could be opened: the node is down or refusing.
            raise UpstreamConnectionError(_describe(exc)) from exc
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
            # A pooled keep-alive connection that the node had already closed
            # fails like this before the node read the request, so one retry
            # on a fresh connection is safe.
            pass
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise UpstreamConnectionError(_describe(exc)) from exc
        try:
            return await self.session.post(url, data=body, headers=headers)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise UpstreamConnectionError(_describe(exc)) from exc


def _describe(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError | TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__
