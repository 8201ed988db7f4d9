"""Prometheus metrics at ``GET /metrics``, through ``prometheus_client``.

Two sources feed them. Every request that reached the proxy is observed once,
from its history record, when it ends: counts, latency, time to first token,
decode speed, tokens and failovers. Live state (in-flight and queued requests,
node health and breakers, the history buffer) is read from the cluster at
scrape time, so it costs nothing between scrapes.

Label values are bounded: routes are the router's own, models only those a
node serves (unknown models are rejected before the proxy), nodes those in the
config, and statuses and outcomes small fixed sets. No prompt text and no
request ids ever become labels.
"""

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .health import Breaker

if TYPE_CHECKING:
    from .cluster import Cluster
    from .history import HistoryWriter, RequestRecord
    from .routing.scheduler import Scheduler

_LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TOKENS_PER_S_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


@dataclass(frozen=True, slots=True)
class _Children:
    """The labelled series one kind of request updates."""

    requests: Any
    failovers: Any
    retries: Any
    latency: Any
    ttft: Any
    decode_speed: Any
    prompt_tokens: Any
    completion_tokens: Any


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        request_labels = ["route", "model", "node", "policy", "status", "outcome"]
        self.requests = Counter(
            "sollol_requests",
            "Requests that reached a node or failed trying, by how they ended.",
            request_labels,
            registry=self.registry,
        )
        self.rejected = Counter(
            "sollol_rejected_requests",
            "Requests answered with an error before any node was chosen (bad input, "
            "unknown model, full queue).",
            ["route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "sollol_request_latency_seconds",
            "Time from leaving the queue to the end of the reply.",
            ["route", "model", "node"],
            buckets=_LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.ttft = Histogram(
            "sollol_time_to_first_token_seconds",
            "Time to the first token relayed to the client (streams only).",
            ["model", "node"],
            buckets=_LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.decode_speed = Histogram(
            "sollol_decode_tokens_per_second",
            "Decode speed the node reported for a reply.",
            ["model", "node"],
            buckets=_TOKENS_PER_S_BUCKETS,
            registry=self.registry,
        )
        self.tokens = Counter(
            "sollol_tokens",
            "Prompt and completion tokens, as the nodes counted them.",
            ["model", "node", "kind"],
            registry=self.registry,
        )
        self.failovers = Counter(
            "sollol_failovers",
            "Requests that moved to another node after a failed attempt.",
            ["route", "model"],
            registry=self.registry,
        )
        self.retries = Counter(
            "sollol_retries",
            "Attempts beyond the first: each one sent a request to another node.",
            ["route", "model"],
            registry=self.registry,
        )
        self._children: dict[tuple[str, str, str, str, int, str], _Children] = {}

    def observe(self, record: "RequestRecord") -> None:
        """Count one finished request from its history record."""
        node = record.node or ""
        key = (record.route, record.model, node, record.policy or "", record.status, record.outcome)
        children = self._children.get(key)
        if children is None:
            # labels() validates and locks on every call; the children of one
            # label set are looked up once and kept (as many as label sets).
            children = self._children[key] = _Children(
                requests=self.requests.labels(*key[:4], str(record.status), record.outcome),
                failovers=self.failovers.labels(record.route, record.model),
                retries=self.retries.labels(record.route, record.model),
                latency=self.latency.labels(record.route, record.model, node),
                ttft=self.ttft.labels(record.model, node),
                decode_speed=self.decode_speed.labels(record.model, node),
                prompt_tokens=self.tokens.labels(record.model, node, "prompt"),
                completion_tokens=self.tokens.labels(record.model, node, "completion"),
            )

        children.requests.inc()
        if record.attempts > 1:
            children.failovers.inc()
            children.retries.inc(record.attempts - 1)
        if not node:
            return

        children.latency.observe(record.latency_ms / 1000)
        if record.ttft_ms is not None:
            children.ttft.observe(record.ttft_ms / 1000)
        if record.node_decode_tps:
            children.decode_speed.observe(record.node_decode_tps)
        if record.prompt_tokens:
            children.prompt_tokens.inc(record.prompt_tokens)
        if record.completion_tokens:
            children.completion_tokens.inc(record.completion_tokens)

    def watch(self, cluster: "Cluster", scheduler: "Scheduler", history: "HistoryWriter") -> None:
        """Report the live state of these objects at every scrape."""
        self.registry.register(_LiveState(cluster, scheduler, history))

    def route(self) -> Route:
        async def metrics(request: Request) -> Response:
            return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

        return Route("/metrics", metrics, methods=["GET"])


class _LiveState(Collector):
    def __init__(
        self, cluster: "Cluster", scheduler: "Scheduler", history: "HistoryWriter"
    ) -> None:
        self.cluster = cluster
        self.scheduler = scheduler
        self.history = history

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        up = GaugeMetricFamily("sollol_node_up", "1 when the node is up (probes).", labels=["node"])
        routable = GaugeMetricFamily(
            "sollol_node_routable", "1 when the node takes new requests.", labels=["node"]
        )
        breaker = GaugeMetricFamily(
            "sollol_node_breaker_state",
            "1 for the node's current breaker state.",
            labels=["node", "state"],
        )
        in_flight = GaugeMetricFamily(
            "sollol_node_in_flight", "Requests the router has on the node.", labels=["node"]
        )
        for node in self.cluster.nodes:
            up.add_metric([node.name], 1.0 if node.health.up else 0.0)
            routable.add_metric([node.name], 1.0 if node.healthy else 0.0)
            for state in Breaker:
                current = node.health.breaker is state
                breaker.add_metric([node.name, state.value], 1.0 if current else 0.0)
            in_flight.add_metric([node.name], float(self.cluster.signals.in_flight(node.index)))
        yield from (up, routable, breaker, in_flight)

        queued = GaugeMetricFamily(
            "sollol_queued_requests", "Requests waiting for a free node.", labels=["model"]
        )
        for model, count in sorted(self.scheduler.queued_by_model().items()):
            queued.add_metric([model], float(count))
        yield queued
        yield GaugeMetricFamily(
            "sollol_history_buffered_rows",
            "History rows waiting for the database.",
            value=float(self.history.buffered_rows),
        )
        yield CounterMetricFamily(
            "sollol_history_dropped_rows",
            "History rows dropped: the buffer was full or the database rejected them.",
            value=float(self.history.dropped_rows),
        )
