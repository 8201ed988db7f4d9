"""Cluster membership: nodes added, drained and removed while the router runs.

Nodes come from four sources, merged into the one list the cluster routes to.
They are the config file, the ``SOLLOL_NODES`` and ``OLLAMA_HOST`` variables,
nodes added through the admin API (``sollol nodes add``), and nodes a scan
found. A scan is ``sollol discover``, or the loopback scan of ``sollol serve``
started with no nodes. Each change made at run time is a row of the ``nodes``
table:

- adding a node stores it with state ``active``;
- draining stores ``drained``: no new requests, those in flight finish;
- removing stores ``removed``: the node leaves routing for good.

A row overrides a node of the same name from the config or environment, so a
configured node drained or removed through the API stays so after a restart
until it is added again. Every router on the same database reads the table
every ``membership_refresh_interval_s`` and applies the rows, so replicas
agree on membership within that interval. Each router probes the nodes
itself and keeps its own live signals.
"""

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

import orjson
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from .cluster import Cluster, Node
from .config import NodeConfig, NodeKind
from .history import nodes_table
from .upstream import UpstreamClient

log = logging.getLogger(__name__)

STATES = ("active", "drained", "removed")
SOURCES = ("config", "env", "api", "discovered")


class MembershipError(ValueError):
    """A membership change that cannot apply: an unknown node, or a name in use."""


class NodeNotFound(MembershipError):
    pass


class NodeNameTaken(MembershipError):
    pass


@dataclass(frozen=True, slots=True)
class NodeRow:
    name: str
    url: str
    kind: NodeKind
    models: tuple[str, ...]
    source: str
    state: str
    added_at: float
    updated_at: float

    def config(self) -> NodeConfig:
        return NodeConfig(url=self.url, kind=self.kind, name=self.name, models=self.models)


class NodeStore:
    """The ``nodes`` table of one history database; every method blocks, so call it off the loop."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def load(self) -> list[NodeRow]:
        with self.engine.connect() as connection:
            rows = connection.execute(select(nodes_table).order_by(nodes_table.c.added_at))
            return [_row_from_mapping(row._mapping) for row in rows]

    def save(self, config: NodeConfig, *, source: str, state: str) -> None:
        """Insert the node's row, or replace the row of the same name."""
        try:
            self._save(config, source=source, state=state)
        except IntegrityError:
            # Another router inserted the same name between our read and insert.
            self._save(config, source=source, state=state)

    def _save(self, config: NodeConfig, *, source: str, state: str) -> None:
        now = time.time()
        values = {
            "url": config.url,
            "kind": config.kind.value,
            "models": orjson.dumps(list(config.models)).decode() if config.models else None,
            "source": source,
            "state": state,
            "updated_at": now,
        }
        table = nodes_table
        with self.engine.begin() as connection:
            existing = connection.execute(
                select(table.c.state).where(table.c.name == config.name).with_for_update()
            ).first()
            if existing is None:
                connection.execute(table.insert().values(name=config.name, added_at=now, **values))
            else:
                if existing.state == "removed":
                    values["added_at"] = now  # a removed node added again starts anew
                connection.execute(
                    table.update().where(table.c.name == config.name).values(**values)
                )


def _row_from_mapping(mapping) -> NodeRow:  # type: ignore[no-untyped-def]
    models = orjson.loads(mapping["models"]) if mapping["models"] else []
    return NodeRow(
        name=mapping["name"],
        url=mapping["url"],
        kind=NodeKind(mapping["kind"]),
        models=tuple(str(model) for model in models),
        source=mapping["source"],
        state=mapping["state"],
        added_at=mapping["added_at"],
        updated_at=mapping["updated_at"],
    )


class Membership:
    """Applies membership changes to the cluster and persists them in the ``nodes`` table."""

    def __init__(
        self,
        cluster: Cluster,
        store: NodeStore,
        client: UpstreamClient,
        *,
        probe_timeout_s: float,
        refresh_interval_s: float,
    ) -> None:
        self.cluster = cluster
        self.store = store
        self.client = client
        self.probe_timeout_s = probe_timeout_s
        self.refresh_interval_s = refresh_interval_s
        self._task: asyncio.Task[None] | None = None
        # Probes of nodes that joined through a change, kept so they finish.
        self._probes: set[asyncio.Task[None]] = set()
        self.probing = True

    async def start(self, *, probe: bool = True) -> None:
        """Apply the stored rows, then re-read them every ``refresh_interval_s``."""
        self.probing = probe
        await self.refresh()
        if self.refresh_interval_s > 0:
            self._task = asyncio.create_task(self._watch(), name="sollol-membership")

    async def stop(self) -> None:
        tasks = [task for task in (self._task, *self._probes) if task is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def refresh(self) -> None:
        rows = await asyncio.to_thread(self.store.load)
        self.apply(rows)

    def apply(self, rows: list[NodeRow]) -> None:
        """Bring the cluster in line with the stored rows; rows not named stay as they are."""
        for row in rows:
            node = self.cluster.find(row.name)
            if row.state == "removed":
                if node is not None:
                    log.info("node %s removed", row.name)
                    self.cluster.remove(node)
                continue
            if node is not None and (node.url != row.url or node.kind is not row.kind):
                log.info("node %s changed its URL or kind; replacing it", row.name)
                self.cluster.remove(node)
                node = None
            if node is None:
                node = self.cluster.add_node(row.config(), source=row.source)
                log.info(
                    "node %s added (%s, %s) from %s", node.name, node.kind, node.url, row.source
                )
                self._probe_soon(node)
            draining = row.state == "drained"
            if node.draining != draining:
                log.info("node %s %s", node.name, "draining" if draining else "back in rotation")
                self.cluster.drain(node, draining)

    async def add(self, config: NodeConfig, *, source: str = "api") -> Node:
        """Add a node, or bring back a drained one with the same URL and kind.

        Raises NodeNameTaken when an active node, or one at another URL, has the
        name, or when another node has the URL already: one server listed twice
        would count its slots twice.
        """
        for other in self.cluster.nodes:
            if other.url == config.url and other.name != config.name:
                raise NodeNameTaken(
                    f"{config.url} is node {other.name!r} already; remove that node first "
                    "to add it under another name"
                )
        node = self.cluster.find(config.name)
        if node is not None and not (
            node.draining and node.url == config.url and node.kind is config.kind
        ):
            raise NodeNameTaken(
                f"a node named {config.name!r} already exists ({node.url}); "
                "remove it first or choose another name (--name)"
            )
        await asyncio.to_thread(self.store.save, config, source=source, state="active")
        await self.refresh()
        node = self.cluster.find(config.name)
        assert node is not None
        if self.probing:
            await self.cluster.probe(self.client, node, self.probe_timeout_s)
        return node

    async def drain(self, name: str) -> Node:
        node = self._require(name)
        await asyncio.to_thread(self.store.save, node.config, source=node.source, state="drained")
        await self.refresh()
        return node

    async def remove(self, name: str) -> Node:
        node = self._require(name)
        await asyncio.to_thread(self.store.save, node.config, source=node.source, state="removed")
        await self.refresh()
        return node

    def add_discovered(self, configs: list[NodeConfig]) -> list[Node]:
        """Add nodes a start-up scan found, in memory only; a later scan finds them again."""
        added = []
        for config in configs:
            if self.cluster.find(config.name) is None:
                added.append(self.cluster.add_node(config, source="discovered"))
        return added

    def _require(self, name: str) -> Node:
        node = self.cluster.find(name)
        if node is None:
            raise NodeNotFound(f"no node named {name!r}; `sollol nodes list` shows the names")
        return node

    def _probe_soon(self, node: Node) -> None:
        if not self.probing:
            return
        try:
            task = asyncio.get_running_loop().create_task(
                self.cluster.probe(self.client, node, self.probe_timeout_s)
            )
        except RuntimeError:
            return  # no loop (unit tests); the health loop probes it
        self._probes.add(task)
        task.add_done_callback(self._probes.discard)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_interval_s)
            try:
                await self.refresh()
            except Exception:
                # Membership stays as it is until the database is reachable again.
                log.exception("reading the nodes table failed; keeping the current membership")
