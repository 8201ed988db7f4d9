"""Bad input: each case gets a 4xx in the OpenAI error shape, never a 5xx.

In-process tests go through httpx.ASGITransport to an app whose one node is
a fake that serves every request, so a valid request always succeeds and a
rejected one was rejected by the router. The header-size tests use a router
process on a real socket, since that limit is applied where Hypercorn serves
the app, outside the app itself.
"""

import contextlib
import json
import socket

import httpx
import openai
import orjson
import pytest
import pytest_asyncio

from sollol.app import create_app
from sollol.config import NodeConfig, NodeKind, Settings
from sollol.request_fields import MAX_TOKEN_ID
from tests.support.fake_node import FakeOpenAINode
from tests.support.fixtures import RouterProcess

MAX_BODY_BYTES = 64 * 1024
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
COMPLETION = {"model": "tiny", "prompt": "hi"}
EMBEDDING = {"model": "tiny", "input": "hi"}


@pytest.fixture(scope="module")
def fake_node():
    with FakeOpenAINode(models=("tiny",)) as node:
        yield node


@contextlib.asynccontextmanager
async def running_router(tmp_path, node_url: str):
    """Yield the app, with its lifespan run; the lifespan's probe finds the fake node healthy."""
    node = NodeConfig(url=node_url, kind=NodeKind.OPENAI, name="fake", models=("tiny",))
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'history.db'}",
        max_body_bytes=MAX_BODY_BYTES,
        nodes=(node,),
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        yield app


@pytest_asyncio.fixture
async def client(tmp_path, fake_node):
    async with running_router(tmp_path, fake_node.url) as app:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://router") as http:
            yield http


def error_of(response: httpx.Response, status: int) -> dict:
    """Return the error object of an OpenAI-shaped error reply with the given status."""
    assert response.status_code == status, response.text
    body = orjson.loads(response.content)
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str)
    assert error["message"]
    assert error["type"] == "invalid_request_error"
    return error


def received_body(node: FakeOpenAINode) -> dict:
    return node.received[-1][1]


# -- the body as a whole -------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "named"),
    [
        (b"42", "an integer"),
        (b"-1.5", "a number"),
        (b'"hello"', "a string"),
        (b"null", "null"),
        (b"true", "a boolean"),
        (b"[]", "an array"),
        (b'[{"model": "tiny"}]', "an array"),
    ],
)
async def test_body_that_is_not_object(client, body, named):
    response = await client.post("/v1/chat/completions", content=body)
    error = error_of(response, 400)
    assert error["message"] == f"request body must be a JSON object, got {named}"


@pytest.mark.parametrize(
    "body",
    [
        b'{"model": "tiny", "messages": [{"role": "user", "content": "\xff\xfe"}]}',
        b'{"model": "tiny\xc3", "messages": []}',
        # An escaped lone surrogate is valid JSON syntax but not valid Unicode.
        b'{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}',
    ],
)
async def test_invalid_unicode_is_400(client, body):
    response = await client.post("/v1/chat/completions", content=body)
    error = error_of(response, 400)
    assert "not valid JSON" in error["message"]


@pytest.mark.parametrize(
    "body",
    [
        b'{"model": "tiny",',
        b'{"model": "tiny"} trailing',
        b"{'model': 'tiny'}",
        b'{"model": NaN}',
        b'{"max_tokens": 1e400}',
        b"\x00",
    ],
)
async def test_malformed_json_is_400(client, body):
    response = await client.post("/v1/completions", content=body)
    assert "not valid JSON" in error_of(response, 400)["message"]


def nested(depth: int) -> dict:
    """A chat body whose extra field contains arrays nested so that the body is ``depth`` deep."""
    return {**CHAT, "extra": orjson.loads(b"[" * (depth - 1) + b"]" * (depth - 1))}


async def test_deepest_body_is_forwarded(client, fake_node):
    response = await client.post("/v1/chat/completions", content=orjson.dumps(nested(254)))
    assert response.status_code == 200, response.text
    assert received_body(fake_node)["extra"] == nested(254)["extra"]


async def test_body_nested_too_deep_is_400(client):
    content = b'{"model": "tiny", "extra": ' + b"[" * 300 + b"]" * 300 + b"}"
    response = await client.post("/v1/chat/completions", content=content)
    assert "deeper than 254 levels" in error_of(response, 400)["message"]


async def test_body_past_parser_depth_is_400(client):
    content = b'{"model": "tiny", "extra": ' + b"[" * 2000 + b"]" * 2000 + b"}"
    response = await client.post("/v1/chat/completions", content=content)
    assert "not valid JSON" in error_of(response, 400)["message"]


async def test_many_brackets_shallow_body_is_forwarded(client, fake_node):
    messages = [{"role": "user", "content": [{"type": "text", "text": "x"}]}] * 200
    response = await client.post("/v1/chat/completions", json={**CHAT, "messages": messages})
    assert response.status_code == 200, response.text
    assert len(received_body(fake_node)["messages"]) == 200


# -- body size -----------------------------------------------------------------


async def test_declared_length_over_limit_is_413(client):
    content = orjson.dumps({**CHAT, "extra": "x" * MAX_BODY_BYTES})
    response = await client.post("/v1/chat/completions", content=content)
    assert "max_body_bytes" in error_of(response, 413)["message"]


async def test_chunked_body_over_limit_is_413(client):
    async def chunks():
        yield b'{"model": "tiny", "extra": "'
        for _ in range(MAX_BODY_BYTES // 4096 + 1):
            yield b"x" * 4096
        yield b'"}'

    response = await client.post("/v1/chat/completions", content=chunks())
    assert "content-length" not in response.request.headers
    assert "max_body_bytes" in error_of(response, 413)["message"]


async def test_body_at_limit_is_accepted(client):
    padding = MAX_BODY_BYTES - len(orjson.dumps({**CHAT, "extra": ""}))
    content = orjson.dumps({**CHAT, "extra": "x" * padding})
    assert len(content) == MAX_BODY_BYTES
    response = await client.post("/v1/chat/completions", content=content)
    assert response.status_code == 200, response.text


async def test_client_gone_while_sending_body(tmp_path, fake_node):
    """A client that leaves mid-body gets a 499 logged, not an unhandled error."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"router"), (b"content-type", b"application/json")],
        "client": ("127.0.0.1", 50000),
        "server": ("router", 80),
    }
    incoming = [
        {"type": "http.request", "body": b'{"model": "ti', "more_body": True},
        {"type": "http.disconnect"},
    ]
    sent = []

    async def receive():
        return incoming.pop(0)

    async def send(message):
        sent.append(message)

    async with running_router(tmp_path, fake_node.url) as app:
        await app(scope, receive, send)
    assert sent[0]["type"] == "http.response.start"
    assert sent[0]["status"] == 499


# -- fields --------------------------------------------------------------------

BAD_FIELDS = [
    # (route, base body, field, bad value)
    ("/v1/chat/completions", CHAT, "max_tokens", -1),
    ("/v1/chat/completions", CHAT, "max_tokens", "16"),
    ("/v1/chat/completions", CHAT, "max_tokens", 16.5),
    ("/v1/chat/completions", CHAT, "max_tokens", 16.0),
    ("/v1/chat/completions", CHAT, "max_tokens", True),
    ("/v1/chat/completions", CHAT, "max_tokens", 2**63),
    ("/v1/chat/completions", CHAT, "max_tokens", 2**64 + 1),
    ("/v1/chat/completions", CHAT, "max_completion_tokens", -5),
    ("/v1/chat/completions", CHAT, "n", 0),
    ("/v1/chat/completions", CHAT, "n", -2),
    ("/v1/chat/completions", CHAT, "n", "2"),
    ("/v1/chat/completions", CHAT, "temperature", "hot"),
    ("/v1/chat/completions", CHAT, "top_p", [1]),
    ("/v1/chat/completions", CHAT, "presence_penalty", {}),
    ("/v1/chat/completions", CHAT, "frequency_penalty", False),
    ("/v1/chat/completions", CHAT, "seed", 1.5),
    ("/v1/chat/completions", CHAT, "stop", 5),
    ("/v1/chat/completions", CHAT, "stop", ["end", 1]),
    ("/v1/chat/completions", CHAT, "logit_bias", []),
    ("/v1/chat/completions", CHAT, "user", 5),
    ("/v1/chat/completions", CHAT, "logprobs", 3),
    ("/v1/chat/completions", CHAT, "top_logprobs", -1),
    ("/v1/chat/completions", CHAT, "tools", {"type": "function"}),
    ("/v1/chat/completions", CHAT, "tools", ["search"]),
    ("/v1/chat/completions", CHAT, "tool_choice", 1),
    ("/v1/chat/completions", CHAT, "parallel_tool_calls", "yes"),
    ("/v1/chat/completions", CHAT, "response_format", "json"),
    ("/v1/chat/completions", CHAT, "stream", 1),
    ("/v1/chat/completions", CHAT, "stream_options", []),
    ("/v1/completions", COMPLETION, "max_tokens", -1),
    ("/v1/completions", COMPLETION, "logprobs", True),
    ("/v1/completions", COMPLETION, "logprobs", -1),
    ("/v1/completions", COMPLETION, "echo", "yes"),
    ("/v1/completions", COMPLETION, "suffix", 5),
    ("/v1/completions", COMPLETION, "best_of", 0),
    ("/v1/completions", COMPLETION, "n", 0),
    ("/v1/completions", COMPLETION, "stream", "true"),
    ("/v1/embeddings", EMBEDDING, "dimensions", 0),
    ("/v1/embeddings", EMBEDDING, "dimensions", "8"),
    ("/v1/embeddings", EMBEDDING, "encoding_format", 1),
    ("/v1/embeddings", EMBEDDING, "user", []),
]


@pytest.mark.parametrize(("route", "base", "field", "value"), BAD_FIELDS)
async def test_bad_field_is_400(client, fake_node, route, base, field, value):
    received_before = len(fake_node.received)
    # json, not orjson, since orjson cannot write integers past 64 bits.
    response = await client.post(route, content=json.dumps({**base, field: value}))
    error = error_of(response, 400)
    assert error["param"] == field
    assert f"'{field}'" in error["message"]
    assert len(fake_node.received) == received_before, "no bad request may reach the node"


async def test_bad_field_message_names_range(client):
    response = await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": -1})
    error = error_of(response, 400)
    assert error["message"] == (
        "'max_tokens' must be an integer from 0 to 2147483647 or null, got -1"
    )


async def test_long_value_shortened_in_message(client):
    response = await client.post("/v1/chat/completions", json={**CHAT, "stop": ["x" * 1000, 1]})
    assert len(error_of(response, 400)["message"]) < 160


@pytest.mark.parametrize(
    ("route", "body"),
    [
        ("/v1/chat/completions", {**CHAT, "max_tokens": 0, "n": 1, "seed": -3, "stop": None}),
        ("/v1/chat/completions", {**CHAT, "temperature": 0, "top_p": 1, "stop": ["a", "b"]}),
        ("/v1/chat/completions", {**CHAT, "max_tokens": None, "logprobs": True, "user": ""}),
        ("/v1/chat/completions", {**CHAT, "tools": [], "tool_choice": {"type": "auto"}}),
        ("/v1/completions", {**COMPLETION, "logprobs": 2, "echo": False, "suffix": None}),
        ("/v1/completions", {**COMPLETION, "prompt": [0, MAX_TOKEN_ID]}),
        # An empty prompt is a valid string; the node decides what it means.
        ("/v1/completions", {**COMPLETION, "prompt": ""}),
        ("/v1/embeddings", {**EMBEDDING, "dimensions": 8, "encoding_format": None}),
    ],
)
async def test_valid_edge_values_are_forwarded(client, fake_node, route, body):
    response = await client.post(route, json=body)
    assert response.status_code == 200, response.text
    assert received_body(fake_node) == body


@pytest.mark.parametrize(
    ("route", "body", "param"),
    [
        ("/v1/chat/completions", {**CHAT, "model": ""}, "model"),
        ("/v1/chat/completions", {**CHAT, "model": ["tiny"]}, "model"),
        ("/v1/chat/completions", {**CHAT, "model": None}, "model"),
        ("/v1/chat/completions", {"model": "tiny", "messages": None}, "messages"),
        ("/v1/chat/completions", {"model": "tiny", "messages": "hi"}, "messages"),
        ("/v1/chat/completions", {"model": "tiny", "messages": {"role": "user"}}, "messages"),
        ("/v1/completions", {"model": "tiny", "prompt": None}, "prompt"),
        ("/v1/completions", {"model": "tiny", "prompt": [-1]}, "prompt"),
        ("/v1/completions", {"model": "tiny", "prompt": [MAX_TOKEN_ID + 1]}, "prompt"),
        ("/v1/completions", {"model": "tiny", "prompt": [True, False]}, "prompt"),
        ("/v1/completions", {"model": "tiny", "prompt": [[1, 2], []]}, "prompt"),
        ("/v1/completions", {"model": "tiny", "prompt": ["a", 1]}, "prompt"),
        ("/v1/embeddings", {"model": "tiny", "input": [[1, -2]]}, "input"),
        ("/v1/embeddings", {"model": "tiny", "input": None}, "input"),
    ],
)
async def test_missing_or_empty_field(client, route, body, param):
    response = await client.post(route, json=body)
    assert error_of(response, 400)["param"] == param


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        ([None], "messages[0]"),
        ([{"content": "no role"}], "messages[0]"),
        ([{"role": 5, "content": "x"}], "messages[0]"),
        ([{"role": "user", "content": 5}], "messages[0].content"),
        ([{"role": "user", "content": {"text": "x"}}], "messages[0].content"),
        ([{"role": "user", "content": True}], "messages[0].content"),
        ([{"role": "user", "content": ["plain string part"]}], "messages[0].content[0]"),
        ([{"role": "user", "content": [{"text": "no type"}]}], "messages[0].content[0]"),
        ([{"role": "user", "content": [{"type": 5}]}], "messages[0].content[0]"),
        (
            [
                {"role": "system", "content": "ok"},
                {"role": "user", "content": [{"type": "text", "text": "ok"}, [[[]]]]},
            ],
            "messages[1].content[1]",
        ),
    ],
)
async def test_nested_garbage_in_messages(client, fake_node, messages, param):
    received_before = len(fake_node.received)
    response = await client.post("/v1/chat/completions", json={**CHAT, "messages": messages})
    assert error_of(response, 400)["param"] == param
    assert len(fake_node.received) == received_before


async def test_content_parts_and_null_forwarded(client, fake_node):
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "content": "42", "tool_call_id": "c1"},
    ]
    response = await client.post("/v1/chat/completions", json={**CHAT, "messages": messages})
    assert response.status_code == 200, response.text
    assert received_body(fake_node)["messages"] == messages


async def test_unknown_fields_reach_node(client, fake_node):
    extra = {
        "cache_prompt": False,
        "n_probs": 3,
        "mirostat": {"tau": 5.0, "eta": [0.1, None]},
        "ünïcödé key": "value",
    }
    response = await client.post("/v1/chat/completions", json={**CHAT, **extra, "priority": 7})
    assert response.status_code == 200, response.text
    forwarded = received_body(fake_node)
    assert {key: forwarded[key] for key in extra} == extra
    assert "priority" not in forwarded


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"])
async def test_valid_request_reaches_fake_node(client, fake_node, route):
    body = {"/v1/chat/completions": CHAT, "/v1/completions": COMPLETION}.get(route, EMBEDDING)
    response = await client.post(route, json=body)
    assert response.status_code == 200, response.text
    assert fake_node.received[-1] == (route, body)


# -- through the OpenAI SDK ----------------------------------------------------


@pytest_asyncio.fixture
async def sdk(tmp_path, fake_node):
    async with running_router(tmp_path, fake_node.url) as app:
        http_client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app))
        async with openai.AsyncOpenAI(
            base_url="http://router/v1", api_key="unused", max_retries=0, http_client=http_client
        ) as client:
            yield client


async def test_sdk_raises_bad_request(sdk):
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=-1
        )
    assert caught.value.status_code == 400
    assert caught.value.param == "max_tokens"
    assert caught.value.type == "invalid_request_error"
    assert "'max_tokens' must be an integer from 0" in caught.value.message


async def test_sdk_rejects_garbage_content(sdk):
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": [{"text": "no type"}]}],  # type: ignore[list-item]
        )
    assert caught.value.param == "messages[0].content[0]"


async def test_sdk_rejects_unknown_policy(sdk):
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk.completions.create(
            model="tiny", prompt="hi", extra_headers={"x-sollol-policy": "fastest"}
        )
    assert "unknown routing policy 'fastest'" in caught.value.message


async def test_sdk_huge_body_is_413(sdk):
    with pytest.raises(openai.APIStatusError) as caught:
        await sdk.embeddings.create(model="tiny", input="x" * MAX_BODY_BYTES)
    assert caught.value.status_code == 413
    assert "max_body_bytes" in caught.value.message


async def test_sdk_passes_extra_body_to_node(sdk, fake_node):
    reply = await sdk.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hi"}],
        extra_body={"cache_prompt": False, "top_k": 5},
    )
    assert reply.choices[0].message.content == "ok"
    assert reply.model == "tiny"
    assert received_body(fake_node)["top_k"] == 5


# -- header size, on a real socket ---------------------------------------------

MAX_HEADER_BYTES = 4096


@pytest.fixture(scope="module")
def header_limited_router(fake_node, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("header-limit")
    config = workdir / "sollol.toml"
    config.write_text(
        "\n".join(
            [
                "[server]",
                'host = "127.0.0.1"',
                "port = 0",
                f'database_url = "sqlite:///{workdir / "history.db"}"',
                f"max_header_bytes = {MAX_HEADER_BYTES}",
                "",
                "[[nodes]]",
                'name = "fake"',
                'kind = "openai"',
                f'url = "{fake_node.url}"',
                'models = ["tiny"]',
                "",
            ]
        ),
        encoding="utf-8",
    )
    router = RouterProcess(config, workdir / "router.log").start()
    try:
        yield router
    finally:
        router.stop()


def raw_exchange(base_url: str, request: bytes) -> bytes:
    """Send raw bytes on a new connection and return all bytes until the server closes it."""
    host, port = base_url.removeprefix("http://").rsplit(":", 1)
    received = b""
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        try:
            connection.sendall(request)
            while chunk := connection.recv(65536):
                received += chunk
        except ConnectionResetError:
            # The server may close while part of a refused request is unread.
            pass
    return received


def head_request(padding_bytes: int) -> bytes:
    return (
        b"GET /health HTTP/1.1\r\nHost: router\r\nConnection: close\r\n"
        + b"X-Padding: "
        + b"a" * padding_bytes
        + b"\r\n\r\n"
    )


def head_of_size(size: int) -> bytes:
    request = head_request(size - len(head_request(0)))
    assert len(request) == size
    return request


def status_and_body(reply: bytes) -> tuple[bytes, bytes]:
    head, _, body = reply.partition(b"\r\n\r\n")
    return head.split(b"\r\n", 1)[0], body


def test_oversized_header_is_431(header_limited_router):
    reply = raw_exchange(header_limited_router.base_url, head_request(2 * MAX_HEADER_BYTES))
    status_line, body = status_and_body(reply)
    assert status_line.startswith(b"HTTP/1.1 431 "), reply[:300]
    error = orjson.loads(body)["error"]
    assert "max_header_bytes" in error["message"]
    assert error["type"] == "invalid_request_error"


def test_head_size_limit_is_exact(header_limited_router):
    at_limit = raw_exchange(header_limited_router.base_url, head_of_size(MAX_HEADER_BYTES))
    over_limit = raw_exchange(header_limited_router.base_url, head_of_size(MAX_HEADER_BYTES + 1))
    assert status_and_body(at_limit)[0].startswith(b"HTTP/1.1 200 "), at_limit[:300]
    assert status_and_body(over_limit)[0].startswith(b"HTTP/1.1 431 "), over_limit[:300]


def test_header_larger_than_one_read_is_431(header_limited_router):
    """Hypercorn itself rejects a head it cannot read at once, before the app receives it."""
    reply = raw_exchange(header_limited_router.base_url, head_request(256 * 1024))
    assert status_and_body(reply)[0].startswith(b"HTTP/1.1 431 "), reply[:300]


def test_router_serves_after_oversized_header(header_limited_router):
    for padding_bytes in (2 * MAX_HEADER_BYTES, 256 * 1024):
        raw_exchange(header_limited_router.base_url, head_request(padding_bytes))
    response = httpx.post(
        header_limited_router.base_url + "/v1/chat/completions", json=CHAT, timeout=10
    )
    assert response.status_code == 200, response.text
    assert response.json()["model"] == "tiny"


def test_header_under_limit_is_served(header_limited_router):
    reply = raw_exchange(header_limited_router.base_url, head_request(MAX_HEADER_BYTES // 2))
    assert status_and_body(reply)[0].startswith(b"HTTP/1.1 200 "), reply[:300]


def test_many_headers_over_limit_are_431(header_limited_router):
    headers = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 40) for i in range(200))
    request = b"GET /health HTTP/1.1\r\nHost: router\r\nConnection: close\r\n" + headers + b"\r\n"
    reply = raw_exchange(header_limited_router.base_url, request)
    assert status_and_body(reply)[0].startswith(b"HTTP/1.1 431 "), reply[:300]


def test_long_query_counts_toward_limit(header_limited_router):
    query = b"model=" + b"m" * MAX_HEADER_BYTES
    request = (
        b"GET /sollol/route?" + query + b" HTTP/1.1\r\nHost: router\r\nConnection: close\r\n\r\n"
    )
    reply = raw_exchange(header_limited_router.base_url, request)
    assert status_and_body(reply)[0].startswith(b"HTTP/1.1 431 "), reply[:300]


async def test_max_tokens_beyond_int32_is_400(client, fake_node):
    # llama-server reads it into an int32; a larger value must not reach it.
    body = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2**31}
    response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "max_tokens"


@pytest.mark.parametrize(
    "extra",
    [
        {"messages": [{"role": "assistant", "tool_calls": [{"function": "x"}]}]},
        {"messages": [{"role": "assistant", "tool_calls": "x"}]},
        {
            "messages": [
                {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": {}}}]}
            ]
        },
        {"tools": [{"type": "function", "function": "x"}]},
        {"tools": [{"type": "function", "function": {"name": 5}}]},
    ],
)
async def test_malformed_tool_calls_are_400(client, fake_node, extra):
    # llama-server rejects these with a 500 of its own, so they must not reach it.
    body = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], **extra}
    before = len(fake_node.received)
    response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    assert len(fake_node.received) == before
