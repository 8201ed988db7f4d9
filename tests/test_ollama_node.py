"""The OpenAI SDK through the router to an Ollama node (the Ollama double).

The router translates OpenAI requests to the node's native API, so these tests
also check the field mapping on what the double received.
"""

import httpx
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


def test_chat_goes_to_native_api(client, double):
    raw = client.chat.completions.with_raw_response.create(
        model=CHAT_MODEL, messages=MESSAGES, max_tokens=4
    )
    reply = raw.parse()
    assert raw.headers["x-sollol-node"] == "ollama-1"
    assert reply.model == CHAT_MODEL
    assert reply.object == "chat.completion"
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 4
    path, body = double.requests[-1]
    assert path == "/api/chat"
    assert body["options"] == {"num_predict": 4}
    assert body["stream"] is False


def test_openai_fields_map_to_ollama_options(client, double):
    client.chat.completions.create(
        model=CHAT_MODEL,
        messages=MESSAGES,
        max_tokens=3,
        temperature=0.1,
        top_p=0.5,
        seed=7,
        stop="END",
        response_format={"type": "json_object"},
        extra_body={"keep_alive": "10m", "options": {"num_ctx": 8192}, "top_k": 4},
    )
    body = double.requests[-1][1]
    assert body["options"] == {
        "num_ctx": 8192,
        "num_predict": 3,
        "temperature": 0.1,
        "top_p": 0.5,
        "seed": 7,
        "stop": ["END"],
        "top_k": 4,
    }
    assert body["format"] == "json"
    assert body["keep_alive"] == "10m"


def test_tool_call_arguments_become_an_object(client, double):
    history = [
        {"role": "user", "content": "add"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "add", "arguments": '{"a": 1}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "2"},
    ]
    client.chat.completions.create(model=CHAT_MODEL, messages=history, max_tokens=2)
    sent = double.requests[-1][1]["messages"]
    assert sent[1]["tool_calls"][0]["function"] == {"name": "add", "arguments": {"a": 1}}
    assert sent[2]["tool_call_id"] == "call_1"


def test_completion_goes_to_generate_raw(client, double):
    reply = client.completions.create(model=CHAT_MODEL, prompt="The router", max_tokens=3)
    assert reply.object == "text_completion"
    assert reply.choices[0].text
    path, body = double.requests[-1]
    assert path == "/api/generate"
    assert (body["prompt"], body["raw"]) == ("The router", True)


def test_token_id_prompt_is_400_for_ollama_node(client):
    with pytest.raises(openai.BadRequestError, match="token ids"):
        client.completions.create(model=CHAT_MODEL, prompt=[1, 2, 3], max_tokens=3)


def test_history_keeps_ollama_timings(ollama_router, client):
    client.chat.completions.create(model=CHAT_MODEL, messages=MESSAGES, max_tokens=4)
    nodes = httpx.get(ollama_router.base_url + "/health").json()["nodes"]
    # Decode speed comes from the node's own eval_duration, not the router's clock.
    assert nodes[0]["decode_tokens_per_s"] > 0


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
    assert path == "/api/chat"
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
