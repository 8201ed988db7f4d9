"""A llama-server killed with SIGKILL, between requests and in the middle of a stream."""

import signal
import sqlite3
import time

import httpx
import openai
import pytest

from tests.support.fixtures import RouterProcess, start_llama_server, write_router_config

pytestmark = pytest.mark.llamacpp

MESSAGES = [{"role": "user", "content": "Keep talking."}]


@pytest.fixture
def doomed_cluster(llama_bin_dir, tiny_model, tmp_path):
    """Two fresh llama-server nodes and a router, for tests that kill a node."""
    servers = [
        start_llama_server(llama_bin_dir, tiny_model, tmp_path, name) for name in ("n1", "n2")
    ]
    config = write_router_config(
        tmp_path / "sollol.toml",
        database_path=tmp_path / "history.db",
        nodes=[
            {"name": name, "url": server.url, "models": ["tiny"]}
            for name, server in zip(("n1", "n2"), servers, strict=True)
        ],
    )
    router = RouterProcess(config, tmp_path / "router.log").start()
    router.database_path = tmp_path / "history.db"  # type: ignore[attr-defined]
    try:
        yield router, dict(zip(("n1", "n2"), servers, strict=True))
    finally:
        router.stop()
        for server in servers:
            server.stop()


def kill(server) -> None:
    server.process.send_signal(signal.SIGKILL)
    server.process.wait(10)


def test_killed_node_between_requests_fails_over(doomed_cluster):
    router, servers = doomed_cluster
    with openai.OpenAI(base_url=router.base_url + "/v1", api_key="unused", max_retries=0) as sdk:
        kill(servers["n1"])
        served_by = []
        for _ in range(4):
            raw = sdk.chat.completions.with_raw_response.create(
                model="tiny",
                messages=MESSAGES,
                max_tokens=2,
                extra_headers={"x-sollol-policy": "round_robin"},
            )
            served_by.append(raw.headers["x-sollol-node"])
    # Round-robin sends some of these to n1 first; each moves on to n2.
    assert served_by == ["n2"] * 4
    nodes = {node["name"]: node for node in httpx.get(router.base_url + "/health").json()["nodes"]}
    assert nodes["n1"]["healthy"] is False
    assert nodes["n2"]["healthy"] is True


def test_killed_idle_node_leaves_at_the_next_probe(doomed_cluster):
    router, servers = doomed_cluster
    kill(servers["n1"])
    killed = time.monotonic()
    # Probes run every second here; three failed probes would take 3 s, but a
    # refused connection takes the node out at the first.
    nodes = {}
    while time.monotonic() - killed < 10:
        nodes = {n["name"]: n for n in httpx.get(router.base_url + "/health").json()["nodes"]}
        if not nodes["n1"]["up"]:
            break
        time.sleep(0.05)
    assert nodes["n1"]["up"] is False
    assert time.monotonic() - killed < 2.5
    assert nodes["n2"]["healthy"] is True


def test_node_killed_mid_stream_ends_with_error_event(doomed_cluster):
    router, servers = doomed_cluster
    body = {
        "model": "tiny",
        "messages": MESSAGES,
        "max_tokens": 900,
        "ignore_eos": True,
        "stream": True,
    }
    raw = b""
    with httpx.stream("POST", router.base_url + "/v1/chat/completions", json=body) as response:
        victim = servers[response.headers["x-sollol-node"]]
        for piece in response.iter_bytes():
            raw += piece
            if raw.count(b"\n\n") >= 3 and victim.process.poll() is None:
                kill(victim)
    events = [event for event in raw.split(b"\n\n") if event]
    assert b"data: [DONE]" not in events
    assert events[-1].startswith(b'data: {"error"')
    assert b"failed in the middle of the stream" in events[-1]

    deadline = time.monotonic() + 5
    row = None
    while time.monotonic() < deadline and row is None:
        with sqlite3.connect(router.database_path) as connection:
            row = connection.execute(
                "SELECT outcome, error FROM requests WHERE stream = 1 ORDER BY id DESC"
            ).fetchone()
        time.sleep(0.1)
    assert row is not None
    assert row[0] == "error"
    assert "failed in the middle of the stream" in row[1]


def test_sdk_raises_on_mid_stream_failure(doomed_cluster):
    router, servers = doomed_cluster
    with openai.OpenAI(base_url=router.base_url + "/v1", api_key="unused", max_retries=0) as sdk:
        stream = sdk.chat.completions.with_streaming_response.create(
            model="tiny", messages=MESSAGES, max_tokens=900, stream=True,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        with stream as response:
            victim = servers[response.headers["x-sollol-node"]]
            received = 0
            with pytest.raises(openai.APIError, match="middle of the stream"):
                for _ in response.parse():
                    received += 1
                    if received == 3:
                        kill(victim)
