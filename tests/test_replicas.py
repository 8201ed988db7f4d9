"""Two router processes on 127.0.0.1 against one real PostgreSQL behave as one:
membership, keys and per-key request limits are shared; node signals are not."""

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
