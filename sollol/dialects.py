"""Dialects: how one client API sends a request to a node, and how the reply is put back.

The proxy and the stream relay are the same for every client API; a dialect
supplies the parts that differ:

* ``plan``: the route and body to send to a given node, and whether its
  stream comes as SSE or as newline-delimited JSON;
* ``whole``: the client's body for a non-streamed reply;
* ``translator``: a per-stream object that turns each upstream event into
  bytes for the client (or drops it) and says what ends the stream;
* the stream's media type, keep-alive line and in-band error frame.

``OPENAI`` serves the OpenAI API to every node kind (to Ollama nodes on their
native API, see ``sollol.ollama_native``); ``sollol.ollama_api`` adds Ollama's
native API for clients.
"""

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from .config import NodeKind
from .errors import openai_error_body
from .ollama_native import OpenAIReplyBuilder, native_request, native_route, openai_embeddings
from .sse import Event

if TYPE_CHECKING:
    from .cluster import Node
    from .history import RequestRecord
    from .proxy import Opened, ProxyRequest

log = logging.getLogger(__name__)

_DONE_EVENT = b"data: [DONE]\n\n"


@dataclass(frozen=True, slots=True)
class Plan:
    route: str
    payload: bytes
    ndjson: bool = False  # the node streams NDJSON (Ollama's native API), not SSE


class Translator:
    """Turns one stream's upstream events into the client's bytes."""

    def __init__(self, request: "ProxyRequest", record: "RequestRecord") -> None:
        self.request = request
        self.record = record
        # Chunks that carried generated text; nodes send one token per chunk,
        # so this is the completion's length so far when no usage arrives.
        self.content_chunks = 0

    def rewrite(self, event: Event) -> bytes | None:
        raise NotImplementedError

    def tail(self) -> bytes:
        """Bytes to send after the node's stream ended normally."""
        return b""

    def failed(self, message: str) -> None:
        self.record.outcome = "error"
        self.record.error = message[:512]
        self.record.error_kind = "upstream_error"


class Dialect:
    media_type = "text/event-stream"
    keepalive: bytes | None = b": keep-alive\n\n"

    def plan(self, request: "ProxyRequest", node: "Node") -> Plan:
        raise NotImplementedError

    def whole(
        self, opened: "Opened", request: "ProxyRequest", record: "RequestRecord", started: float
    ) -> bytes:
        raise NotImplementedError

    def translator(
        self, opened: "Opened", request: "ProxyRequest", record: "RequestRecord", started: float
    ) -> Translator:
        raise NotImplementedError

    def error_frame(self, message: str, error_type: str) -> bytes:
        return b"data: " + openai_error_body(message, error_type) + b"\n\n"


def own_model_body(request: "ProxyRequest", node: "Node") -> dict[str, Any]:
    """Return the client's body with ``model`` in the node's own spelling (``llama3.2:latest``)."""
    body = request.body
    own_name = node.own_names.get(request.model)
    if own_name is not None and own_name != body.get("model"):
        body = {**body, "model": own_name}
    return body


class OpenAIDialect(Dialect):
    def plan(self, request: "ProxyRequest", node: "Node") -> Plan:
        body = own_model_body(request, node)
        if node.kind is NodeKind.OLLAMA:
            native = native_request(request.route, body, body.get("model", request.model))
            return Plan(native_route(request.route), orjson.dumps(native), ndjson=request.stream)
        if request.stream and not request.client_wants_usage:
            # Ask for usage on every stream so the history has token counts; the
            # extra usage chunk is dropped before it reaches the client.
            options = body.get("stream_options")
            options = dict(options) if isinstance(options, dict) else {}
            options["include_usage"] = True
            body = {**body, "stream_options": options}
        return Plan(request.route, orjson.dumps(body))

    def whole(
        self, opened: "Opened", request: "ProxyRequest", record: "RequestRecord", started: float
    ) -> bytes:
        try:
            reply = orjson.loads(opened.body)
        except orjson.JSONDecodeError:
            # NOTE: forwarded unchanged, so `model` keeps the node's own name.
            log.warning("node %s sent a reply that is not JSON", record.node)
            return opened.body
        if not isinstance(reply, dict):
            return opened.body
        if opened.node.kind is NodeKind.OLLAMA:
            return orjson.dumps(_from_native(reply, request, record))
        record.read_usage(reply)
        if "model" in reply:
            reply["model"] = request.client_model
        return orjson.dumps(reply)

    def translator(
        self, opened: "Opened", request: "ProxyRequest", record: "RequestRecord", started: float
    ) -> Translator:
        if opened.node.kind is NodeKind.OLLAMA:
            builder = OpenAIReplyBuilder(
                model=request.client_model,
                chat=request.route == "/v1/chat/completions",
                include_usage=request.client_wants_usage,
            )
            return NativeToOpenAIStream(request, record, builder)
        return OpenAIStream(request, record)


def _from_native(
    reply: dict[str, Any], request: "ProxyRequest", record: "RequestRecord"
) -> dict[str, Any]:
    """Turn an Ollama node's whole native reply into the OpenAI reply the client asked for."""
    record.read_ollama_counts(reply)
    if request.route == "/v1/embeddings":
        encoding = request.body.get("encoding_format")
        return openai_embeddings(reply, model=request.client_model, encoding=encoding)
    builder = OpenAIReplyBuilder(
        model=request.client_model,
        chat=request.route == "/v1/chat/completions",
        include_usage=False,
    )
    return builder.whole(reply)


class NativeToOpenAIStream(Translator):
    """An Ollama node's NDJSON stream, as OpenAI SSE chunks ending in ``data: [DONE]``."""

    def __init__(
        self, request: "ProxyRequest", record: "RequestRecord", builder: OpenAIReplyBuilder
    ) -> None:
        super().__init__(request, record)
        self.builder = builder

    def rewrite(self, event: Event) -> bytes | None:
        try:
            line = orjson.loads(event.data or b"")
        except orjson.JSONDecodeError:
            return None
        if not isinstance(line, dict):
            return None
        if "error" in line:
            # Ollama ends a failed stream with a line holding only "error".
            self.failed(str(line["error"]))
            return b"data: " + openai_error_body(str(line["error"]), "upstream_error") + b"\n\n"
        if line.get("done"):
            self.record.read_ollama_counts(line)
        chunks = self.builder.chunks(line)
        if any(has_content(chunk["choices"]) for chunk in chunks):
            self.content_chunks += 1
        out = b"".join(b"data: " + orjson.dumps(chunk) + b"\n\n" for chunk in chunks)
        return out + _DONE_EVENT if line.get("done") else out


class OpenAIStream(Translator):
    def rewrite(self, event: Event) -> bytes | None:
        data = event.data
        if data is None:
            return event.raw  # comment lines such as llama-server's keep-alive pings
        if data == b"[DONE]":
            return _DONE_EVENT
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            return event.raw
        if not isinstance(chunk, dict):
            return event.raw
        if "error" in chunk:
            error = chunk["error"]
            message = error.get("message") if isinstance(error, dict) else str(error)
            self.failed(str(message))
            return event.raw
        self.record.read_usage(chunk)
        choices = chunk.get("choices")
        if choices == [] and not self.request.client_wants_usage:
            return None
        if choices and has_content(choices):
            self.content_chunks += 1
        if "model" in chunk:
            chunk["model"] = self.request.client_model
        return b"data: " + orjson.dumps(chunk) + b"\n\n"


def has_content(choices: list[object]) -> bool:
    for choice in choices:
        if isinstance(choice, dict):
            delta = choice.get("delta")
            text = delta.get("content") if isinstance(delta, dict) else choice.get("text")
            if text:
                return True
    return False


OPENAI = OpenAIDialect()
