"""Dialects: how one client API asks a node, and how the node's reply is put back.

The proxy and the stream relay are the same for every client API; a dialect
supplies the parts that differ:

* ``plan``: the route and body to send to a given node, and whether its
  stream comes as SSE or as newline-delimited JSON;
* ``whole``: the client's body for a non-streamed reply;
* ``translator``: a per-stream object that turns each upstream event into
  bytes for the client (or drops it) and says what ends the stream;
* the stream's media type, keep-alive line and in-band error frame.

``OPENAI`` serves the OpenAI API to every node kind (Ollama nodes on their
``/v1`` layer); ``sollol.ollama_api`` adds Ollama's native API.
"""

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from .errors import openai_error_body
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
    """The client's body with ``model`` in the node's own spelling (``llama3.2:latest``)."""
    body = request.body
    own_name = node.own_names.get(request.model)
    if own_name is not None and own_name != body.get("model"):
        body = {**body, "model": own_name}
    return body


class OpenAIDialect(Dialect):
    def plan(self, request: "ProxyRequest", node: "Node") -> Plan:
        body = own_model_body(request, node)
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
        record.read_usage(reply)
        if "model" in reply:
            reply["model"] = request.client_model
        return orjson.dumps(reply)

    def translator(
        self, opened: "Opened", request: "ProxyRequest", record: "RequestRecord", started: float
    ) -> Translator:
        return OpenAIStream(request, record)


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
