"""The OpenAI SDK through the router to an Ollama node (the Ollama double)."""

import openai
import pytest

from tests.support.fixtures import RouterProcess, write_router_config
from tests.support.ollama_double import EMBEDDING_DIMENSIONS, DoubleModel, OllamaDouble

CHAT_MODEL = "llama3.2:latest"
EMBED_MODEL = "nomic-embed-text:latest"
MESSAGES = [{"role": "user", "content": "Which node answers?"}]


@pytest.fixture(scope="module")
def double():
    server = OllamaDouble(models=[DoubleModel(CHAT_MODEL), DoubleModel(EMBED_MODEL)])
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def ollama_router(double, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ollama-router")
    # No models in the config: the router reads them from the node's /api/tags.
    config = write_router_config(
        workdir / "sollol.toml",
        database_path=workdir / "history.db",
        nodes=[{"name": "ollama-1", "kind": "ollama", "url": double.url}],
    )
    router = RouterProcess(config, workdir / "router.log").start()
    yield router
    router.stop()


@pytest.fixture(scope="module")
def client(ollama_router):
    with openai.OpenAI(
        base_url=ollama_router.base_url + "/v1", api_key="unused", max_retries=0
    ) as sdk:
        yield sdk


def test_models_discovered_from_tags(client):
    # Listed by the router's model key: Ollama's implicit ":latest" dropped.
    assert sorted(model.id for model in client.models.list()) == ["llama3.2", "nomic-embed-text"]


def test_chat_goes_through_openai_layer(client, double):
    raw = client.chat.completions.with_raw_response.create(
        model=CHAT_MODEL, messages=MESSAGES, max_tokens=4
    )
    reply = raw.parse()
    assert raw.headers["x-sollol-node"] == "ollama-1"
    assert reply.model == CHAT_MODEL
    assert reply.usage.completion_tokens == 4
    assert double.requests[-1][0] == "/v1/chat/completions"


def test_stream_matches_plain_reply(client):
    plain = client.chat.completions.create(model=CHAT_MODEL, messages=MESSAGES, max_tokens=5)
    chunks = list(
        client.chat.completions.create(
            model=CHAT_MODEL,
            messages=MESSAGES,
            max_tokens=5,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert streamed == plain.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 5


def test_embeddings_default_encoding(client):
    reply = client.embeddings.create(model=EMBED_MODEL, input=["one", "two"])
    assert reply.model == EMBED_MODEL
    assert [len(item.embedding) for item in reply.data] == [EMBEDDING_DIMENSIONS] * 2


def test_unknown_model_not_forwarded(client, double):
    before = len(double.requests)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="llama3.3", messages=MESSAGES)
    assert len(double.requests) == before


def test_priority_field_not_forwarded(client, double):
    client.chat.completions.create(
        model=CHAT_MODEL, messages=MESSAGES, max_tokens=2, extra_body={"priority": 9}
    )
    path, body = double.requests[-1]
    assert path == "/v1/chat/completions"
    assert "priority" not in body


@pytest.fixture(scope="module")
def memory_router(tmp_path_factory):
    big = DoubleModel("big:latest", size_bytes=8_000_000_000)
    doubles = [OllamaDouble(models=[big]).start() for _ in range(2)]
    workdir = tmp_path_factory.mktemp("memory-router")
    config = write_router_config(
        workdir / "sollol.toml",
        database_path=workdir / "history.db",
        nodes=[
            {"name": "small", "kind": "ollama", "url": doubles[0].url, "memory_bytes": 4 << 30},
            {"name": "large", "kind": "ollama", "url": doubles[1].url, "memory_bytes": 16 << 30},
        ],
    )
    router = RouterProcess(config, workdir / "router.log").start()
    yield router
    router.stop()
    for double in doubles:
        double.stop()


def test_model_larger_than_memory_avoided(memory_router):
    import httpx

    explained = httpx.get(
        memory_router.base_url + "/sollol/route", params={"model": "big:latest"}
    ).json()
    assert explained["chosen"] == "large"
    scores = {entry["node"]: entry["score"] for entry in explained["candidates"]}
    assert scores["small"] is None
    with openai.OpenAI(
        base_url=memory_router.base_url + "/v1", api_key="unused", max_retries=0
    ) as sdk:
        for _ in range(3):
            raw = sdk.chat.completions.with_raw_response.create(
                model="big:latest", messages=MESSAGES, max_tokens=2
            )
            assert raw.headers["x-sollol-node"] == "large"
