"""Two router processes on 127.0.0.1 against one real PostgreSQL behave as one:
membership, keys and per-key limits are shared; node signals are not."""

import asyncio
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from sollol.history import create_history_engine
from sollol.keys import KeyStore
from tests.support.fake_node import FakeOpenAINode
from tests.support.fixtures import RouterProcess, write_router_config

REFRESH_S = 1.0
RPM = 40
SENT = 100
TPM = 1000
QUOTA_TOKENS = 500
MESSAGES = [{"role": "user", "content": "Say something."}]


@pytest.fixture
def database_url(postgres_server):
    return postgres_server.create_database(f"replicas_{time.monotonic_ns()}")


@pytest.fixture
def nodes():
    with FakeOpenAINode(models=("tiny",)) as first, FakeOpenAINode(models=("only-new",)) as new:
        yield first, new


@pytest.fixture
def admin_secret(database_url):
    engine = create_history_engine(database_url)
    try:
        _, secret = KeyStore(engine).create("ops", admin=True)
        return secret
    finally:
        engine.dispose()


@pytest.fixture
def replicas(tmp_path, database_url, nodes, admin_secret):
    processes = []
    try:
        for name in ("one", "two"):
            config = write_router_config(
                tmp_path / f"{name}.toml",
                database_path=tmp_path / "unused.db",
                nodes=[{"name": "first", "kind": "openai", "url": nodes[0].url}],
                server={
                    "database_url": database_url,
                    "membership_refresh_interval_s": REFRESH_S,
                    "keys_refresh_interval_s": REFRESH_S,
                },
            )
            processes.append(RouterProcess(config, tmp_path / f"{name}.log").start())
        yield processes
    finally:
        for process in processes:
            process.stop()


def chat(router, secret, model="tiny"):
    return httpx.post(
        router.base_url + "/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
        headers={"Authorization": f"Bearer {secret}"},
        timeout=30,
    )


def test_node_added_on_one_served_by_other(replicas, nodes, admin_secret):
    one, two = replicas
    result = subprocess.run(
        [
            *(sys.executable, "-m", "sollol", "nodes", "add", nodes[1].url, "--name", "new"),
            *("--url", one.base_url, "--api-key", admin_secret),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    # The other router applies the stored row within its refresh interval,
    # then probes the node; wait for both.
    deadline = time.monotonic() + 5 * REFRESH_S + 5.0
    status = None
    while time.monotonic() < deadline:
        status = chat(two, admin_secret, model="only-new").status_code
        if status == 200:
            break
        time.sleep(0.1)
    assert status == 200
    assert any(body.get("model") == "only-new" for _, body in nodes[1].received)
    listing = httpx.get(
        two.base_url + "/sollol/nodes",
        headers={"Authorization": f"Bearer {admin_secret}"},
        timeout=10,
    ).json()
    assert {node["name"]: node["source"] for node in listing["nodes"]} == {
        "first": "config",
        "new": "api",
    }


def test_drain_on_one_applies_on_other(replicas, admin_secret):
    one, two = replicas
    headers = {"Authorization": f"Bearer {admin_secret}"}
    drained = httpx.post(one.base_url + "/sollol/nodes/first/drain", headers=headers, timeout=10)
    assert drained.status_code == 200
    deadline = time.monotonic() + 5 * REFRESH_S
    state = None
    while time.monotonic() < deadline:
        nodes = httpx.get(two.base_url + "/sollol/nodes", headers=headers, timeout=10).json()
        state = nodes["nodes"][0]["state"]
        if state == "drained":
            break
        time.sleep(0.1)
    assert state == "drained"
    assert chat(two, admin_secret).status_code == 503


def test_key_rpm_holds_across_replicas(replicas, database_url):
    engine = create_history_engine(database_url)
    try:
        _, secret = KeyStore(engine).create("limited", rpm=RPM)
    finally:
        engine.dispose()
    # Both routers read the new key within their refresh interval.
    deadline = time.monotonic() + 5 * REFRESH_S
    for router in replicas:
        while chat(router, secret).status_code == 401 and time.monotonic() < deadline:
            time.sleep(0.1)

    def send(position):
        return chat(replicas[position % 2], secret).status_code

    with ThreadPoolExecutor(max_workers=8) as pool:
        statuses = list(pool.map(send, range(SENT)))
    # The two waiting requests above count too; all were sent within a minute.
    accepted = statuses.count(200) + 2
    assert statuses.count(200) + statuses.count(429) == SENT
    assert accepted == RPM


@pytest.fixture
def llama_replicas(tmp_path, database_url, llama_nodes):
    """Two routers in front of real llama-server nodes; yields them and the keys' secrets."""
    engine = create_history_engine(database_url)
    try:
        store = KeyStore(engine)
        secrets = {
            "warm": store.create("warm")[1],
            "tpm": store.create("tpm", tpm=TPM)[1],
            "quota": store.create("quota", quota_tokens=QUOTA_TOKENS, quota_period="day")[1],
        }
    finally:
        engine.dispose()
    nodes = [
        {"name": f"node-{index}", "url": server.url, "models": ["tiny"]}
        for index, server in enumerate(llama_nodes)
    ]
    processes = []
    try:
        for name in ("one", "two"):
            config = write_router_config(
                tmp_path / f"{name}.toml",
                database_path=tmp_path / "unused.db",
                nodes=nodes,
                server={"database_url": database_url, "node_queue_per_slot": 1.0},
            )
            processes.append(RouterProcess(config, tmp_path / f"{name}.log").start())
        # Each router learns from a first reply how many tokens the prompt
        # takes, so that its estimates are not far too low.
        for router in processes:
            assert llama_chat(router, secrets["warm"]).status_code == 200
        yield processes, secrets
    finally:
        for process in processes:
            process.stop()


def llama_chat(router, secret):
    return httpx.post(
        router.base_url + "/v1/chat/completions",
        json={"model": "tiny", "messages": MESSAGES, "max_tokens": 4},
        headers={"Authorization": f"Bearer {secret}"},
        timeout=60,
    )


async def chats_on_both(routers, secret: str, count: int) -> list[httpx.Response]:
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 4}
    headers = {"Authorization": f"Bearer {secret}"}
    clients = [
        httpx.AsyncClient(base_url=router.base_url, timeout=120, limits=httpx.Limits())
        for router in routers
    ]
    try:
        return await asyncio.gather(
            *(
                clients[position % 2].post("/v1/chat/completions", json=body, headers=headers)
                for position in range(count)
            )
        )
    finally:
        for client in clients:
            await client.aclose()


@pytest.mark.llamacpp
def test_key_tpm_holds_across_replicas(llama_replicas):
    routers, secrets = llama_replicas
    replies = asyncio.run(chats_on_both(routers, secrets["tpm"], 40))
    accepted = [reply.json()["usage"]["total_tokens"] for reply in replies if reply.is_success]
    rejected = [reply for reply in replies if reply.status_code == 429]
    print(f"tpm {TPM}: {len(accepted)} accepted using {sum(accepted)} tokens, {len(rejected)} 429")
    assert len(accepted) + len(rejected) == len(replies)
    assert all(reply.json()["error"]["code"] == "rate_limit_tokens" for reply in rejected)
    # Every router reserves the request's estimate in the shared table, and
    # the estimate (the learned prompt length plus max_tokens) is at least
    # the real count, so the limit holds exactly. A request is rejected only
    # when it would not fit, so the window is nearly full.
    assert sum(accepted) <= TPM
    assert sum(accepted) >= TPM - 2 * max(accepted)


@pytest.mark.llamacpp
def test_key_quota_holds_across_replicas(llama_replicas):
    routers, secrets = llama_replicas
    replies = asyncio.run(chats_on_both(routers, secrets["quota"], 20))
    counts = [reply.json()["usage"]["total_tokens"] for reply in replies if reply.is_success]
    assert all(reply.status_code in (200, 429) for reply in replies)
    # The requests still reserved their estimates when the last ones were
    # checked; once they end, single requests use what the quota has left.
    for position in range(20):
        reply = llama_chat(routers[position % 2], secrets["quota"])
        if reply.status_code == 429:
            break
        counts.append(reply.json()["usage"]["total_tokens"])
    used = sum(counts)
    print(f"quota {QUOTA_TOKENS}: {used} tokens used before the 429")
    assert reply.status_code == 429
    assert reply.json()["error"]["code"] == "quota_exceeded"
    assert used <= QUOTA_TOKENS
    # Rejected alone, so the next request's estimate (about one reply) did not fit.
    assert used >= QUOTA_TOKENS - 2 * max(counts)
    # The other router rejects the key as well.
    other = llama_chat(routers[(position + 1) % 2], secrets["quota"])
    assert other.status_code == 429
