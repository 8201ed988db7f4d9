"""Ollama's native API on the router, so any Ollama client can use the whole cluster.

Requests are checked and routed like OpenAI ones. ``sollol.ollama_dialect``
defines what each node kind is sent and how its reply comes back. Errors use
Ollama's shape, ``{"error": "<text>"}``.

Model names follow ``cluster.model_key``: ``llama3.2`` and
``llama3.2:latest`` are one model. ``/api/tags`` lists every model with its
tag (``tiny:latest`` for a llama-server alias ``tiny``), and replies echo the
name the client sent.
"""

import asyncio
import hashlib
import logging
from typing import TYPE_CHECKING, Any

import orjson
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from .auth import request_key
from .cluster import Cluster, Node, model_key
from .config import NodeKind
from .dialects import Dialect
from .errors import InvalidRequestError, SollolError
from .ollama_dialect import CHAT, EMBED, EMBEDDINGS_LEGACY, GENERATE, embed_texts
from .ollama_wire import now_rfc3339
from .openai_api import read_json_body
from .request_fields import (
    OLLAMA_FIELDS,
    OLLAMA_MESSAGE,
    OLLAMA_OPTIONS,
    check_fields,
    check_tool_calls,
    check_tools,
)
from .upstream import UpstreamConnectionError

if TYPE_CHECKING:
    from .openai_api import OpenAIRoutes
    from .upstream import UpstreamClient

log = logging.getLogger(__name__)

# The Ollama version the router reports: clients check it for features, and
# the router serves the API of this release.
OLLAMA_API_VERSION = "0.12.6"


class OllamaModelNotFoundError(SollolError):
    status_code = 404
    error_type = "not_found_error"


def ollama_error_body(message: str) -> bytes:
    return orjson.dumps({"error": message})


# -- routes ----------------------------------------------------------------------


class OllamaRoutes:
    def __init__(
        self,
        openai_routes: "OpenAIRoutes",
        cluster: Cluster,
        client: "UpstreamClient",
        *,
        max_body_bytes: int,
        timeout_s: float,
    ) -> None:
        self._openai = openai_routes
        self._cluster = cluster
        self._client = client
        self._max_body_bytes = max_body_bytes
        self._timeout_s = timeout_s

    def routes(self) -> list[Route]:
        return [
            Route("/", self.root, methods=["GET", "HEAD"]),
            Route("/api/version", self.version, methods=["GET", "HEAD"]),
            Route("/api/tags", self.tags, methods=["GET", "HEAD"]),
            Route("/api/ps", self.ps, methods=["GET"]),
            Route("/api/show", self.show, methods=["POST"]),
            Route("/api/chat", self.chat, methods=["POST"]),
            Route("/api/generate", self.generate, methods=["POST"]),
            Route("/api/embed", self.embed, methods=["POST"]),
            Route("/api/embeddings", self.embeddings, methods=["POST"]),
        ]

    async def root(self, request: Request) -> Response:
        return PlainTextResponse("Ollama is running")

    async def version(self, request: Request) -> Response:
        return _json({"version": OLLAMA_API_VERSION})

    async def tags(self, request: Request) -> Response:
        api_key = request_key(request)
        entries: dict[str, dict[str, Any]] = {}
        for node in self._cluster.nodes:
            if not node.health.up:
                continue
            for key in sorted(node.models):
                if api_key is None or api_key.allows_model(key):
                    entries.setdefault(key, _tag_entry(node, key))
        return _json({"models": [entries[key] for key in sorted(entries)]})

    async def ps(self, request: Request) -> Response:
        api_key = request_key(request)
        models = []
        for node in self._cluster.nodes:
            if not node.health.up:
                continue
            if node.kind is NodeKind.OLLAMA:
                for entry in node.ps_entries:
                    name = entry.get("name") or entry.get("model") or ""
                    if api_key is None or api_key.allows_model(model_key(str(name))):
                        models.append({**entry, "sollol_node": node.name})
            else:
                # A llama-server keeps its model loaded for as long as it runs.
                for key in sorted(node.models):
                    if api_key is not None and not api_key.allows_model(key):
                        continue
                    entry = _tag_entry(node, key)
                    entry.pop("modified_at", None)
                    entry.update(expires_at="9999-12-31T23:59:59Z", size_vram=0)
                    models.append({**entry, "sollol_node": node.name})
        return _json({"models": models})

    async def show(self, request: Request) -> Response:
        body = await self._read_body(request)
        name = body.get("model") or body.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidRequestError("model is required")
        key = self._require_known(name, request)
        nodes = [node for node in self._cluster.nodes if key in node.models]
        for node in nodes:
            if node.kind is NodeKind.OLLAMA and node.health.up:
                # An Ollama node has its model's template, parameters and capabilities.
                shown = await self._show_on(node, key)
                if shown is not None:
                    return Response(shown, media_type="application/json")
        entry = _tag_entry(nodes[0], key)
        return _json(
            {
                "modelfile": "",
                "parameters": "",
                "template": "",
                "details": entry["details"],
                "model_info": {},
                "capabilities": ["completion"],
                "modified_at": entry["modified_at"],
            }
        )

    async def chat(self, request: Request) -> Response:
        body = await self._read_body(request)
        name = self._model_of(body)
        messages = body.get("messages")
        if messages is not None and not isinstance(messages, list):
            raise InvalidRequestError("messages must be an array")
        if not messages:
            return self._load_reply(body, name, request, chat=True)
        features = {"messages": messages, **_max_tokens_of(body)}
        return await self._forward(request, "/api/chat", body, name, CHAT, features, "chat")

    async def generate(self, request: Request) -> Response:
        body = await self._read_body(request)
        name = self._model_of(body)
        prompt = body.get("prompt")
        if prompt is not None and not isinstance(prompt, str):
            raise InvalidRequestError("prompt must be a string")
        if not prompt:
            return self._load_reply(body, name, request, chat=False)
        features = {"prompt": prompt, **_max_tokens_of(body)}
        return await self._forward(
            request, "/api/generate", body, name, GENERATE, features, "completion"
        )

    async def embed(self, request: Request) -> Response:
        body = await self._read_body(request)
        name = self._model_of(body)
        texts = embed_texts(body)
        if not texts:
            self._require_known(name, request)
            return _json({"model": name, "embeddings": []})
        features = {"input": texts}
        return await self._forward(request, "/api/embed", body, name, EMBED, features, "embedding")

    async def embeddings(self, request: Request) -> Response:
        body = await self._read_body(request)
        name = self._model_of(body)
        prompt = body.get("prompt")
        if prompt is not None and not isinstance(prompt, str):
            raise InvalidRequestError("prompt must be a string")
        if not prompt:
            self._require_known(name, request)
            return _json({"embedding": []})
        return await self._forward(
            request,
            "/api/embeddings",
            body,
            name,
            EMBEDDINGS_LEGACY,
            {"input": prompt},
            "embedding",
        )

    # -- helpers -----------------------------------------------------------------

    async def _show_on(self, node: Node, key: str) -> bytes | None:
        payload = orjson.dumps({"model": node.own_names.get(key, key)})
        try:
            async with asyncio.timeout(self._timeout_s):
                async with self._client.post(node.url + "/api/show", payload) as reply:
                    if reply.status != 200:
                        return None
                    return await reply.read()
        except (UpstreamConnectionError, TimeoutError) as exc:
            log.warning("POST /api/show on node %s failed: %s", node.name, exc or "timed out")
            return None

    async def _read_body(self, request: Request) -> dict[str, Any]:
        """Read the body and check the fields the router reads or translates."""
        body = await read_json_body(request, self._max_body_bytes)
        check_fields(body, OLLAMA_FIELDS)
        if isinstance(body.get("options"), dict):
            check_fields(body["options"], OLLAMA_OPTIONS)
        messages = body.get("messages")
        for position, message in enumerate(messages if isinstance(messages, list) else []):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise InvalidRequestError(
                    f"messages[{position}] must be an object with a string 'role'"
                )
            check_fields(message, OLLAMA_MESSAGE)
            check_tool_calls(
                message.get("tool_calls"),
                f"messages[{position}].tool_calls",
                arguments_as_string=False,
            )
        check_tools(body.get("tools"))
        return body

    def _model_of(self, body: dict[str, Any]) -> str:
        name = body.get("model")
        if name is None or name == "":
            raise InvalidRequestError("model is required")
        if not isinstance(name, str):
            raise InvalidRequestError("model must be a string")
        return name

    def _require_known(self, name: str, request: Request) -> str:
        """Return the model's key; a model outside the API key's allow-list is not found."""
        key = model_key(name)
        api_key = request_key(request)
        if not self._cluster.knows_model(key) or (
            api_key is not None and not api_key.allows_model(key)
        ):
            raise OllamaModelNotFoundError(f"model '{name}' not found")
        return key

    def _load_reply(
        self, body: dict[str, Any], name: str, request: Request, *, chat: bool
    ) -> Response:
        """Answer a request with no prompt, which Ollama treats as "load the model".

        The router replies itself, because llama-server nodes keep their model
        loaded anyway and Ollama nodes load a model on its first real request.
        """
        self._require_known(name, request)
        keep_alive = body.get("keep_alive")
        line: dict[str, Any] = {"model": name, "created_at": now_rfc3339()}
        if chat:
            line["message"] = {"role": "assistant", "content": ""}
        else:
            line["response"] = ""
        line["done"] = True
        line["done_reason"] = "unload" if keep_alive in (0, "0", "0s") else "load"
        return _json(line)

    async def _forward(
        self,
        request: Request,
        route: str,
        body: dict[str, Any],
        name: str,
        dialect: Dialect,
        features: dict[str, Any],
        task: str,
    ) -> Response:
        self._require_known(name, request)
        stream = dialect in (CHAT, GENERATE) and body.get("stream", True) is not False
        return await self._openai.forward(
            request, route, task, body, name, stream, dialect=dialect, features_body=features
        )


def _tag_entry(node: Node, key: str) -> dict[str, Any]:
    """Return a model's /api/tags entry: the Ollama node's own, or one built for llama-server."""
    own = node.listing.get(key)
    name = key if ":" in key else key + ":latest"
    if node.kind is NodeKind.OLLAMA and own is not None:
        return {**own, "name": name, "model": name}
    meta = (own or {}).get("meta") or {}
    size = meta.get("size") if isinstance(meta.get("size"), int) else 0
    parameters = meta.get("n_params")
    return {
        "name": name,
        "model": name,
        "modified_at": "1970-01-01T00:00:00Z",
        "size": size,
        # A stable stand-in: llama-server does not report the file's digest.
        "digest": hashlib.sha256(f"{node.name}/{key}".encode()).hexdigest(),
        "details": {
            "parent_model": "",
            "format": "gguf",
            "family": "",
            "families": None,
            "parameter_size": f"{parameters}" if isinstance(parameters, int) else "",
            "quantization_level": "",
        },
    }


def _max_tokens_of(body: dict[str, Any]) -> dict[str, Any]:
    options = body.get("options")
    num_predict = options.get("num_predict") if isinstance(options, dict) else None
    return {"max_tokens": num_predict} if isinstance(num_predict, int) and num_predict >= 0 else {}


def _json(body: dict[str, Any]) -> Response:
    return Response(orjson.dumps(body), media_type="application/json")
