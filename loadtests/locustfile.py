"""Locust users for SOLLOL's OpenAI endpoints.

Run against a running router, for example the demo:

    .venv/bin/locust -f loadtests/locustfile.py --host http://127.0.0.1:8000 \
        --headless --users 8 --spawn-rate 4 --run-time 30s

``loadtests/run.py`` starts the nodes and the router itself and runs this file.

Every reply is checked, not only its status: a JSON reply must have the
OpenAI shape of its route, an error reply must carry an OpenAI error body,
and a stream must end with ``data: [DONE]``. A stream that carries an
in-band error event, or does not end with ``[DONE]``, is a failure. Streaming requests
are timed to the last byte.

Environment variables:

- ``SOLLOL_CHAT_MODEL``, ``SOLLOL_EMBEDDING_MODEL``: the models (default: the
  demo's ``tiny`` and ``tiny-embed``);
- ``SOLLOL_LOAD_TIMEOUT_S``: the longest wait for a connection or between two
  reads, in seconds (default 30); a request that waits longer fails as a hang;
- ``SOLLOL_LOAD_FAILURE_LOG``: a file to which every failure is appended as
  one JSON line (``time``, ``name``, ``kind``, ``status``, ``node``,
  ``events``, ``message``), for ``loadtests/run.py`` to classify.
"""

import json
import os
import time
from typing import Any

import requests
from locust import HttpUser, between, events, task

CHAT_MODEL = os.environ.get("SOLLOL_CHAT_MODEL", "tiny")
EMBEDDING_MODEL = os.environ.get("SOLLOL_EMBEDDING_MODEL", "tiny-embed")
TIMEOUT_S = float(os.environ.get("SOLLOL_LOAD_TIMEOUT_S", "30"))
FAILURE_LOG = os.environ.get("SOLLOL_LOAD_FAILURE_LOG")
MESSAGES = [{"role": "user", "content": "Write one short sentence about load balancing."}]
MAX_TOKENS = 16
# The part of a reply body quoted in a failure message.
MAX_QUOTED_BYTES = 200

# Kinds of failure, written to the failure log.
HTTP_ERROR = "http_error"  # a non-2xx status with a well-formed OpenAI error body
BAD_ERROR_BODY = "bad_error_body"  # a non-2xx status whose body is not an OpenAI error
BAD_REPLY = "bad_reply"  # a 200 whose body does not have the route's OpenAI shape
ERROR_EVENT = "error_event"  # a stream that carried an in-band error event
NO_DONE = "no_done"  # a stream that ended without data: [DONE] and without an error event
TRANSPORT = "transport"  # no reply: connection failed, timed out or broke


class ReplyFailure(Exception):
    """A failed request, with what ``loadtests/run.py`` needs to classify it.

    ``node`` is the reply's ``x-sollol-node`` header, ``events`` the number of
    data events a stream carried before it ended.
    """

    def __init__(
        self,
        kind: str,
        message: str,
        *,
        status: int | None = None,
        node: str | None = None,
        events: int | None = None,
    ) -> None:
        # Locust groups failures by this text.
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message
        self.status = status
        self.node = node
        self.events = events


@events.request.add_listener
def log_failure(name: str, exception: BaseException | None, **_kwargs: Any) -> None:
    if exception is None or FAILURE_LOG is None:
        return
    record = {"time": time.time(), "name": name, "kind": "other", "message": str(exception)}
    if isinstance(exception, ReplyFailure):
        record |= {
            "kind": exception.kind,
            "status": exception.status,
            "node": exception.node,
            "events": exception.events,
            "message": exception.message,
        }
    # Locust runs every user in one process (gevent), so appends do not interleave.
    with open(FAILURE_LOG, "a", encoding="utf-8") as log_file:
        log_file.write(json.dumps(record) + "\n")


class OpenAIUser(HttpUser):
    wait_time = between(0.0, 0.2)

    @task(3)
    def chat(self) -> None:
        body = {"model": CHAT_MODEL, "messages": MESSAGES, "max_tokens": MAX_TOKENS}
        self._post("/v1/chat/completions", body, "chat", "choices")

    @task(3)
    def chat_stream(self) -> None:
        body = {"model": CHAT_MODEL, "messages": MESSAGES, "max_tokens": MAX_TOKENS}
        self._post_stream("/v1/chat/completions", body, "chat stream")

    @task(2)
    def completion(self) -> None:
        body = {"model": CHAT_MODEL, "prompt": "The router", "max_tokens": MAX_TOKENS}
        self._post("/v1/completions", body, "completion", "choices")

    @task(1)
    def completion_stream(self) -> None:
        body = {"model": CHAT_MODEL, "prompt": "The router", "max_tokens": MAX_TOKENS}
        self._post_stream("/v1/completions", body, "completion stream")

    @task(1)
    def embedding(self) -> None:
        body = {"model": EMBEDDING_MODEL, "input": ["first text", "second text"]}
        self._post("/v1/embeddings", body, "embedding", "data")

    def _post(self, path: str, body: dict[str, Any], name: str, list_field: str) -> None:
        with self.client.post(
            path, json=body, name=name, timeout=TIMEOUT_S, catch_response=True
        ) as response:
            failure = check_transport(response)
            if failure is None:
                failure = check_status(response, response.content)
            if failure is None:
                failure = check_reply(response.content, list_field)
            if failure is not None:
                response.failure(failure)

    def _post_stream(self, path: str, body: dict[str, Any], name: str) -> None:
        started = time.perf_counter()
        with self.client.post(
            path,
            json={**body, "stream": True},
            name=name,
            timeout=TIMEOUT_S,
            stream=True,
            catch_response=True,
        ) as response:
            failure = check_transport(response)
            content = b""
            if failure is None:
                try:
                    content = b"".join(response.iter_content(chunk_size=None))
                except requests.RequestException as exc:
                    failure = ReplyFailure(
                        TRANSPORT,
                        f"stream broke: {type(exc).__name__}: {exc}",
                        status=response.status_code,
                        node=node_of(response),
                    )
            # Locust timed the request to its headers; time it to the last byte.
            response.request_meta["response_time"] = (time.perf_counter() - started) * 1000.0
            response.request_meta["response_length"] = len(content)
            if failure is None:
                failure = check_status(response, content) or check_stream(response, content)
            if failure is not None:
                response.failure(failure)


def node_of(response: requests.Response) -> str | None:
    return response.headers.get("x-sollol-node")


def check_transport(response: Any) -> ReplyFailure | None:
    """Return a failure when locust got no response at all (its ``error`` is then set)."""
    error = getattr(response, "error", None)
    if error is None or response.status_code:
        return None
    return ReplyFailure(TRANSPORT, f"{type(error).__name__}: {error}")


def check_status(response: requests.Response, content: bytes) -> ReplyFailure | None:
    """Check that a non-200 reply carries ``{"error": {"message": str, "type": str, ...}}``."""
    if response.status_code == 200:
        return None
    status = response.status_code
    try:
        error = json.loads(content)["error"]
        message = error["message"]
        if not isinstance(message, str) or not isinstance(error["type"], str):
            raise TypeError("message and type must be strings")
    except (ValueError, KeyError, TypeError):
        quoted = content[:MAX_QUOTED_BYTES]
        return ReplyFailure(
            BAD_ERROR_BODY, f"HTTP {status}, body {quoted!r}", status=status, node=node_of(response)
        )
    return ReplyFailure(
        HTTP_ERROR, f"HTTP {status}: {message}", status=status, node=node_of(response)
    )


def check_reply(content: bytes, list_field: str) -> ReplyFailure | None:
    """Check that a JSON reply is an object whose ``list_field`` is a non-empty list."""
    try:
        reply = json.loads(content)
    except ValueError:
        reply = None
    if isinstance(reply, dict) and isinstance(reply.get(list_field), list) and reply[list_field]:
        return None
    quoted = content[:MAX_QUOTED_BYTES]
    return ReplyFailure(BAD_REPLY, f"no '{list_field}' list in {quoted!r}", status=200)


def check_stream(response: requests.Response, content: bytes) -> ReplyFailure | None:
    """Check that a stream has no error event and ends with ``data: [DONE]``.

    The router writes every event as ``data: <payload>`` and a blank line.
    """
    node = node_of(response)
    stream_events = [event for event in content.split(b"\n\n") if event.startswith(b"data:")]
    for position, event in enumerate(stream_events):
        if event.startswith(b'data: {"error"'):
            try:
                message = json.loads(event[len(b"data: ") :])["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = f"malformed error event {event[:MAX_QUOTED_BYTES]!r}"
            return ReplyFailure(
                ERROR_EVENT,
                f"stream carried an error event: {message}",
                status=200,
                node=node,
                events=position,
            )
    if stream_events and stream_events[-1] == b"data: [DONE]":
        return None
    tail = content[-MAX_QUOTED_BYTES:]
    return ReplyFailure(
        NO_DONE,
        f"stream ended without data: [DONE], last bytes {tail!r}",
        status=200,
        node=node,
        events=len(stream_events),
    )
