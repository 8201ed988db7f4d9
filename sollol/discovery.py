"""Finding nodes: tell a node's kind from its URL alone, and scan hosts and ports for nodes.

``detect_node`` sends these requests to a URL, in order:

1. ``GET /api/version``. Ollama returns ``{"version": "0.x.y"}`` there, and
   then ``/api/tags`` lists its models.
2. ``GET /props``. llama-server returns its settings there, with
   ``total_slots`` and ``default_generation_settings``, and then
   ``/v1/models`` lists its model.
3. ``GET /v1/models``. Any other OpenAI-compatible server (vLLM, a hosted
   API behind a proxy) lists its models there.

A URL that passes none of them is no node. ``scan`` runs ``detect_node`` on
every address of a network and every port given, bounded three ways: at most
``max_targets`` address and port pairs (a larger range is rejected before
anything is sent), at most ``concurrency`` connections open at once, and at
most ``rate_per_s`` new connections per second. Scanning is never on by
default, except that ``sollol serve`` with no nodes at all scans 127.0.0.1
on ports 11434 and 8080, which reaches only this machine.
"""

import asyncio
import ipaddress
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from .config import ConfigError, NodeConfig, NodeKind
from .loops import LOOP_STATUS, LoopDetected
from .upstream import UpstreamClient, UpstreamConnectionError

DEFAULT_PORTS = (11434, 8080)
LOOPBACK_CIDR = "127.0.0.1/32"
DEFAULT_MAX_TARGETS = 1024
DEFAULT_RATE_PER_S = 50.0
DEFAULT_CONCURRENCY = 16


@dataclass(frozen=True, slots=True)
class DetectedNode:
    url: str
    kind: NodeKind
    models: tuple[str, ...]
    version: str | None = None  # Ollama's version, or llama-server's build

    def config(self, name: str = "") -> NodeConfig:
        # Models stay empty in the config, so the cluster keeps reading them from the node.
        return NodeConfig(url=self.url, kind=self.kind, name=name)

    def to_json(self) -> dict[str, object]:
        return {
            "url": self.url,
            "kind": self.kind.value,
            "models": list(self.models),
            "version": self.version,
        }


async def detect_node(client: UpstreamClient, url: str, timeout_s: float) -> DetectedNode | None:
    """Return the kind and models of the server at ``url``, or None when it is no node.

    Raises UpstreamConnectionError when the connection to ``url`` fails, and
    LoopDetected when ``url`` is this router, or a router that forwards to it.
    """
    status, body = await client.get(url + "/api/version", timeout_s=timeout_s)
    if status == LOOP_STATUS:
        raise LoopDetected(f"{url} leads back to this router")
    if status == 200 and isinstance(body, dict) and isinstance(body.get("version"), str):
        models = await _listed_names(client, url + "/api/tags", "models", "name", timeout_s)
        return DetectedNode(url, NodeKind.OLLAMA, models, body["version"])

    # llama-server's own connection per request, for the reason in proxy._pools_connections.
    status, body = await client.get(url + "/props", timeout_s=timeout_s, pooled=False)
    if status == 200 and isinstance(body, dict) and _is_llama_props(body):
        models = await _listed_names(client, url + "/v1/models", "data", "id", timeout_s)
        build = body.get("build_info")
        return DetectedNode(
            url, NodeKind.LLAMACPP, models, build if isinstance(build, str) else None
        )

    status, body = await client.get(url + "/v1/models", timeout_s=timeout_s)
    if status == 200 and isinstance(body, dict) and isinstance(body.get("data"), list):
        models = tuple(_names(body["data"], "id"))
        return DetectedNode(url, NodeKind.OPENAI, models)
    return None


def _is_llama_props(body: dict) -> bool:
    return "total_slots" in body or "default_generation_settings" in body


async def _listed_names(
    client: UpstreamClient, url: str, list_field: str, name_field: str, timeout_s: float
) -> tuple[str, ...]:
    status, body = await client.get(url, timeout_s=timeout_s, pooled=False)
    if status != 200 or not isinstance(body, dict):
        return ()
    return tuple(_names(body.get(list_field) or [], name_field))


def _names(entries: Iterable[object], field: str) -> Iterator[str]:
    for entry in entries:
        if isinstance(entry, dict) and isinstance(entry.get(field), str) and entry[field]:
            yield entry[field]


def scan_targets(cidr: str, ports: Iterable[int], max_targets: int) -> list[str]:
    """Return the base URLs to try, ``http://ADDRESS:PORT``, for every host address and port.

    Raises ConfigError for an invalid network or port, or when the scan
    would try more than ``max_targets`` URLs.
    """
    try:
        network = ipaddress.ip_network(cidr.strip(), strict=False)
    except ValueError as exc:
        raise ConfigError(f"--cidr {cidr!r} is not a valid network: {exc}") from None
    ports = list(dict.fromkeys(ports))
    for port in ports:
        if not 1 <= port <= 65535:
            raise ConfigError(f"port {port} is invalid; ports are from 1 to 65535")
    if not ports:
        raise ConfigError("no ports to scan; pass --ports, e.g. --ports 11434,8080")
    # A /32 (or /128) has one address, which hosts() returns from Python 3.11 on.
    total = network.num_addresses * len(ports)
    if total > max_targets:
        raise ConfigError(
            f"scanning {cidr} on {len(ports)} port(s) means {total} connections, over the "
            f"limit of {max_targets}; narrow --cidr or raise --max-targets"
        )
    targets = []
    for address in network.hosts():
        host = f"[{address}]" if address.version == 6 else str(address)
        targets.extend(f"http://{host}:{port}" for port in ports)
    return targets


async def scan(
    client: UpstreamClient,
    targets: list[str],
    *,
    timeout_s: float,
    rate_per_s: float = DEFAULT_RATE_PER_S,
    concurrency: int = DEFAULT_CONCURRENCY,
) -> list[DetectedNode]:
    """Detect a node at each target URL; return those found, in target order."""
    if rate_per_s <= 0 or concurrency <= 0:
        raise ConfigError("the scan rate and concurrency must be positive")
    open_slots = asyncio.Semaphore(concurrency)
    interval_s = 1.0 / rate_per_s
    started = time.monotonic()

    async def try_one(position: int, url: str) -> DetectedNode | None:
        # Start times are spaced by interval_s, whatever the concurrency.
        delay_s = started + position * interval_s - time.monotonic()
        if delay_s > 0:
            await asyncio.sleep(delay_s)
        async with open_slots:
            try:
                return await detect_node(client, url, timeout_s)
            except (UpstreamConnectionError, LoopDetected):  # nothing there, or ourselves
                return None

    found = await asyncio.gather(*(try_one(i, url) for i, url in enumerate(targets)))
    return [node for node in found if node is not None]


async def scan_network(
    cidr: str,
    ports: Iterable[int],
    *,
    timeout_s: float = 2.0,
    max_targets: int = DEFAULT_MAX_TARGETS,
    rate_per_s: float = DEFAULT_RATE_PER_S,
    concurrency: int = DEFAULT_CONCURRENCY,
) -> list[DetectedNode]:
    """Scan ``cidr`` on ``ports`` with a client of its own, for the CLI and the start-up scan."""
    targets = scan_targets(cidr, ports, max_targets)
    client = UpstreamClient(connect_timeout_s=timeout_s, max_connections=concurrency)
    await client.start()
    try:
        return await scan(
            client, targets, timeout_s=timeout_s, rate_per_s=rate_per_s, concurrency=concurrency
        )
    finally:
        await client.close()


def node_name(node: DetectedNode, taken: Iterable[str]) -> str:
    """Return a name for a found node: its host and port, unless a node already has it."""
    base = NodeConfig(url=node.url).name
    taken = set(taken)
    name = base
    suffix = 2
    while name in taken:
        name = f"{base}-{suffix}"
        suffix += 1
    return name
