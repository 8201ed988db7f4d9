"""Nodes that fail in each way a router meets: silent, resetting, erroring, slow, stalling.

Each test runs a real router process in front of a ``FaultyNode`` (and, where
failover is tested, a real llama-server), and states what the client sees
and what the history records. Timeouts are shortened so the tests are quick.
"""

import time

import httpx
import openai
import pytest

from tests.support.faulty_node import FaultyNode
from tests.support.fixtures import RouterProcess, history_rows, write_router_config

pytestmark = pytest.mark.llamacpp

MESSAGES = [{"role": "user", "content": "hello"}]
STREAM = {"model": "tiny", "messages": MESSAGES, "max_tokens": 8, "stream": True}
ROUND_ROBIN = {"x-sollol-policy": "round_robin"}
FAST_TIMEOUTS = {
    "connect_timeout_s": 2.0,
    "first_token_timeout_s": 1.5,
    "idle_timeout_s": 1.0,
    "keepalive_interval_s": 0.3,
    "breaker_open_s": 1.0,
}


@pytest.fixture
def start_router(tmp_path):
    """Return a function that starts a router in front of the given nodes."""
    started: list[RouterProcess] = []

    def start(nodes: list[dict], **server) -> RouterProcess:
        database_path = tmp_path / f"history-{len(started)}.db"
        config = write_router_config(
            tmp_path / f"sollol-{len(started)}.toml",
            database_path=database_path,
            nodes=nodes,
            server={**FAST_TIMEOUTS, **server},
        )
        router = RouterProcess(config, tmp_path / f"router-{len(started)}.log")
        started.append(router)
        router.start()
        router.database_path = database_path  # type: ignore[attr-defined]
        return router

    yield start
    for router in started:
        router.stop()


@pytest.fixture
def faulty():
    """Return a function that starts a FaultyNode; all are stopped after the test."""
    nodes: list[FaultyNode] = []

    def start(fault: str, **options) -> FaultyNode:
        node = FaultyNode(fault, **options).start()
        nodes.append(node)
        return node

    yield start
    for node in nodes:
        node.stop()


def faulty_entry(node: FaultyNode) -> dict:
    return {"name": "faulty", "kind": "openai", "url": node.url, "models": ["tiny"]}


def llama_entry(llama_nodes) -> dict:
    return {"name": "llama", "url": llama_nodes[0].url, "models": ["tiny"]}


def stream_raw(router: RouterProcess, body: dict = STREAM, headers=None) -> tuple[int, bytes]:
    with httpx.stream(
        "POST",
        router.base_url + "/v1/chat/completions",
        json=body,
        headers=headers or {},
        timeout=30,
    ) as response:
        return response.status_code, b"".join(response.iter_bytes())


def events_of(raw: bytes) -> list[bytes]:
    return [event for event in raw.split(b"\n\n") if event]


def wait_until(condition, timeout_s: float = 5.0, what: str = "condition") -> float:
    """Poll ``condition`` until it holds; return the seconds it took."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if condition():
            return time.monotonic() - started
        time.sleep(0.02)
    pytest.fail(f"{what} did not hold within {timeout_s} s")


def node_state(router: RouterProcess, name: str) -> dict:
    nodes = httpx.get(router.base_url + "/health").json()["nodes"]
    return next(node for node in nodes if node["name"] == name)


# -- before the first byte: failover -------------------------------------


def test_silent_node_stream_fails_over(start_router, faulty, llama_nodes):
    silent = faulty("silent")
    router = start_router([faulty_entry(silent), llama_entry(llama_nodes)])
    replies = [stream_raw(router, headers=ROUND_ROBIN) for _ in range(2)]

    # Round-robin sends one of the two to the silent node first. The client
    # sees keep-alive comments while the router waits, then the whole reply
    # from llama-server.
    for status, raw in replies:
        assert status == 200
        assert raw.endswith(b"data: [DONE]\n\n")
    waited = [raw for _, raw in replies if raw.startswith(b": keep-alive\n\n")]
    assert len(waited) == 1
    assert b'"error"' not in waited[0]
    assert silent.hits == 1
    wait_until(lambda: silent.active == 0, what="the silent node's request closed")

    rows = history_rows(router.database_path, 2)
    assert sorted(row["attempts"] for row in rows) == [1, 2]
    assert {row["node"] for row in rows} == {"llama"}
    assert all(row["outcome"] == "ok" for row in rows)


def test_silent_only_node_gives_504_in_openai_shape(start_router, faulty):
    silent = faulty("silent")
    router = start_router([faulty_entry(silent)])
    started = time.monotonic()
    response = httpx.post(
        router.base_url + "/v1/chat/completions",
        json={"model": "tiny", "messages": MESSAGES},
        timeout=30,
    )
    elapsed = time.monotonic() - started
    assert response.status_code == 504
    error = response.json()["error"]
    assert error["code"] == "upstream_timeout"
    assert "first_token_timeout_s" in error["message"]
    assert 1.4 < elapsed < 5.0

    [row] = history_rows(router.database_path, 1)
    assert (row["status"], row["outcome"], row["node"]) == (504, "timeout", "faulty")


@pytest.mark.parametrize("fault", ["reset_before", "error_first", "http_500"])
def test_failure_before_first_token_fails_over(start_router, faulty, llama_nodes, fault):
    node = faulty(fault)
    router = start_router([faulty_entry(node), llama_entry(llama_nodes)])
    replies = [stream_raw(router, headers=ROUND_ROBIN) for _ in range(2)]
    for status, raw in replies:
        assert status == 200
        assert raw.endswith(b"data: [DONE]\n\n")
        assert b'"error"' not in raw
    assert node.hits == 1
    rows = history_rows(router.database_path, 2)
    assert sorted(row["attempts"] for row in rows) == [1, 2]
    assert {row["node"] for row in rows} == {"llama"}


def test_sdk_gets_a_clean_stream_after_failover(start_router, faulty, llama_nodes):
    node = faulty("reset_before")
    router = start_router([faulty_entry(node), llama_entry(llama_nodes)])
    with openai.OpenAI(base_url=router.base_url + "/v1", api_key="unused", max_retries=0) as sdk:
        for _ in range(2):
            chunks = list(
                sdk.chat.completions.create(
                    model="tiny",
                    messages=MESSAGES,
                    max_tokens=6,
                    stream=True,
                    extra_headers=ROUND_ROBIN,
                )
            )
            assert chunks[-1].choices == [] or chunks[-1].choices[0].finish_reason is not None
    assert node.hits == 1


# -- after the first byte: an error event, no [DONE] ----------------------


def test_reset_mid_stream_ends_with_error_event(start_router, faulty):
    node = faulty("reset_after", events_before_fault=3)
    router = start_router([faulty_entry(node)])
    status, raw = stream_raw(router)
    assert status == 200
    events = events_of(raw)
    assert [event.count(b'"content"') for event in events[:3]] == [1, 1, 1]
    assert events[-1].startswith(b'data: {"error"')
    assert b"failed in the middle of the stream" in events[-1]
    assert b"data: [DONE]" not in raw
    assert b'finish_reason":"stop' not in raw
    assert len(events) == 4, "nothing may be sent twice"

    [row] = history_rows(router.database_path, 1)
    assert row["outcome"] == "error"
    assert row["completion_tokens"] == 3
    assert "middle of the stream" in row["error"]


def test_sdk_raises_api_error_on_mid_stream_reset(start_router, faulty):
    node = faulty("reset_after", events_before_fault=2)
    router = start_router([faulty_entry(node)])
    with openai.OpenAI(base_url=router.base_url + "/v1", api_key="unused", max_retries=0) as sdk:
        received = []
        with pytest.raises(openai.APIError, match="middle of the stream"):
            for chunk in sdk.chat.completions.create(
                model="tiny", messages=MESSAGES, max_tokens=8, stream=True
            ):
                received.append(chunk.choices[0].delta.content)
    assert received == ["t0 ", "t1 "]


def test_slow_node_stream_completes(start_router, faulty):
    # Tokens 0.6 s apart: under the 1 s idle limit, over the 0.3 s keep-alive interval.
    node = faulty("slow", tokens=4, token_interval_s=0.6)
    router = start_router([faulty_entry(node)])
    with openai.OpenAI(base_url=router.base_url + "/v1", api_key="unused", max_retries=0) as sdk:
        chunks = list(
            sdk.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8, stream=True)
        )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == "t0 t1 t2 t3 "
    [row] = history_rows(router.database_path, 1)
    assert row["outcome"] == "ok"


def test_keepalive_comments_go_out_between_slow_tokens(start_router, faulty):
    node = faulty("slow", tokens=3, token_interval_s=0.8)
    router = start_router([faulty_entry(node)])
    status, raw = stream_raw(router)
    assert status == 200
    assert raw.endswith(b"data: [DONE]\n\n")
    assert raw.count(b": keep-alive\n\n") >= 2


def test_stalled_stream_hits_idle_timeout(start_router, faulty):
    node = faulty("stall_after", events_before_fault=2)
    router = start_router([faulty_entry(node)])
    started = time.monotonic()
    status, raw = stream_raw(router)
    elapsed = time.monotonic() - started
    events = [event for event in events_of(raw) if not event.startswith(b":")]
    assert status == 200
    assert len(events) == 3
    assert events[-1].startswith(b'data: {"error"')
    assert b"idle_timeout_s" in events[-1]
    assert b"data: [DONE]" not in raw
    assert 0.9 < elapsed < 4.0
    # Closing the upstream connection ends the node's work.
    wait_until(lambda: node.active == 0, timeout_s=1.0, what="the stalled request closed")

    [row] = history_rows(router.database_path, 1)
    assert row["outcome"] == "timeout"
    assert row["completion_tokens"] == 2


def test_total_timeout_ends_a_long_stream(start_router, faulty):
    node = faulty("slow", tokens=20, token_interval_s=0.2)
    router = start_router([faulty_entry(node)], total_timeout_s=1.5)
    status, raw = stream_raw(router)
    events = [event for event in events_of(raw) if not event.startswith(b":")]
    assert status == 200
    assert b"total_timeout_s" in events[-1]
    assert b"data: [DONE]" not in raw
    assert 3 <= len(events) - 1 < 20
    [row] = history_rows(router.database_path, 1)
    assert row["outcome"] == "timeout"


# -- breaker ----------------------------------------------------------------


def test_request_every_node_rejects_opens_no_breaker(start_router, faulty):
    # Both nodes return 500 for everything, as llama-server does for some bad
    # input, so the request, not the nodes, is the likely cause.
    nodes = [faulty("http_500"), faulty("http_500")]
    entries = [{**faulty_entry(node), "name": f"n{index}"} for index, node in enumerate(nodes)]
    router = start_router(entries)
    for _ in range(5):
        response = httpx.post(
            router.base_url + "/v1/chat/completions",
            json={"model": "tiny", "messages": MESSAGES},
            timeout=30,
        )
        assert response.status_code == 502
        # The text comes from a node, so the reply names it.
        assert response.headers["x-sollol-node"] in {"n0", "n1"}
    assert {node_state(router, name)["breaker"] for name in ("n0", "n1")} == {"closed"}


def test_failing_node_breaker_opens(start_router, faulty, llama_nodes):
    node = faulty("http_500")
    router = start_router([faulty_entry(node), llama_entry(llama_nodes)], breaker_open_s=2.0)
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 2}

    def send() -> httpx.Response:
        return httpx.post(
            router.base_url + "/v1/chat/completions", json=body, headers=ROUND_ROBIN, timeout=30
        )

    # Without a breaker, round-robin would send half of these to the failing
    # node first; with it, three failures in a row open the breaker.
    for _ in range(10):
        assert send().status_code == 200
    assert node.hits == 3
    assert node_state(router, "faulty")["breaker"] == "open"

    # Once the open period is over, one trial request goes through; it succeeds
    # now, which closes the breaker.
    node.fault = "none"
    wait_until(
        lambda: node_state(router, "faulty")["breaker"] == "half_open",
        timeout_s=5.0,
        what="the breaker became half-open",
    )
    served_by = {send().headers["x-sollol-node"] for _ in range(4)}
    assert "faulty" in served_by
    assert node_state(router, "faulty")["breaker"] == "closed"
