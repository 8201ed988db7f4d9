"""The real ``ollama`` client through the router's Ollama API.

One router fronts a real llama-server (requests translated to the OpenAI API)
and the Ollama double (requests passed on natively), so tag listing runs
across a mixed cluster.
"""

import httpx
import ollama
import openai
import pytest

from tests.support.fixtures import RouterProcess, write_router_config
from tests.support.ollama_double import DoubleModel, OllamaDouble
from tests.support.ollama_double_state import Faults

pytestmark = pytest.mark.llamacpp

OLLAMA_MODEL = "llama3.2:latest"
OLLAMA_EMBED = "nomic-embed-text:latest"
MESSAGES = [{"role": "user", "content": "Which node answers?"}]
OPTIONS = {"num_predict": 6, "temperature": 0, "seed": 1}


@pytest.fixture(scope="module")
def double():
    server = OllamaDouble(models=[DoubleModel(OLLAMA_MODEL), DoubleModel(OLLAMA_EMBED)])
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def router(llama_nodes, double, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ollama-api")
    config = write_router_config(
        workdir / "sollol.toml",
        database_path=workdir / "history.db",
        nodes=[
            {"name": "llama", "url": llama_nodes[1].url, "models": ["tiny", "tiny-embed"]},
            {"name": "ollama-1", "kind": "ollama", "url": double.url},
        ],
    )
    process = RouterProcess(config, workdir / "router.log").start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def client(router):
    with ollama.Client(host=router.base_url) as ollama_client:
        yield ollama_client


# -- listing --------------------------------------------------------------------


def test_root_and_version(router, client):
    root = httpx.get(router.base_url + "/")
    assert (root.status_code, root.text) == (200, "Ollama is running")
    assert httpx.head(router.base_url + "/").status_code == 200
    assert httpx.get(router.base_url + "/api/version").json()["version"]


def test_tags_list_every_model_once_with_tags(client):
    names = [model.model for model in client.list().models]
    assert sorted(names) == [
        "llama3.2:latest",
        "nomic-embed-text:latest",
        "tiny-embed:latest",
        "tiny:latest",
    ]
    by_name = {model.model: model for model in client.list().models}
    # The double's own entry keeps its size and details.
    assert by_name[OLLAMA_MODEL].size > 0
    assert by_name[OLLAMA_MODEL].details.family == "llama"
    assert by_name["tiny:latest"].details.format == "gguf"


def test_ps_names_the_node_of_each_loaded_model(router):
    models = httpx.get(router.base_url + "/api/ps").json()["models"]
    assert {(entry["name"], entry["sollol_node"]) for entry in models} >= {
        ("tiny:latest", "llama"),
        ("tiny-embed:latest", "llama"),
    }


def test_show_known_and_unknown(client):
    assert client.show("tiny").details.format == "gguf"
    # An Ollama node returns its own model's details, template and model_info included.
    shown = client.show("llama3.2")
    assert shown.template == "{{ .Prompt }}"
    assert shown.modelinfo["llama.context_length"] == 4096
    with pytest.raises(ollama.ResponseError) as caught:
        client.show("no-such-model")
    assert caught.value.status_code == 404
    assert caught.value.error == "model 'no-such-model' not found"


# -- llama-server behind the Ollama API -------------------------------------------------


def test_chat_on_llama_server(client):
    reply = client.chat(model="tiny", messages=MESSAGES, options=OPTIONS)
    assert reply.model == "tiny"
    assert reply.done is True
    assert reply.done_reason == "length"
    assert reply.message.role == "assistant"
    assert reply.message.content
    assert reply.eval_count == 6
    assert reply.prompt_eval_count > 0
    assert reply.total_duration > 0


def test_chat_stream_on_llama_server_matches_whole_reply(client):
    whole = client.chat(model="tiny:latest", messages=MESSAGES, options=OPTIONS)
    parts = list(client.chat(model="tiny:latest", messages=MESSAGES, options=OPTIONS, stream=True))
    assert all(part.done is False for part in parts[:-1])
    assert parts[-1].done is True
    assert parts[-1].eval_count == 6
    assert "".join(part.message.content for part in parts) == whole.message.content
    assert {part.model for part in parts} == {"tiny:latest"}


def test_generate_on_llama_server(client):
    reply = client.generate(model="tiny", prompt="The router", options=OPTIONS)
    assert reply.response
    assert reply.done_reason == "length"
    streamed = "".join(
        part.response
        for part in client.generate(model="tiny", prompt="The router", options=OPTIONS, stream=True)
    )
    assert streamed == reply.response


def test_generate_raw_goes_to_completions(client):
    reply = client.generate(model="tiny", prompt="abc", raw=True, options=OPTIONS)
    assert reply.done is True
    assert reply.eval_count == 6


def test_embed_on_llama_server_is_normalised(client):
    reply = client.embed(model="tiny-embed", input=["first text", "second text"])
    assert len(reply.embeddings) == 2
    for vector in reply.embeddings:
        assert abs(sum(value * value for value in vector) - 1.0) < 1e-4
    legacy = client.embeddings(model="tiny-embed", prompt="first text")
    assert len(legacy.embedding) == len(reply.embeddings[0])


def test_empty_prompt_is_a_load_request(client):
    assert client.generate(model="tiny", prompt="").done_reason == "load"
    assert client.generate(model="tiny", prompt="", keep_alive=0).done_reason == "unload"


# -- the Ollama double behind the Ollama API ----------------------------------------


def test_chat_on_ollama_node_goes_native(client, double):
    reply = client.chat(model="llama3.2", messages=MESSAGES, options={"num_predict": 3})
    assert reply.model == "llama3.2"
    assert reply.eval_count == 3
    path, body = double.requests[-1]
    # Sent on Ollama's own route, with the node's own spelling of the name.
    assert path == "/api/chat"
    assert body["model"] == OLLAMA_MODEL
    assert body["options"] == {"num_predict": 3}


def test_stream_on_ollama_node(client, double):
    parts = list(client.chat(model=OLLAMA_MODEL, messages=MESSAGES, stream=True,
                             options={"num_predict": 4}))  # fmt: skip
    assert parts[-1].done is True
    assert parts[-1].eval_count == 4
    assert sum(1 for part in parts if part.message.content) == 4


def test_embed_on_ollama_node(client, double):
    reply = client.embed(model=OLLAMA_EMBED, input="one text")
    assert len(reply.embeddings) == 1
    assert double.requests[-1][0] == "/api/embed"


# -- errors in Ollama's shape ----------------------------------------------------------


def test_unknown_model_is_404_in_ollama_shape(client):
    with pytest.raises(ollama.ResponseError) as caught:
        client.chat(model="missing", messages=MESSAGES)
    assert caught.value.status_code == 404
    assert caught.value.error == "model 'missing' not found"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "request body is not valid JSON"),
        (b'{"messages": []}', "model is required"),
        (b'{"model": "tiny", "messages": "hi"}', "messages must be an array"),
    ],
)
def test_bad_chat_request_is_400_in_ollama_shape(router, body, message):
    response = httpx.post(router.base_url + "/api/chat", content=body)
    assert response.status_code == 400
    assert set(response.json()) == {"error"}
    assert message in response.json()["error"]


def test_openai_sdk_still_gets_openai_errors(router):
    sdk = openai.OpenAI(base_url=router.base_url + "/v1", api_key="unused", max_retries=0)
    with sdk, pytest.raises(openai.NotFoundError) as caught:
        sdk.chat.completions.create(model="missing", messages=MESSAGES)
    assert caught.value.code == "model_not_found"


def test_openai_name_without_latest_reaches_ollama_node(router, double):
    with openai.OpenAI(base_url=router.base_url + "/v1", api_key="unused", max_retries=0) as sdk:
        reply = sdk.chat.completions.create(model="llama3.2", messages=MESSAGES, max_tokens=2)
    assert reply.model == "llama3.2"
    assert double.requests[-1][1]["model"] == OLLAMA_MODEL


# -- faults on the Ollama node ------------------------------------------------------


@pytest.fixture
def faulty_double(double):
    yield double
    double.faults = Faults()


def test_ollama_client_mid_stream_error(client, faulty_double):
    faulty_double.faults = Faults(error_mid_stream=2)
    parts = []
    with pytest.raises(ollama.ResponseError):
        for part in client.chat(model=OLLAMA_MODEL, messages=MESSAGES, stream=True):
            parts.append(part)
    assert len(parts) == 2
    assert all(part.done is False for part in parts)


def test_openai_client_mid_stream_error(router, faulty_double):
    faulty_double.faults = Faults(error_mid_stream=2)
    with openai.OpenAI(base_url=router.base_url + "/v1", api_key="unused", max_retries=0) as sdk:
        stream = sdk.chat.completions.create(model=OLLAMA_MODEL, messages=MESSAGES, stream=True)
        with pytest.raises(openai.APIError):
            list(stream)


def test_busy_ollama_node_gives_503(router, faulty_double):
    faulty_double.faults = Faults(busy_503=True)
    response = httpx.post(
        router.base_url + "/api/chat",
        json={"model": OLLAMA_MODEL, "messages": MESSAGES, "stream": False},
    )
    # The only node serving the model is busy: the router reports it, Ollama-style.
    assert response.status_code == 503
    assert set(response.json()) == {"error"}
    assert "busy" in response.json()["error"]


@pytest.mark.parametrize(
    "body",
    [
        {"model": "tiny", "messages": MESSAGES, "options": "fast"},
        {"model": "tiny", "messages": [1]},
        {"model": "tiny", "messages": [{"role": "user", "content": "x", "tool_calls": "abc"}]},
        {"model": "tiny", "messages": MESSAGES, "tools": "x"},
        {"model": "tiny", "messages": MESSAGES, "stream": "yes"},
        {"model": "tiny", "messages": MESSAGES, "options": {"num_predict": "x"}},
        {"model": "tiny", "messages": MESSAGES, "options": {"num_predict": 2**31}},
        {"model": "tiny", "messages": MESSAGES, "format": 5},
        {"model": "tiny", "messages": [{"role": "user", "content": "x", "images": [1]}]},
        {"model": "tiny", "messages": [{"role": "assistant", "tool_calls": [{"function": "x"}]}]},
        {"model": "tiny", "messages": [{"role": "assistant", "tool_calls": [{"function": [1]}]}]},
        {
            "model": "tiny",
            "messages": [{"role": "assistant", "tool_calls": [{"function": {"name": 5}}]}],
        },
        {"model": "tiny", "messages": MESSAGES, "tools": [{"type": "function", "function": "x"}]},
    ],
)
def test_mistyped_ollama_fields_are_400_before_any_node(router, body):
    response = httpx.post(router.base_url + "/api/chat", json=body)
    assert response.status_code == 400, response.text
    assert set(response.json()) == {"error"}
    assert response.json()["error"]
