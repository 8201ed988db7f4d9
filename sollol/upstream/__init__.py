"""The one pooled HTTP client for all traffic to nodes.

aiohttp was chosen over httpx by a side-by-side measurement through a
pass-through proxy (benchmarks/router_overhead.py; figures in
docs/benchmarks.md). Every aiohttp and timeout error is translated here, at
one boundary, into UpstreamConnectionError, so callers never import aiohttp.
"""

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import orjson

from ..loops import via_header

log = logging.getLogger(__name__)


class UpstreamConnectionError(Exception):
    """A node could not be reached, reset the connection, or stopped sending in time.

    ``connect_failed`` is True when no connection could be opened at all (the
    node is down or refusing), as opposed to one that broke while in use.
    """

    def __init__(self, message: str, *, connect_failed: bool = False) -> None:
        super().__init__(message)
        self.connect_failed = connect_failed


class UpstreamResponse:
    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.status = response.status

    async def read(self) -> bytes:
        try:
            return await self._response.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise UpstreamConnectionError(_describe(exc)) from exc

    async def next_chunk(self) -> bytes:
        """Return the next piece of the body as soon as it arrives; b"" at its end.

        Safe to cancel, e.g. by ``asyncio.timeout``: bytes that arrive
        meanwhile stay buffered for the next call. The caller owns the read
        timeouts, which differ before and after the first token.
        """
        try:
            return await self._response.content.readany()
        except aiohttp.ClientError as exc:
            raise UpstreamConnectionError(_describe(exc)) from exc


class UpstreamClient:
    def __init__(
        self, *, connect_timeout_s: float, max_connections: int, instance_id: str | None = None
    ) -> None:
        # The router's id, sent on every request so a loop back to it is
        # refused (see sollol.loops); None for tools that are not a router.
        self.instance_id = instance_id
        # Only the connect timeout is aiohttp's; the proxy times the reply.
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout_s)
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None
        self._fresh_session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        # llama-server closes idle keep-alive connections after 5 s (its
        # Keep-Alive header says timeout=5), so pooled ones are dropped sooner.
        connector = aiohttp.TCPConnector(
            limit=self._max_connections, keepalive_timeout=4, enable_cleanup_closed=True
        )
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=self._timeout, auto_decompress=False
        )
        # For requests that must not share connections, and for retries after
        # a broken pooled connection, which must not pick another stale one.
        self._fresh_session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self._max_connections, force_close=True),
            timeout=self._timeout,
            auto_decompress=False,
        )

    async def close(self) -> None:
        for session in (self._session, self._fresh_session):
            if session is not None:
                await session.close()
        self._session = None
        self._fresh_session = None

    async def get(self, url: str, *, timeout_s: float, pooled: bool = True) -> tuple[int, Any]:
        """GET a URL and return (status, parsed JSON body or None)."""
        session = self._session_for(pooled)
        try:
            async with session.get(
                url, timeout=aiohttp.ClientTimeout(total=timeout_s), headers=self._via()
            ) as response:
                body = await response.read()
                status = response.status
        except aiohttp.ClientConnectorError as exc:
            raise UpstreamConnectionError(_describe(exc), connect_failed=True) from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise UpstreamConnectionError(_describe(exc)) from exc
        try:
            return status, orjson.loads(body) if body else None
        except orjson.JSONDecodeError:
            return status, None

    async def get_text(self, url: str, *, timeout_s: float) -> tuple[int, str]:
        """GET a URL on a new connection and return (status, body as text)."""
        try:
            async with self._session_for(False).get(
                url, timeout=aiohttp.ClientTimeout(total=timeout_s), headers=self._via()
            ) as response:
                return response.status, await response.text(errors="replace")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise UpstreamConnectionError(_describe(exc)) from exc

    @asynccontextmanager
    async def post(
        self, url: str, body: bytes, *, pooled: bool = True
    ) -> AsyncIterator[UpstreamResponse]:
        """POST a JSON body; the connection is pooled or closed when the block exits.

        Leaving the block before the body was fully read (a client that hung
        up, say) closes the connection, which stops the node's generation.
        With ``pooled`` False the request opens a new connection and closes
        it after the reply (see ``Proxy`` for the nodes that need this).
        """
        response = await self._send_post(url, body, pooled=pooled)
        try:
            yield UpstreamResponse(response)
        except BaseException:
            # Cancellation included: closing, not pooling, the connection is
            # what tells the node to stop generating.
            response.close()
            raise
        else:
            response.release()

    def _session_for(self, pooled: bool) -> aiohttp.ClientSession:
        session = self._session if pooled else self._fresh_session
        if session is None:
            raise RuntimeError("UpstreamClient.start() was not called")
        return session

    def _via(self) -> dict[str, str]:
        return via_header(self.instance_id) if self.instance_id else {}

    async def _send_post(self, url: str, body: bytes, *, pooled: bool) -> aiohttp.ClientResponse:
        headers = {"Content-Type": "application/json", **self._via()}
        if pooled:
            try:
                return await self._session_for(True).post(url, data=body, headers=headers)
            except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
                raise UpstreamConnectionError(_describe(exc), connect_failed=True) from exc
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
                # A pooled keep-alive connection that the node had already
                # closed fails like this before the node read the request, so
                # one retry on a new connection is safe.
                log.debug("retrying %s on a new connection after: %s", url, _describe(exc))
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise UpstreamConnectionError(_describe(exc)) from exc

        try:
            return await self._session_for(False).post(url, data=body, headers=headers)
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            raise UpstreamConnectionError(_describe(exc), connect_failed=True) from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise UpstreamConnectionError(_describe(exc)) from exc


def _describe(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError | TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__
