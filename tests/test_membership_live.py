"""Membership changes on a running router process: add, drain and remove through the
``sollol nodes`` command while traffic flows, and the changes surviving a restart."""

import subprocess
import sys
import threading

import httpx
import orjson
import pytest

from tests.support.fake_node import FakeOpenAINode
from tests.support.fixtures import RouterProcess, write_router_config
from tests.support.ollama_double import DoubleModel, OllamaDouble

MODEL = "llama3.2"
WAIT_S = 15.0


@pytest.fixture
def doubles():
    # 40 tokens per second: a 120-token reply streams for about 3 s.
    servers = [
        OllamaDouble(models=[DoubleModel("llama3.2:latest")], tokens_per_s=40.0, parallel=4)
        for _ in range(2)
    ]
    for server in servers:
        server.start()
    yield servers
    for server in servers:
        server.stop()


@pytest.fixture
def router_config(tmp_path, doubles):
    return write_router_config(
        tmp_path / "sollol.toml",
        database_path=tmp_path / "history.db",
        nodes=[{"name": "a", "kind": "ollama", "url": doubles[0].url}],
        server={"node_queue_per_slot": 1.0},
    )


@pytest.fixture
def router(router_config, tmp_path):
    process = RouterProcess(router_config, tmp_path / "router.log").start()
    yield process
    process.stop()


def sollol(*arguments):
    """Run the sollol command; return its stdout, failing the test on a non-zero exit."""
    result = subprocess.run(
        [sys.executable, "-m", "sollol", *arguments],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def nodes_of(router):
    listing = orjson.loads(sollol("nodes", "list", "--json", "--url", router.base_url))
    return {node["name"]: node for node in listing["nodes"]}


def chat(router, max_tokens=4, stream=False):
    return httpx.post(
        router.base_url + "/v1/chat/completions",
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": max_tokens,
            "stream": stream,
        },
        timeout=30,
    )


def served_by(double):
    """Count the requests the double received (the router may use its native or OpenAI API)."""
    return len(double.requests)


def test_add_detects_kind(router, doubles):
    output = sollol("nodes", "add", doubles[1].url, "--name", "b", "--url", router.base_url)
    assert "added node b (ollama" in output
    assert ": healthy;" in output
    node = nodes_of(router)["b"]
    assert node["kind"] == "ollama"
    assert node["source"] == "api"
    assert node["state"] == "active"
    assert node["models"] == [MODEL]


def test_add_rejects_bad_url(router):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sollol",
            "nodes",
            "add",
            "ftp://127.0.0.1:1",
            "--url",
            router.base_url,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "the scheme must be http or https" in result.stderr


def test_add_name_taken(router, doubles):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sollol",
            "nodes",
            "add",
            doubles[1].url,
            "--name",
            "a",
            "--url",
            router.base_url,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "HTTP 409" in result.stderr


def test_drain_keeps_stream_in_flight(router, doubles):
    sollol("nodes", "add", doubles[1].url, "--name", "b", "--url", router.base_url)
    lines: list[str] = []
    first_chunk = threading.Event()

    def stream():
        with httpx.stream(
            "POST",
            router.base_url + "/v1/chat/completions",
            json={
                "model": MODEL,
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 120,
                "stream": True,
            },
            timeout=30,
        ) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    lines.append(line)
                    first_chunk.set()

    reader = threading.Thread(target=stream)
    reader.start()
    assert first_chunk.wait(WAIT_S)
    busy = 0 if doubles[0].in_flight else 1
    assert doubles[busy].in_flight == 1
    busy_name = "ab"[busy]
    assert f"node {busy_name}: draining" in sollol(
        "nodes", "drain", busy_name, "--url", router.base_url
    )

    before = [served_by(double) for double in doubles]
    for _ in range(6):
        assert chat(router).status_code == 200
    after = [served_by(double) for double in doubles]
    assert after[busy] == before[busy]
    assert after[1 - busy] == before[1 - busy] + 6

    reader.join(WAIT_S)
    assert not reader.is_alive()
    assert lines[-1] == "data: [DONE]"
    assert len(lines) > 100
    assert nodes_of(router)[busy_name]["state"] == "drained"


def test_remove_persists_across_restart(router_config, tmp_path, doubles):
    first = RouterProcess(router_config, tmp_path / "first.log").start()
    try:
        sollol("nodes", "add", doubles[1].url, "--name", "b", "--url", first.base_url)
        sollol("nodes", "remove", "a", "--url", first.base_url)
        assert set(nodes_of(first)) == {"b"}
        assert chat(first).status_code == 200
    finally:
        first.stop()
    second = RouterProcess(router_config, tmp_path / "second.log").start()
    try:
        nodes = nodes_of(second)
        # "a" is still in the config file, but its stored removal wins.
        assert set(nodes) == {"b"}
        assert nodes["b"]["source"] == "api"
        before = served_by(doubles[1])
        assert chat(second).status_code == 200
        assert served_by(doubles[1]) == before + 1
    finally:
        second.stop()


def test_add_again_resumes_drained(router, doubles):
    sollol("nodes", "drain", "a", "--url", router.base_url)
    assert nodes_of(router)["a"]["state"] == "drained"
    sollol(
        "nodes", "add", doubles[0].url, "--name", "a", "--kind", "ollama", "--url", router.base_url
    )
    assert nodes_of(router)["a"]["state"] == "active"


def test_discover_adds_found_nodes(router, doubles):
    with FakeOpenAINode(models=(MODEL,)) as openai_node:
        ports = ",".join(url.rsplit(":", 1)[1] for url in (doubles[1].url, openai_node.url))
        output = sollol(
            "discover",
            "--cidr",
            "127.0.0.1/32",
            "--ports",
            ports,
            "--add",
            "--url",
            router.base_url,
            "--json",
        )
        found = {node["url"]: node["kind"] for node in orjson.loads(output)}
        assert found == {doubles[1].url: "ollama", openai_node.url: "openai"}
        kinds = {node["url"]: node["kind"] for node in nodes_of(router).values()}
        assert kinds[doubles[1].url] == "ollama"
        assert kinds[openai_node.url] == "openai"
        # Again: the nodes are there already, and the command still succeeds.
        sollol("discover", "--cidr", "127.0.0.1/32", "--ports", ports, "--add",
               "--url", router.base_url)  # fmt: skip


def test_names_with_url_characters(router, doubles):
    sollol("nodes", "add", doubles[1].url, "--name", "b?x#1", "--url", router.base_url)
    sollol("nodes", "drain", "b?x#1", "--url", router.base_url)
    assert nodes_of(router)["b?x#1"]["state"] in {"draining", "drained"}
    sollol("nodes", "remove", "b?x#1", "--url", router.base_url)
    assert "b?x#1" not in nodes_of(router)


def test_serve_with_nothing_configured(tmp_path, doubles):
    # With no nodes the router scans 127.0.0.1 on ports 11434 and 8080 only,
    # then serves whatever it found, and nodes can be added while it runs.
    command = [sys.executable, "-m", "sollol", "serve", "--port", "0"]
    command += ["--database-url", f"sqlite:///{tmp_path / 'h.db'}"]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        env={"PATH": "/usr/bin:/bin", "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline().decode()
        assert "listening on" in line
        router = RouterProcess(tmp_path / "unused.toml", tmp_path / "unused.log")
        router.base_url = line.split("listening on ")[1].split()[0]
        sollol("nodes", "add", doubles[0].url, "--url", router.base_url)
        assert chat(router).status_code == 200
    finally:
        process.terminate()
        process.wait(15)
        if process.stdout is not None:
            process.stdout.close()
