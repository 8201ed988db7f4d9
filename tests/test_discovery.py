"""Kind detection and the scan, against real llama-server processes, the Ollama double
and the fake OpenAI node, all on 127.0.0.1. Scans here aim only at 127.0.0.0/8."""

import asyncio
import socket

import pytest

from sollol.config import ConfigError, NodeKind
from sollol.discovery import detect_node, node_name, scan_network, scan_targets
from sollol.upstream import UpstreamClient, UpstreamConnectionError
from tests.support.fake_node import FakeOpenAINode
from tests.support.ollama_double import DoubleModel, OllamaDouble


@pytest.fixture(scope="module")
def ollama_double():
    server = OllamaDouble(models=[DoubleModel("llama3.2:latest"), DoubleModel("qwen3:8b")])
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def openai_node():
    with FakeOpenAINode(models=("gpt-tiny",)) as node:
        yield node


def detect(url):
    async def run():
        client = UpstreamClient(connect_timeout_s=2.0, max_connections=4)
        await client.start()
        try:
            return await detect_node(client, url, timeout_s=5.0)
        finally:
            await client.close()

    return asyncio.run(run())


def closed_port():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        return holder.getsockname()[1]


def port_of(url):
    return int(url.rsplit(":", 1)[1])


def test_detect_llama_server(llama_nodes):
    found = detect(llama_nodes[0].url)
    assert found is not None
    assert found.kind is NodeKind.LLAMACPP
    assert len(found.models) == 1


def test_detect_ollama(ollama_double):
    found = detect(ollama_double.url)
    assert found is not None
    assert found.kind is NodeKind.OLLAMA
    assert found.models == ("llama3.2:latest", "qwen3:8b")
    assert found.version


def test_detect_openai_compatible(openai_node):
    found = detect(openai_node.url)
    assert found is not None
    assert found.kind is NodeKind.OPENAI
    assert found.models == ("gpt-tiny",)


def test_detect_nothing_listening():
    with pytest.raises(UpstreamConnectionError):
        detect(f"http://127.0.0.1:{closed_port()}")


def test_scan_loopback_ports(llama_nodes, ollama_double, openai_node):
    ports = [
        port_of(llama_nodes[0].url),
        port_of(ollama_double.url),
        port_of(openai_node.url),
        closed_port(),
    ]
    found = asyncio.run(scan_network("127.0.0.1/32", ports, timeout_s=5.0, rate_per_s=20))
    kinds = {node.url: node.kind for node in found}
    assert kinds == {
        llama_nodes[0].url: NodeKind.LLAMACPP,
        ollama_double.url: NodeKind.OLLAMA,
        openai_node.url: NodeKind.OPENAI,
    }


def test_scan_other_loopback_address(ollama_double):
    # 127.0.0.2 reaches this machine too; the double listens on 127.0.0.1 only.
    found = asyncio.run(scan_network("127.0.0.0/30", [port_of(ollama_double.url)], timeout_s=2.0))
    assert [node.url for node in found] == [ollama_double.url]


def test_scan_targets_bounded():
    with pytest.raises(ConfigError, match="over the limit of 1024"):
        scan_targets("127.0.0.0/16", [11434], max_targets=1024)


def test_scan_targets_invalid():
    with pytest.raises(ConfigError, match="not a valid network"):
        scan_targets("127.0.0.300/32", [11434], max_targets=10)
    with pytest.raises(ConfigError, match="port 0 is invalid"):
        scan_targets("127.0.0.1/32", [0], max_targets=10)


def test_scan_targets_lists_urls():
    targets = scan_targets("127.0.0.1/32", [11434, 8080, 11434], max_targets=10)
    assert targets == ["http://127.0.0.1:11434", "http://127.0.0.1:8080"]


def test_scan_rate_spaces_connections():
    ports = [closed_port() for _ in range(5)]
    loop_started = asyncio.run(_timed_scan(ports, rate_per_s=10.0))
    # Five starts at 10 per second take at least 0.4 s.
    assert loop_started >= 0.4


async def _timed_scan(ports, rate_per_s):
    loop = asyncio.get_running_loop()
    started = loop.time()
    await scan_network("127.0.0.1/32", ports, timeout_s=1.0, rate_per_s=rate_per_s)
    return loop.time() - started


def test_node_name_unique():
    from sollol.discovery import DetectedNode

    node = DetectedNode("http://127.0.0.1:8080", NodeKind.LLAMACPP, ())
    assert node_name(node, []) == "127.0.0.1:8080"
    assert node_name(node, ["127.0.0.1:8080"]) == "127.0.0.1:8080-2"
