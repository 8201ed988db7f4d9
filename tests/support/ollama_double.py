"""An Ollama server double: the native API and its OpenAI-compatible ``/v1`` layer.

No Ollama binary can be installed where SOLLOL is tested, so Ollama nodes are
tested against this double. Its wire format follows Ollama's documented API:
NDJSON streams whose last line has ``done: true`` and the duration counters
in integer nanoseconds, errors as ``{"error": "<text>"}``, and on ``/v1`` the
OpenAI shapes (SSE with ``data: [DONE]``, ``system_fingerprint: "fp_ollama"``).
The test suite checks it with the real ``ollama`` client and the OpenAI SDK.

Replies are deterministic: words picked by a hash of the prompt, one word per
token. The prompt is evaluated at ``prompt_tokens_per_s`` (one token per
word) and the reply produced at ``tokens_per_s``. Models load, queue and
unload as ``ModelScheduler`` describes, and ``faults`` injects failures.
"""

import asyncio
import hashlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from .ollama_double_openai import OpenAILayer
from .ollama_double_reply import (
    DEFAULT_PREDICT,
    EMBEDDING_DIMENSIONS,
    InjectedError,
    LazyStream,
    Timings,
    collect_text,
    embedding,
    json_response,
    native_error,
    now_rfc3339,
    openai_error,
    reset_after_delivery,
    reset_connection,
    timestamp_rfc3339,
)
from .ollama_double_state import (
    BUSY_MESSAGE,
    DEFAULT_KEEP_ALIVE_S,
    DoubleModel,
    Faults,
    ModelScheduler,
    ServerBusyError,
    parse_keep_alive,
)
from .threaded_server import ThreadedServer

__all__ = ["EMBEDDING_DIMENSIONS", "DoubleModel", "Faults", "OllamaDouble"]

VERSION = "0.12.6"
WORDS = ("alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa")


@dataclass(eq=False)
class OllamaDouble(OpenAILayer, ThreadedServer):
    """An Ollama server on 127.0.0.1; keyword arguments mirror Ollama's settings.

    ``parallel`` is OLLAMA_NUM_PARALLEL (slots per loaded model), ``max_queue``
    is OLLAMA_MAX_QUEUE (requests that may wait, across all models) and
    ``max_loaded_models`` is OLLAMA_MAX_LOADED_MODELS. ``memory_bytes``, if
    set, also caps the total size of the loaded models. ``eviction`` picks
    the idle model that makes room: "lru" or Ollama's own rule, "ollama". ``preloaded`` names
    the models in memory at start. ``faults`` may be replaced while the
    double runs. Each request reads it once, so no request mixes two settings.

    Counters readable from any thread: ``active`` (POST handlers still
    running; it falls when a client disconnects), ``in_flight``, ``queued``,
    ``max_seen_in_flight`` and ``requests`` (path and body of each request).
    """

    models: list[DoubleModel] = field(default_factory=lambda: [DoubleModel("llama3.2:latest")])
    tokens_per_s: float = 500.0
    requests: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    prompt_tokens_per_s: float = 10_000.0
    preloaded: list[str] = field(default_factory=list)
    parallel: int = 1
    max_queue: int = 512
    max_loaded_models: int | None = None
    memory_bytes: int | None = None
    eviction: str = "lru"
    faults: Faults = field(default_factory=Faults)

    def __post_init__(self) -> None:
        ThreadedServer.__init__(self)
        self.scheduler = ModelScheduler(
            parallel=self.parallel,
            max_queue=self.max_queue,
            max_loaded_models=self.max_loaded_models,
            memory_bytes=self.memory_bytes,
            eviction=self.eviction,
        )
        for name in self.preloaded:
            model = self._model(name)
            if model is None:
                raise ValueError(f"preloaded model {name!r} is not in models")
            self.scheduler.preload(model)
        # POST requests whose handler still runs, by id() because aiohttp
        # requests are not hashable.
        self._open_requests: dict[int, web.Request] = {}

    @property
    def active(self) -> int:
        return len(self._open_requests)

    @property
    def in_flight(self) -> int:
        return self.scheduler.in_flight

    @property
    def queued(self) -> int:
        return self.scheduler.queued

    @property
    def max_seen_in_flight(self) -> int:
        return self.scheduler.max_seen_in_flight

    def stop(self) -> None:
        # A stopped server drops the connections it still serves; otherwise
        # aiohttp's shutdown would wait for stalled replies to end.
        if self._loop is None or self._loop.is_closed():
            return
        self._loop.call_soon_threadsafe(self._reset_open_requests)
        super().stop()

    def _reset_open_requests(self) -> None:
        for request in list(self._open_requests.values()):
            reset_connection(request)

    def make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._count_active])
        app.router.add_get("/", self._root)
        app.router.add_get("/api/version", self._version)
        app.router.add_get("/api/tags", self._tags)
        app.router.add_get("/api/ps", self._ps)
        app.router.add_post("/api/show", self._show)
        app.router.add_post("/api/chat", self._native_chat)
        app.router.add_post("/api/generate", self._native_generate)
        app.router.add_post("/api/embed", self._native_embed)
        app.router.add_post("/v1/chat/completions", self._openai_chat)
        app.router.add_post("/v1/completions", self._openai_completions)
        app.router.add_post("/v1/embeddings", self._openai_embeddings)
        app.router.add_get("/v1/models", self._openai_models)
        return app

    @web.middleware
    async def _count_active(
        self,
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        if request.method != "POST":
            return await handler(request)
        self._open_requests[id(request)] = request
        try:
            return await handler(request)
        finally:
            del self._open_requests[id(request)]

    # -- helpers ---------------------------------------------------------

    def _model(self, name: str) -> DoubleModel | None:
        return next((model for model in self.models if model.name == name), None)

    async def _read(self, request: web.Request) -> dict[str, Any]:
        raw = await request.read()
        if not raw:
            raise native_error(400, "missing request body")
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise native_error(400, str(exc)) from None
        if not isinstance(body, dict):
            raise native_error(400, "json: cannot unmarshal into Go value of type api.Request")
        self.requests.append((request.path, body))
        return body

    def _words(self, prompt: str, count: int) -> list[str]:
        digest = hashlib.sha256(prompt.encode()).digest()
        return [WORDS[digest[i % len(digest)] % len(WORDS)] for i in range(count)]

    @asynccontextmanager
    async def _scheduled(
        self,
        model: DoubleModel,
        keep_alive_s: float,
        faults: Faults,
        *,
        openai: bool,
        slot: bool = True,
    ) -> AsyncIterator[int]:
        """Hold ``model`` and a slot for one request, and yield the load wait in nanoseconds."""
        try:
            if faults.busy_503:
                raise ServerBusyError(BUSY_MESSAGE)
            async with self.scheduler.use(model, keep_alive_s, slot=slot) as load_ns:
                yield load_ns
        except ServerBusyError:
            if openai:
                raise openai_error(503, "api_error", BUSY_MESSAGE) from None
            raise native_error(503, BUSY_MESSAGE) from None

    async def _generate(
        self,
        request: web.Request,
        model: DoubleModel,
        prompt: str,
        timings: Timings,
        keep_alive_s: float = DEFAULT_KEEP_ALIVE_S,
        *,
        openai: bool,
    ) -> AsyncGenerator[str, None]:
        """Yield reply pieces and fill ``timings``, injecting the faults set at the start."""
        faults = self.faults
        async with self._scheduled(model, keep_alive_s, faults, openai=openai) as load_ns:
            timings.load_ns = load_ns
            prompt_started = time.perf_counter_ns()
            await asyncio.sleep(timings.prompt_tokens / self.prompt_tokens_per_s)
            eval_started = time.perf_counter_ns()
            timings.prompt_eval_ns = eval_started - prompt_started
            fault = faults.first_piece_fault()
            strike_at = min(fault[1], timings.max_tokens) if fault else None
            for index, word in enumerate(self._words(prompt, timings.max_tokens)):
                if index == strike_at:
                    break
                await asyncio.sleep(1.0 / self.tokens_per_s)
                timings.produced += 1
                timings.eval_ns = time.perf_counter_ns() - eval_started
                yield word if index == 0 else " " + word
            if fault is not None:
                await self._strike(request, fault[0], timings.produced)

    async def _strike(self, request: web.Request, fault: str, produced: int) -> None:
        if fault == "error_mid_stream":
            raise InjectedError(f"model runner failed after {produced} pieces (injected fault)")
        if fault == "reset_after":
            await reset_after_delivery(request)
        # The slot stays taken, as by a hung runner, until the client leaves
        # and aiohttp cancels this handler.
        await asyncio.Event().wait()

    # -- native API ------------------------------------------------------

    async def _root(self, request: web.Request) -> web.Response:
        return web.Response(text="Ollama is running")

    async def _version(self, request: web.Request) -> web.Response:
        return json_response({"version": VERSION})

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
        return json_response({"models": entries})

    async def _ps(self, request: web.Request) -> web.Response:
        now = time.time()
        # Ollama lists the model that expires last first.
        loaded = sorted(self.scheduler.loaded(), key=lambda e: e.expires_at(now), reverse=True)
        entries = [
            {
                "name": entry.model.name,
                "model": entry.model.name,
                "size": entry.model.size_bytes,
                "digest": entry.model.digest,
                "details": entry.model.details(),
                "expires_at": timestamp_rfc3339(entry.expires_at(now)),
                "size_vram": entry.size_vram_bytes,
                "context_length": entry.model.context_length,
            }
            for entry in loaded
        ]
        return json_response({"models": entries})

    async def _show(self, request: web.Request) -> web.Response:
        body = await self._read(request)
        # Ollama still accepts the old key "name" here.
        body.setdefault("model", body.get("name"))
        model = self._require_native_model(body, not_found="model '{}' not found")
        return json_response(
            {
                "modelfile": f"FROM {model.name}\n",
                "parameters": "",
                "template": "{{ .Prompt }}",
                "details": model.details(),
                "model_info": {
                    "general.architecture": model.family,
                    f"{model.family}.context_length": model.context_length,
                },
                "capabilities": ["completion"],
                "modified_at": "2026-11-01T10:00:00.000000000Z",
            }
        )

    async def _native_chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._read(request)
        model = self._require_native_model(body, not_found="model '{}' not found")
        messages = body.get("messages") or []
        prompt = " ".join(str(m.get("content", "")) for m in messages)
        return await self._native_reply(
            request, body, model, prompt, chat=True, load_only=not messages
        )

    async def _native_generate(self, request: web.Request) -> web.StreamResponse:
        body = await self._read(request)
        model = self._require_native_model(body, not_found="model '{}' not found")
        prompt = str(body.get("prompt") or "")
        return await self._native_reply(
            request, body, model, prompt, chat=False, load_only=not prompt
        )

    def _require_native_model(self, body: dict[str, Any], *, not_found: str) -> DoubleModel:
        name = body.get("model")
        if not name:
            raise native_error(400, "model is required")
        model = self._model(str(name))
        if model is None:
            raise native_error(404, not_found.format(name))
        return model

    def _native_keep_alive(self, body: dict[str, Any]) -> float:
        try:
            return parse_keep_alive(body.get("keep_alive"))
        except ValueError as exc:
            raise native_error(400, str(exc)) from None

    async def _native_reply(
        self,
        request: web.Request,
        body: dict[str, Any],
        model: DoubleModel,
        prompt: str,
        *,
        chat: bool,
        load_only: bool,
    ) -> web.StreamResponse:
        keep_alive_s = self._native_keep_alive(body)

        def piece_line(text: str, done: bool) -> dict[str, Any]:
            line: dict[str, Any] = {"model": model.name, "created_at": now_rfc3339()}
            if chat:
                line["message"] = {"role": "assistant", "content": text}
            else:
                line["response"] = text
            line["done"] = done
            return line

        if load_only:
            reason = await self._load_or_unload(model, keep_alive_s)
            return json_response({**piece_line("", True), "done_reason": reason})

        options = body.get("options") or {}
        count = int(options.get("num_predict", DEFAULT_PREDICT))
        if count < 0:
            count = DEFAULT_PREDICT
        timings = Timings(prompt_tokens=max(1, len(prompt.split())), max_tokens=count)
        pieces = self._generate(request, model, prompt, timings, keep_alive_s, openai=False)

        def final_line(text: str) -> dict[str, Any]:
            line = piece_line(text, True)
            line.update(done_reason=timings.done_reason, **timings.metrics())
            return line

        if body.get("stream") is False:
            text = await collect_text(pieces, openai=False)
            return json_response(final_line(text))

        stream = LazyStream(request, "application/x-ndjson")
        try:
            async with aclosing(pieces):
                async for piece in pieces:
                    await stream.write(orjson.dumps(piece_line(piece, False)) + b"\n")
        except InjectedError as exc:
            if not stream.started:
                raise native_error(500, str(exc)) from None
            # Ollama reports an error after the first byte as a last line
            # {"error": "..."}, and the status stays 200.
            await stream.write(orjson.dumps({"error": str(exc)}) + b"\n")
            return await stream.finish()
        await stream.write(orjson.dumps(final_line("")) + b"\n")
        return await stream.finish()

    async def _load_or_unload(self, model: DoubleModel, keep_alive_s: float) -> str:
        """Load ``model``, or unload it if ``keep_alive_s`` is 0, and return the done_reason.

        Ollama does this for a request with no prompt or messages, and
        replies with one JSON object even when streaming.
        """
        if keep_alive_s == 0:
            self.scheduler.expire_now(model.name)
            return "unload"
        async with self._scheduled(model, keep_alive_s, self.faults, openai=False, slot=False):
            return "load"

    async def _native_embed(self, request: web.Request) -> web.Response:
        body = await self._read(request)
        model = self._require_native_model(
            body, not_found='model "{}" not found, try pulling it first'
        )
        keep_alive_s = self._native_keep_alive(body)
        texts = body.get("input")
        texts = [texts] if isinstance(texts, str) else texts or []
        if not all(isinstance(text, str) for text in texts):
            raise native_error(400, "invalid input type")
        started_ns = time.perf_counter_ns()
        async with self._scheduled(model, keep_alive_s, self.faults, openai=False) as load_ns:
            embeddings = [embedding(text) for text in texts]
        return json_response(
            {
                "model": model.name,
                "embeddings": embeddings,
                "total_duration": time.perf_counter_ns() - started_ns,
                "load_duration": load_ns,
                "prompt_eval_count": sum(len(text.split()) for text in texts),
            }
        )
