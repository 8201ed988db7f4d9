"""An OpenAI-compatible node that misbehaves on purpose, for failover and timeout tests.

It answers ``/v1/models`` (so the router's probes find it healthy) and serves
``/v1/chat/completions`` according to ``fault``:

    none          a normal reply: a few tokens, then ``data: [DONE]`` when streaming
    silent        reads the request and never answers
    http_500      answers 500 with an OpenAI error body
    error_first   answers 200, then an error event before any token
    reset_before  sends the 200 headers, then resets the connection
    reset_after   sends ``events_before_fault`` tokens, then resets the connection
    stall_after   sends ``events_before_fault`` tokens, then goes silent
    slow          sends ``tokens`` tokens, ``token_interval_s`` apart

``fault`` may be changed while the node runs. ``hits`` counts chat requests;
``active`` is the number of chat requests whose handler is still running,
which falls when the router closes the connection.
"""

import asyncio
import threading
import time
from typing import Any

import orjson
from aiohttp import web

from .ollama_double_reply import reset_after_delivery, reset_connection
from .threaded_server import ThreadedServer

FAULTS = (
    "none",
    "silent",
    "http_500",
    "error_first",
    "reset_before",
    "reset_after",
    "stall_after",
    "slow",
)


class FaultyNode(ThreadedServer):
    def __init__(
        self,
        fault: str = "none",
        *,
        model: str = "tiny",
        tokens: int = 4,
        events_before_fault: int = 2,
        token_interval_s: float = 0.0,
    ) -> None:
        super().__init__()
        self.fault = fault
        self.model = model
        self.tokens = tokens
        self.events_before_fault = events_before_fault
        self.token_interval_s = token_interval_s
        self.hits = 0
        self.active = 0
        self._lock = threading.Lock()

    @property
    def fault(self) -> str:
        return self._fault

    @fault.setter
    def fault(self, value: str) -> None:
        if value not in FAULTS:
            raise ValueError(f"unknown fault {value!r}; expected one of {FAULTS}")
        self._fault = value

    def make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._chat)
        return app

    async def _models(self, request: web.Request) -> web.Response:
        body = {"object": "list", "data": [{"id": self.model, "object": "model"}]}
        return web.json_response(body, dumps=lambda value: orjson.dumps(value).decode())

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        with self._lock:
            self.hits += 1
            self.active += 1
        try:
            return await self._reply(request, body)
        finally:
            with self._lock:
                self.active -= 1

    async def _reply(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        fault = self.fault
        if fault == "silent":
            await asyncio.sleep(3600)
        if fault == "http_500":
            error = {"error": {"message": "injected failure", "type": "server_error"}}
            return web.Response(
                status=500, body=orjson.dumps(error), content_type="application/json"
            )
        if not body.get("stream"):
            return web.Response(
                body=orjson.dumps(self._completion()), content_type="application/json"
            )

        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        if fault == "error_first":
            error = {"error": {"message": "injected error before the first token"}}
            await response.write(b"data: " + orjson.dumps(error) + b"\n\n")
            await response.write_eof()
            return response
        if fault == "reset_before":
            reset_connection(request)
            return response

        count = self.tokens
        if fault in ("reset_after", "stall_after"):
            count = self.events_before_fault
        for index in range(count):
            if index and self.token_interval_s:
                await asyncio.sleep(self.token_interval_s)
            await response.write(b"data: " + orjson.dumps(self._chunk(f"t{index} ")) + b"\n\n")
        if fault == "reset_after":
            await reset_after_delivery(request)
            return response
        if fault == "stall_after":
            await asyncio.sleep(3600)
        await response.write(b"data: " + orjson.dumps(self._chunk(None, "stop")) + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    def _chunk(self, content: str | None, finish_reason: str | None = None) -> dict[str, Any]:
        delta = {} if content is None else {"content": content}
        return {
            "id": "chatcmpl-faulty",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        }

    def _completion(self) -> dict[str, Any]:
        text = "".join(f"t{index} " for index in range(self.tokens))
        return {
            "id": "chatcmpl-faulty",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": 3,
                "completion_tokens": self.tokens,
                "total_tokens": 3 + self.tokens,
            },
        }
