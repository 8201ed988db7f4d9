"""A fake OpenAI-compatible node that replies at once to every JSON object body.

For tests of the router's own request handling, where a real llama-server
would be slow and would reject requests for its own reasons. Every POST gets
a 200 with a minimal OpenAI-shaped reply, streamed when the body has
``"stream": true``. Each body the node received is kept in ``received``, so
tests can check what the router forwarded.
"""

import base64
import struct
import time
from typing import Any

import orjson
from aiohttp import web

from .threaded_server import ThreadedServer

EMBEDDING_DIMENSIONS = 4


class FakeOpenAINode(ThreadedServer):
    def __init__(self, models: tuple[str, ...] = ("tiny",)) -> None:
        super().__init__()
        self.models = models
        self.received: list[tuple[str, dict[str, Any]]] = []

    def __enter__(self) -> "FakeOpenAINode":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._generate)
        app.router.add_post("/v1/completions", self._generate)
        app.router.add_post("/v1/embeddings", self._embeddings)
        return app

    async def _models(self, request: web.Request) -> web.Response:
        data = [{"id": model, "object": "model", "owned_by": "fake"} for model in self.models]
        return web.json_response({"object": "list", "data": data})

    async def _read(self, request: web.Request) -> dict[str, Any]:
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError as exc:
            raise _bad_request(f"body is not JSON: {exc}") from None
        if not isinstance(body, dict):
            raise _bad_request("body is not a JSON object")
        self.received.append((request.path, body))
        return body

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        body = await self._read(request)
        chat = request.path == "/v1/chat/completions"
        base = {"id": "fake-1", "created": int(time.time()), "model": "fake-alias"}
        usage = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
        if body.get("stream") is not True:
            if chat:
                choice: dict[str, Any] = {"message": {"role": "assistant", "content": "ok"}}
            else:
                choice = {"text": "ok"}
            choice.update(index=0, finish_reason="stop", logprobs=None)
            kind = "chat.completion" if chat else "text_completion"
            return web.json_response({**base, "object": kind, "choices": [choice], "usage": usage})

        kind = "chat.completion.chunk" if chat else "text_completion"
        piece: dict[str, Any] = {"delta": {"content": "ok"}} if chat else {"text": "ok"}
        chunks = [
            {**base, "object": kind, "choices": [{"index": 0, **piece, "finish_reason": "stop"}]}
        ]
        options = body.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage") is True:
            chunks.append({**base, "object": kind, "choices": [], "usage": usage})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for chunk in chunks:
            await response.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def _embeddings(self, request: web.Request) -> web.Response:
        body = await self._read(request)
        inputs = body.get("input")
        # A string or one token-id array is one input; any other array is a list of inputs.
        if isinstance(inputs, list) and inputs and not isinstance(inputs[0], int):
            count = len(inputs)
        else:
            count = 1
        vector = [0.5] * EMBEDDING_DIMENSIONS
        embedding: Any = vector
        if body.get("encoding_format") == "base64":
            embedding = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        data = [
            {"object": "embedding", "index": index, "embedding": embedding}
            for index in range(count)
        ]
        usage = {"prompt_tokens": count, "total_tokens": count}
        return web.json_response(
            {"object": "list", "data": data, "model": "fake-alias", "usage": usage}
        )


def _bad_request(message: str) -> web.HTTPBadRequest:
    error = {"message": message, "type": "invalid_request_error", "param": None, "code": None}
    return web.HTTPBadRequest(
        text=orjson.dumps({"error": error}).decode(), content_type="application/json"
    )
