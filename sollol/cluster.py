"""Cluster state: the nodes, their health and models, and requests in flight.

The request path reads only precomputed arrays: ``in_flight`` (one int64 per
node) and, per model, the indices of healthy nodes that serve it. Those
candidate arrays are rebuilt only when health, a model list or membership
changes, never per request.

Membership changes at run time. A node's index (its row in the signal
matrix) is fixed for the life of the process: an added node gets a new row
at the end, and a removed node stays in place as a tombstone that is never a
candidate. So a request in flight, which holds its node's index, still
releases the right row after its node was removed. ``nodes`` lists the nodes
present now (active or draining); ``node_at`` looks any node up by index.
"""

import asyncio
import dataclasses
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from .config import NodeConfig, NodeKind
from .health import HealthPolicy, NodeHealth
from .probes import LOADING, llama_load, model_sizes, probe_node
from .routing.engine import Decision, NodeSignals, RoutingEngine
from .routing.features import RequestFeatures
from .routing.layout import COL_IN_FLIGHT, COL_SLOTS_TOTAL, MODEL_FITS, MODEL_LOADED
from .upstream import UpstreamClient, UpstreamConnectionError

log = logging.getLogger(__name__)

_EMPTY = np.zeros(0, dtype=np.int64)


def model_key(name: str) -> str:
    """Return the router's name for a model: the name without Ollama's implicit ``:latest``.

    Ollama treats ``llama3.2`` and ``llama3.2:latest`` as one model, and a
    llama-server alias has no tag at all, so both forms of a name route to the
    same nodes. Other tags (``qwen3:8b``) stay part of the name.
    """
    return name[: -len(":latest")] if name.endswith(":latest") else name


@dataclass(slots=True)
class Node:
    config: NodeConfig
    index: int
    health: NodeHealth
    # Set from the config, else from the node's model listing, as model_key()s.
    models: frozenset[str] = frozenset()
    # model_key() -> the name the node itself uses, sent in requests to it.
    own_names: dict[str, str] = field(default_factory=dict)
    # model_key() -> the node's own listing entry (/api/tags or /v1/models).
    listing: dict[str, dict] = field(default_factory=dict)
    # Ollama nodes: the models loaded now, as /api/ps lists them.
    ps_entries: list[dict] = field(default_factory=list)
    last_error: str | None = None
    checked_at: float = 0.0
    # When a reply from this node last delivered bytes (time.monotonic()).
    last_progress_at: float = 0.0
    # Non-streamed requests the router is waiting on from this node.
    unary_in_flight: int = 0
    served_total: int = field(default=0)
    # A draining node gets no new requests; those in flight finish.
    draining: bool = False
    # A removed node is a tombstone: its row stays, it is never routed to.
    removed: bool = False

    def set_models(self, names: Iterable[str]) -> None:
        self.own_names = {model_key(name): name for name in names}
        self.models = frozenset(self.own_names)

    @property
    def healthy(self) -> bool:
        """Whether the node gets new requests: present, not draining, up, breaker closed."""
        return not self.draining and not self.removed and self.health.routable()

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def url(self) -> str:
        return self.config.url

    @property
    def kind(self) -> NodeKind:
        return self.config.kind

    @property
    def source(self) -> str:
        return self.config.source


class Cluster:
    def __init__(
        self,
        nodes: Iterable[NodeConfig],
        *,
        default_policy: str = "predicted_latency",
        node_queue_per_slot: float = 1.0,
        health_policy: HealthPolicy | None = None,
        progress_window_s: float = 10.0,
    ) -> None:
        # Requests a node may hold per slot: one running, the rest in its own queue.
        self.capacity_per_slot = 1.0 + node_queue_per_slot
        health_policy = health_policy or HealthPolicy()
        # A node that delivered bytes this recently is alive, whatever its probe reports.
        self.progress_window_s = progress_window_s
        self._health_policy = health_policy
        # Every node ever added, by index, tombstones included.
        self._by_index: list[Node] = [
            Node(config=config, index=index, health=NodeHealth(health_policy))
            for index, config in enumerate(nodes)
        ]
        # The nodes present now; replaced whole when membership changes.
        self.nodes: list[Node] = list(self._by_index)
        for node in self.nodes:
            node.set_models(node.config.models)
        self.signals = NodeSignals(len(self.nodes))
        for node in self.nodes:
            self.signals.set_static(
                node.index, is_gpu=node.config.gpu, cost_weight=node.config.cost_weight
            )
        self.engine = RoutingEngine(self.signals, default_policy=default_policy)
        self._candidates: dict[str, np.ndarray] = {}
        self._known_models: frozenset[str] = frozenset()
        self._rebuild_candidates()

    # -- membership ------------------------------------------------------

    def node_at(self, index: int) -> Node:
        """Return the node at a signal-matrix row, removed ones included."""
        return self._by_index[index]

    def node_names_by_index(self) -> list[str]:
        """Return every node's name in index order, tombstones included."""
        return [node.name for node in self._by_index]

    def find(self, name: str) -> Node | None:
        """Return the present (not removed) node called ``name``, or None."""
        for node in self.nodes:
            if node.name == name:
                return node
        return None

    def add_node(self, config: NodeConfig, *, source: str) -> Node:
        """Add a node at a new index; it joins rotation after its first good probe.

        Raises ValueError when a present node already has the name.
        """
        if self.find(config.name) is not None:
            raise ValueError(f"a node named {config.name!r} already exists")
        config = dataclasses.replace(config, source=source)
        index = self.signals.add_node()
        node = Node(config=config, index=index, health=NodeHealth(self._health_policy))
        node.set_models(config.models)
        self.signals.set_static(index, is_gpu=config.gpu, cost_weight=config.cost_weight)
        self._by_index.append(node)
        self.nodes = [*self.nodes, node]
        self.on_membership()
        self._rebuild_candidates()
        return node

    def drain(self, node: Node, draining: bool = True) -> None:
        """Stop (or, with ``draining`` False, resume) new requests to a node.

        Requests in flight on a draining node run to their end.
        """
        node.draining = draining
        self._rebuild_candidates()

    def remove(self, node: Node) -> None:
        """Take a node out for good; its requests in flight still finish."""
        node.removed = True
        self.nodes = [present for present in self.nodes if present is not node]
        self.signals.set_healthy(node.index, False)
        self.on_membership()
        self._rebuild_candidates()

    def state_of(self, node: Node) -> str:
        """Return active, draining (requests still in flight), drained or removed."""
        if node.removed:
            return "removed"
        if node.draining:
            return "draining" if self.signals.in_flight(node.index) > 0 else "drained"
        return "active"

    def on_membership(self) -> None:
        """Called after a node was added or removed; the app rewires what reads the matrix."""

    # -- request path ----------------------------------------------------

    def knows_model(self, model: str) -> bool:
        """Return True when any node, healthy or not, lists the model."""
        return model in self._known_models

    def choose(
        self,
        model: str,
        features: RequestFeatures,
        policy: str | None = None,
        exclude: frozenset[int] = frozenset(),
        *,
        dry_run: bool = False,
    ) -> Decision | None:
        """Score the healthy nodes serving ``model`` and pick one, or return None.

        Nodes at their capacity (see ``capacity_per_slot``) are left out while
        any node has room, so admission by the scheduler and the choice agree.
        """
        candidates = self._candidates.get(model, _EMPTY)
        if exclude:
            candidates = candidates[~np.isin(candidates, list(exclude))]
        if len(candidates) > 1:
            slots = self.signals.matrix[candidates, COL_SLOTS_TOTAL]
            in_flight = self.signals.matrix[candidates, COL_IN_FLIGHT]
            has_room = np.isnan(slots) | (in_flight < slots * self.capacity_per_slot)
            if has_room.any() and not has_room.all():
                candidates = candidates[has_room]
        return self.engine.decide(
            candidates,
            features,
            policy,
            model_state=self.signals.model_state(model),
            dry_run=dry_run,
            model=model,
        )

    def acquire(self, node: Node) -> None:
        self.signals.acquire(node.index)
        if node.health.request_started():
            # A half-open node takes one trial request at a time.
            self._rebuild_candidates()

    def release(self, node: Node) -> None:
        self.signals.release(node.index)
        node.served_total += 1
        self.on_capacity()

    def describe(self, node: Node) -> dict[str, object]:
        """Return the node's state as ``GET /health`` and the dashboard show it."""
        loaded = [
            model
            for model in sorted(node.models)
            if self.signals.model_state(model)[node.index, MODEL_LOADED] == 1.0
        ]
        return {
            "name": node.name,
            "kind": node.kind.value,
            "url": node.url,
            "source": node.source,
            "state": self.state_of(node),
            "healthy": node.healthy,
            "models": sorted(node.models),
            "loaded_models": loaded,
            "served": node.served_total,
            "last_error": node.last_error,
            **node.health.describe(),
            **self.signals.row(node.index),
        }

    def candidates_of(self, model: str) -> np.ndarray:
        """Return the indices of the healthy nodes that serve ``model``."""
        return self._candidates.get(model, _EMPTY)

    def on_capacity(self) -> None:
        """Called when a slot may have become free; the scheduler replaces it."""

    def healthy_models(self) -> list[str]:
        """Models of the nodes that are up, including those behind an open breaker."""
        models: set[str] = set()
        for node in self.nodes:
            if node.health.up and not node.draining:
                models |= node.models
        return sorted(models)

    # -- health ----------------------------------------------------------

    def mark_unreachable(self, node: Node, error: str) -> None:
        """Take a node out of rotation after a refused connection; probes restore it."""
        node.last_error = error
        if node.health.unreachable():
            log.warning("node %s is unreachable, out of rotation: %s", node.name, error)
            self._rebuild_candidates()

    def request_succeeded(self, node: Node) -> None:
        breaker = node.health.breaker
        if node.health.request_succeeded():
            log.info("node %s: breaker closed after a good trial request", node.name)
            self._rebuild_candidates()
        elif breaker is not node.health.breaker:
            self._rebuild_candidates()

    def request_failed(self, node: Node, error: str) -> None:
        """Count a failed request (5xx, reset, timeout) against the node's breaker."""
        node.last_error = error
        if node.health.request_failed(time.monotonic()):
            log.warning(
                "node %s: breaker open for %.1f s after %d failed requests: %s",
                node.name,
                node.health.open_s,
                node.health.request_failures,
                error,
            )
            self._rebuild_candidates()
            self._schedule_half_open(node)

    def request_abandoned(self, node: Node) -> None:
        if node.health.request_abandoned():
            self._rebuild_candidates()

    def _schedule_half_open(self, node: Node) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (unit tests): the next refresh() moves it
        loop.call_later(node.health.open_s, self._half_open_due)

    def _half_open_due(self) -> None:
        now = time.monotonic()
        changed = False
        for node in self.nodes:
            if node.health.half_open_if_due(now):
                log.info("node %s: breaker half-open, next request is a trial", node.name)
                changed = True
        if changed:
            self._rebuild_candidates()

    async def refresh(self, client: UpstreamClient, timeout_s: float) -> None:
        """Probe every node once, concurrently, and update health and model lists."""
        await asyncio.gather(*(self._probe(client, node, timeout_s) for node in self.nodes))
        self._half_open_due()
        self._rebuild_candidates()

    async def probe(self, client: UpstreamClient, node: Node, timeout_s: float) -> None:
        """Probe one node now, e.g. one just added, so it need not wait for the health loop."""
        await self._probe(client, node, timeout_s)
        self._rebuild_candidates()

    async def run_health_loop(
        self, client: UpstreamClient, *, interval_s: float, timeout_s: float
    ) -> None:
        while True:
            await asyncio.sleep(interval_s)
            await self.refresh(client, timeout_s)

    async def _probe(self, client: UpstreamClient, node: Node, timeout_s: float) -> None:
        was_up = node.health.up
        connect_failed = False
        try:
            healthy, models, detail = await probe_node(client, node, timeout_s)
        except UpstreamConnectionError as exc:
            healthy, models, detail = False, None, str(exc)
            connect_failed = exc.connect_failed
        now = time.monotonic()
        node.checked_at = now
        if healthy:
            node.health.probe_ok()
            node.last_error = None
        elif detail == LOADING:
            node.health.probe_loading()
            node.last_error = detail
        else:
            streaming = (
                self.signals.in_flight(node.index) > 0
                and now - node.last_progress_at < self.progress_window_s
            )
            if connect_failed and not streaming:
                # Nothing listens there now (a killed process, a shard group
                # whose supervisor stopped it): out at once, as for a request.
                node.health.unreachable()
            else:
                node.health.probe_failed(streaming=streaming)
            node.last_error = detail
            if streaming:
                log.info("node %s: probe failed while it streams; kept: %s", node.name, detail)
        if models is not None and not node.config.models:
            node.set_models(models)
            node.listing = {model_key(name): entry for name, entry in models.items()}
        if healthy:
            await self._read_load_signals(client, node, timeout_s)
        if node.health.up != was_up:
            if node.health.up:
                log.info("node %s is up, serving %s", node.name, sorted(node.models))
            else:
                log.warning("node %s is down: %s", node.name, detail)

    async def _read_load_signals(
        self, client: UpstreamClient, node: Node, timeout_s: float
    ) -> None:
        """Read slots, queue and loaded models from the node's own endpoints.

        A node without these endpoints (an older build, slots disabled) is
        still routed to, on the router's own signals.
        """
        try:
            if node.kind is NodeKind.LLAMACPP:
                load = await llama_load(client, node, timeout_s)
                self.signals.set_slots(node.index, load.total_slots)
                # Busy slots beyond the router's own requests are load from
                # other clients of the same node; deferred requests wait there.
                if load.busy_slots is not None:
                    others = max(0, load.busy_slots - self.signals.in_flight(node.index))
                    self.signals.set_queue_depth(node.index, float(others + load.deferred))
                self._set_loaded(node, node.models)
                if node.config.memory_bytes is not None:
                    sizes = await model_sizes(client, node, timeout_s, "/v1/models")
                    self._set_fits(node, sizes)
            elif node.kind is NodeKind.OLLAMA:
                status, body = await client.get(node.url + "/api/ps", timeout_s=timeout_s)
                if status == 200 and isinstance(body, dict):
                    node.ps_entries = [
                        entry for entry in body.get("models") or [] if isinstance(entry, dict)
                    ]
                    loaded = {entry.get("name") for entry in node.ps_entries}
                    self._set_loaded(
                        node, {model_key(name) for name in loaded if isinstance(name, str)}
                    )
                if node.config.memory_bytes is not None:
                    sizes = await model_sizes(client, node, timeout_s, "/api/tags")
                    self._set_fits(node, sizes)
        except UpstreamConnectionError as exc:
            log.debug("reading load signals of node %s failed: %s", node.name, exc)

    def _set_fits(self, node: Node, sizes: dict[str, int]) -> None:
        """Mark which of the node's models fit in its configured memory."""
        memory = node.config.memory_bytes
        for name, size in sizes.items():
            model = model_key(name)
            fits = memory is None or size <= memory
            self.signals.model_state(model)[node.index, MODEL_FITS] = 1.0 if fits else 0.0

    def _set_loaded(self, node: Node, loaded: set[str] | frozenset[str]) -> None:
        for model in node.models | set(loaded):
            state = self.signals.model_state(model)
            state[node.index, MODEL_LOADED] = 1.0 if model in loaded else 0.0

    def _rebuild_candidates(self) -> None:
        self._known_models = frozenset().union(*(node.models for node in self.nodes))
        for node in self.nodes:
            self.signals.set_healthy(node.index, node.healthy)
        by_model: dict[str, list[int]] = {}
        for node in self.nodes:
            if node.healthy:
                for model in node.models:
                    by_model.setdefault(model, []).append(node.index)
        self._candidates = {
            model: np.asarray(indices, dtype=np.int64) for model, indices in by_model.items()
        }
        self.on_capacity()
