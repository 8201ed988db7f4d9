"""Admin routes for cluster membership, under ``/sollol/`` and so admin-only.

- ``GET /sollol/nodes``: every present node with its source, state and health.
- ``POST /sollol/nodes``: add a node from ``{"url", "kind", "name", "models"}``.
  Without ``kind`` the router detects it from the node's replies (see
  ``sollol.discovery``). Adding a drained node again, same URL and kind,
  puts it back in rotation. Returns 201 with the node.
- ``DELETE /sollol/nodes/{name}``: remove a node; requests in flight finish.
- ``POST /sollol/nodes/{name}/drain``: no new requests; those in flight finish.

Every change is stored in the ``nodes`` table first, so it survives a
restart and reaches the other routers on the same database.
"""

from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .cluster import Cluster, Node
from .config import ConfigError, NodeConfig, NodeKind
from .discovery import detect_node
from .errors import InvalidRequestError, SollolError
from .loops import LoopDetected
from .membership import Membership, NodeNameTaken, NodeNotFound
from .openai_api import read_json_body
from .upstream import UpstreamConnectionError

MAX_NODES_BODY_BYTES = 64 * 1024
MAX_NAME_CHARS = 256


class NodeNotFoundError(SollolError):
    status_code = 404
    error_type = "not_found_error"


class NodeConflictError(SollolError):
    status_code = 409
    error_type = "invalid_request_error"


class NodeRoutes:
    def __init__(self, membership: Membership, *, detect_timeout_s: float) -> None:
        self._membership = membership
        self._cluster: Cluster = membership.cluster
        self._detect_timeout_s = detect_timeout_s

    def routes(self) -> list[Route]:
        return [
            Route("/sollol/nodes", self.list_nodes, methods=["GET"]),
            Route("/sollol/nodes", self.add_node, methods=["POST"]),
            Route("/sollol/nodes/{name}", self.remove_node, methods=["DELETE"]),
            Route("/sollol/nodes/{name}/drain", self.drain_node, methods=["POST"]),
        ]

    async def list_nodes(self, request: Request) -> Response:
        return _json({"nodes": [self._cluster.describe(node) for node in self._cluster.nodes]})

    async def add_node(self, request: Request) -> Response:
        body = await read_json_body(request, MAX_NODES_BODY_BYTES)
        config = await self._node_config(body)
        try:
            node = await self._membership.add(config)
        except NodeNameTaken as exc:
            raise NodeConflictError(str(exc), param="name") from None
        return _json(self._cluster.describe(node), status_code=201)

    async def remove_node(self, request: Request) -> Response:
        node = await self._change(request, self._membership.remove)
        return _json(self._cluster.describe(node))

    async def drain_node(self, request: Request) -> Response:
        node = await self._change(request, self._membership.drain)
        return _json(self._cluster.describe(node))

    async def _change(self, request: Request, change) -> Node:  # type: ignore[no-untyped-def]
        name = request.path_params["name"]
        try:
            return await change(name)
        except NodeNotFound as exc:
            raise NodeNotFoundError(str(exc), param="name") from None

    async def _node_config(self, body: dict[str, Any]) -> NodeConfig:
        known = {"url", "kind", "name", "models"}
        unknown = sorted(set(body) - known)
        if unknown:
            raise InvalidRequestError(f"unknown fields: {', '.join(unknown)}", param=unknown[0])
        url = body.get("url")
        if not isinstance(url, str) or not url:
            raise InvalidRequestError("'url' must be a node's base URL", param="url")
        name = body.get("name", "")
        if not isinstance(name, str) or len(name) > MAX_NAME_CHARS or "/" in name:
            raise InvalidRequestError(
                f"'name' must be a string of at most {MAX_NAME_CHARS} characters without '/'",
                param="name",
            )
        models = body.get("models")
        models = [] if models is None else models
        if not isinstance(models, list) or not all(isinstance(m, str) and m for m in models):
            raise InvalidRequestError("'models' must be an array of model names", param="models")
        kind_text = body.get("kind")
        try:
            config = NodeConfig(url=url, name=name, models=tuple(models), source="api")
            if "kind" not in body:
                kind = await self._detect(config.url)
            elif isinstance(kind_text, str) and kind_text in tuple(NodeKind):
                kind = NodeKind(kind_text)
            else:
                choices = ", ".join(kind.value for kind in NodeKind)
                raise InvalidRequestError(f"'kind' must be one of {choices}", param="kind")
            return NodeConfig(
                url=config.url, kind=kind, name=config.name, models=config.models, source="api"
            )
        except ConfigError as exc:
            raise InvalidRequestError(str(exc), param="url") from None

    async def _detect(self, url: str) -> NodeKind:
        try:
            found = await detect_node(self._membership.client, url, self._detect_timeout_s)
        except LoopDetected:
            raise InvalidRequestError(
                f"{url} is this router (or a router that sends requests back to it); "
                "adding it would send requests round in a loop",
                param="url",
            ) from None
        except UpstreamConnectionError as exc:
            raise InvalidRequestError(
                f"could not reach {url} to detect its kind ({exc}); start the node, "
                "or give 'kind' (llamacpp, ollama or openai) to add it anyway",
                param="url",
            ) from None
        if found is None:
            raise InvalidRequestError(
                f"{url} responded, but not as Ollama, llama-server or an OpenAI-compatible "
                "server (no /api/version, /props or /v1/models); give 'kind' to add it anyway",
                param="url",
            )
        return found.kind


def _json(body: dict[str, Any], status_code: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status_code, media_type="application/json")
