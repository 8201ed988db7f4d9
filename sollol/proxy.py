"""Forwarding one OpenAI request to a node, with failover until the first byte.

Until any byte of the reply has reached the client, a failed attempt moves
on to another node serving the model. An attempt fails on a refused or reset
connection, on no first token within ``first_token_timeout_s``, on a 5xx, or
on a stream whose first event is an error. A 4xx is the node's judgement of the request and goes
back to the client as it is. Streams are relayed by ``streaming.StreamRelay``.

The reply is rewritten on its way back: ``model`` becomes the name the client
asked for (nodes report their own alias or file name), and token usage is
read for the history.
"""

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
from starlette.responses import Response

from .cluster import Cluster, Node
from .config import NodeKind, Settings
from .dialects import OPENAI, Dialect
from .errors import (
    ClientClosedError,
    NoNodeAvailableError,
    SollolError,
    UpstreamError,
    upstream_error_from_reply,
)
from .history import HistoryWriter, RequestRecord
from .metrics import RouterMetrics
from .routing.engine import Decision, NodeSnapshot
from .routing.features import RequestFeatures
from .sse import Event, LineParser, SSEParser
from .streaming import StreamRelay
from .upstream import UpstreamClient, UpstreamConnectionError, UpstreamResponse

if TYPE_CHECKING:
    from .dashboard import DashboardFeed
    from .tenancy import Tenancy

log = logging.getLogger(__name__)
access_log = logging.getLogger("sollol.access")

# The history keeps the scores of this many best candidates per request.
MAX_EXPLAINED_CANDIDATES = 8


@dataclass(slots=True)
class ProxyRequest:
    route: str
    body: dict[str, Any]
    model: str
    features: RequestFeatures
    stream: bool = False
    policy: str | None = None  # None: the configured default
    queue_ms: float = 0.0
    # Returns once the client has disconnected, so that a non-streamed
    # request can stop its node when no client waits for the reply.
    disconnected: Callable[[], Awaitable[None]] | None = None
    # The client's API: how to ask each node and how to put its reply back.
    dialect: Dialect = OPENAI
    # The API key the request came with (None when auth is off), and the
    # tokens reserved against its limits until the request ends.
    key_id: int | None = None
    reserved_tokens: int = 0
    rate_event_id: int | None = None  # see RequestRecord.rate_event_id

    @property
    def client_model(self) -> str:
        """The model name as the client wrote it, echoed in replies."""
        return str(self.body.get("model", self.model))

    @property
    def client_wants_usage(self) -> bool:
        options = self.body.get("stream_options")
        return isinstance(options, dict) and options.get("include_usage") is True


@dataclass(slots=True)
class Opened:
    """A node that accepted the request: its whole body, or a stream and its first events."""

    node: Node
    body: bytes = b""
    stack: AsyncExitStack | None = None
    upstream: UpstreamResponse | None = None
    parser: SSEParser | LineParser | None = None
    first_events: list[Event] | None = None


class _FailedAttempt(Exception):
    """One node could not serve the request; another may."""

    def __init__(
        self, error: SollolError, *, unreachable: bool = False, replied: bool = False
    ) -> None:
        super().__init__(error.message)
        self.error = error
        self.unreachable = unreachable
        # The node replied with a 5xx or an error event, rather than failing to reply.
        self.replied = replied


class Proxy:
    def __init__(
        self,
        *,
        cluster: Cluster,
        client: UpstreamClient,
        history: HistoryWriter,
        settings: Settings,
        metrics: RouterMetrics | None = None,
        feed: "DashboardFeed | None" = None,
        tenancy: "Tenancy | None" = None,
    ) -> None:
        self.cluster = cluster
        self.client = client
        self.history = history
        self.settings = settings
        self.metrics = metrics
        self.feed = feed
        self.tenancy = tenancy

    async def forward(self, request: ProxyRequest) -> Response:
        record = RequestRecord(
            started_at=time.time(),
            route=request.route,
            model=request.model,
            stream=request.stream,
            queue_ms=request.queue_ms,
            priority=request.features.priority,
            key_id=request.key_id,
            reserved_tokens=request.reserved_tokens,
            rate_event_id=request.rate_event_id,
        )
        started = time.perf_counter()
        if request.stream:
            return await StreamRelay(self, request, record, started).response()

        try:
            opened = await self._open_until_disconnect(request, record, started)
        except SollolError as exc:
            self.fail(record, started, exc)
            raise
        except Exception:
            record.status, record.outcome, record.error = 500, "error", "internal router error"
            record.error_kind = "internal_error"
            self.finish(record, started)
            raise
        except BaseException:
            record.outcome = "cancelled"
            self.finish(record, started)
            raise
        content = request.dialect.whole(opened, request, record, started)
        self.finish(record, started, opened.node, request)
        headers = {"x-sollol-node": opened.node.name, "x-sollol-policy": record.policy or ""}
        return Response(content, media_type="application/json", headers=headers)

    async def _open_until_disconnect(
        self, request: ProxyRequest, record: RequestRecord, started: float
    ) -> Opened:
        """Wait for the whole reply, or stop the node's work as soon as the client hangs up.

        The ASGI server does not cancel a handler whose client left, so the
        disconnect is watched here. Cancelling the attempt closes the upstream
        connection, and that makes the node stop generating.
        """
        if request.disconnected is None:
            return await self.open(request, record, started)
        attempt = asyncio.ensure_future(self.open(request, record, started))
        hangup = asyncio.ensure_future(request.disconnected())
        try:
            await asyncio.wait({attempt, hangup}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            hangup.cancel()
            if not attempt.done():
                attempt.cancel()
                # Let the attempt close its upstream connection before going on.
                await asyncio.wait({attempt})
        if attempt.cancelled():
            raise ClientClosedError("the client disconnected before the reply was ready")
        return attempt.result()

    async def open(self, request: ProxyRequest, record: RequestRecord, started: float) -> Opened:
        """Try nodes until one accepts the request, up to ``max_attempts`` of them.

        On success the node stays acquired when a stream is returned (its
        relay releases it), and is released when a whole body is returned.
        """
        tried: set[int] = set()
        last_error: SollolError | None = None
        # Nodes that replied to this request with a 5xx or an error event. They
        # count against their breakers only if another node then serves it.
        rejected: list[tuple[Node, str]] = []
        for _ in range(max(1, self.settings.max_attempts)):
            decision = self.cluster.choose(
                request.model, request.features, request.policy, frozenset(tried)
            )
            if decision is None:
                break
            node = self.cluster.node_at(decision.node)
            tried.add(node.index)
            record.attempts += 1
            record.node = node.name
            record.policy = decision.policy
            record.scores = self._explain(decision, record)
            _note_decision(
                record, request, self.cluster.signals.snapshot(node.index, request.model)
            )
            self.cluster.acquire(node)
            try:
                opened = await self._attempt(node, request, started)
            except _FailedAttempt as failure:
                self.cluster.release(node)
                self.cluster.signals.observe(node.index, ok=False)
                if failure.unreachable:
                    self.cluster.mark_unreachable(node, failure.error.message)
                elif failure.replied:
                    rejected.append((node, failure.error.message))
                    # The node produced this error's text, so the reply names it.
                    failure.error.headers.setdefault("x-sollol-node", node.name)
                else:
                    self.cluster.request_failed(node, failure.error.message)
                last_error = failure.error
                log.warning("attempt on node %s failed: %s", node.name, failure.error.message)
                continue
            except UpstreamError as exc:  # a 4xx: the request itself is wrong
                self.cluster.release(node)
                self.cluster.request_succeeded(node)
                exc.headers["x-sollol-node"] = node.name
                raise
            except BaseException:
                self.cluster.release(node)
                self.cluster.request_abandoned(node)
                raise
            if not request.stream:
                self.cluster.release(node)
            for failed_node, message in rejected:
                self.cluster.request_failed(failed_node, message)
            return opened

        if last_error is not None:
            if rejected:
                # Every node that replied rejected the request, so the request is
                # the likely cause (llama-server returns 500 for some bad input).
                # No breaker opens, and other clients keep their nodes.
                log.info("all nodes rejected a request to %s; no breaker counts it", request.route)
            raise last_error
        raise NoNodeAvailableError(
            f"no node can serve model '{request.model}' right now: every node serving it is "
            "unhealthy, has its breaker open, or lacks memory for it; GET /health shows "
            "their state",
            retry_after_s=self.settings.retry_after_s,
        )

    async def _attempt(self, node: Node, request: ProxyRequest, started: float) -> Opened:
        """Send the request to one node and wait for its first token (or whole body)."""
        timeout_s = min(
            self.settings.first_token_timeout_s,
            self.settings.total_timeout_s - (time.perf_counter() - started),
        )
        plan = request.dialect.plan(request, node)
        stack = AsyncExitStack()
        unary = not request.stream
        node.unary_in_flight += unary
        try:
            async with asyncio.timeout(max(0.0, timeout_s)):
                upstream = await stack.enter_async_context(
                    self.client.post(
                        node.url + plan.route, plan.payload, pooled=_pools_connections(node)
                    )
                )
                if upstream.status != 200:
                    error_body = await upstream.read()
                    await stack.aclose()
                    error = upstream_error_from_reply(upstream.status, error_body, node.name)
                    if upstream.status < 500:
                        raise error
                    raise _FailedAttempt(error, replied=True)
                if not request.stream:
                    body = await upstream.read()
                    await stack.aclose()
                    return Opened(node, body=body)
                parser = LineParser() if plan.ndjson else SSEParser()
                first_events = await _first_events(upstream, parser, node)
                return Opened(
                    node, stack=stack, upstream=upstream, parser=parser, first_events=first_events
                )
        except TimeoutError:
            await stack.aclose()
            raise _FailedAttempt(
                UpstreamError(
                    f"node {node.name} sent no first token within {timeout_s:.1f} s "
                    "(first_token_timeout_s)",
                    status_code=504,
                    code="upstream_timeout",
                )
            ) from None
        except UpstreamConnectionError as exc:
            await stack.aclose()
            raise _FailedAttempt(
                UpstreamError(f"node {node.name} could not be reached: {exc}"),
                unreachable=exc.connect_failed,
            ) from exc
        except BaseException:
            await stack.aclose()
            raise
        finally:
            node.unary_in_flight -= unary

    def observe(self, node: Node, record: RequestRecord) -> None:
        ok = record.outcome == "ok" and record.status < 500
        ttft_ms = record.ttft_ms if record.ttft_ms is not None else record.node_ttft_ms
        record.decode_tps = _decode_tokens_per_s(record)
        self.cluster.signals.observe(
            node.index, record.model, ok=ok, ttft_ms=ttft_ms, decode_tps=record.decode_tps
        )

    def _explain(self, decision: Decision, record: RequestRecord) -> str:
        """Return the best candidates' scores as compact JSON for the history row."""
        best = decision.best(MAX_EXPLAINED_CANDIDATES)
        scores = {self.cluster.node_at(index).name: score for index, score in best}
        others = [index for index, score in best if index != decision.node and math.isfinite(score)]
        record.runner_up = self.cluster.node_at(others[0]).name if others else None
        # JSON has no infinity; a null score means "not eligible".
        return orjson.dumps({name: _finite(score) for name, score in scores.items()}).decode()

    def fail(self, record: RequestRecord, started: float, error: SollolError) -> None:
        """Record a request that ended with an error response and no reply from a node."""
        record.status = error.status_code
        record.outcome = "timeout" if error.code == "upstream_timeout" else "error"
        if isinstance(error, ClientClosedError):
            record.outcome = "cancelled"
        record.error = error.message[:512]
        record.error_kind = error.code
        self.finish(record, started)
        error.recorded = True

    def finish(
        self,
        record: RequestRecord,
        started: float,
        node: Node | None = None,
        request: ProxyRequest | None = None,
    ) -> None:
        record.latency_ms = (time.perf_counter() - started) * 1000.0
        if node is not None and record.outcome != "cancelled":
            self.observe(node, record)
            if record.outcome == "ok":
                self.cluster.request_succeeded(node)
                if request is not None:
                    self.cluster.engine.remember_prefix(request.features, node.index)
        if self.tenancy is not None:
            self.tenancy.settle(record)
        self.history.record(record)
        if self.metrics is not None:
            self.metrics.observe(record)
        if self.feed is not None:
            self.feed.publish(record)
        # One logfmt line per request: fields only, never prompt or reply text.
        access_log.info(
            "route=%s model=%s node=%s policy=%s status=%d outcome=%s attempts=%d "
            "latency_ms=%.1f ttft_ms=%s prompt_tokens=%s completion_tokens=%s key=%s",
            record.route,
            _logfmt(record.model),
            record.node or "-",
            record.policy or "-",
            record.status,
            record.outcome,
            record.attempts,
            record.latency_ms,
            "-" if record.ttft_ms is None else f"{record.ttft_ms:.1f}",
            record.prompt_tokens,
            record.completion_tokens,
            "-" if record.key_id is None else record.key_id,
        )


async def _first_events(upstream: UpstreamResponse, parser: SSEParser, node: Node) -> list[Event]:
    """Read a stream up to its first data event, which must not be an error.

    Comment lines before it (llama-server's keep-alive pings) are kept. An
    error as the first event means nothing was generated, so another node
    may still serve the request.
    """
    events: list[Event] = []
    while True:
        chunk = await upstream.next_chunk()
        if not chunk:
            events.extend(parser.finish())
            return events
        node.last_progress_at = time.monotonic()
        # Events after the first data event in the same read are kept too.
        events.extend(parser.feed(chunk))
        first_data = next((event.data for event in events if event.data is not None), None)
        if first_data is not None:
            message = error_message(first_data)
            if message is not None:
                raise _FailedAttempt(
                    UpstreamError(f"node {node.name} failed before its first token: {message}"),
                    replied=True,
                )
            return events


def error_message(data: bytes) -> str | None:
    """Return the message of an SSE data payload that is an OpenAI error, else None."""
    if not data.startswith(b'{"error"') and b'"error"' not in data[:32]:
        return None
    try:
        chunk = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(chunk, dict) or "error" not in chunk:
        return None
    error = chunk["error"]
    message = error.get("message") if isinstance(error, dict) else error
    return str(message)


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _logfmt(value: str) -> str:
    """Quote a value that would break a logfmt line (model names come from clients)."""
    if value and not any(c.isspace() or c in '"=' for c in value):
        return value
    return orjson.dumps(value).decode()


def _note_decision(record: RequestRecord, request: ProxyRequest, node: NodeSnapshot) -> None:
    """Keep the features the choice was made on, for `sollol train`."""
    record.est_prompt_tokens = request.features.prompt_tokens
    record.max_tokens = request.features.max_tokens
    record.node_in_flight = node.in_flight
    record.node_queue_depth = node.queue_depth
    record.node_slots = node.slots
    record.model_loaded = node.model_loaded
    record.node_ttft_ms_avg = node.ttft_ms
    record.node_decode_tps_avg = node.decode_tps


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
