"""The OpenAI-compatible HTTP surface: request checks, then hand-off to the proxy."""

import time
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .errors import InvalidRequestError, ModelNotFoundError, PayloadTooLargeError
from .proxy import Proxy, ProxyRequest


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
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_body_bytes:
            raise PayloadTooLargeError(
                f"request body exceeds the limit of {max_body_bytes} bytes (max_body_bytes)"
            )
        chunks.append(chunk)
    body = b"".join(chunks)

    if not body:
        raise InvalidRequestError("request body is empty; expected a JSON object")
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequestError(f"request body is not valid JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise InvalidRequestError("request body must be a JSON object")
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


def _is_token_list(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(token, int) and not isinstance(token, bool) for token in value
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
        "an array of token ids or an array of token-id arrays",
        param=field,
    )


class OpenAIRoutes:
    def __init__(self, proxy: Proxy, *, max_body_bytes: int) -> None:
        self._proxy = proxy
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
        return await self._forward("/v1/chat/completions", body, model, stream)

    async def completions(self, request: Request) -> Response:
        body = await read_json_body(request, self._max_body_bytes)
        model = _require_model(body)
        _check_text_or_tokens(body, "prompt")
        stream = _read_stream_flag(body)
        return await self._forward("/v1/completions", body, model, stream)

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
        return await self._forward("/v1/embeddings", body, model, stream=False)

    async def _forward(
        self, route: str, body: dict[str, Any], model: str, stream: bool
    ) -> Response:
        # Checked before choosing a node, so an unknown model never reaches one.
        if not self._proxy.cluster.knows_model(model):
            raise ModelNotFoundError(model)
        return await self._proxy.forward(
            ProxyRequest(route=route, body=body, model=model, stream=stream)
        )

    async def list_models(self, request: Request) -> Response:
        data = [self._model_entry(model) for model in self._proxy.cluster.healthy_models()]
        return Response(
            orjson.dumps({"object": "list", "data": data}), media_type="application/json"
        )

    async def get_model(self, request: Request) -> Response:
        model = request.path_params["model"]
        if model not in self._proxy.cluster.healthy_models():
            raise ModelNotFoundError(model)
        return Response(orjson.dumps(self._model_entry(model)), media_type="application/json")

    def _model_entry(self, model: str) -> dict[str, Any]:
        return {"id": model, "object": "model", "created": self._created, "owned_by": "sollol"}
