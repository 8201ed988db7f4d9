"""Errors the router returns to clients, in the OpenAI error shape.

    SollolError                      base; carries HTTP status and OpenAI fields
    ├── InvalidRequestError          400, malformed JSON or a bad field
    ├── AuthenticationError          401, no API key, or one that is unknown or revoked
    ├── PermissionDeniedError        403, the key lacks the scope the route needs
    ├── ModelNotFoundError           404, no configured node serves the model
    ├── PayloadTooLargeError         413, body over ``max_body_bytes``
    ├── NoNodeAvailableError         503, the model is known but no node can take it now
    ├── QueueFullError               429, the model's wait queue is at its bound
    ├── RateLimitError               429, the key is over a rate limit or its token quota
    ├── ClientClosedError            499, the client left while its request waited
    └── UpstreamError                a node failed, could not be reached, or returned an error

One Starlette exception handler turns any of them into
``{"error": {"message", "type", "param", "code"}}``.

Errors of the offline learning commands and of loading a learned model never
reach a client, so they stand apart:

    LearningError                    base of the learning errors
    ├── TrainingDataError            the history is missing, unreadable or too small
    └── ModelArtifactError           a learned-model file is unreadable or incompatible
"""

import math
from typing import Any

import orjson


class SollolError(Exception):
    status_code = 500
    error_type = "server_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status_code: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        if status_code is not None:
            self.status_code = status_code
        self.headers = headers or {}
        # Set once the proxy has written this request's access line and
        # history row, so the error handler does not log it a second time.
        self.recorded = False

    def to_body(self) -> bytes:
        return openai_error_body(self.message, self.error_type, param=self.param, code=self.code)


class InvalidRequestError(SollolError):
    status_code = 400
    error_type = "invalid_request_error"


class AuthenticationError(SollolError):
    status_code = 401
    error_type = "authentication_error"

    def __init__(self, message: str) -> None:
        super().__init__(message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


class PermissionDeniedError(SollolError):
    status_code = 403
    error_type = "permission_error"


class ModelNotFoundError(SollolError):
    status_code = 404
    error_type = "invalid_request_error"

    def __init__(self, model: str) -> None:
        super().__init__(
            f"The model '{model}' does not exist on any node of this router; "
            "GET /v1/models lists the models it serves.",
            param="model",
            code="model_not_found",
        )


class PayloadTooLargeError(SollolError):
    status_code = 413
    error_type = "invalid_request_error"


class NoNodeAvailableError(SollolError):
    status_code = 503
    error_type = "server_error"

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(
            message, code="no_node_available", headers={"Retry-After": str(retry_after_s)}
        )


class QueueFullError(SollolError):
    status_code = 429
    error_type = "rate_limit_error"

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message, code="queue_full", headers={"Retry-After": str(retry_after_s)})


class RateLimitError(SollolError):
    """A key's requests or tokens per minute, or its token quota, are used up.

    ``code`` names the limit: ``rate_limit_requests``, ``rate_limit_tokens``
    or ``quota_exceeded``.
    """

    status_code = 429
    error_type = "rate_limit_error"

    def __init__(self, message: str, *, code: str, retry_after_s: float) -> None:
        # Retry-After takes whole seconds (RFC 9110), so round up.
        seconds = max(1, math.ceil(retry_after_s))
        super().__init__(message, code=code, headers={"Retry-After": str(seconds)})


class ClientClosedError(SollolError):
    """The client went away before a reply; 499 as in nginx, never seen by the client."""

    status_code = 499
    error_type = "client_closed_request"


class UpstreamError(SollolError):
    """An error response from a node, or a node that could not be reached.

    4xx responses keep their status, since the node judged the request itself;
    anything else becomes 502 Bad Gateway.
    """

    error_type = "upstream_error"

    def __init__(
        self, message: str, *, status_code: int = 502, error_type: str | None = None, **kwargs: Any
    ) -> None:
        super().__init__(message, status_code=status_code, **kwargs)
        if error_type:
            self.error_type = error_type


class LearningError(Exception):
    """An error of `sollol train`, `sollol evaluate` or of loading a learned model."""


class TrainingDataError(LearningError):
    """The history cannot be read, or contains too few usable rows to train on."""


class ModelArtifactError(LearningError):
    """A learned-model artifact cannot be read, or was made for another feature schema."""


def openai_error_body(
    message: str, error_type: str, *, param: str | None = None, code: str | None = None
) -> bytes:
    return orjson.dumps(
        {"error": {"message": message, "type": error_type, "param": param, "code": code}}
    )


def upstream_error_from_reply(status: int, body: bytes, node_name: str) -> UpstreamError:
    """Build an UpstreamError from a node's non-2xx reply.

    llama-server sends ``{"error": {"code": <int>, "message", "type"}}``, Ollama's
    native API ``{"error": "<text>"}``, and OpenAI-compatible servers the OpenAI
    shape; anything else is reported as raw text.
    """
    message = body.decode("utf-8", errors="replace").strip() or f"HTTP {status}"
    error_type = None
    param = None
    code = None
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        parsed = None
    if isinstance(parsed, dict):
        error = parsed.get("error")
        if isinstance(error, dict):
            message = str(error.get("message") or message)
            error_type = error.get("type") if isinstance(error.get("type"), str) else None
            param = error.get("param") if isinstance(error.get("param"), str) else None
            # llama-server puts the HTTP status, an int, in ``code``; the OpenAI
            # SDK expects a string or null there.
            code = error.get("code") if isinstance(error.get("code"), str) else None
        elif isinstance(error, str):
            message = error

    if 400 <= status < 500:
        return UpstreamError(
            message,
            status_code=status,
            error_type=error_type or "invalid_request_error",
            param=param,
            code=code,
        )
    if status == 503:
        # Busy (Ollama's full queue) or still loading: worth a retry later.
        return UpstreamError(
            f"node {node_name} is unavailable (HTTP 503): {message}", status_code=503
        )
    return UpstreamError(
        f"node {node_name} failed with HTTP {status}: {message}",
        status_code=502,
        headers={"x-should-retry": "false"},
    )
