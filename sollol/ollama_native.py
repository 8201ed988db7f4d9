"""OpenAI requests served by an Ollama node on its native API, and the replies put back.

Ollama's own ``/v1`` layer would take OpenAI requests as they are, but it
drops Ollama's timings (the history needs them to learn each node's decode
speed) and cannot pass ``keep_alive`` or a context size. So the router
translates itself. Field mapping, OpenAI request → Ollama request:

    model                          model (the node's own name)
    messages[].content             content (text parts joined); image parts with
                                   base64 data URLs → images
    messages[].tool_calls          arguments: a JSON string in OpenAI, an object in Ollama
    messages[] role "tool"         tool_call_id, and name → tool_name
    max_tokens / max_completion_tokens
                                   options.num_predict
    temperature, top_p, seed, stop, presence_penalty, frequency_penalty,
    and llama.cpp's top_k, min_p, repeat_penalty
                                   options of the same names (stop always a list)
    response_format                format: "json" or the JSON schema
    tools                          tools
    stream                         stream (false unless asked: OpenAI's default)
    keep_alive, options            passed as they are: a client may send
                                   extra_body={"keep_alive": "10m", "options": {"num_ctx": 8192}}

``/v1/completions`` becomes ``/api/generate`` with ``raw`` (no chat template,
as a completion expects), and ``/v1/embeddings`` becomes ``/api/embed``.
Not mapped: ``n`` (one choice only), ``logprobs``, ``logit_bias``,
``tool_choice``, ``user``, ``echo``, ``best_of``. A prompt or input given as
token ids gets 400 from the router, because Ollama takes only text.
"""

import base64
import struct
import time
import uuid
from typing import Any

import orjson

from .errors import InvalidRequestError
from .ollama_wire import openai_tool_call

_OPTION_FIELDS = (
    "temperature",
    "top_p",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "top_k",
    "min_p",
    "repeat_penalty",
)
_FINISH_REASONS = {"stop": "stop", "length": "length", "load": "stop", "unload": "stop"}
_NATIVE_ROUTES = {
    "/v1/chat/completions": "/api/chat",
    "/v1/completions": "/api/generate",
    "/v1/embeddings": "/api/embed",
}


def native_route(openai_route: str) -> str:
    return _NATIVE_ROUTES[openai_route]


def native_request(route: str, body: dict[str, Any], model: str) -> dict[str, Any]:
    """Build the Ollama request for an OpenAI request to ``route``."""
    if route == "/v1/embeddings":
        return {"model": model, "input": _texts(body.get("input"), "input"), **_extras(body)}
    out: dict[str, Any] = {"model": model, "stream": body.get("stream") is True}
    if route == "/v1/chat/completions":
        out["messages"] = [_message(message) for message in body.get("messages") or []]
        if body.get("tools"):
            out["tools"] = body["tools"]
    else:
        prompts = _texts(body.get("prompt"), "prompt")
        if len(prompts) != 1:
            raise InvalidRequestError(
                "an Ollama node takes one prompt per completion request", param="prompt"
            )
        out["prompt"] = prompts[0]
        out["raw"] = True
        if isinstance(body.get("suffix"), str):
            out["suffix"] = body["suffix"]
    fmt = _format(body.get("response_format"))
    if fmt is not None:
        out["format"] = fmt
    options = _options(body)
    if options:
        out["options"] = options
    out.update(_extras(body))
    return out


def _extras(body: dict[str, Any]) -> dict[str, Any]:
    return {"keep_alive": body["keep_alive"]} if "keep_alive" in body else {}


def _options(body: dict[str, Any]) -> dict[str, Any]:
    options = dict(body["options"]) if isinstance(body.get("options"), dict) else {}
    for name in _OPTION_FIELDS:
        if body.get(name) is not None:
            options[name] = body[name]
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    if isinstance(limit, int):
        options["num_predict"] = limit
    stop = body.get("stop")
    if isinstance(stop, str):
        options["stop"] = [stop]
    elif isinstance(stop, list):
        options["stop"] = stop
    return options


def _format(response_format: Any) -> Any:
    if not isinstance(response_format, dict):
        return None
    if response_format.get("type") == "json_object":
        return "json"
    if response_format.get("type") == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema")
        return schema if isinstance(schema, dict) else "json"
    return None


def _texts(value: Any, param: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return value
    raise InvalidRequestError(f"an Ollama node takes '{param}' as text, not token ids", param=param)


def _message(message: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"role": message.get("role", "user")}
    content = message.get("content")
    if isinstance(content, list):
        texts, images = [], []
        for part in content:
            if not isinstance(part, dict):
                continue
            if part.get("type") == "text":
                texts.append(str(part.get("text", "")))
            elif part.get("type") == "image_url":
                url = str((part.get("image_url") or {}).get("url", ""))
                if url.startswith("data:") and "," in url:
                    images.append(url.split(",", 1)[1])
        out["content"] = "\n".join(texts)
        if images:
            out["images"] = images
    else:
        out["content"] = content or ""
    if message.get("tool_calls"):
        out["tool_calls"] = [_native_tool_call(call) for call in message["tool_calls"]]
    if message.get("tool_call_id"):
        out["tool_call_id"] = message["tool_call_id"]
    if out["role"] == "tool" and message.get("name"):
        out["tool_name"] = message["name"]
    return out


def _native_tool_call(call: dict[str, Any]) -> dict[str, Any]:
    function = call.get("function") or {}
    arguments = function.get("arguments") or "{}"
    if isinstance(arguments, str):
        try:
            arguments = orjson.loads(arguments)
        except orjson.JSONDecodeError:
            raise InvalidRequestError(
                "tool call arguments must be a JSON object encoded as a string",
                param="messages",
            ) from None
    out: dict[str, Any] = {"function": {"name": function.get("name", ""), "arguments": arguments}}
    if call.get("id"):
        out["id"] = call["id"]
    return out


# -- replies -----------------------------------------------------------------


class OpenAIReplyBuilder:
    """Turns Ollama's native replies (whole or NDJSON lines) into OpenAI's shapes."""

    def __init__(self, *, model: str, chat: bool, include_usage: bool) -> None:
        self.model = model
        self.chat = chat
        self.include_usage = include_usage
        kind = "chatcmpl" if chat else "cmpl"
        self.id = f"{kind}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.usage: dict[str, int] | None = None
        self._sent_role = False
        self._tool_calls = 0

    def whole(self, reply: dict[str, Any]) -> dict[str, Any]:
        self._read_usage(reply)
        if self.chat:
            message = reply.get("message") or {}
            out_message: dict[str, Any] = {
                "role": "assistant",
                "content": message.get("content") or "",
            }
            calls = [openai_tool_call(call, _call_id()) for call in message.get("tool_calls") or []]
            if calls:
                out_message["tool_calls"] = calls
            choice: dict[str, Any] = {"index": 0, "message": out_message, "logprobs": None}
        else:
            choice = {"index": 0, "text": reply.get("response") or "", "logprobs": None}
        choice["finish_reason"] = self._finish_reason(reply)
        return {
            "id": self.id,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": self.usage or _usage(0, 0),
        }

    def chunks(self, line: dict[str, Any]) -> list[dict[str, Any]]:
        """Return the OpenAI chunks for one NDJSON line."""
        out = []
        if self.chat:
            message = line.get("message") or {}
            delta: dict[str, Any] = {}
            if not self._sent_role:
                delta["role"] = "assistant"
                self._sent_role = True
            if message.get("content"):
                delta["content"] = message["content"]
            calls = message.get("tool_calls") or []
            if calls:
                delta["tool_calls"] = [
                    {
                        "index": self._tool_calls + index,
                        **openai_tool_call(call, _call_id()),
                    }
                    for index, call in enumerate(calls)
                ]
                self._tool_calls += len(calls)
            if delta:
                out.append(self._chunk({"index": 0, "delta": delta, "finish_reason": None}))
        elif line.get("response"):
            choice = {"index": 0, "text": line["response"], "finish_reason": None}
            out.append(self._chunk(choice))
        if line.get("done"):
            self._read_usage(line)
            last = {"index": 0, "finish_reason": self._finish_reason(line)}
            last.update({"delta": {}} if self.chat else {"text": ""})
            out.append(self._chunk(last))
            if self.include_usage:
                usage_chunk = self._chunk(None)
                usage_chunk["usage"] = self.usage
                out.append(usage_chunk)
        return out

    def _chunk(self, choice: dict[str, Any] | None) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [] if choice is None else [choice],
        }

    def _finish_reason(self, line: dict[str, Any]) -> str:
        if (self.chat and (line.get("message") or {}).get("tool_calls")) or self._tool_calls:
            return "tool_calls"
        return _FINISH_REASONS.get(str(line.get("done_reason") or "stop"), "stop")

    def _read_usage(self, line: dict[str, Any]) -> None:
        prompt = line.get("prompt_eval_count")
        completion = line.get("eval_count")
        self.usage = _usage(
            prompt if isinstance(prompt, int) else 0,
            completion if isinstance(completion, int) else 0,
        )


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:8]}"


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def openai_embeddings(reply: dict[str, Any], *, model: str, encoding: str | None) -> dict[str, Any]:
    """Turn /api/embed's reply into OpenAI's embedding list (floats or base64 float32)."""
    data = []
    for index, vector in enumerate(reply.get("embeddings") or []):
        embedding: Any = vector
        if encoding == "base64":
            embedding = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    prompt = reply.get("prompt_eval_count")
    tokens = prompt if isinstance(prompt, int) else 0
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
