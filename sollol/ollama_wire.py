"""Translating between Ollama's native API and the OpenAI API that llama-server speaks.

Requests go one way (Ollama → OpenAI), replies the other (OpenAI → Ollama).
Everything here is pure: dicts in, dicts or bytes out.

Field mapping, Ollama request → OpenAI request:

    model                     model (the node's own name)
    messages / prompt+system  messages (``/api/generate`` becomes a chat turn so the
                              model's chat template applies, as in Ollama; with
                              ``raw`` it goes to /v1/completions verbatim)
    images                    image_url content parts with base64 data URLs
    tool_calls[].arguments    a JSON object in Ollama, a JSON string in OpenAI
    tools                     tools (same shape in both)
    format "json" / schema    response_format json_object / json_schema
    options.num_predict       max_tokens (-1, "no limit", is left out)
    options.temperature, top_p, top_k, min_p, typical_p, seed, stop,
    presence_penalty, frequency_penalty, repeat_penalty, repeat_last_n
                              the same names (llama-server reads the non-OpenAI ones)
    stream                    stream, with usage asked for

Not mapped, because llama-server has no per-request equivalent: ``keep_alive``
(a llama-server model stays loaded), ``options.num_ctx`` and the other load
and hardware options (set by llama-server's flags), ``think``, ``suffix``,
``context``, ``template``, ``truncate``, ``shift``, ``logprobs``. They are
dropped, and the reply has no ``context`` array. Ollama nodes get the request
unchanged, so nothing is lost there.
"""

import contextlib
import math
import time
from datetime import UTC, datetime
from typing import Any

import orjson

NS_PER_MS = 1_000_000

# Ollama option -> OpenAI (or llama-server) request field, same meaning.
_SAMPLING_OPTIONS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "typical_p": "typical_p",
    "seed": "seed",
    "stop": "stop",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "repeat_penalty": "repeat_penalty",
    "repeat_last_n": "repeat_last_n",
}
_DONE_REASONS = {"stop": "stop", "length": "length", "tool_calls": "stop"}


def now_rfc3339() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


# -- requests ----------------------------------------------------------------


def chat_request(body: dict[str, Any], model: str) -> dict[str, Any]:
    """Build the /v1/chat/completions body for an Ollama /api/chat request."""
    messages = [_chat_message(message) for message in body.get("messages") or []]
    return _with_common_fields({"model": model, "messages": messages}, body)


def generate_request(body: dict[str, Any], model: str) -> tuple[str, dict[str, Any]]:
    """Return (OpenAI route, body) for an Ollama /api/generate request."""
    prompt = body.get("prompt") or ""
    if body.get("raw"):
        return "/v1/completions", _with_common_fields({"model": model, "prompt": prompt}, body)
    messages: list[dict[str, Any]] = []
    if body.get("system"):
        messages.append({"role": "system", "content": body["system"]})
    messages.append(
        _chat_message({"role": "user", "content": prompt, "images": body.get("images")})
    )
    return "/v1/chat/completions", _with_common_fields({"model": model, "messages": messages}, body)


def embed_request(texts: list[str], model: str) -> dict[str, Any]:
    return {"model": model, "input": texts, "encoding_format": "float"}


def _chat_message(message: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"role": message.get("role", "user")}
    content = message.get("content") or ""
    images = message.get("images")
    if images:
        parts: list[dict[str, Any]] = [{"type": "text", "text": content}] if content else []
        for image in images:
            url = f"data:image/png;base64,{image}"
            parts.append({"type": "image_url", "image_url": {"url": url}})
        out["content"] = parts
    else:
        out["content"] = content
    tool_calls = message.get("tool_calls")
    if tool_calls:
        out["tool_calls"] = [
            openai_tool_call(call, f"call_{index}") for index, call in enumerate(tool_calls)
        ]
    if message.get("tool_call_id"):
        out["tool_call_id"] = message["tool_call_id"]
    elif out["role"] == "tool" and message.get("tool_name"):
        out["name"] = message["tool_name"]
    return out


def openai_tool_call(call: dict[str, Any], fallback_id: str) -> dict[str, Any]:
    """Return an Ollama tool call in OpenAI's shape; ``fallback_id`` when it has no id."""
    function = call.get("function") or {}
    arguments = function.get("arguments", {})
    return {
        "id": call.get("id") or fallback_id,
        "type": "function",
        "function": {
            "name": function.get("name", ""),
            # Ollama sends arguments as an object, OpenAI as a JSON string.
            "arguments": arguments
            if isinstance(arguments, str)
            else orjson.dumps(arguments).decode(),
        },
    }


def _with_common_fields(out: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
    options = body.get("options") or {}
    for name, field in _SAMPLING_OPTIONS.items():
        if name in options:
            out[field] = options[name]
    num_predict = options.get("num_predict")
    if isinstance(num_predict, int) and num_predict >= 0:
        out["max_tokens"] = num_predict
    response_format = _response_format(body.get("format"))
    if response_format is not None:
        out["response_format"] = response_format
    if body.get("tools"):
        out["tools"] = body["tools"]
    stream = body.get("stream", True) is not False  # Ollama streams by default
    out["stream"] = stream
    if stream:
        out["stream_options"] = {"include_usage": True}
    return out


def _response_format(value: Any) -> dict[str, Any] | None:
    if value == "json":
        return {"type": "json_object"}
    if isinstance(value, dict):
        return {"type": "json_schema", "json_schema": {"name": "response", "schema": value}}
    return None


# -- replies -----------------------------------------------------------------


class ReplyBuilder:
    """Turns OpenAI replies or stream chunks from a node into Ollama's chat or generate shape.

    ``started`` is the router's time.perf_counter() at the request's start;
    Ollama reports durations in integer nanoseconds.
    """

    def __init__(self, *, model: str, chat: bool, started: float) -> None:
        self.model = model
        self.chat = chat
        self.started = started
        self.done_reason = "stop"
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.prompt_ms: float | None = None
        self.predicted_ms: float | None = None
        # Streamed tool calls arrive in fragments, keyed by their index.
        self._tool_calls: dict[int, dict[str, Any]] = {}

    def whole(self, reply: dict[str, Any]) -> dict[str, Any]:
        """Translate a non-streamed OpenAI reply."""
        self._read_counts(reply)
        choice = (reply.get("choices") or [{}])[0]
        self._read_finish(choice)
        if self.chat:
            message = choice.get("message") or {}
            for index, call in enumerate(message.get("tool_calls") or []):
                self._tool_calls[index] = {
                    "id": call.get("id"),
                    "name": (call.get("function") or {}).get("name", ""),
                    "arguments": (call.get("function") or {}).get("arguments", ""),
                }
            text = message.get("content") or ""
        else:
            text = choice.get("text") or (choice.get("message") or {}).get("content") or ""
        return self.final(text)

    def piece(self, chunk: dict[str, Any]) -> dict[str, Any] | None:
        """Translate one stream chunk; None when it carries no text for the client."""
        self._read_counts(chunk)
        choices = chunk.get("choices") or []
        if not choices:
            return None
        choice = choices[0]
        self._read_finish(choice)
        delta = choice.get("delta") or {}
        for call in delta.get("tool_calls") or []:
            self._add_tool_fragment(call)
        text = delta.get("content") if self.chat else choice.get("text", delta.get("content"))
        if not text:
            return None
        return self._line(text, done=False)

    def final(self, text: str = "") -> dict[str, Any]:
        """Return the last line: ``done`` with Ollama's counters and durations."""
        line = self._line(text, done=True)
        if self.chat and self._tool_calls:
            line["message"]["tool_calls"] = [
                _ollama_tool_call(self._tool_calls[index], index)
                for index in sorted(self._tool_calls)
            ]
        line["done_reason"] = self.done_reason
        line["total_duration"] = int((time.perf_counter() - self.started) * 1e9)
        line["prompt_eval_count"] = self.prompt_tokens
        if self.prompt_ms is not None:
            line["prompt_eval_duration"] = int(self.prompt_ms * NS_PER_MS)
        line["eval_count"] = self.completion_tokens
        if self.predicted_ms is not None:
            line["eval_duration"] = int(self.predicted_ms * NS_PER_MS)
        return line

    def _line(self, text: str, *, done: bool) -> dict[str, Any]:
        line: dict[str, Any] = {"model": self.model, "created_at": now_rfc3339()}
        if self.chat:
            line["message"] = {"role": "assistant", "content": text}
        else:
            line["response"] = text
        line["done"] = done
        return line

    def _read_counts(self, reply: dict[str, Any]) -> None:
        usage = reply.get("usage")
        if isinstance(usage, dict):
            self.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            self.completion_tokens = int(usage.get("completion_tokens") or 0)
        timings = reply.get("timings")
        if isinstance(timings, dict):
            if isinstance(timings.get("prompt_ms"), int | float):
                self.prompt_ms = float(timings["prompt_ms"])
            if isinstance(timings.get("predicted_ms"), int | float):
                self.predicted_ms = float(timings["predicted_ms"])

    def _read_finish(self, choice: dict[str, Any]) -> None:
        reason = choice.get("finish_reason")
        if reason:
            self.done_reason = _DONE_REASONS.get(reason, "stop")

    def _add_tool_fragment(self, call: dict[str, Any]) -> None:
        index = call.get("index", 0)
        entry = self._tool_calls.setdefault(index, {"id": None, "name": "", "arguments": ""})
        if call.get("id"):
            entry["id"] = call["id"]
        function = call.get("function") or {}
        entry["name"] += function.get("name") or ""
        entry["arguments"] += function.get("arguments") or ""


def _ollama_tool_call(call: dict[str, Any], index: int) -> dict[str, Any]:
    arguments: Any = call["arguments"]
    # Arguments that are not valid JSON stay the string the model wrote.
    with contextlib.suppress(orjson.JSONDecodeError):
        arguments = orjson.loads(arguments) if arguments else {}
    out: dict[str, Any] = {
        "function": {"index": index, "name": call["name"], "arguments": arguments}
    }
    if call.get("id"):
        out["id"] = call["id"]
    return out


def embeddings_from_openai(reply: dict[str, Any]) -> list[list[float]]:
    data = sorted(reply.get("data") or [], key=lambda item: item.get("index", 0))
    return [list(item.get("embedding") or []) for item in data]


def normalized(vector: list[float], dimensions: int | None = None) -> list[float]:
    """Cut ``vector`` to ``dimensions`` and scale it to unit length, as /api/embed does."""
    if dimensions:
        vector = vector[:dimensions]
    norm = math.sqrt(sum(value * value for value in vector))
    return [value / norm for value in vector] if norm > 0 else vector


def ndjson(line: dict[str, Any]) -> bytes:
    return orjson.dumps(line) + b"\n"
