"""The Ollama double, checked by clients written outside this project: ollama and openai."""

import ssl
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import ollama
import openai
import pytest

from tests.support.ollama_double import EMBEDDING_DIMENSIONS, DoubleModel, Faults, OllamaDouble
from tests.support.ollama_double_state import (
    BUSY_MESSAGE,
    DEFAULT_KEEP_ALIVE_S,
    FOREVER_S,
    parse_keep_alive,
)

# These clients speak plain HTTP to 127.0.0.1, so they share one SSL context:
# otherwise httpx loads the CA bundle again for every client, which made up
# most of this file's run time.
SSL_CONTEXT = ssl.create_default_context()


def client_for(double, **options):
    return ollama.Client(host=double.url, verify=SSL_CONTEXT, **options)


def sdk_for(double, **options):
    return openai.OpenAI(
        base_url=double.url + "/v1",
        api_key="unused",
        max_retries=0,
        http_client=httpx.Client(verify=SSL_CONTEXT),
        **options,
    )


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
    ollama_client = client_for(double)
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
    with sdk_for(double) as sdk:
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


# -- load state, eviction and keep_alive ---------------------------------

MODEL = "llama3.2:latest"
OTHER = "qwen2.5:latest"
LOAD_S = 0.2
GIB = 1 << 30
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture
def start_double():
    """Start doubles with the given settings, and stop them all after the test."""
    started = []

    def start(**settings):
        server = OllamaDouble(**settings).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def wait_until(condition, timeout_s=2.0):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"condition not met within {timeout_s} s"
        time.sleep(0.005)


def loaded_names(client):
    return [model.model for model in client.ps().models]


def timed_generate(client, model=MODEL, **options):
    started = time.monotonic()
    reply = client.generate(model=model, prompt="hello there", **options)
    return reply, time.monotonic() - started


def test_first_request_waits_for_load(start_double):
    double = start_double(models=[DoubleModel(MODEL, load_s=LOAD_S)])
    with client_for(double) as client:
        first, first_s = timed_generate(client)
        second, second_s = timed_generate(client)
    assert first_s >= LOAD_S
    assert first.load_duration >= LOAD_S * 1e9
    assert second_s < LOAD_S
    assert second.load_duration < LOAD_S * 1e9 / 4


def test_ps_lists_model_after_load(start_double):
    model = DoubleModel(MODEL, size_bytes=3 * GIB, load_s=LOAD_S, context_length=8192)
    double = start_double(models=[model])
    with client_for(double) as client:
        assert loaded_names(client) == []
        client.generate(model=MODEL, prompt="hi")
        listing = client.ps().models
    assert [entry.model for entry in listing] == [MODEL]
    entry = listing[0]
    assert entry.name == MODEL
    assert entry.size == 3 * GIB
    assert entry.size_vram == 3 * GIB
    assert entry.context_length == 8192
    assert entry.digest == model.digest
    assert entry.details.family == "llama"
    expires_in_s = entry.expires_at.timestamp() - time.time()
    assert 290 < expires_in_s <= 300


def test_preloaded_model_needs_no_load(start_double):
    double = start_double(models=[DoubleModel(MODEL, load_s=LOAD_S)], preloaded=[MODEL])
    with client_for(double) as client:
        assert loaded_names(client) == [MODEL]
        reply, elapsed_s = timed_generate(client)
    assert elapsed_s < LOAD_S
    assert reply.load_duration < LOAD_S * 1e9 / 4


def test_preloaded_model_must_exist():
    with pytest.raises(ValueError, match="not in models"):
        OllamaDouble(models=[DoubleModel(MODEL)], preloaded=[OTHER])


@pytest.mark.parametrize(
    ("settings", "field"), [({"load_s": -1.0}, "load_s"), ({"parallel": 0}, "parallel")]
)
def test_model_rejects_invalid_settings(settings, field):
    with pytest.raises(ValueError, match=field):
        DoubleModel(MODEL, **settings)


def test_swap_pays_load_again(start_double):
    models = [DoubleModel(MODEL, load_s=LOAD_S), DoubleModel(OTHER, load_s=LOAD_S)]
    double = start_double(models=models, max_loaded_models=1)
    with client_for(double) as client:
        timed_generate(client, MODEL)
        timed_generate(client, OTHER)
        assert loaded_names(client) == [OTHER]
        back, back_s = timed_generate(client, MODEL)
        assert loaded_names(client) == [MODEL]
    assert back_s >= LOAD_S
    assert back.load_duration >= LOAD_S * 1e9


def test_eviction_takes_least_recently_used(start_double):
    names = ["a:latest", "b:latest", "c:latest"]
    double = start_double(models=[DoubleModel(name) for name in names], max_loaded_models=2)
    with client_for(double) as client:
        for name in ["a:latest", "b:latest", "a:latest", "c:latest"]:
            client.generate(model=name, prompt="hi", options={"num_predict": 1})
        assert sorted(loaded_names(client)) == ["a:latest", "c:latest"]


def test_ollama_eviction_takes_shortest_keep_alive(start_double):
    names = ["a:latest", "b:latest", "c:latest"]
    double = start_double(
        models=[DoubleModel(name) for name in names], max_loaded_models=2, eviction="ollama"
    )
    with client_for(double) as client:
        client.generate(model="b:latest", prompt="hi", keep_alive="1h")
        client.generate(model="a:latest", prompt="hi", keep_alive="1h")
        client.generate(model="b:latest", prompt="hi", keep_alive="10m")
        # b has the shorter keep_alive, though a is the least recently used.
        client.generate(model="c:latest", prompt="hi")
        assert sorted(loaded_names(client)) == ["a:latest", "c:latest"]

        # With equal keep_alive the first name goes, though a was used last.
        client.generate(model="c:latest", prompt="hi", keep_alive="1h")
        client.generate(model="a:latest", prompt="hi", keep_alive="1h")
        client.generate(model="b:latest", prompt="hi")
        assert sorted(loaded_names(client)) == ["b:latest", "c:latest"]


def test_unknown_eviction_rejected():
    with pytest.raises(ValueError, match="eviction"):
        OllamaDouble(eviction="random")


def test_memory_bytes_evicts_to_fit(start_double):
    models = [
        DoubleModel(MODEL, size_bytes=3 * GIB),
        DoubleModel(OTHER, size_bytes=3 * GIB),
        DoubleModel("big:latest", size_bytes=8 * GIB),
    ]
    double = start_double(models=models, memory_bytes=5 * GIB)
    with client_for(double) as client:
        client.generate(model=MODEL, prompt="hi", options={"num_predict": 1})
        client.generate(model=OTHER, prompt="hi", options={"num_predict": 1})
        assert loaded_names(client) == [OTHER]
        client.generate(model="big:latest", prompt="hi", options={"num_predict": 1})
        [entry] = client.ps().models
    # A model larger than the memory loads partly outside it.
    assert entry.model == "big:latest"
    assert entry.size == 8 * GIB
    assert entry.size_vram == 5 * GIB


def test_keep_alive_zero_unloads_after_reply(start_double):
    double = start_double(models=[DoubleModel(MODEL)])
    with client_for(double) as client:
        reply = client.generate(model=MODEL, prompt="hi", keep_alive=0)
        assert reply.done_reason == "length"
        assert loaded_names(client) == []


def test_keep_alive_seconds_expire(start_double):
    double = start_double(models=[DoubleModel(MODEL)])
    with client_for(double) as client:
        client.generate(model=MODEL, prompt="hi", keep_alive=0.2)
        assert loaded_names(client) == [MODEL]
        wait_until(lambda: loaded_names(client) == [])


@pytest.mark.parametrize(
    ("keep_alive", "expected_s"),
    [("1h", 3600.0), ("1h30m", 5400.0), (600, 600.0), ("90s", 90.0)],
)
def test_keep_alive_sets_expiry(start_double, keep_alive, expected_s):
    double = start_double(models=[DoubleModel(MODEL)])
    with client_for(double) as client:
        client.generate(model=MODEL, prompt="hi", keep_alive=keep_alive)
        [entry] = client.ps().models
    expires_in_s = entry.expires_at.timestamp() - time.time()
    assert expected_s - 10 < expires_in_s <= expected_s


def test_negative_keep_alive_never_expires(start_double):
    double = start_double(models=[DoubleModel(MODEL)])
    with client_for(double) as client:
        client.generate(model=MODEL, prompt="hi", keep_alive=-1)
        [entry] = client.ps().models
    assert entry.expires_at.year > 2200


def test_invalid_keep_alive_rejected(client):
    with pytest.raises(ollama.ResponseError) as caught:
        client.generate(model="llama3.2:latest", prompt="hi", keep_alive="soon")
    assert caught.value.status_code == 400
    assert caught.value.error == 'time: invalid duration "soon"'


@pytest.mark.parametrize(
    ("value", "expected_s"),
    [
        (None, DEFAULT_KEEP_ALIVE_S),
        (0, 0.0),
        ("0", 0.0),
        (2.5, 2.5),
        ("500ms", 0.5),
        ("1.5s", 1.5),
        ("5m", 300.0),
        ("1h2m3s", 3723.0),
        (-1, FOREVER_S),
        ("-5m", FOREVER_S),
    ],
)
def test_parse_keep_alive(value, expected_s):
    assert parse_keep_alive(value) == pytest.approx(expected_s)


@pytest.mark.parametrize("value", ["5", "", "m", "5x", "1h 2m", True, [1]])
def test_parse_keep_alive_rejects(value):
    with pytest.raises(ValueError):
        parse_keep_alive(value)


def test_request_without_prompt_loads(start_double):
    double = start_double(models=[DoubleModel(MODEL, load_s=LOAD_S)])
    with client_for(double) as client:
        started = time.monotonic()
        reply = client.generate(model=MODEL)
        elapsed_s = time.monotonic() - started
        assert reply.done_reason == "load"
        assert reply.response == ""
        assert elapsed_s >= LOAD_S
        assert loaded_names(client) == [MODEL]

        unloaded = client.chat(model=MODEL, keep_alive=0)
        assert unloaded.done_reason == "unload"
        assert unloaded.message.role == "assistant"
        assert loaded_names(client) == []


def test_load_reply_ignores_stream(start_double):
    double = start_double(models=[DoubleModel(MODEL)])
    reply = httpx.post(double.url + "/api/chat", json={"model": MODEL, "stream": True})
    assert reply.headers["content-type"] == "application/json"
    body = reply.json()
    assert body["done"] is True
    assert body["done_reason"] == "load"
    assert body["message"] == {"role": "assistant", "content": ""}


def test_stream_headers_wait_for_load(start_double):
    double = start_double(models=[DoubleModel(MODEL, load_s=LOAD_S)])
    body = {"model": MODEL, "prompt": "hi", "options": {"num_predict": 2}}
    started = time.monotonic()
    with httpx.stream("POST", double.url + "/api/generate", json=body) as reply:
        headers_s = time.monotonic() - started
        lines = list(reply.iter_lines())
    assert headers_s >= LOAD_S
    assert reply.headers["content-type"] == "application/x-ndjson"
    assert len(lines) == 3


# -- decode speed and the counters of the final line ---------------------


def test_done_line_counters_match_simulation(start_double):
    double = start_double(
        models=[DoubleModel(MODEL, load_s=LOAD_S)], tokens_per_s=100, prompt_tokens_per_s=100
    )
    with client_for(double) as client:
        parts = list(
            client.generate(
                model=MODEL,
                prompt="one two three four five",
                stream=True,
                options={"num_predict": 5},
            )
        )
    final = parts[-1]
    counters = [
        final.total_duration,
        final.load_duration,
        final.prompt_eval_duration,
        final.eval_duration,
    ]
    assert all(isinstance(value, int) for value in counters)
    assert final.done_reason == "length"
    assert final.prompt_eval_count == 5
    assert final.eval_count == 5
    assert final.load_duration >= LOAD_S * 1e9
    assert final.prompt_eval_duration >= 0.05e9
    assert final.eval_duration >= 0.05e9
    assert final.total_duration >= sum(counters[1:])
    tokens_per_s = final.eval_count / final.eval_duration * 1e9
    assert 50 < tokens_per_s <= 100


def test_embed_reports_load(start_double):
    double = start_double(models=[DoubleModel(MODEL, load_s=LOAD_S)])
    with client_for(double) as client:
        reply = client.embed(model=MODEL, input="x")
        assert reply.load_duration >= LOAD_S * 1e9
        assert loaded_names(client) == [MODEL]


# -- parallel slots and the queue ----------------------------------------


def generate_in_threads(double, count, num_predict=10):
    clients = [client_for(double) for _ in range(count)]

    def generate(index):
        return clients[index].generate(
            model=MODEL, prompt=f"prompt {index}", options={"num_predict": num_predict}
        )

    try:
        with ThreadPoolExecutor(count) as pool:
            return list(pool.map(generate, range(count)))
    finally:
        for client in clients:
            client.close()


@pytest.mark.parametrize(
    ("parallel", "model_parallel", "expected"), [(1, None, 1), (2, None, 2), (1, 3, 3)]
)
def test_parallel_limit_respected(start_double, parallel, model_parallel, expected):
    double = start_double(
        models=[DoubleModel(MODEL, parallel=model_parallel)], parallel=parallel, tokens_per_s=100
    )
    replies = generate_in_threads(double, 6)
    assert [reply.eval_count for reply in replies] == [10] * 6
    assert double.max_seen_in_flight == expected
    assert double.in_flight == 0
    assert double.queued == 0


def test_queue_overflow_is_503(start_double):
    double = start_double(models=[DoubleModel(MODEL)], max_queue=1, tokens_per_s=100)
    holder = client_for(double)
    waiter = client_for(double)
    with ThreadPoolExecutor(1) as pool:
        # The first request takes the only slot for 10 s unless its client leaves.
        stream = holder.generate(
            model=MODEL, prompt="long", stream=True, options={"num_predict": 1000}
        )
        next(stream)
        queued = pool.submit(waiter.generate, model=MODEL, prompt="short")
        wait_until(lambda: double.queued == 1)

        with (
            client_for(double) as client,
            pytest.raises(ollama.ResponseError) as caught,
        ):
            client.generate(model=MODEL, prompt="one too many")
        assert caught.value.status_code == 503
        assert caught.value.error == BUSY_MESSAGE
        with sdk_for(double) as sdk, pytest.raises(openai.InternalServerError) as caught_sdk:
            sdk.chat.completions.create(model=MODEL, messages=MESSAGES)
        assert caught_sdk.value.status_code == 503
        assert caught_sdk.value.body["message"] == BUSY_MESSAGE

        # Closing the first stream frees its slot for the queued request.
        stream.close()
        assert queued.result(timeout=5).done
    holder.close()
    waiter.close()
    wait_until(lambda: double.active == 0)
    assert double.in_flight == 0
    assert double.queued == 0


# -- injected faults -----------------------------------------------------


@pytest.fixture
def faulty(start_double):
    return start_double(models=[DoubleModel(MODEL)], tokens_per_s=1000)


def stream_native(client, parts, **options):
    for part in client.generate(model=MODEL, prompt="hi", stream=True, **options):
        parts.append(part)


def stream_openai(sdk, chunks):
    for chunk in sdk.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True):
        chunks.append(chunk)


def test_faults_reject_invalid_counts():
    with pytest.raises(ValueError, match="reset_after"):
        Faults(reset_after=-1)


def test_busy_503_on_both_layers(faulty):
    faulty.faults = Faults(busy_503=True)
    with client_for(faulty) as client, sdk_for(faulty) as sdk:
        with pytest.raises(ollama.ResponseError) as caught:
            client.chat(model=MODEL, messages=MESSAGES)
        assert caught.value.status_code == 503
        assert caught.value.error == BUSY_MESSAGE
        with pytest.raises(openai.InternalServerError) as caught_sdk:
            sdk.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
        assert caught_sdk.value.status_code == 503
        with pytest.raises(ollama.ResponseError):
            client.embed(model=MODEL, input="x")

        # Faults may change while the double runs.
        faulty.faults = Faults()
        assert client.chat(model=MODEL, messages=MESSAGES).done
    assert faulty.in_flight == 0


def test_error_mid_stream_native(faulty):
    faulty.faults = Faults(error_mid_stream=2)
    parts = []
    with client_for(faulty) as client:
        with pytest.raises(ollama.ResponseError) as caught:
            stream_native(client, parts)
        # Ollama keeps status 200 and ends the stream with {"error": "..."}.
        assert caught.value.status_code == -1
        assert "injected" in caught.value.error
        assert [part.done for part in parts] == [False, False]

        with pytest.raises(ollama.ResponseError) as caught_plain:
            client.generate(model=MODEL, prompt="hi")
        assert caught_plain.value.status_code == 500


def test_error_mid_stream_openai(faulty):
    faulty.faults = Faults(error_mid_stream=2)
    chunks = []
    with sdk_for(faulty) as sdk:
        with pytest.raises(openai.APIError, match="injected"):
            stream_openai(sdk, chunks)
        assert len(chunks) == 2

        with pytest.raises(openai.InternalServerError) as caught:
            sdk.chat.completions.create(model=MODEL, messages=MESSAGES)
        assert caught.value.status_code == 500


def test_error_before_first_piece_is_500(faulty):
    faulty.faults = Faults(error_mid_stream=0)
    with client_for(faulty) as client, pytest.raises(ollama.ResponseError) as caught:
        stream_native(client, [])
    assert caught.value.status_code == 500


def test_reset_after_pieces(faulty):
    faulty.faults = Faults(reset_after=2)
    parts, chunks = [], []
    with client_for(faulty) as client, sdk_for(faulty) as sdk:
        with pytest.raises(httpx.ReadError):
            stream_native(client, parts)
        with pytest.raises(openai.APIConnectionError):
            stream_openai(sdk, chunks)
        with pytest.raises(httpx.ReadError):
            client.generate(model=MODEL, prompt="hi")
    assert len(parts) == 2
    assert len(chunks) == 2
    wait_until(lambda: faulty.active == 0)
    assert faulty.in_flight == 0


def test_late_fault_strikes_before_done(faulty):
    faulty.faults = Faults(reset_after=50)
    parts = []
    with client_for(faulty) as client, pytest.raises(httpx.ReadError):
        stream_native(client, parts, options={"num_predict": 3})
    assert len(parts) == 3
    assert not parts[-1].done


def test_stall_until_client_leaves(faulty):
    faulty.faults = Faults(stall_after=2)
    parts = []
    with client_for(faulty, timeout=0.3) as client, pytest.raises(httpx.ReadTimeout):
        stream_native(client, parts)
    assert len(parts) == 2
    wait_until(lambda: faulty.active == 0)
    assert faulty.in_flight == 0

    chunks = []
    with sdk_for(faulty, timeout=0.3) as sdk, pytest.raises(openai.APITimeoutError):
        stream_openai(sdk, chunks)
    assert len(chunks) == 2
    wait_until(lambda: faulty.active == 0)


def test_stop_drops_stalled_connection(faulty):
    faulty.faults = Faults(stall_after=1)
    with ThreadPoolExecutor(1) as pool, client_for(faulty, timeout=5) as client:
        stalled = pool.submit(stream_native, client, [])
        wait_until(lambda: faulty.in_flight == 1 and faulty.active == 1)
        # Stopping the double drops the connection instead of waiting for it.
        started = time.monotonic()
        faulty.stop()
        assert time.monotonic() - started < 2
        with pytest.raises(httpx.TransportError):
            stalled.result(timeout=5)
