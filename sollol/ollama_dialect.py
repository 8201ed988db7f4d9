"""The dialects of Ollama's native API: what each node kind is sent, and the replies put back.

An Ollama node gets the request unchanged on its own ``/api/...`` route; any
other node gets it translated to the OpenAI API (``sollol.ollama_wire``).
Streams come back as NDJSON lines: an Ollama node's own, or lines built from
the OpenAI chunks, then a last line with ``done: true`` and Ollama's counters.
"""

from typing import TYPE_CHECKING, Any

import orjson

from .cluster import Node
from .config import NodeKind
from .dialects import Dialect, Plan, Translator, own_model_body
from .errors import InvalidRequestError
from .ollama_wire import (
    ReplyBuilder,
    chat_request,
    embed_request,
    embeddings_from_openai,
    generate_request,
    ndjson,
    normalized,
)
from .sse import Event

if TYPE_CHECKING:
    from .history import RequestRecord
    from .proxy import Opened, ProxyRequest

NDJSON_MEDIA_TYPE = "application/x-ndjson"


class OllamaDialect(Dialect):
    """``/api/chat`` (``chat`` True) or ``/api/generate``."""

    media_type = NDJSON_MEDIA_TYPE
    # NDJSON has no comment line, and an empty line breaks clients that parse
    # every line, so a long wait sends nothing.
    keepalive = None

    def __init__(self, *, chat: bool) -> None:
        self.chat = chat
        self.native_route = "/api/chat" if chat else "/api/generate"

    def plan(self, request: "ProxyRequest", node: Node) -> Plan:
        body = own_model_body(request, node)
        if node.kind is NodeKind.OLLAMA:
            return Plan(self.native_route, orjson.dumps(body), ndjson=True)
        model = body.get("model", request.model)
        if self.chat:
            return Plan("/v1/chat/completions", orjson.dumps(chat_request(body, model)))
        route, translated = generate_request(body, model)
        return Plan(route, orjson.dumps(translated))

    def whole(
        self, opened: "Opened", request: "ProxyRequest", record: "RequestRecord", started: float
    ) -> bytes:
        reply = _json_object(opened.body)
        if opened.node.kind is NodeKind.OLLAMA:
            record.read_ollama_counts(reply)
            reply["model"] = request.client_model
            return orjson.dumps(reply)
        record.read_usage(reply)
        builder = ReplyBuilder(model=request.client_model, chat=self.chat, started=started)
        return orjson.dumps(builder.whole(reply))

    def translator(
        self, opened: "Opened", request: "ProxyRequest", record: "RequestRecord", started: float
    ) -> Translator:
        if opened.node.kind is NodeKind.OLLAMA:
            return NativeStream(request, record)
        builder = ReplyBuilder(model=request.client_model, chat=self.chat, started=started)
        return TranslatedStream(request, record, builder)

    def error_frame(self, message: str, error_type: str) -> bytes:
        # Ollama ends a failed stream with a line holding only "error".
        return ndjson({"error": message})


class NativeStream(Translator):
    """An Ollama node's own NDJSON stream: ``model`` rewritten, counters read."""

    def rewrite(self, event: Event) -> bytes | None:
        line = _json_object(event.data or b"")
        if "error" in line:
            self.failed(str(line["error"]))
            return event.raw
        if line.get("done"):
            self.record.read_ollama_counts(line)
        elif _text_of(line):
            self.content_chunks += 1
        if "model" in line:
            line["model"] = self.request.client_model
        return ndjson(line)


class TranslatedStream(Translator):
    """An OpenAI SSE stream from a llama-server node, as Ollama NDJSON lines."""

    def __init__(self, request: "ProxyRequest", record: "RequestRecord", builder: ReplyBuilder):
        super().__init__(request, record)
        self.builder = builder
        self.ended = False

    def rewrite(self, event: Event) -> bytes | None:
        data = event.data
        if data is None:
            return None
        if data == b"[DONE]":
            self.ended = True
            return None
        chunk = _json_object(data)
        if "error" in chunk:
            error = chunk["error"]
            message = str(error.get("message") if isinstance(error, dict) else error)
            self.failed(message)
            return ndjson({"error": message})
        self.record.read_usage(chunk)
        line = self.builder.piece(chunk)
        if line is None:
            return None
        self.content_chunks += 1
        return ndjson(line)

    def tail(self) -> bytes:
        # The last line carries the counters; only a stream the node finished
        # gets one, so a cut stream never looks complete.
        if not self.ended or self.record.outcome == "error":
            return b""
        return ndjson(self.builder.final())


class EmbedDialect(Dialect):
    """``/api/embed`` (normalised vectors) or the legacy ``/api/embeddings``."""

    def __init__(self, *, legacy: bool) -> None:
        self.legacy = legacy

    def plan(self, request: "ProxyRequest", node: Node) -> Plan:
        body = own_model_body(request, node)
        if node.kind is NodeKind.OLLAMA:
            route = "/api/embeddings" if self.legacy else "/api/embed"
            return Plan(route, orjson.dumps(body))
        texts = [body.get("prompt") or ""] if self.legacy else embed_texts(body)
        return Plan("/v1/embeddings", orjson.dumps(embed_request(texts, body["model"])))

    def whole(
        self, opened: "Opened", request: "ProxyRequest", record: "RequestRecord", started: float
    ) -> bytes:
        reply = _json_object(opened.body)
        if opened.node.kind is NodeKind.OLLAMA:
            record.read_ollama_counts(reply)
            if "model" in reply:
                reply["model"] = request.client_model
            return orjson.dumps(reply)
        record.read_usage(reply)
        vectors = embeddings_from_openai(reply)
        if self.legacy:
            # The legacy route returns the vector as computed, not normalised.
            return orjson.dumps({"embedding": vectors[0] if vectors else []})
        dimensions = request.body.get("dimensions")
        dimensions = dimensions if isinstance(dimensions, int) and dimensions > 0 else None
        return orjson.dumps(
            {
                "model": request.client_model,
                "embeddings": [normalized(vector, dimensions) for vector in vectors],
                "prompt_eval_count": record.prompt_tokens or 0,
            }
        )


CHAT = OllamaDialect(chat=True)
GENERATE = OllamaDialect(chat=False)
EMBED = EmbedDialect(legacy=False)
EMBEDDINGS_LEGACY = EmbedDialect(legacy=True)


def embed_texts(body: dict[str, Any]) -> list[str]:
    value = body.get("input")
    if value is None or value == "":
        return []
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not all(isinstance(text, str) for text in texts):
        raise InvalidRequestError("invalid input type")
    return texts


def _text_of(line: dict[str, Any]) -> str:
    message = line.get("message")
    if isinstance(message, dict):
        return str(message.get("content") or "")
    return str(line.get("response") or "")


def _json_object(data: bytes) -> dict[str, Any]:
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}
