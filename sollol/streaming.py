"""Relaying one streamed reply: keep-alive while waiting, timeouts, and clean endings.

The life of a stream:

1. The proxy tries nodes until one sends its first event (``Proxy.open``).
   If that takes less than ``keepalive_interval_s``, or fails by then, the
   client gets a normal response: the stream, or an error with its status.
2. If the wait is longer, the response starts anyway (HTTP 200) and an SSE
   comment line goes out every ``keepalive_interval_s``, so clients and
   proxies in between keep the connection. Failover still works during this
   wait, since no data has been sent; if every node fails, the stream ends
   with an error event.
3. Events are relayed as they arrive, with ``model`` rewritten. Silence
   longer than ``idle_timeout_s``, a stream past ``total_timeout_s``, or a
   node that breaks the connection ends the stream with an error event in
   the OpenAI shape and no ``data: [DONE]``. The OpenAI SDK raises it as
   ``APIError``. Nothing is sent twice and no ``finish_reason`` is invented.
4. If the client leaves, the upstream connection is closed at once, which
   makes the node stop generating, and the history row says "cancelled"
   with the tokens relayed so far.
"""

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from .dialects import Translator
from .errors import SollolError
from .sse import Event
from .upstream import UpstreamConnectionError

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from .history import RequestRecord
    from .proxy import Opened, Proxy, ProxyRequest

log = logging.getLogger(__name__)

STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class StreamRelay:
    """One streamed reply. ``close`` releases its node and records it once (see ``_closed``)."""

    def __init__(
        self, proxy: "Proxy", request: "ProxyRequest", record: "RequestRecord", started: float
    ) -> None:
        self._proxy = proxy
        self._settings = proxy.settings
        self._request = request
        self._record = record
        self._started = started
        self._dialect = request.dialect
        self._opening: asyncio.Future[Opened] | None = None
        self._opened: Opened | None = None
        self._translator: Translator | None = None
        self._closed = False

    async def response(self) -> StreamingResponse:
        """Start opening the stream, and return the response once its status is known."""
        self._opening = asyncio.ensure_future(
            self._proxy.open(self._request, self._record, self._started)
        )
        try:
            await asyncio.wait({self._opening}, timeout=self._settings.keepalive_interval_s)
        except BaseException:
            await self.close()
            raise
        headers = dict(STREAM_HEADERS)
        if self._opening.done():
            try:
                self._opened = self._opening.result()
            except SollolError as exc:
                # Nothing was sent yet, so the error keeps its own status.
                self._closed = True
                self._proxy.fail(self._record, self._started, exc)
                raise
            except Exception:
                self._closed = True
                self._record.status, self._record.outcome = 500, "error"
                self._record.error = "internal router error"
                self._record.error_kind = "internal_error"
                self._proxy.finish(self._record, self._started)
                raise
            headers["x-sollol-node"] = self._opened.node.name
        headers["x-sollol-policy"] = self._record.policy or ""
        # Until the stream ends by itself, a close means the client went away.
        self._record.outcome = "cancelled"
        self._record.status = 200
        return RelayResponse(self, headers=headers, media_type=self._dialect.media_type)

    async def events(self) -> "AsyncIterator[bytes]":
        opened = self._opened
        if opened is None:
            assert self._opening is not None
            while not self._opening.done():
                done, _ = await asyncio.wait(
                    {self._opening}, timeout=self._settings.keepalive_interval_s
                )
                if not done and self._dialect.keepalive:
                    yield self._dialect.keepalive
            try:
                opened = self._opened = self._opening.result()
            except SollolError as exc:
                self._end(
                    exc.message, "timeout" if exc.code == "upstream_timeout" else "error", exc.code
                )
                yield self._dialect.error_frame(exc.message, exc.error_type)
                return

        assert opened.first_events is not None and opened.upstream is not None
        self._translator = self._dialect.translator(
            opened, self._request, self._record, self._started
        )
        first = self._relay(opened.first_events)
        if first:
            yield first
        async for out in self._rest(opened):
            yield out

    async def _rest(self, opened: "Opened") -> "AsyncIterator[bytes]":
        """Relay the stream after its first event, applying the idle and total limits."""
        assert opened.upstream is not None and opened.parser is not None
        node, upstream, parser = opened.node, opened.upstream, opened.parser
        idle_s = self._settings.idle_timeout_s
        keepalive_s = self._settings.keepalive_interval_s
        now = time.monotonic()
        total_deadline = (
            now + self._settings.total_timeout_s - (time.perf_counter() - self._started)
        )
        idle_deadline = now + idle_s

        while True:
            wait_s = min(idle_deadline, total_deadline, now + keepalive_s) - now
            try:
                async with asyncio.timeout(max(0.0, wait_s)):
                    chunk = await upstream.next_chunk()
            except TimeoutError:
                now = time.monotonic()
                if now >= total_deadline:
                    message = (
                        f"the stream exceeded {self._settings.total_timeout_s:.0f} s "
                        "(total_timeout_s)"
                    )
                elif now >= idle_deadline:
                    message = f"node {node.name} sent nothing for {idle_s:.1f} s (idle_timeout_s)"
                else:
                    if self._dialect.keepalive:
                        yield self._dialect.keepalive
                    continue
                self._end(message, "timeout", "upstream_timeout")
                yield self._dialect.error_frame(message, "timeout")
                return
            except UpstreamConnectionError as exc:
                # The client already has part of the reply, so no other node
                # can take over.
                message = f"node {node.name} failed in the middle of the stream: {exc}"
                self._end(message, "error", "upstream_error")
                yield self._dialect.error_frame(message, "upstream_error")
                return

            now = time.monotonic()
            if not chunk:
                break
            idle_deadline = now + idle_s
            node.last_progress_at = now
            # Events completed by one network read go out in one write.
            out = self._relay(parser.feed(chunk))
            if out:
                yield out

        out = self._relay(parser.finish()) + self._translator.tail()
        if out:
            yield out
        if parser.pending.strip():
            log.warning("node %s ended its stream inside an event", node.name)
        if self._record.outcome == "cancelled":
            self._record.outcome = "ok"

    def _end(self, message: str, outcome: str, error_kind: str) -> None:
        self._record.outcome = outcome
        self._record.error = message[:512]
        self._record.error_kind = error_kind

    def _relay(self, events: list[Event]) -> bytes:
        assert self._translator is not None
        rewrite = self._translator.rewrite
        out = b"".join(piece for piece in map(rewrite, events) if piece is not None)
        if out and self._record.ttft_ms is None and self._translator.content_chunks:
            self._record.ttft_ms = (time.perf_counter() - self._started) * 1000.0
        return out

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        opening = self._opening
        if opening is not None and not opening.done():
            # The client left while nodes were still being tried.
            opening.cancel()
            await asyncio.wait({opening})
        if self._opened is None and opening is not None and _succeeded(opening):
            self._opened = opening.result()
        record = self._record
        translator = self._translator
        if record.completion_tokens is None and translator and translator.content_chunks:
            record.completion_tokens = translator.content_chunks
        opened = self._opened
        if opened is None:
            self._proxy.finish(record, self._started)
            return
        cluster = self._proxy.cluster
        try:
            if opened.stack is not None:
                await opened.stack.aclose()
        finally:
            cluster.release(opened.node)
            if record.outcome == "cancelled":
                cluster.request_abandoned(opened.node)
            elif record.outcome != "ok":
                cluster.request_failed(opened.node, record.error or record.outcome)
            self._proxy.finish(record, self._started, opened.node, self._request)


class RelayResponse(StreamingResponse):
    """A streaming response that always closes its relay, even if never iterated."""

    def __init__(self, relay: StreamRelay, *, headers: dict[str, str], media_type: str) -> None:
        super().__init__(relay.events(), headers=headers, media_type=media_type)
        self._relay = relay

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._relay.close()


def _succeeded(future: asyncio.Future["Opened"]) -> bool:
    return future.done() and not future.cancelled() and future.exception() is None
