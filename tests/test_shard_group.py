"""Shard groups with real ggml-rpc-server and llama-server processes on 127.0.0.1."""

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest

from sollol.shard.state import load_state, process_alive
from tests.support.fake_rpc_worker import FakeRpcWorker
from tests.support.fixtures import RouterProcess, write_router_config
from tests.support.shard import ShardUp, group_table, local_workers

pytestmark = pytest.mark.llamacpp

MESSAGES = [{"role": "user", "content": "Hello there"}]
# The router probes every second and takes a node out after 3 failed probes.
GROUP_DOWN_BOUND_S = 10.0
GROUP_BACK_BOUND_S = 20.0


def sollol(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sollol", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def write_config(tmp_path, tiny_model, *, workers, nodes=(), name="pair", **group_options):
    """Write a router config with the shard group ``name`` and the given single nodes."""
    config = write_router_config(
        tmp_path / "sollol.toml", database_path=tmp_path / "history.db", nodes=list(nodes)
    )
    runtime_dir = tmp_path / "runtime"
    table = group_table(
        name=name, model=tiny_model, runtime_dir=runtime_dir, workers=workers, **group_options
    )
    with open(config, "a", encoding="utf-8") as handle:
        handle.write("\n" + table)
    return config, runtime_dir


def assert_all_stopped(runtime_dir) -> None:
    state = load_state(runtime_dir)
    assert state is not None
    assert not process_alive(state.coordinator_pid, "llama-server")
    for worker in state.workers:
        assert not process_alive(worker.pid, "ggml-rpc-server"), worker


@pytest.fixture
def running_group(llama_bin_dir, tiny_model, tmp_path):
    """A two-worker group brought up by `sollol shard up`, and the router in front of it."""
    config, runtime_dir = write_config(tmp_path, tiny_model, workers=local_workers(2))
    shard = ShardUp(config, "pair")
    router = None
    try:
        shard.wait_for("serves 'tiny-shard'")
        router = RouterProcess(config, tmp_path / "router.log").start()
        yield shard, router, runtime_dir
    finally:
        if router is not None:
            router.stop()
        shard.stop()
    assert_all_stopped(runtime_dir)


def wait_group_health(router, healthy: bool, timeout_s: float) -> float:
    """Poll the router's /health until the group's node is (not) healthy; return the wait."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        body = httpx.get(router.base_url + "/health", timeout=2.0).json()
        (node,) = [node for node in body["nodes"] if node["name"] == "pair"]
        if node["healthy"] is healthy:
            return time.monotonic() - started
        time.sleep(0.1)
    pytest.fail(f"group node not healthy={healthy} within {timeout_s} s: {node}")


def test_group_serves_openai_sdk_through_router(running_group):
    shard, router, _ = running_group
    wait_group_health(router, True, GROUP_BACK_BOUND_S)
    with openai.OpenAI(base_url=router.base_url + "/v1", api_key="unused", max_retries=0) as sdk:
        raw = sdk.chat.completions.with_raw_response.create(
            model="tiny-shard", messages=MESSAGES, max_tokens=8
        )
        reply = raw.parse()
        chunks = list(
            sdk.chat.completions.create(
                model="tiny-shard", messages=MESSAGES, max_tokens=8, stream=True
            )
        )
    assert raw.headers["x-sollol-node"] == "pair"
    assert reply.model == "tiny-shard"
    assert reply.usage is not None
    assert reply.usage.completion_tokens == 8
    assert chunks[0].model == "tiny-shard"
    # Each worker gets one of the tiny model's two layers; the second also the output layer.
    assert [line for line in shard.lines if "layer(s)" in line] == [
        line for line in shard.lines if "1 layer(s)" in line
    ]
    assert len([line for line in shard.lines if "1 layer(s)" in line]) == 2


def test_status_reports_running_group(running_group):
    shard, _, _ = running_group
    result = sollol("shard", "status", "--config", str(shard.config_path))
    assert result.returncode == 0, result.stderr
    first, *workers = result.stdout.splitlines()
    assert first.startswith("pair: running")
    assert "coordinator healthy" in first
    assert len(workers) == 2
    assert all("local, pid" in line and "running" in line for line in workers)


@pytest.fixture
def group_beside_node(llama_bin_dir, tiny_model, llama_nodes, tmp_path):
    """A group that waits 6 s before a restart, and a single node serving the same model."""
    config, runtime_dir = write_config(
        tmp_path,
        tiny_model,
        workers=local_workers(2),
        nodes=[{"name": "single", "url": llama_nodes[0].url, "models": ["tiny-shard"]}],
        restart_initial_s=6.0,
    )
    shard = ShardUp(config, "pair")
    router = None
    try:
        shard.wait_for("serves 'tiny-shard'")
        router = RouterProcess(config, tmp_path / "router.log").start()
        yield shard, router, runtime_dir
    finally:
        if router is not None:
            router.stop()
        shard.stop()
    assert_all_stopped(runtime_dir)


def served_by(router, count: int) -> list[str]:
    """Send ``count`` round-robin completions; return the node that served each."""
    nodes = []
    with openai.OpenAI(base_url=router.base_url + "/v1", api_key="unused", max_retries=0) as sdk:
        for _ in range(count):
            raw = sdk.completions.with_raw_response.create(
                model="tiny-shard",
                prompt="Hello",
                max_tokens=4,
                extra_headers={"x-sollol-policy": "round_robin"},
            )
            assert raw.parse().usage.completion_tokens == 4
            nodes.append(raw.headers["x-sollol-node"])
    return nodes


def test_killed_worker_restarts_group(group_beside_node):
    shard, router, runtime_dir = group_beside_node
    wait_group_health(router, True, GROUP_BACK_BOUND_S)
    state = load_state(runtime_dir)
    assert state is not None
    coordinator_port = int(state.url.rsplit(":", 1)[1])
    victim = shard.worker_pids(runtime_dir)[0]
    os.kill(victim, signal.SIGKILL)

    shard.wait_for(f"exited with code -{signal.SIGKILL.value}")
    # The supervisor kills the coordinator at once, so its port refuses connections.
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", coordinator_port), timeout=1.0).close()
    # Requests in the meantime go to the single node.
    assert served_by(router, 3) == ["single"] * 3
    down_after_s = wait_group_health(router, False, GROUP_DOWN_BOUND_S)
    assert down_after_s < GROUP_DOWN_BOUND_S

    shard.wait_for("serves 'tiny-shard'", timeout_s=GROUP_BACK_BOUND_S)
    wait_group_health(router, True, GROUP_BACK_BOUND_S)
    assert "pair" in served_by(router, 4)
    state = load_state(runtime_dir)
    assert state is not None
    assert state.restarts == 1
    assert victim not in shard.worker_pids(runtime_dir)


def test_shard_down_stops_group(llama_bin_dir, tiny_model, tmp_path):
    config, runtime_dir = write_config(tmp_path, tiny_model, workers=local_workers(2))
    shard = ShardUp(config, "pair")
    try:
        shard.wait_for("serves 'tiny-shard'")
        result = sollol("shard", "down", "pair", "--config", str(config))
        assert result.returncode == 0, result.stderr
        assert "group pair stopped" in result.stdout
        assert shard.wait_exit() == 0
    finally:
        shard.stop()
    assert_all_stopped(runtime_dir)
    state = load_state(runtime_dir)
    assert state is not None
    assert state.state == "stopped"
    again = sollol("shard", "down", "pair", "--config", str(config))
    assert again.returncode == 1
    assert "is not running" in again.stderr


def test_version_mismatch_is_reported(llama_bin_dir, tiny_model, tmp_path):
    fake = FakeRpcWorker((8, 1, 0)).start()
    try:
        workers = [*local_workers(1), {"address": fake.address, "start": False}]
        config, runtime_dir = write_config(tmp_path, tiny_model, workers=workers)
        shard = ShardUp(config, "pair")
        try:
            code = shard.wait_exit()
        finally:
            shard.stop()
    finally:
        fake.stop()
    assert code == 2, shard.output
    (line,) = [line for line in shard.lines if "error:" in line]
    assert f"worker {fake.address} speaks RPC protocol 8.1.0" in line
    assert "speaks 7.0.0" in line
    assert "run the same llama.cpp build on every machine" in line
    assert not any("coordinator" in line for line in shard.lines)
    state = load_state(runtime_dir)
    assert state is not None
    assert state.state == "failed"
    assert_all_stopped(runtime_dir)


def test_model_too_large_is_reported(llama_bin_dir, tiny_model, tmp_path):
    workers = [{**worker, "memory_bytes": 1_000_000} for worker in local_workers(2)]
    config, runtime_dir = write_config(tmp_path, tiny_model, workers=workers)
    shard = ShardUp(config, "pair")
    try:
        code = shard.wait_exit()
    finally:
        shard.stop()
    assert code == 2, shard.output
    (line,) = [line for line in shard.lines if "error:" in line]
    assert "the group cannot hold the model" in line
    assert "which have 1.9 MiB in all" in line
    assert "but has 976.6 KiB" not in line  # sizes are in MiB or bytes
    assert "but has 1000000 bytes" in line
    assert_all_stopped(runtime_dir)


def test_unknown_group_name_is_a_config_error(tiny_model, tmp_path):
    config, _ = write_config(tmp_path, tiny_model, workers=local_workers(2))
    result = sollol("shard", "up", "nosuch", "--config", str(config))
    assert result.returncode == 2
    assert "no shard group named 'nosuch'; configured: pair" in result.stderr
