"""Request features the scoring core reads, estimated cheaply from the request body."""

import hashlib
from dataclasses import dataclass
from typing import Any

import orjson

DEFAULT_PRIORITY = 5  # the original SOLLOL levels: 10 critical, 5 normal, 1 batch
DEFAULT_MAX_TOKENS = 256  # assumed output length when a request sets no limit
CHARS_PER_TOKEN = 4.0  # rough average for English text; no tokenizer is loaded


@dataclass(frozen=True, slots=True)
class RequestFeatures:
    task: str  # chat | completion | embedding
    prompt_tokens: float
    max_tokens: float
    priority: int = DEFAULT_PRIORITY
    # Hash of the conversation before its last message, so follow-up turns of
    # one conversation share a key; None when there is no earlier context.
    prefix_key: bytes | None = None


def parse_priority(value: Any, source: str) -> int:
    """Return a priority from 1 to 10, or raise ValueError naming ``source``."""
    try:
        priority = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{source} must be an integer from 1 to 10, got {value!r}") from None
    if isinstance(value, bool) or not 1 <= priority <= 10 or str(priority) != str(value).strip():
        raise ValueError(f"{source} must be an integer from 1 to 10, got {value!r}")
    return priority


def estimate_features(task: str, body: dict[str, Any], priority: int) -> RequestFeatures:
    if task == "chat":
        messages = body.get("messages") or []
        text_chars = sum(_content_chars(message.get("content")) for message in messages)
        prefix_key = _prefix_key(messages[:-1]) if len(messages) > 1 else None
    elif task == "completion":
        text_chars = _content_chars(body.get("prompt"))
        prefix_key = None
    else:
        text_chars = _content_chars(body.get("input"))
        prefix_key = None

    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    if task == "embedding":
        max_tokens = 0.0
    elif isinstance(limit, int) and not isinstance(limit, bool) and limit >= 0:
        max_tokens = float(limit)
    else:
        max_tokens = float(DEFAULT_MAX_TOKENS)
    return RequestFeatures(
        task=task,
        prompt_tokens=text_chars / CHARS_PER_TOKEN,
        max_tokens=max_tokens,
        priority=priority,
        prefix_key=prefix_key,
    )


def _content_chars(content: Any) -> int:
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        total = 0
        for part in content:
            if isinstance(part, str):
                total += len(part)
            elif isinstance(part, dict) and isinstance(part.get("text"), str):
                total += len(part["text"])
            elif isinstance(part, list):
                total += len(part) * int(CHARS_PER_TOKEN)  # a token-id array
        return total
    return 0


def _prefix_key(messages: list[Any]) -> bytes:
    return hashlib.blake2b(orjson.dumps(messages), digest_size=16).digest()
