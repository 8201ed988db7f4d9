"""The OpenAI Python SDK through a Hypercorn-served router to two real llama-server nodes."""

import asyncio
import base64
import itertools
import json
import sqlite3
import time

import httpx
import numpy as np
import openai
import pytest

pytestmark = pytest.mark.llamacpp

MESSAGES = [{"role": "user", "content": "Say something about routers."}]
# Greedy decoding without the prompt cache, so the same request gives the same
# tokens on either node and when sent to a node directly.
DETERMINISTIC = {
    "temperature": 0.0,
    "seed": 7,
    "extra_body": {"cache_prompt": False, "ignore_eos": True},
}
# Random weights can emit the end-of-sequence token at any step; tests that
# count tokens make llama-server ignore it.
FULL_LENGTH = {"extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def client(router):
    with openai.OpenAI(base_url=router.base_url + "/v1", api_key="unused", max_retries=0) as sdk:
        yield sdk


@pytest.fixture
async def async_client(router):
    async with openai.AsyncOpenAI(
        base_url=router.base_url + "/v1", api_key="unused", max_retries=0
    ) as sdk:
        yield sdk


class CorruptBodyTransport(httpx.BaseTransport):
    """Sends a truncated JSON body in place of the SDK's request body."""

    def __init__(self) -> None:
        self._inner = httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        broken = httpx.Request(
            request.method,
            request.url,
            headers={k: v for k, v in request.headers.items() if k.lower() != "content-length"},
            content=b'{"model": "tiny", "messages": [',
        )
        return self._inner.handle_request(broken)

    def close(self) -> None:
        self._inner.close()


def test_chat_reply_names_requested_model(client):
    reply = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=8, **FULL_LENGTH
    )
    assert reply.model == "tiny"
    assert reply.choices[0].message.role == "assistant"
    assert isinstance(reply.choices[0].message.content, str)
    assert reply.usage.completion_tokens == 8


def served_by(client, policy, count):
    nodes = []
    for _ in range(count):
        raw = client.chat.completions.with_raw_response.create(
            model="tiny",
            messages=MESSAGES,
            max_tokens=2,
            extra_headers={"x-sollol-policy": policy},
            **FULL_LENGTH,
        )
        assert raw.headers["x-sollol-policy"] == policy
        nodes.append(raw.headers["x-sollol-node"])
    return nodes


def test_both_nodes_serve_requests(client):
    # Sequential requests leave both nodes idle, so ties rotate between them.
    assert set(served_by(client, "least_loaded", 8)) == {"node-a", "node-b"}


def test_round_robin_alternates(client):
    nodes = served_by(client, "round_robin", 6)
    assert all(first != second for first, second in itertools.pairwise(nodes))


def test_unknown_policy_header_is_400(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="tiny", messages=MESSAGES, extra_headers={"x-sollol-policy": "fastest"}
        )
    assert caught.value.param == "x-sollol-policy"


def test_stream_deltas_equal_direct_node_output(client, llama_nodes):
    stream = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=24, stream=True, **DETERMINISTIC
    )
    routed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)

    with openai.OpenAI(base_url=llama_nodes[0].url + "/v1", api_key="unused") as direct_client:
        direct = direct_client.chat.completions.create(
            model="tiny", messages=MESSAGES, max_tokens=24, stream=True, **DETERMINISTIC
        )
        expected = "".join(
            chunk.choices[0].delta.content or "" for chunk in direct if chunk.choices
        )
    assert routed
    assert routed == expected


def test_stream_include_usage_adds_final_usage_chunk(client):
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=MESSAGES,
            max_tokens=5,
            stream=True,
            stream_options={"include_usage": True},
            **FULL_LENGTH,
        )
    )
    assert all(chunk.model == "tiny" for chunk in chunks)
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 5


def test_stream_without_include_usage_has_no_usage_chunk(client):
    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=MESSAGES, max_tokens=5, stream=True, **FULL_LENGTH
        )
    )
    assert all(chunk.choices for chunk in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stream_bytes_are_sse_events(router):
    body = {
        "model": "tiny",
        "messages": MESSAGES,
        "max_tokens": 6,
        "stream": True,
        "ignore_eos": True,
    }
    with httpx.stream("POST", router.base_url + "/v1/chat/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache"
        assert response.headers["x-accel-buffering"] == "no"
        assert response.headers["x-sollol-node"] in {"node-a", "node-b"}
        raw = response.read()
    events = raw.split(b"\n\n")
    assert events[-1] == b""
    assert events[-2] == b"data: [DONE]"
    assert raw.count(b"data: [DONE]") == 1
    assert all(event.startswith(b"data: {") for event in events[:-2])


def test_completions(client):
    reply = client.completions.create(
        model="tiny", prompt="The router", max_tokens=6, **FULL_LENGTH
    )
    assert reply.model == "tiny"
    assert reply.usage.completion_tokens == 6
    streamed = list(
        client.completions.create(
            model="tiny", prompt="The router", max_tokens=4, stream=True, **FULL_LENGTH
        )
    )
    assert all(chunk.model == "tiny" for chunk in streamed)
    assert streamed[-1].choices[0].finish_reason == "length"


def test_embeddings_float_and_base64_agree(client):
    as_float = client.embeddings.create(
        model="tiny-embed", input=["alpha", "beta"], encoding_format="float"
    )
    # With no encoding_format the SDK requests base64 and decodes it itself.
    as_default = client.embeddings.create(model="tiny-embed", input=["alpha", "beta"])
    assert as_float.model == "tiny-embed"
    assert len(as_float.data) == 2
    assert len(as_float.data[0].embedding) == 256
    for left, right in zip(as_float.data, as_default.data, strict=True):
        np.testing.assert_allclose(left.embedding, right.embedding, rtol=1e-6)


def test_embeddings_base64_wire_format(router):
    body = {"model": "tiny-embed", "input": "alpha", "encoding_format": "base64"}
    reply = httpx.post(router.base_url + "/v1/embeddings", json=body).json()
    vector = np.frombuffer(base64.b64decode(reply["data"][0]["embedding"]), dtype="<f4")
    assert vector.shape == (256,)
    assert reply["model"] == "tiny-embed"


def test_models_lists_every_served_model(client):
    assert sorted(model.id for model in client.models.list()) == ["tiny", "tiny-embed"]


def test_unknown_model_raises_not_found(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="missing", messages=MESSAGES)
    assert caught.value.code == "model_not_found"


def test_unknown_model_stream_raises_not_found(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="missing", messages=MESSAGES, stream=True)


def test_malformed_json_raises_bad_request(router):
    with (
        openai.OpenAI(
            base_url=router.base_url + "/v1",
            api_key="unused",
            max_retries=0,
            http_client=httpx.Client(transport=CorruptBodyTransport()),
        ) as broken_client,
        pytest.raises(openai.BadRequestError) as caught,
    ):
        broken_client.chat.completions.create(model="tiny", messages=MESSAGES)
    assert caught.value.type == "invalid_request_error"


async def test_async_chat_and_stream(async_client):
    reply = await async_client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=4, **FULL_LENGTH
    )
    assert reply.model == "tiny"
    stream = await async_client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        max_tokens=4,
        stream=True,
        stream_options={"include_usage": True},
        **FULL_LENGTH,
    )
    chunks = [chunk async for chunk in stream]
    # llama-server holds back bytes of an unfinished UTF-8 character, so one
    # chunk may carry several tokens: count tokens from usage, not chunks.
    assert chunks[-1].usage.completion_tokens == 4
    assert chunks[-2].choices[0].finish_reason == "length"


async def test_async_embeddings(async_client):
    reply = await async_client.embeddings.create(model="tiny-embed", input="gamma")
    assert len(reply.data[0].embedding) == 256


def last_history_id(database_path):
    with sqlite3.connect(database_path) as connection:
        return connection.execute("SELECT coalesce(max(id), 0) FROM requests").fetchone()[0]


def test_history_records_each_request(client, router):
    # Rows from earlier tests may still be on their way to the database, so
    # wait for this test's two rows by id, not for the newest rows.
    time.sleep(1.0)
    first_id = last_history_id(router.database_path) + 1

    plain = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=3, **FULL_LENGTH
    )
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=MESSAGES,
            max_tokens=3,
            stream=True,
            stream_options={"include_usage": True},
            **FULL_LENGTH,
        )
    )

    rows = []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and len(rows) < 2:
        with sqlite3.connect(router.database_path) as connection:
            rows = connection.execute(
                "SELECT route, model, node, stream, status, outcome, prompt_tokens, "
                "completion_tokens, ttft_ms, latency_ms FROM requests WHERE id >= ? ORDER BY id",
                (first_id,),
            ).fetchall()
        time.sleep(0.1)
    assert len(rows) == 2

    plain_row, streamed_row = rows
    assert streamed_row[:2] == ("/v1/chat/completions", "tiny")
    assert streamed_row[2] in {"node-a", "node-b"}
    assert streamed_row[3:6] == (1, 200, "ok")
    assert streamed_row[6:8] == (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens)
    assert streamed_row[8] > 0
    assert plain_row[3:6] == (0, 200, "ok")
    assert plain_row[6:8] == (plain.usage.prompt_tokens, plain.usage.completion_tokens)
    assert plain_row[8] is None
    assert plain_row[9] > 0

    with sqlite3.connect(router.database_path) as connection:
        features = connection.execute(
            "SELECT est_prompt_tokens, max_tokens, node_in_flight, node_slots, decode_tps "
            "FROM requests WHERE id >= ? ORDER BY id",
            (first_id,),
        ).fetchall()
    for est_prompt_tokens, max_tokens, node_in_flight, node_slots, decode_tps in features:
        assert est_prompt_tokens > 0
        assert max_tokens == 3
        assert node_in_flight >= 0
        assert node_slots in (None, 2)  # None until the first probe has read /props
        assert decode_tps is None or decode_tps > 0


def test_node_error_keeps_status_and_names_node(router):
    # The router checks only that response_format is an object; llama-server
    # rejects the unknown type.
    body = {"model": "tiny", "messages": MESSAGES, "response_format": {"type": "bogus"}}
    response = httpx.post(router.base_url + "/v1/chat/completions", json=body)
    assert response.status_code == 400
    assert response.headers["x-sollol-node"] in {"node-a", "node-b"}
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_live_signals_from_llama_server(client, router):
    client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4, **FULL_LENGTH)
    deadline = time.monotonic() + 5
    nodes = []
    while time.monotonic() < deadline:
        nodes = httpx.get(router.base_url + "/health").json()["nodes"]
        if all(node["slots_total"] for node in nodes):
            break
        time.sleep(0.2)
    # Both nodes run with -np 2, which the router reads from /props.
    assert [node["slots_total"] for node in nodes] == [2, 2]
    assert any(node["ttft_ms"] is not None for node in nodes)
    assert any(node["decode_tokens_per_s"] for node in nodes)


def test_history_records_policy_and_scores(client, router):
    time.sleep(1.0)  # let rows of earlier tests reach the database first
    first_id = last_history_id(router.database_path) + 1
    client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        max_tokens=2,
        extra_headers={"x-sollol-policy": "sollol_heuristic"},
        **FULL_LENGTH,
    )
    row = None
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and row is None:
        with sqlite3.connect(router.database_path) as connection:
            row = connection.execute(
                "SELECT policy, scores, node FROM requests WHERE id >= ?", (first_id,)
            ).fetchone()
        time.sleep(0.1)
    assert row is not None
    policy, scores, node = row
    assert policy == "sollol_heuristic"
    parsed = json.loads(scores)
    assert set(parsed) == {"node-a", "node-b"}
    assert parsed[node] == min(parsed.values())


async def health_of(http: httpx.AsyncClient) -> dict:
    return (await http.get("/health")).json()


async def fill_every_slot(http: httpx.AsyncClient, max_tokens: int) -> list[asyncio.Task]:
    """Start four long requests, one per slot of the two 2-slot nodes, and wait until all run."""
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": max_tokens, "ignore_eos": True}
    headers = {"x-sollol-policy": "least_loaded"}
    blockers = [
        asyncio.create_task(http.post("/v1/chat/completions", json=body, headers=headers))
        for _ in range(4)
    ]
    deadline = time.monotonic() + 10
    while sum(node["in_flight"] for node in (await health_of(http))["nodes"]) < 4:
        assert time.monotonic() < deadline, "the four long requests never all started"
        await asyncio.sleep(0.01)
    return blockers


async def test_request_waits_while_every_slot_is_busy(router):
    async with httpx.AsyncClient(base_url=router.base_url, timeout=60) as http:
        blockers = await fill_every_slot(http, max_tokens=800)
        waiting = asyncio.create_task(
            http.post(
                "/v1/chat/completions",
                json={"model": "tiny", "messages": MESSAGES, "max_tokens": 2, "priority": 9},
            )
        )
        queued_seen = 0
        deadline = time.monotonic() + 10
        while not waiting.done() and time.monotonic() < deadline:
            queued_seen = max(queued_seen, (await health_of(http))["queued"])
            await asyncio.sleep(0.01)
        replies = await asyncio.gather(*blockers, waiting)
    assert [reply.status_code for reply in replies] == [200] * 5
    assert queued_seen == 1


async def test_disconnected_client_leaves_queue(router):
    async with httpx.AsyncClient(base_url=router.base_url, timeout=60) as http:
        blockers = await fill_every_slot(http, max_tokens=900)
        deadline = time.monotonic() + 10

        # This client gives up while its request waits, closing the connection.
        async with httpx.AsyncClient(base_url=router.base_url, timeout=0.3) as impatient:
            with pytest.raises(httpx.ReadTimeout):
                await impatient.post(
                    "/v1/chat/completions",
                    json={"model": "tiny", "messages": MESSAGES, "max_tokens": 2},
                )
        queued_after = None
        while time.monotonic() < deadline:
            queued_after = (await health_of(http))["queued"]
            if queued_after == 0:
                break
            await asyncio.sleep(0.01)
        still_running = sum(not blocker.done() for blocker in blockers)
        replies = await asyncio.gather(*blockers)
    assert queued_after == 0
    assert still_running > 0, "the queue emptied only because the long requests ended"
    assert [reply.status_code for reply in replies] == [200] * 4
