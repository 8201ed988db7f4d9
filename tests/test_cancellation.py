"""A client that hangs up stops the node's work, and leaves nothing behind in the router.

Checked on a real llama-server through its ``/slots`` endpoint: the slot that
generated the reply must be idle within a second of the client leaving.
"""

import asyncio
import time

import httpx
import pytest

from tests.support.faulty_node import FaultyNode
from tests.support.fixtures import (
    RouterProcess,
    history_rows,
    start_llama_server,
    write_router_config,
)

pytestmark = pytest.mark.llamacpp

# At about 400 tokens/s on two CPU cores, this reply would take 15 s or more.
LONG_REPLY = {
    "model": "tiny",
    "messages": [{"role": "user", "content": "Keep talking."}],
    "max_tokens": 6000,
    "ignore_eos": True,
}


@pytest.fixture(scope="module")
def long_node(llama_bin_dir, tiny_model, tmp_path_factory):
    """One llama-server with a single slot and room for a long reply."""
    log_dir = tmp_path_factory.mktemp("long-node")
    server = start_llama_server(
        llama_bin_dir, tiny_model, log_dir, "long", parallel=1, context_size=8192
    )
    yield server
    server.stop()


@pytest.fixture
def router(long_node, tmp_path):
    config = write_router_config(
        tmp_path / "sollol.toml",
        database_path=tmp_path / "history.db",
        nodes=[{"name": "long", "url": long_node.url, "models": ["tiny"]}],
        # A probe's /slots request that is already on its way when a
        # non-streamed request starts can make llama-server miss the closed
        # connection (see probes.llama_load). After the probe at start-up,
        # none runs during these tests, so that race cannot decide them.
        server={"health_interval_s": 60.0},
    )
    process = RouterProcess(config, tmp_path / "router.log").start()
    process.database_path = tmp_path / "history.db"  # type: ignore[attr-defined]
    yield process
    process.stop()


def _log_since(node, offset: int) -> bytes:
    with open(node.log_path, "rb") as log_file:
        log_file.seek(offset)
        return log_file.read()


def slot_busy(node) -> bool:
    slots = httpx.get(node.url + "/slots", timeout=5).json()
    return any(slot["is_processing"] for slot in slots)


def wait_for(condition, what: str, timeout_s: float = 2.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def seconds_until_idle(node, timeout_s: float = 5.0) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if not slot_busy(node):
            return time.monotonic() - started
        time.sleep(0.02)
    pytest.fail(f"llama-server still generating {timeout_s} s after the client left")


def test_stream_cancelled_by_client_stops_generation(router, long_node):
    received = 0
    with httpx.stream(
        "POST", router.base_url + "/v1/chat/completions", json={**LONG_REPLY, "stream": True}
    ) as response:
        # Kept in a variable: a discarded httpx iterator closes the response.
        pieces = response.iter_raw()
        while received < 5:
            received += next(pieces).count(b'"content"')
        wait_for(lambda: slot_busy(long_node), "the slot to report it is processing")
    # Leaving the block closed the connection to the router.
    assert seconds_until_idle(long_node) < 1.0

    [row] = history_rows(router.database_path, 1)
    assert row["outcome"] == "cancelled"
    assert row["status"] == 200
    # Counted from the relayed chunks: at least what the client read.
    assert row["completion_tokens"] >= 5


def test_non_streamed_request_cancelled_by_client_stops_generation(router, long_node):
    # A /slots request during a non-streamed reply can make llama-server miss
    # that the connection closed (see probes.llama_load), so this test sends
    # nothing to the node until its log records the cancelled task.
    log_start = long_node.log_path.stat().st_size
    url = router.base_url + "/v1/chat/completions"
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url, json=LONG_REPLY, timeout=httpx.Timeout(5.0, read=1.0))
    left = time.monotonic()
    wait_for(lambda: b"cancel task" in _log_since(long_node, log_start), "llama-server to cancel")
    assert time.monotonic() - left < 1.0
    assert not slot_busy(long_node)

    [row] = history_rows(router.database_path, 1)
    assert row["outcome"] == "cancelled"
    assert row["status"] == 499


def test_non_streamed_request_cancelled_by_client_closes_upstream(tmp_path):
    silent = FaultyNode("silent").start()
    config = write_router_config(
        tmp_path / "sollol.toml",
        database_path=tmp_path / "history.db",
        nodes=[{"name": "silent", "kind": "openai", "url": silent.url, "models": ["tiny"]}],
    )
    router = RouterProcess(config, tmp_path / "router.log").start()
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                router.base_url + "/v1/chat/completions",
                json={"model": "tiny", "messages": LONG_REPLY["messages"]},
                timeout=httpx.Timeout(5.0, read=0.5),
            )
        wait_for(lambda: silent.active == 0, "the node's handler to end", timeout_s=1.0)
        [row] = history_rows(tmp_path / "history.db", 1)
        assert (row["status"], row["outcome"]) == (499, "cancelled")
    finally:
        router.stop()
        silent.stop()


def test_disconnect_storm_leaves_router_idle(tmp_path, llama_bin_dir, long_node):
    """Clients leaving mid-stream and a node resetting connections leak nothing."""
    resetting = FaultyNode("reset_after", events_before_fault=3).start()
    config = write_router_config(
        tmp_path / "sollol.toml",
        database_path=tmp_path / "history.db",
        nodes=[
            {"name": "long", "url": long_node.url, "models": ["tiny"]},
            {"name": "resetting", "kind": "openai", "url": resetting.url, "models": ["tiny"]},
        ],
        # The resetting node's breaker would soon keep the storm off it.
        server={"breaker_failures": 1000},
    )
    router = RouterProcess(config, tmp_path / "router.log").start()
    try:
        asyncio.run(_storm(router.base_url, clients=24))
        nodes = httpx.get(router.base_url + "/health").json()["nodes"]
        assert [node["in_flight"] for node in nodes] == [0, 0]
        assert resetting.active == 0
        assert seconds_until_idle(long_node) < 1.0

        # The next request is served at once, not after a leaked slot frees up.
        started = time.monotonic()
        reply = httpx.post(
            router.base_url + "/v1/chat/completions",
            json={**LONG_REPLY, "max_tokens": 4},
            headers={"x-sollol-policy": "least_loaded"},
            timeout=10,
        )
        assert reply.status_code == 200
        assert time.monotonic() - started < 1.0
    finally:
        router.stop()
        resetting.stop()


async def _storm(base_url: str, *, clients: int) -> None:
    """Open ``clients`` streams at once; each hangs up after its first content."""

    async def one(client: httpx.AsyncClient) -> None:
        body = {**LONG_REPLY, "stream": True}
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            async for piece in response.aiter_raw():
                if b'"content"' in piece or b'"error"' in piece:
                    break

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=30) as client:
        await asyncio.gather(*(one(client) for _ in range(clients)))
