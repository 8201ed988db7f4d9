"""An Ollama server double: the native API and its OpenAI-compatible ``/v1`` layer.

No Ollama binary can be installed where SOLLOL is tested, so Ollama nodes are
tested against this double. Its wire format follows Ollama's documented API:
NDJSON streams whose last line has ``done: true`` and the duration counters
in integer nanoseconds, errors as ``{"error": "<text>"}``, and on ``/v1`` the
OpenAI shapes (SSE with ``data: [DONE]``, ``system_fingerprint: "fp_ollama"``).
The test suite checks it with the real ``ollama`` client and the OpenAI SDK.

Replies are deterministic: words picked by a hash of the prompt, one word per
token, produced at ``tokens_per_s``.
"""

import asyncio
import base64
import hashlib
import struct
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web

from .threaded_server import ThreadedServer

VERSION = "0.12.6"
WORDS = ("alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa")
EMBEDDING_DIMENSIONS = 16
DEFAULT_PREDICT = 12


@dataclass
class DoubleModel:
    name: str
    size_bytes: int = 2_000_000_000
    family: str = "llama"
    parameter_size: str = "3.2B"
    quantization_level: str = "Q4_K_M"

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.name.encode()).hexdigest()

    def details(self) -> dict[str, Any]:
        return {
            "parent_model": "",
            "format": "gguf",
            "family": self.family,
            "families": [self.family],
            "parameter_size": self.parameter_size,
            "quantization_level": self.quantization_level,
        }


@dataclass(eq=False)
class OllamaDouble(ThreadedServer):
    models: list[DoubleModel] = field(default_factory=lambda: [DoubleModel("llama3.2:latest")])
    tokens_per_s: float = 500.0
    requests: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        ThreadedServer.__init__(self)

    def make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/", self._root)
        app.router.add_get("/api/version", self._version)
        app.router.add_get("/api/tags", self._tags)
        app.router.add_get("/api/ps", self._ps)
        app.router.add_post("/api/chat", self._native_chat)
        app.router.add_post("/api/generate", self._native_generate)
        app.router.add_post("/api/embed", self._native_embed)
        app.router.add_post("/v1/chat/completions", self._openai_chat)
        app.router.add_post("/v1/completions", self._openai_completions)
        app.router.add_post("/v1/embeddings", self._openai_embeddings)
        app.router.add_get("/v1/models", self._openai_models)
        return app

    # -- helpers ---------------------------------------------------------

    def _model(self, name: str) -> DoubleModel | None:
        return next((model for model in self.models if model.name == name), None)

    async def _read(self, request: web.Request) -> dict[str, Any]:
        raw = await request.read()
        if not raw:
            raise _native_error(400, "missing request body")
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise _native_error(400, str(exc)) from None
        if not isinstance(body, dict):
            raise _native_error(400, "json: cannot unmarshal into Go value of type api.Request")
        self.requests.append((request.path, body))
        return body

    def _words(self, prompt: str, count: int) -> list[str]:
        digest = hashlib.sha256(prompt.encode()).digest()
        return [WORDS[digest[i % len(digest)] % len(WORDS)] for i in range(count)]

    async def _produce(self, prompt: str, count: int):  # type: ignore[no-untyped-def]
        for index, word in enumerate(self._words(prompt, count)):
            await asyncio.sleep(1.0 / self.tokens_per_s)
            yield word if index == 0 else " " + word

    # -- native API ------------------------------------------------------

    async def _root(self, request: web.Request) -> web.Response:
        return web.Response(text="Ollama is running")

    async def _version(self, request: web.Request) -> web.Response:
        return _json({"version": VERSION})

    async def _tags(self, request: web.Request) -> web.Response:
        entries = [
            {
                "name": model.name,
                "model": model.name,
                "modified_at": "2026-11-01T10:00:00.000000000Z",
                "size": model.size_bytes,
                "digest": model.digest,
                "details": model.details(),
            }
            for model in self.models
        ]
        return _json({"models": entries})

    async def _ps(self, request: web.Request) -> web.Response:
        return _json({"models": []})

    async def _native_chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._read(request)
        model = self._require_native_model(body, not_found="model '{}' not found")
        prompt = " ".join(str(m.get("content", "")) for m in body.get("messages") or [])
        return await self._native_reply(request, body, model, prompt, chat=True)

    async def _native_generate(self, request: web.Request) -> web.StreamResponse:
        body = await self._read(request)
        model = self._require_native_model(body, not_found="model '{}' not found")
        return await self._native_reply(
            request, body, model, str(body.get("prompt", "")), chat=False
        )

    def _require_native_model(self, body: dict[str, Any], *, not_found: str) -> DoubleModel:
        name = body.get("model")
        if not name:
            raise _native_error(400, "model is required")
        model = self._model(str(name))
        if model is None:
            raise _native_error(404, not_found.format(name))
        return model

    async def _native_reply(
        self,
        request: web.Request,
        body: dict[str, Any],
        model: DoubleModel,
        prompt: str,
        *,
        chat: bool,
    ) -> web.StreamResponse:
        options = body.get("options") or {}
        count = int(options.get("num_predict", DEFAULT_PREDICT))
        if count < 0:
            count = DEFAULT_PREDICT
        started = time.perf_counter_ns()
        prompt_tokens = max(1, len(prompt.split()))

        def piece_line(text: str, done: bool) -> dict[str, Any]:
            line: dict[str, Any] = {"model": model.name, "created_at": _now()}
            if chat:
                line["message"] = {"role": "assistant", "content": text}
            else:
                line["response"] = text
            line["done"] = done
            return line

        def final_line(produced: int, text: str) -> dict[str, Any]:
            line = piece_line(text, True)
            elapsed = time.perf_counter_ns() - started
            line.update(
                done_reason="length" if produced >= count else "stop",
                total_duration=elapsed,
                prompt_eval_count=prompt_tokens,
                prompt_eval_duration=max(1, elapsed // 10),
                eval_count=produced,
                eval_duration=max(1, elapsed - elapsed // 10),
            )
            return line

        if body.get("stream") is False:
            pieces = [piece async for piece in self._produce(prompt, count)]
            return _json(final_line(len(pieces), "".join(pieces)))

        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        produced = 0
        async for piece in self._produce(prompt, count):
            produced += 1
            await response.write(orjson.dumps(piece_line(piece, False)) + b"\n")
        await response.write(orjson.dumps(final_line(produced, "")) + b"\n")
        await response.write_eof()
        return response

    async def _native_embed(self, request: web.Request) -> web.Response:
        body = await self._read(request)
        model = self._require_native_model(
            body, not_found='model "{}" not found, try pulling it first'
        )
        texts = body.get("input")
        texts = [texts] if isinstance(texts, str) else texts or []
        if not all(isinstance(text, str) for text in texts):
            raise _native_error(400, "invalid input type")
        return _json(
            {
                "model": model.name,
                "embeddings": [_embedding(text) for text in texts],
                "total_duration": 1000,
                "prompt_eval_count": sum(len(text.split()) for text in texts),
            }
        )

    # -- OpenAI-compatible layer -----------------------------------------

    async def _read_openai(self, request: web.Request) -> tuple[dict[str, Any], DoubleModel]:
        try:
            body = await self._read(request)
        except web.HTTPException as exc:
            raise _openai_error(400, "invalid_request_error", exc.text or "invalid body") from None
        model = self._model(str(body.get("model")))
        if model is None:
            raise _openai_error(404, "not_found_error", f'model "{body.get("model")}" not found')
        return body, model

    async def _openai_chat(self, request: web.Request) -> web.StreamResponse:
        body, model = await self._read_openai(request)
        messages = body.get("messages") or []
        if not messages:
            raise _openai_error(400, "invalid_request_error", "[] is too short - 'messages'")
        prompt = " ".join(str(m.get("content", "")) for m in messages)
        return await self._openai_reply(request, body, model, prompt, chat=True)

    async def _openai_completions(self, request: web.Request) -> web.StreamResponse:
        body, model = await self._read_openai(request)
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise _openai_error(400, "invalid_request_error", "prompt must be a string")
        return await self._openai_reply(request, body, model, prompt, chat=False)

    async def _openai_reply(
        self,
        request: web.Request,
        body: dict[str, Any],
        model: DoubleModel,
        prompt: str,
        *,
        chat: bool,
    ) -> web.StreamResponse:
        count = int(body.get("max_tokens") or DEFAULT_PREDICT)
        prompt_tokens = max(1, len(prompt.split()))
        reply_id = ("chatcmpl-" if chat else "cmpl-") + str(len(self.requests) % 999)
        kind = "chat.completion" if chat else "text_completion"
        base = {
            "id": reply_id,
            "created": int(time.time()),
            "model": model.name,
            "system_fingerprint": "fp_ollama",
        }

        def usage(produced: int) -> dict[str, int]:
            return {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": produced,
                "total_tokens": prompt_tokens + produced,
            }

        if not body.get("stream"):
            pieces = [piece async for piece in self._produce(prompt, count)]
            text = "".join(pieces)
            finish = "length" if len(pieces) >= count else "stop"
            choice = (
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": finish,
                }
                if chat
                else {"index": 0, "text": text, "finish_reason": finish}
            )
            return _json({**base, "object": kind, "choices": [choice], "usage": usage(len(pieces))})

        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        chunk_kind = kind + ".chunk" if chat else kind

        async def send(choices: list[dict[str, Any]], extra: dict[str, Any] | None = None) -> None:
            event = {**base, "object": chunk_kind, "choices": choices, **(extra or {})}
            await response.write(b"data: " + orjson.dumps(event) + b"\n\n")

        produced = 0
        async for piece in self._produce(prompt, count):
            delta = {"role": "assistant", "content": piece} if chat else None
            choice = (
                {"index": 0, "delta": delta, "finish_reason": None}
                if chat
                else {"index": 0, "text": piece, "finish_reason": None}
            )
            await send([choice])
            produced += 1
        finish = "length" if produced >= count else "stop"
        await send(
            [{"index": 0, "delta": {}, "finish_reason": finish}]
            if chat
            else [{"index": 0, "text": "", "finish_reason": finish}]
        )
        options = body.get("stream_options") or {}
        if options.get("include_usage"):
            await send([], {"usage": usage(produced)})
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def _openai_embeddings(self, request: web.Request) -> web.Response:
        body, model = await self._read_openai(request)
        texts = body.get("input")
        texts = [texts] if isinstance(texts, str) else texts
        if not isinstance(texts, list) or not all(isinstance(text, str) for text in texts):
            raise _openai_error(400, "invalid_request_error", "invalid input type")
        encoding = body.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            raise _openai_error(
                400, "invalid_request_error", f"invalid encoding_format {encoding!r}"
            )
        data = []
        for index, text in enumerate(texts):
            vector = _embedding(text)
            value: Any = vector
            if encoding == "base64":
                value = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            data.append({"object": "embedding", "embedding": value, "index": index})
        tokens = sum(len(text.split()) for text in texts)
        return _json(
            {
                "object": "list",
                "data": data,
                "model": model.name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )

    async def _openai_models(self, request: web.Request) -> web.Response:
        data = [
            {"id": model.name, "object": "model", "created": 1_761_991_200, "owned_by": "library"}
            for model in self.models
        ]
        return _json({"object": "list", "data": data})


def _json(body: dict[str, Any], status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


def _native_error(status: int, message: str) -> web.HTTPException:
    return _status_error(status, orjson.dumps({"error": message}))


def _openai_error(status: int, error_type: str, message: str) -> web.HTTPException:
    body = {"error": {"message": message, "type": error_type, "param": None, "code": None}}
    return _status_error(status, orjson.dumps(body))


_ERRORS_BY_STATUS: dict[int, type[web.HTTPException]] = {
    400: web.HTTPBadRequest,
    404: web.HTTPNotFound,
    503: web.HTTPServiceUnavailable,
}


def _status_error(status: int, body: bytes) -> web.HTTPException:
    return _ERRORS_BY_STATUS[status](text=body.decode(), content_type="application/json")


def _embedding(text: str) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    vector = [(byte - 127.5) / 127.5 for byte in digest[:EMBEDDING_DIMENSIONS]]
    norm = sum(value * value for value in vector) ** 0.5 or 1.0
    return [value / norm for value in vector]


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
