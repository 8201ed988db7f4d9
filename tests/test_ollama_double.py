"""The Ollama double, checked by clients written outside this project: ollama and openai."""

import ollama
import openai
import pytest

from tests.support.ollama_double import EMBEDDING_DIMENSIONS, DoubleModel, OllamaDouble


@pytest.fixture(scope="module")
def double():
    server = OllamaDouble(
        models=[DoubleModel("llama3.2:latest"), DoubleModel("nomic-embed-text:latest")]
    )
    server.start()
    yield server
    server.stop()


@pytest.fixture
def client(double):
    ollama_client = ollama.Client(host=double.url)
    yield ollama_client
    ollama_client.close()


def test_list_models(client):
    listing = client.list()
    assert [model.model for model in listing.models] == [
        "llama3.2:latest",
        "nomic-embed-text:latest",
    ]
    assert listing.models[0].details.family == "llama"
    assert len(listing.models[0].digest) == 64


def test_chat_not_streamed(client):
    reply = client.chat(
        model="llama3.2:latest",
        messages=[{"role": "user", "content": "hi"}],
        stream=False,
        options={"num_predict": 5},
    )
    assert reply.done
    assert reply.done_reason == "length"
    assert reply.eval_count == 5
    assert len(reply.message.content.split()) == 5


def test_chat_streamed(client):
    parts = list(
        client.chat(
            model="llama3.2:latest",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            options={"num_predict": 4},
        )
    )
    assert [part.done for part in parts] == [False] * 4 + [True]
    assert parts[-1].eval_count == 4
    assert parts[-1].total_duration > 0


def test_generate(client):
    reply = client.generate(model="llama3.2:latest", prompt="hello", options={"num_predict": 3})
    assert len(reply.response.split()) == 3


def test_embed(client):
    reply = client.embed(model="nomic-embed-text:latest", input=["a", "b"])
    assert len(reply.embeddings) == 2
    assert len(reply.embeddings[0]) == EMBEDDING_DIMENSIONS


def test_unknown_model_is_response_error(client):
    with pytest.raises(ollama.ResponseError) as caught:
        client.chat(model="missing:latest", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 404
    assert "not found" in caught.value.error


def test_openai_layer_with_sdk(double):
    with openai.OpenAI(base_url=double.url + "/v1", api_key="unused", max_retries=0) as sdk:
        check_openai_layer(sdk)


def check_openai_layer(sdk):
    reply = sdk.chat.completions.create(
        model="llama3.2:latest", messages=[{"role": "user", "content": "hi"}], max_tokens=3
    )
    assert reply.system_fingerprint == "fp_ollama"
    assert reply.usage.completion_tokens == 3
    chunks = list(
        sdk.chat.completions.create(
            model="llama3.2:latest",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=3,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].usage.completion_tokens == 3
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        == reply.choices[0].message.content
    )
    vectors = sdk.embeddings.create(model="nomic-embed-text:latest", input="x")
    assert len(vectors.data[0].embedding) == EMBEDDING_DIMENSIONS
    with pytest.raises(openai.NotFoundError):
        sdk.chat.completions.create(model="missing", messages=[{"role": "user", "content": "hi"}])
