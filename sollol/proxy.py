"""Forwarding one OpenAI request to a node, with failover before the first byte.

The reply is rewritten on its way back: ``model`` becomes the name the client
asked for (nodes report their own alias or file name), and token usage is read
for the history. Streams are relayed event by event as they arrive.
"""

import logging
import math
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from .cluster import Cluster, Node
from .config import NodeKind, Settings
from .errors import (
    NoNodeAvailableError,
    SollolError,
    UpstreamError,
    openai_error_body,
    upstream_error_from_reply,
)
from .history import HistoryWriter, RequestRecord
from .routing.engine import Decision
from .routing.features import RequestFeatures
from .sse import Event, SSEParser
from .upstream import UpstreamClient, UpstreamConnectionError, UpstreamResponse

log = logging.getLogger(__name__)
access_log = logging.getLogger("sollol.access")

_DONE_EVENT = b"data: [DONE]\n\n"
# The history keeps the scores of this many best candidates per request.
MAX_EXPLAINED_CANDIDATES = 8
_STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass(slots=True)
class ProxyRequest:
    route: str
    body: dict[str, Any]
    model: str
    features: RequestFeatures
    stream: bool = False
    policy: str | None = None  # None: the configured default
    queue_ms: float = 0.0

    @property
    def client_wants_usage(self) -> bool:
        options = self.body.get("stream_options")
        return isinstance(options, dict) and options.get("include_usage") is True


class Proxy:
    def __init__(
        self,
        *,
        cluster: Cluster,
        client: UpstreamClient,
        history: HistoryWriter,
        settings: Settings,
    ) -> None:
        self.cluster = cluster
        self.client = client
        self.history = history
        self.settings = settings

    async def forward(self, request: ProxyRequest) -> Response:
        record = RequestRecord(
            started_at=time.time(),
            route=request.route,
            model=request.model,
            stream=request.stream,
            queue_ms=request.queue_ms,
            priority=request.features.priority,
        )
        started = time.perf_counter()
        try:
            node, stack, upstream = await self._open(request, record)
        except SollolError as exc:
            record.status = exc.status_code
            record.outcome = "error"
            record.error = exc.message[:512]
            self._finish(record, started)
            exc.recorded = True
            raise

        if request.stream:
            relay = StreamRelay(self, request, record, node, stack, upstream, started)
            headers = {
                **_STREAM_HEADERS,
                "x-sollol-node": node.name,
                "x-sollol-policy": record.policy or "",
            }
            return RelayResponse(relay, headers=headers)

        try:
            async with stack:
                body = await upstream.read()
        except UpstreamConnectionError as exc:
            record.status, record.outcome, record.error = 502, "error", str(exc)[:512]
            self._finish(record, started, node)
            error = UpstreamError(f"node {node.name} failed while replying: {exc}")
            error.recorded = True
            raise error from exc
        except BaseException:
            record.outcome = "cancelled"
            self._finish(record, started)
            raise
        finally:
            self.cluster.release(node)
        content = self._rewrite_reply(body, request, record)
        self._finish(record, started, node, request)
        headers = {"x-sollol-node": node.name, "x-sollol-policy": record.policy or ""}
        return Response(content, media_type="application/json", headers=headers)

    async def _open(
        self, request: ProxyRequest, record: RequestRecord
    ) -> tuple[Node, AsyncExitStack, UpstreamResponse]:
        """Send the request to a node and wait for its status line, failing over on errors.

        Connection failures and 5xx responses move on to another node serving
        the model, up to ``max_attempts`` nodes. A 4xx response is the node's
        judgement of the request, so it is returned at once. On success the chosen node
        stays acquired and the returned stack owns the open upstream response.
        """
        payload = self._upstream_payload(request)
        tried: set[int] = set()
        last_error: SollolError | None = None
        for _ in range(max(1, self.settings.max_attempts)):
            decision = self.cluster.choose(
                request.model, request.features, request.policy, frozenset(tried)
            )
            if decision is None:
                break
            node = self.cluster.nodes[decision.node]
            tried.add(node.index)
            record.attempts += 1
            record.node = node.name
            record.policy = decision.policy
            record.scores = self._explain(decision)
            self.cluster.acquire(node)
            stack = AsyncExitStack()
            try:
                upstream = await stack.enter_async_context(
                    self.client.post(
                        node.url + request.route, payload, pooled=_pools_connections(node)
                    )
                )
                if upstream.status == 200:
                    return node, stack, upstream
                error_body = await upstream.read()
                await stack.aclose()
            except UpstreamConnectionError as exc:
                await stack.aclose()
                self.cluster.release(node)
                self.cluster.signals.observe(node.index, ok=False)
                if exc.connect_failed:
                    # Only a node that cannot be connected to leaves rotation;
                    # a connection that broke in use may be a one-off.
                    self.cluster.mark_unreachable(node, str(exc))
                last_error = UpstreamError(f"node {node.name} could not be reached: {exc}")
                log.warning("attempt on node %s failed: %s", node.name, exc)
                continue
            except BaseException:
                await stack.aclose()
                self.cluster.release(node)
                raise
            self.cluster.release(node)
            error = upstream_error_from_reply(upstream.status, error_body, node.name)
            self.cluster.signals.observe(node.index, ok=upstream.status < 500)
            if upstream.status < 500:
                error.headers["x-sollol-node"] = node.name
                raise error
            last_error = error
            log.warning("attempt on node %s failed with HTTP %d", node.name, upstream.status)

        if last_error is not None:
            raise last_error
        raise NoNodeAvailableError(
            f"no node can serve model '{request.model}' right now: every node serving it is "
            "unhealthy or lacks memory for it; GET /health shows their state",
            retry_after_s=self.settings.retry_after_s,
        )

    def _observe(self, node: Node, record: RequestRecord) -> None:
        ok = record.outcome == "ok" and record.status < 500
        ttft_ms = record.ttft_ms if record.ttft_ms is not None else record.node_ttft_ms
        self.cluster.signals.observe(
            node.index,
            record.model,
            ok=ok,
            ttft_ms=ttft_ms,
            decode_tps=_decode_tokens_per_s(record),
        )

    def _explain(self, decision: Decision) -> str:
        """Return the best candidates' scores as compact JSON for the history row."""
        best = decision.best(MAX_EXPLAINED_CANDIDATES)
        scores = {self.cluster.nodes[index].name: score for index, score in best}
        # JSON has no infinity; a null score means "not eligible".
        return orjson.dumps({name: _finite(score) for name, score in scores.items()}).decode()

    def _upstream_payload(self, request: ProxyRequest) -> bytes:
        body = request.body
        if request.stream and not request.client_wants_usage:
            # Ask for usage on every stream so the history has token counts; the
            # extra usage chunk is dropped before it reaches the client.
            options = body.get("stream_options")
            options = dict(options) if isinstance(options, dict) else {}
            options["include_usage"] = True
            body = {**body, "stream_options": options}
        return orjson.dumps(body)

    def _rewrite_reply(self, body: bytes, request: ProxyRequest, record: RequestRecord) -> bytes:
        try:
            reply = orjson.loads(body)
        except orjson.JSONDecodeError:
            # NOTE: forwarded unchanged, so `model` keeps the node's own name.
            log.warning("node %s sent a reply that is not JSON", record.node)
            return body
        if not isinstance(reply, dict):
            return body
        _read_usage(reply, record)
        if "model" in reply:
            reply["model"] = request.model
        return orjson.dumps(reply)

    def _finish(
        self,
        record: RequestRecord,
        started: float,
        node: Node | None = None,
        request: ProxyRequest | None = None,
    ) -> None:
        record.latency_ms = (time.perf_counter() - started) * 1000.0
        if node is not None and record.outcome != "cancelled":
            self._observe(node, record)
            if record.outcome == "ok" and request is not None:
                self.cluster.engine.remember_prefix(request.features, node.index)
        self.history.record(record)
        access_log.info(
            "%s model=%s node=%s status=%d outcome=%s attempts=%d latency_ms=%.1f "
            "ttft_ms=%s prompt_tokens=%s completion_tokens=%s",
            record.route,
            record.model,
            record.node,
            record.status,
            record.outcome,
            record.attempts,
            record.latency_ms,
            "-" if record.ttft_ms is None else f"{record.ttft_ms:.1f}",
            record.prompt_tokens,
            record.completion_tokens,
        )


class StreamRelay:
    """One streamed reply: relays the node's SSE events and cleans up exactly once."""

    def __init__(
        self,
        proxy: Proxy,
        request: ProxyRequest,
        record: RequestRecord,
        node: Node,
        stack: AsyncExitStack,
        upstream: UpstreamResponse,
        started: float,
    ) -> None:
        self._proxy = proxy
        self._request = request
        self._record = record
        self._node = node
        self._stack = stack
        self._upstream = upstream
        self._started = started
        self._closed = False
        # Until the stream ends by itself, a close means the client went away.
        record.outcome = "cancelled"
        record.status = 200

    async def events(self):  # type: ignore[no-untyped-def]
        parser = SSEParser()
        try:
            async for chunk in self._upstream.iter_chunks():
                # Events completed by one network read go out in one write:
                # nothing waits for later reads, and the server is not asked
                # for one send per event.
                out = b"".join(self._rewrite_all(parser.feed(chunk)))
                if out:
                    if self._record.ttft_ms is None:
                        self._record.ttft_ms = (time.perf_counter() - self._started) * 1000.0
                    yield out
        except UpstreamConnectionError as exc:
            # The client already has part of the reply, so no other node can
            # take over. End with an error event and no [DONE], which the
            # OpenAI SDK raises as APIError.
            self._record.outcome = "error"
            self._record.error = f"node failed mid-stream: {exc}"[:512]
            message = f"node {self._node.name} failed in the middle of the stream: {exc}"
            yield b"data: " + openai_error_body(message, "upstream_error") + b"\n\n"
            return
        out = b"".join(self._rewrite_all(parser.finish()))
        if out:
            yield out
        if parser.pending.strip():
            log.warning("node %s ended its stream inside an event", self._node.name)
        if self._record.outcome == "cancelled":
            self._record.outcome = "ok"

    def _rewrite_all(self, events: list[Event]) -> list[bytes]:
        rewritten = (self._rewrite(event) for event in events)
        return [out for out in rewritten if out is not None]

    def _rewrite(self, event: Event) -> bytes | None:
        data = event.data
        if data is None:
            return event.raw  # comment lines such as llama-server's keep-alive pings
        if data == b"[DONE]":
            return _DONE_EVENT
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            return event.raw
        if not isinstance(chunk, dict):
            return event.raw
        if "error" in chunk:
            error = chunk["error"]
            message = error.get("message") if isinstance(error, dict) else str(error)
            self._record.outcome = "error"
            self._record.error = str(message)[:512]
            return event.raw
        _read_usage(chunk, self._record)
        if not self._request.client_wants_usage and chunk.get("choices") == []:
            return None
        if "model" in chunk:
            chunk["model"] = self._request.model
        return b"data: " + orjson.dumps(chunk) + b"\n\n"

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self._stack.aclose()
        finally:
            self._proxy.cluster.release(self._node)
            self._proxy._finish(self._record, self._started, self._node, self._request)


class RelayResponse(StreamingResponse):
    """A streaming response that always closes its relay, even if never iterated."""

    def __init__(self, relay: StreamRelay, *, headers: dict[str, str]) -> None:
        super().__init__(relay.events(), headers=headers, media_type="text/event-stream")
        self._relay = relay

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._relay.close()


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _decode_tokens_per_s(record: RequestRecord) -> float | None:
    if record.node_decode_tps is not None:
        return record.node_decode_tps
    if not record.completion_tokens or record.ttft_ms is None:
        return None
    decode_ms = record.latency_ms - record.ttft_ms
    return record.completion_tokens / decode_ms * 1000.0 if decode_ms > 0 else None


def _pools_connections(node: Node) -> bool:
    """Return whether requests to ``node`` may reuse pooled keep-alive connections.

    llama-server gives each open connection one of a few HTTP threads, and an
    idle pooled connection keeps its thread until the 5 s keep-alive timeout.
    With more pooled connections than threads, new requests stalled 5 to 15 s
    (measured at 16 concurrent requests on a 2-slot node). It also closes its
    side after each streamed reply without a Connection: close header. So each
    request to a llama-server node gets a connection of its own.
    """
    return node.kind is not NodeKind.LLAMACPP


def _read_usage(reply: dict[str, Any], record: RequestRecord) -> None:
    """Copy token counts, and llama-server's timings when present, into ``record``."""
    timings = reply.get("timings")
    if isinstance(timings, dict):
        prompt_ms = timings.get("prompt_ms")
        decode_tps = timings.get("predicted_per_second")
        if isinstance(prompt_ms, int | float):
            record.node_ttft_ms = float(prompt_ms)
        if isinstance(decode_tps, int | float):
            record.node_decode_tps = float(decode_tps)
    usage = reply.get("usage")
    if isinstance(usage, dict):
        prompt_tokens = usage.get("prompt_tokens")
        completion_tokens = usage.get("completion_tokens")
        if isinstance(prompt_tokens, int):
            record.prompt_tokens = prompt_tokens
        if isinstance(completion_tokens, int):
            record.completion_tokens = completion_tokens
