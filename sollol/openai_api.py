"""The OpenAI-compatible HTTP surface: request checks, then hand-off to the proxy."""

import functools
import math
import time
from typing import Any

import orjson
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from .auth import request_key
from .cluster import model_key
from .dialects import OPENAI, Dialect
from .errors import (
    ClientClosedError,
    InvalidRequestError,
    ModelNotFoundError,
    NoNodeAvailableError,
    PayloadTooLargeError,
)
from .errors import QueueFullError as ApiQueueFullError
from .proxy import Proxy, ProxyRequest
from .request_fields import (
    CHAT_FIELDS,
    COMPLETION_FIELDS,
    EMBEDDING_FIELDS,
    MAX_TOKEN_ID,
    TYPE_NAMES,
    check_fields,
    check_tool_calls,
    check_tools,
    json_type_of,
)
from .routing.features import (
    DEFAULT_MAX_TOKENS,
    DEFAULT_PRIORITY,
    RequestFeatures,
    estimate_features,
    parse_priority,
)
from .routing.layout import ROUTING_POLICIES
from .routing.scheduler import ClientGoneError, QueueFullError, QueueTimeoutError, Scheduler
from .tenancy import Reservation

# orjson 3.13 parses up to 1024 levels of nested arrays and objects but
# writes at most 254, and the router writes every body again for the node.
MAX_JSON_DEPTH = 254


async def read_json_body(request: Request, max_body_bytes: int) -> dict[str, Any]:
    """Read the body up to ``max_body_bytes`` and parse it as a JSON object."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            declared_bytes = int(declared)
        except ValueError:
            raise InvalidRequestError(f"invalid Content-Length header: {declared!r}") from None
        if declared_bytes > max_body_bytes:
            raise PayloadTooLargeError(
                f"request body of {declared_bytes} bytes exceeds the limit of "
                f"{max_body_bytes} bytes (max_body_bytes)"
            )

    chunks = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body_bytes:
                raise PayloadTooLargeError(
                    f"request body exceeds the limit of {max_body_bytes} bytes (max_body_bytes)"
                )
            chunks.append(chunk)
    except ClientDisconnect:
        raise ClientClosedError("the client disconnected while sending its request") from None
    body = b"".join(chunks)

    if not body:
        raise InvalidRequestError("request body is empty; expected a JSON object")
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequestError(f"request body is not valid JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise InvalidRequestError(
            f"request body must be a JSON object, got {TYPE_NAMES[json_type_of(parsed)]}"
        )
    # Only a body with this many brackets can nest this deep, so the common
    # case costs two byte counts and no second serialization.
    if body.count(b"[") + body.count(b"{") > MAX_JSON_DEPTH:
        try:
            orjson.dumps(parsed)
        except orjson.JSONEncodeError:
            raise InvalidRequestError(
                f"request body nests arrays and objects deeper than {MAX_JSON_DEPTH} levels"
            ) from None
    return parsed


def _require_model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if model is None:
        raise InvalidRequestError("missing required field 'model'", param="model")
    if not isinstance(model, str) or not model:
        raise InvalidRequestError("'model' must be a non-empty string", param="model")
    return model


def _read_stream_flag(body: dict[str, Any]) -> bool:
    stream = body.get("stream", False)
    if stream is None:
        return False
    if not isinstance(stream, bool):
        raise InvalidRequestError("'stream' must be a boolean", param="stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise InvalidRequestError("'stream_options' must be an object", param="stream_options")
    return stream


def _check_messages(body: dict[str, Any]) -> None:
    messages = body.get("messages")
    if messages is None:
        raise InvalidRequestError("missing required field 'messages'", param="messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("'messages' must be a non-empty array", param="messages")
    for position, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise InvalidRequestError(
                f"messages[{position}] must be an object with a string 'role'",
                param=f"messages[{position}]",
            )
        _check_content(message.get("content"), f"messages[{position}].content")
        check_tool_calls(
            message.get("tool_calls"), f"messages[{position}].tool_calls", arguments_as_string=True
        )
    check_tools(body.get("tools"))


def _check_content(content: Any, param: str) -> None:
    """Accept a string, null (an assistant turn with tool calls) or an array of content parts."""
    if content is None or isinstance(content, str):
        return
    if not isinstance(content, list):
        raise InvalidRequestError(
            f"{param} must be a string, an array of content parts or null", param=param
        )
    for position, part in enumerate(content):
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise InvalidRequestError(
                f"{param}[{position}] must be an object with a string 'type', "
                'such as {"type": "text", "text": "..."}',
                param=f"{param}[{position}]",
            )


def _is_token_list(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(token, int) and not isinstance(token, bool) and 0 <= token <= MAX_TOKEN_ID
        for token in value
    )


def _check_text_or_tokens(body: dict[str, Any], field: str) -> None:
    """Accept a string, a list of strings, a token list or a list of token lists."""
    value = body.get(field)
    if value is None:
        raise InvalidRequestError(f"missing required field '{field}'", param=field)
    if isinstance(value, str):
        return
    if isinstance(value, list) and value:
        if all(isinstance(item, str) for item in value):
            return
        if _is_token_list(value) or all(_is_token_list(item) and item for item in value):
            return
    raise InvalidRequestError(
        f"'{field}' must be a string, a non-empty array of strings, "
        "an array of token ids or an array of token-id arrays "
        f"(token ids are integers from 0 to {MAX_TOKEN_ID})",
        param=field,
    )


def _read_policy(value: str | None, param: str = "x-sollol-policy") -> str | None:
    if value is None or value == "":
        return None
    if value not in ROUTING_POLICIES:
        raise InvalidRequestError(
            f"unknown routing policy {value!r}; "
            f"expected one of {', '.join(sorted(ROUTING_POLICIES))}",
            param=param,
        )
    return value


def _read_priority(body: dict[str, Any], header: str | None, header_name: str) -> int:
    """Return the request priority: the body field ``priority`` wins over the header.

    Both are checked when both are given. The body field must be a JSON
    integer. It is not an OpenAI field, so it is taken out of the body before
    the body goes to a node.
    """
    priority = DEFAULT_PRIORITY
    try:
        if header is not None:
            priority = parse_priority(header, header_name)
        if "priority" in body:
            value = body.pop("priority")
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"'priority' must be an integer from 1 to 10, got {value!r}")
            priority = parse_priority(value, "'priority'")
    except ValueError as exc:
        raise InvalidRequestError(str(exc), param="priority") from None
    return priority


def _read_number(params: Any, name: str, default: float) -> float:
    text = params.get(name)
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        raise InvalidRequestError(f"'{name}' must be a number, got {text!r}", param=name) from None
    if not math.isfinite(value) or value < 0:
        raise InvalidRequestError(
            f"'{name}' must be a finite number of at least 0, got {text!r}", param=name
        )
    return value


async def _disconnected(request: Request) -> None:
    """Return once the client has closed the connection.

    Only for use after the body has been read: further ASGI messages can only
    be the disconnect.
    """
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


TASKS = ("chat", "completion", "embedding")


class OpenAIRoutes:
    def __init__(self, proxy: Proxy, scheduler: Scheduler, *, max_body_bytes: int) -> None:
        self._proxy = proxy
        self._scheduler = scheduler
        self._max_body_bytes = max_body_bytes
        self._created = int(time.time())

    def routes(self) -> list[Route]:
        return [
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/embeddings", self.embeddings, methods=["POST"]),
            Route("/v1/models", self.list_models, methods=["GET"]),
            Route("/v1/models/{model:path}", self.get_model, methods=["GET"]),
        ]

    async def chat_completions(self, request: Request) -> Response:
        body = await read_json_body(request, self._max_body_bytes)
        model = _require_model(body)
        _check_messages(body)
        stream = _read_stream_flag(body)
        check_fields(body, CHAT_FIELDS)
        return await self.forward(request, "/v1/chat/completions", "chat", body, model, stream)

    async def completions(self, request: Request) -> Response:
        body = await read_json_body(request, self._max_body_bytes)
        model = _require_model(body)
        _check_text_or_tokens(body, "prompt")
        stream = _read_stream_flag(body)
        check_fields(body, COMPLETION_FIELDS)
        return await self.forward(request, "/v1/completions", "completion", body, model, stream)

    async def embeddings(self, request: Request) -> Response:
        body = await read_json_body(request, self._max_body_bytes)
        model = _require_model(body)
        _check_text_or_tokens(body, "input")
        encoding = body.get("encoding_format")
        if encoding is not None and encoding not in ("float", "base64"):
            raise InvalidRequestError(
                f"'encoding_format' must be 'float' or 'base64', got {encoding!r}",
                param="encoding_format",
            )
        check_fields(body, EMBEDDING_FIELDS)
        return await self.forward(request, "/v1/embeddings", "embedding", body, model, False)

    async def forward(
        self,
        request: Request,
        route: str,
        task: str,
        body: dict[str, Any],
        model: str,
        stream: bool,
        *,
        dialect: Dialect = OPENAI,
        features_body: dict[str, Any] | None = None,
    ) -> Response:
        """Admit the request, wait for a node with room, and hand it to the proxy.

        ``features_body`` is an OpenAI-shaped view of the request for the
        routing features, when the client spoke another API.
        """
        policy = _read_policy(request.headers.get("x-sollol-policy"))
        priority = _read_priority(
            body, request.headers.get("x-sollol-priority"), "x-sollol-priority"
        )
        # Checked before choosing a node, so an unknown model never reaches one.
        key = model_key(model)
        if not self._proxy.cluster.knows_model(key):
            raise ModelNotFoundError(model)
        api_key = request_key(request)
        tenancy = self._proxy.tenancy
        if tenancy is not None:
            tenancy.check_model(api_key, key, model)
        features = estimate_features(task, features_body or body, priority)
        reservation = Reservation()
        if tenancy is not None:
            reservation = await tenancy.admit(api_key, key, features)
        try:
            queue_ms = await self._wait_for_node(request, key, priority)
        except BaseException:
            if tenancy is not None:
                tenancy.release(api_key, reservation)
            raise
        return await self._proxy.forward(
            ProxyRequest(
                route=route,
                body=body,
                model=key,
                features=features,
                stream=stream,
                policy=policy,
                queue_ms=queue_ms,
                disconnected=functools.partial(_disconnected, request),
                dialect=dialect,
                key_id=None if api_key is None else api_key.id,
                reserved_tokens=reservation.tokens,
                rate_event_id=reservation.event_id,
            )
        )

    async def _wait_for_node(self, request: Request, model: str, priority: int) -> float:
        settings = self._proxy.settings
        try:
            return await self._scheduler.admit(
                model, priority, functools.partial(_disconnected, request)
            )
        except QueueFullError:
            raise ApiQueueFullError(
                f"too many requests are waiting for model '{model}' "
                f"(max_queued_per_model={self._scheduler.max_queued_per_model}); retry later",
                retry_after_s=settings.retry_after_s,
            ) from None
        except QueueTimeoutError:
            raise NoNodeAvailableError(
                f"no node serving model '{model}' became free within "
                f"{self._scheduler.timeout_s:.0f} s (queue_timeout_s)",
                retry_after_s=settings.retry_after_s,
            ) from None
        except ClientGoneError:
            raise ClientClosedError("the client disconnected while its request waited") from None

    async def explain_route(self, request: Request) -> Response:
        """Show which node the router would choose now, and every candidate's score.

        Query parameters: ``model`` (required), ``policy``, ``task`` (chat,
        completion or embedding), ``prompt_tokens``, ``max_tokens``, ``priority``.
        """
        params = request.query_params
        model = params.get("model")
        if not model:
            raise InvalidRequestError("missing query parameter 'model'", param="model")
        model = model_key(model)
        if not self._proxy.cluster.knows_model(model):
            raise ModelNotFoundError(model)
        policy = _read_policy(params.get("policy"), param="policy")
        task = params.get("task", "chat")
        if task not in TASKS:
            raise InvalidRequestError(
                f"unknown task {task!r}; expected one of {', '.join(TASKS)}", param="task"
            )
        default_max_tokens = 0.0 if task == "embedding" else float(DEFAULT_MAX_TOKENS)
        features = RequestFeatures(
            task=task,
            prompt_tokens=_read_number(params, "prompt_tokens", 0.0),
            max_tokens=_read_number(params, "max_tokens", default_max_tokens),
            priority=_read_priority({}, params.get("priority"), "priority"),
        )
        cluster = self._proxy.cluster
        decision = cluster.choose(model, features, policy, dry_run=True)
        candidates = []
        if decision is not None:
            for index, score in decision.best(len(decision.candidates)):
                candidates.append(
                    {
                        "node": cluster.node_at(index).name,
                        "score": score if math.isfinite(score) else None,
                        "signals": cluster.signals.row(index),
                    }
                )
        body = {
            "model": model,
            "policy": policy or cluster.engine.default_policy,
            "chosen": None if decision is None else cluster.node_at(decision.node).name,
            "candidates": candidates,
            "lower_score_wins": True,
        }
        return Response(orjson.dumps(body), media_type="application/json")

    async def list_models(self, request: Request) -> Response:
        api_key = request_key(request)
        data = [
            self._model_entry(model)
            for model in self._proxy.cluster.healthy_models()
            if api_key is None or api_key.allows_model(model)
        ]
        return Response(
            orjson.dumps({"object": "list", "data": data}), media_type="application/json"
        )

    async def get_model(self, request: Request) -> Response:
        model = request.path_params["model"]
        api_key = request_key(request)
        if model_key(model) not in self._proxy.cluster.healthy_models() or (
            api_key is not None and not api_key.allows_model(model_key(model))
        ):
            raise ModelNotFoundError(model)
        return Response(orjson.dumps(self._model_entry(model)), media_type="application/json")

    def _model_entry(self, model: str) -> dict[str, Any]:
        return {"id": model, "object": "model", "created": self._created, "owned_by": "sollol"}
