"""Keys, limits and usage against a real router process in front of real llama-server nodes.

Usage totals are checked against the token counts the nodes reported in
their replies, which the router passes through to the client unchanged:
``usage`` of OpenAI replies and stream chunks, ``prompt_eval_count`` and
``eval_count`` of Ollama's.
"""

import asyncio
import json
import subprocess
import sys
import time

import httpx
import ollama
import openai
import pytest

from sollol.history import create_history_engine
from sollol.keys import KeyStore
from tests.support.fixtures import RouterProcess, history_rows, write_router_config

pytestmark = pytest.mark.llamacpp

PROMPT_PRICE = 3.0  # per million prompt tokens, on both nodes
COMPLETION_PRICE = 7.0
MESSAGES = [{"role": "user", "content": "Say something."}]
RPM = 20
TPM = 300
QUOTA_TOKENS = 150
SOLLOL = (sys.executable, "-m", "sollol")


@pytest.fixture(scope="module")
def live(llama_nodes, tmp_path_factory):
    """A router with prices and five keys; yields (router, secrets, key ids, database URL)."""
    workdir = tmp_path_factory.mktemp("tenancy")
    database_path = workdir / "history.db"
    database_url = f"sqlite:///{database_path}"
    store = KeyStore(create_history_engine(database_url))
    secrets: dict[str, str] = {}
    ids: dict[str, int] = {}
    for name, options in {
        "usage": {},
        "admin": {"admin": True},
        "rpm": {"rpm": RPM},
        "tpm": {"tpm": TPM},
        "quota": {"quota_tokens": QUOTA_TOKENS, "quota_period": "day"},
    }.items():
        key, secrets[name] = store.create(name, **options)
        ids[name] = key.id
    config = write_router_config(
        workdir / "sollol.toml",
        database_path=database_path,
        nodes=[
            {"name": "node-a", "url": llama_nodes[0].url, "models": ["tiny"]},
            {"name": "node-b", "url": llama_nodes[1].url, "models": ["tiny", "tiny-embed"]},
        ],
        server={"keys_refresh_interval_s": 0.5, "node_queue_per_slot": 1.0},
    )
    prices = (
        f"prompt_per_million_tokens = {PROMPT_PRICE}\n"
        f"completion_per_million_tokens = {COMPLETION_PRICE}\n"
    )
    with config.open("a", encoding="utf-8") as file:
        file.write(f'\n[costs]\ncurrency = "EUR"\n[costs.nodes.node-a]\n{prices}')
        file.write(f"[costs.nodes.node-b]\n{prices}")
    router = RouterProcess(config, workdir / "router.log").start()
    try:
        yield router, secrets, ids, database_url, database_path
    finally:
        router.stop()


def sdk(router: RouterProcess, secret: str) -> openai.OpenAI:
    return openai.OpenAI(api_key=secret, base_url=router.base_url + "/v1", max_retries=0)


def sollol_usage(config_path, key_id: int) -> dict:
    output = subprocess.run(
        [*SOLLOL, "usage", "--json", "--key", str(key_id), "--config", str(config_path)],
        capture_output=True,
        check=True,
        timeout=60,
    )
    return json.loads(output.stdout)


def test_usage_matches_node_counts(live):
    router, secrets, ids, _, database_path = live
    client = sdk(router, secrets["usage"])
    counted: list[tuple[int, int]] = []  # (prompt, completion) per request, as the node said

    reply = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6)
    counted.append((reply.usage.prompt_tokens, reply.usage.completion_tokens))

    stream = client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
    )
    usage = [chunk.usage for chunk in stream if chunk.usage is not None]
    counted.append((usage[-1].prompt_tokens, usage[-1].completion_tokens))

    completion = client.completions.create(model="tiny", prompt="Once upon", max_tokens=5)
    counted.append((completion.usage.prompt_tokens, completion.usage.completion_tokens))

    streamed = client.completions.create(
        model="tiny",
        prompt="Once upon",
        max_tokens=5,
        stream=True,
        stream_options={"include_usage": True},
    )
    usage = [chunk.usage for chunk in streamed if chunk.usage is not None]
    counted.append((usage[-1].prompt_tokens, usage[-1].completion_tokens))

    embedding = client.embeddings.create(model="tiny-embed", input=["one text", "two texts"])
    counted.append((embedding.usage.prompt_tokens, 0))

    ollama_client = ollama.Client(
        host=router.base_url, headers={"Authorization": f"Bearer {secrets['usage']}"}
    )
    chat = ollama_client.chat(model="tiny", messages=MESSAGES, options={"num_predict": 6})
    counted.append((chat.prompt_eval_count, chat.eval_count))
    last = list(
        ollama_client.generate(
            model="tiny", prompt="Hello", stream=True, options={"num_predict": 6}
        )
    )[-1]
    counted.append((last.prompt_eval_count, last.eval_count))
    embedded = ollama_client.embed(model="tiny-embed", input="some text")
    counted.append((embedded.prompt_eval_count, 0))

    client.close()
    ollama_client.close()
    assert all(prompt > 0 for prompt, _ in counted), counted
    rows: list[dict] = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        rows = [row for row in history_rows(database_path, 1) if row["key_id"] == ids["usage"]]
        if len(rows) == len(counted):
            break
        time.sleep(0.1)
    assert len(rows) == len(counted)

    report = sollol_usage(router.config_path, ids["usage"])
    (total,) = report["totals"]
    prompt_sum = sum(prompt for prompt, _ in counted)
    completion_sum = sum(completion for _, completion in counted)
    assert total["key_id"] == ids["usage"]
    assert total["key_name"] == "usage"
    assert total["requests"] == len(counted)
    assert total["prompt_tokens"] == prompt_sum
    assert total["completion_tokens"] == completion_sum
    expected_cost = (prompt_sum * PROMPT_PRICE + completion_sum * COMPLETION_PRICE) / 1e6
    assert total["cost"] == pytest.approx(expected_cost)
    assert report["currency"] == "EUR"
    assert {row["node"] for row in report["rows"]} <= {"node-a", "node-b"}
    assert {row["model"] for row in report["rows"]} == {"tiny", "tiny-embed"}

    admin = httpx.get(
        router.base_url + f"/sollol/usage?key_id={ids['usage']}",
        headers={"Authorization": f"Bearer {secrets['admin']}"},
        timeout=10,
    )
    assert admin.status_code == 200
    assert admin.json()["totals"] == report["totals"]


async def concurrent_chats(router: RouterProcess, secret: str, count: int) -> list[httpx.Response]:
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 4}
    headers = {"Authorization": f"Bearer {secret}"}
    limits = httpx.Limits(max_connections=count)
    async with httpx.AsyncClient(base_url=router.base_url, timeout=120, limits=limits) as client:
        return await asyncio.gather(
            *(client.post("/v1/chat/completions", json=body, headers=headers) for _ in range(count))
        )


def test_rpm_holds_under_concurrency(live):
    router, secrets, _, _, _ = live
    replies = asyncio.run(concurrent_chats(router, secrets["rpm"], 3 * RPM))
    statuses = [reply.status_code for reply in replies]
    assert statuses.count(200) == RPM, statuses
    assert statuses.count(429) == 2 * RPM, statuses
    for reply in replies:
        if reply.status_code == 429:
            assert 1 <= int(reply.headers["retry-after"]) <= 60
            assert reply.json()["error"]["code"] == "rate_limit_requests"


def test_tpm_holds_under_concurrency(live):
    router, secrets, _, _, _ = live
    # The router learns from earlier replies how many tokens a prompt takes.
    warm_up = asyncio.run(concurrent_chats(router, secrets["usage"], 1))[0]
    assert warm_up.status_code == 200
    replies = asyncio.run(concurrent_chats(router, secrets["tpm"], 40))
    accepted = [reply.json()["usage"]["total_tokens"] for reply in replies if reply.is_success]
    rejected = [reply for reply in replies if reply.status_code == 429]
    print(f"tpm {TPM}: {len(accepted)} accepted using {sum(accepted)} tokens, {len(rejected)} 429")
    assert len(accepted) + len(rejected) == len(replies)
    assert accepted and rejected
    assert sum(accepted) <= TPM * 1.05
    assert all(reply.json()["error"]["code"] == "rate_limit_tokens" for reply in rejected)
    # The window is full or nearly so: the next request is refused as well.
    again = asyncio.run(concurrent_chats(router, secrets["tpm"], 1))[0]
    assert again.status_code == 429


def test_quota_stops_key(live):
    router, secrets, _, _, _ = live
    warm_up = asyncio.run(concurrent_chats(router, secrets["usage"], 1))[0]
    assert warm_up.status_code == 200
    client = sdk(router, secrets["quota"])
    used = 0
    for _ in range(50):
        try:
            reply = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4)
        except openai.RateLimitError as exc:
            assert exc.code == "quota_exceeded"
            retry_after_s = int(exc.response.headers["retry-after"])
            assert 1 <= retry_after_s <= 86400
            break
        used += reply.usage.total_tokens
    else:
        pytest.fail(f"the quota of {QUOTA_TOKENS} tokens never stopped the key; used {used}")
    client.close()
    print(f"quota {QUOTA_TOKENS}: {used} tokens used before the 429")
    assert QUOTA_TOKENS * 0.5 <= used <= QUOTA_TOKENS * 1.05


def test_revoked_key_stops_soon(live):
    router, _, _, database_url, _ = live
    _, secret = KeyStore(create_history_engine(database_url)).create("short-lived")
    headers = {"Authorization": f"Bearer {secret}"}
    deadline = time.monotonic() + 10
    status = 0
    while time.monotonic() < deadline and status != 200:
        status = httpx.get(router.base_url + "/v1/models", headers=headers).status_code
        time.sleep(0.1)
    assert status == 200
    listed = KeyStore(create_history_engine(database_url)).list()
    key_id = next(key.id for key in listed if key.name == "short-lived")
    subprocess.run(
        [*SOLLOL, "keys", "revoke", str(key_id), "--database-url", database_url],
        check=True,
        capture_output=True,
        timeout=60,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and status != 401:
        status = httpx.get(router.base_url + "/v1/models", headers=headers).status_code
        time.sleep(0.1)
    assert status == 401


def test_router_log_has_no_secret(live):
    router, secrets, _, _, _ = live
    for secret in [*secrets.values(), "sollol-not-a-key"]:
        httpx.get(router.base_url + "/metrics", headers={"Authorization": f"Bearer {secret}"})
    log_text = router.log_path.read_text(encoding="utf-8", errors="replace")
    assert "route=/v1/chat/completions" in log_text
    assert "status=401" in log_text
    for secret in secrets.values():
        assert secret[len("sollol-") :] not in log_text
