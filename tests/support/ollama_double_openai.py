"""The OpenAI-compatible ``/v1`` layer of the Ollama double.

Ollama serves it beside its native API: the same models and scheduler, with
OpenAI's request fields, reply shapes and error bodies. ``stream`` defaults to
false here, and ``max_tokens`` plays the part of ``num_predict``.
"""

import base64
import struct
import time
from contextlib import aclosing
from typing import Any

import orjson
from aiohttp import web

from .ollama_double_reply import (
    DEFAULT_PREDICT,
    InjectedError,
    LazyStream,
    Timings,
    collect_text,
    embedding,
    json_response,
    openai_error,
)
from .ollama_double_state import DEFAULT_KEEP_ALIVE_S, DoubleModel, Faults


class OpenAILayer:
    """Handlers of ``/v1``, mixed into the double.

    They use the double's ``_read``, ``_model``, ``_scheduled`` and
    ``_generate``, which the native API shares.
    """

    models: list[DoubleModel]
    requests: list[tuple[str, dict[str, Any]]]
    faults: Faults

    async def _read_openai(self, request: web.Request) -> tuple[dict[str, Any], DoubleModel]:
        try:
            body = await self._read(request)
        except web.HTTPException as exc:
            raise openai_error(400, "invalid_request_error", exc.text or "invalid body") from None
        model = self._model(str(body.get("model")))
        if model is None:
            raise openai_error(404, "not_found_error", f'model "{body.get("model")}" not found')
        return body, model

    async def _openai_chat(self, request: web.Request) -> web.StreamResponse:
        body, model = await self._read_openai(request)
        messages = body.get("messages") or []
        if not messages:
            raise openai_error(400, "invalid_request_error", "[] is too short - 'messages'")
        prompt = " ".join(str(m.get("content", "")) for m in messages)
        return await self._openai_reply(request, body, model, prompt, chat=True)

    async def _openai_completions(self, request: web.Request) -> web.StreamResponse:
        body, model = await self._read_openai(request)
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise openai_error(400, "invalid_request_error", "prompt must be a string")
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
        timings = Timings(prompt_tokens=max(1, len(prompt.split())), max_tokens=count)
        pieces = self._generate(request, model, prompt, timings, openai=True)
        reply_id = ("chatcmpl-" if chat else "cmpl-") + str(len(self.requests) % 999)
        kind = "chat.completion" if chat else "text_completion"
        base = {
            "id": reply_id,
            "created": int(time.time()),
            "model": model.name,
            "system_fingerprint": "fp_ollama",
        }

        def usage() -> dict[str, int]:
            return {
                "prompt_tokens": timings.prompt_tokens,
                "completion_tokens": timings.produced,
                "total_tokens": timings.prompt_tokens + timings.produced,
            }

        if not body.get("stream"):
            text = await collect_text(pieces, openai=True)
            finish = timings.done_reason
            choice = (
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": finish,
                }
                if chat
                else {"index": 0, "text": text, "finish_reason": finish}
            )
            return json_response({**base, "object": kind, "choices": [choice], "usage": usage()})

        stream = LazyStream(request, "text/event-stream")
        chunk_kind = kind + ".chunk" if chat else kind

        async def send(choices: list[dict[str, Any]], extra: dict[str, Any] | None = None) -> None:
            event = {**base, "object": chunk_kind, "choices": choices, **(extra or {})}
            await stream.write(b"data: " + orjson.dumps(event) + b"\n\n")

        try:
            async with aclosing(pieces):
                async for piece in pieces:
                    delta = {"role": "assistant", "content": piece} if chat else None
                    choice = (
                        {"index": 0, "delta": delta, "finish_reason": None}
                        if chat
                        else {"index": 0, "text": piece, "finish_reason": None}
                    )
                    await send([choice])
        except InjectedError as exc:
            if not stream.started:
                raise openai_error(500, "api_error", str(exc)) from None
            # NOTE: Ollama's /v1 layer (middleware/openai.go) decodes every
            # native line as a reply chunk. So a real server may send no such
            # error event where this double does. The OpenAI SDK raises
            # APIError on it.
            error = {"message": str(exc), "type": "api_error", "param": None, "code": None}
            await stream.write(b"data: " + orjson.dumps({"error": error}) + b"\n\n")
            return await stream.finish()
        finish = timings.done_reason
        await send(
            [{"index": 0, "delta": {}, "finish_reason": finish}]
            if chat
            else [{"index": 0, "text": "", "finish_reason": finish}]
        )
        options = body.get("stream_options") or {}
        if options.get("include_usage"):
            await send([], {"usage": usage()})
        await stream.write(b"data: [DONE]\n\n")
        return await stream.finish()

    async def _openai_embeddings(self, request: web.Request) -> web.Response:
        body, model = await self._read_openai(request)
        texts = body.get("input")
        texts = [texts] if isinstance(texts, str) else texts
        if not isinstance(texts, list) or not all(isinstance(text, str) for text in texts):
            raise openai_error(400, "invalid_request_error", "invalid input type")
        encoding = body.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            raise openai_error(
                400, "invalid_request_error", f"invalid encoding_format {encoding!r}"
            )
        async with self._scheduled(model, DEFAULT_KEEP_ALIVE_S, self.faults, openai=True):
            vectors = [embedding(text) for text in texts]
        data = []
        for index, vector in enumerate(vectors):
            value: Any = vector
            if encoding == "base64":
                value = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            data.append({"object": "embedding", "embedding": value, "index": index})
        tokens = sum(len(text.split()) for text in texts)
        return json_response(
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
        return json_response({"object": "list", "data": data})
