"""Reading a node's state from its own endpoints: health, models, slots, queue, sizes.

Each function makes the requests one probe needs for one node kind and returns
plain values; ``cluster.Cluster`` decides what they mean for routing.
"""

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .config import NodeKind
from .upstream import UpstreamClient

if TYPE_CHECKING:
    from .cluster import Node

LOADING = "loading"  # llama-server's /health returns 503 while it loads the model


async def probe_node(
    client: UpstreamClient, node: "Node", timeout_s: float
) -> tuple[bool, dict[str, dict] | None, str]:
    """Return (healthy, discovered models and their listing entries or None, detail).

    llama-server returns 503 on every route while it loads its model, so a 503
    there means "not ready yet"; the node joins once /health returns 200.
    """
    # Probes to llama-server use a connection of their own, for the reason
    # given in proxy._pools_connections.
    pooled = node.kind is not NodeKind.LLAMACPP
    if node.kind is NodeKind.LLAMACPP:
        status, _ = await client.get(node.url + "/health", timeout_s=timeout_s, pooled=pooled)
        if status != 200:
            return False, None, LOADING if status == 503 else f"/health returned HTTP {status}"
    elif node.kind is NodeKind.OLLAMA:
        status, _ = await client.get(node.url + "/api/version", timeout_s=timeout_s)
        if status != 200:
            return False, None, f"/api/version returned HTTP {status}"

    if node.config.models:
        if node.kind is NodeKind.OPENAI:
            status, _ = await client.get(node.url + "/v1/models", timeout_s=timeout_s)
            if status != 200:
                return False, None, f"/v1/models returned HTTP {status}"
        return True, None, "ok"

    if node.kind is NodeKind.OLLAMA:
        status, body = await client.get(node.url + "/api/tags", timeout_s=timeout_s)
        if status != 200:
            return False, None, f"/api/tags returned HTTP {status}"
        listing = body.get("models") if isinstance(body, dict) else None
        entries = [entry for entry in listing or [] if isinstance(entry, dict)]
        names = [entry.get("name") for entry in entries]
    else:
        status, body = await client.get(node.url + "/v1/models", timeout_s=timeout_s, pooled=pooled)
        if status != 200:
            return False, None, f"/v1/models returned HTTP {status}"
        listing = body.get("data") if isinstance(body, dict) else None
        entries = [entry for entry in listing or [] if isinstance(entry, dict)]
        names = [entry.get("id") for entry in entries]
    return (
        True,
        {name: entry for name, entry in zip(names, entries, strict=True) if _is_name(name)},
        "ok",
    )


def _is_name(value: object) -> bool:
    return isinstance(value, str) and bool(value)


@dataclass(frozen=True, slots=True)
class LlamaLoad:
    total_slots: int | None = None
    busy_slots: int | None = None
    deferred: int = 0


async def llama_load(client: UpstreamClient, node: "Node", timeout_s: float) -> LlamaLoad:
    """Read llama-server's slots (/props, /slots) and, when enabled, its /metrics queue."""
    total = busy = None
    deferred = 0
    status, props = await client.get(node.url + "/props", timeout_s=timeout_s, pooled=False)
    if status == 200 and isinstance(props, dict):
        if isinstance(props.get("total_slots"), int):
            total = props["total_slots"]
        if props.get("endpoint_metrics") is True:
            deferred = await llama_deferred(client, node, timeout_s)
    if node.unary_in_flight:
        # A /slots request during a non-streamed reply can make llama-server
        # miss that the client closed the connection, and generate to the end
        # (seen in 8 of 9 tries), so the busy count waits for the next probe.
        return LlamaLoad(total, None, deferred)
    status, slots = await client.get(node.url + "/slots", timeout_s=timeout_s, pooled=False)
    if status == 200 and isinstance(slots, list):
        busy = sum(1 for slot in slots if isinstance(slot, dict) and slot.get("is_processing"))
    return LlamaLoad(total, busy, deferred)


async def llama_deferred(client: UpstreamClient, node: "Node", timeout_s: float) -> int:
    """Return the ``llamacpp:requests_deferred`` gauge of a node started with --metrics."""
    status, text = await client.get_text(node.url + "/metrics", timeout_s=timeout_s)
    if status != 200:
        return 0
    for line in text.splitlines():
        if line.startswith("llamacpp:requests_deferred "):
            try:
                return max(0, int(float(line.split()[1])))
            except ValueError:
                return 0
    return 0


async def model_sizes(
    client: UpstreamClient, node: "Node", timeout_s: float, path: str
) -> dict[str, int]:
    """Return model sizes in bytes from /api/tags (Ollama) or /v1/models meta (llama-server)."""
    pooled = node.kind is not NodeKind.LLAMACPP
    status, body = await client.get(node.url + path, timeout_s=timeout_s, pooled=pooled)
    if status != 200 or not isinstance(body, dict):
        return {}
    sizes = {}
    if path == "/api/tags":
        for entry in body.get("models") or []:
            if isinstance(entry, dict) and isinstance(entry.get("size"), int):
                sizes[str(entry.get("name"))] = entry["size"]
    else:
        for entry in body.get("data") or []:
            meta = entry.get("meta") if isinstance(entry, dict) else None
            if isinstance(meta, dict) and isinstance(meta.get("size"), int):
                for name in node.models or {entry.get("id")}:
                    sizes[str(name)] = meta["size"]
    return sizes
