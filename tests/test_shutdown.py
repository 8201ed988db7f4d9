"""SIGTERM lets a request in flight finish, flushes the history and exits 0."""

import asyncio
import signal
import sqlite3

import httpx
import pytest

from tests.support.fixtures import RouterProcess, write_router_config

pytestmark = pytest.mark.llamacpp


async def test_sigterm_finishes_in_flight_request(llama_nodes, tmp_path):
    config = write_router_config(
        tmp_path / "sollol.toml",
        database_path=tmp_path / "history.db",
        nodes=[{"name": "n", "url": llama_nodes[0].url, "models": ["tiny"]}],
    )
    router = RouterProcess(config, tmp_path / "router.log").start()
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "x"}],
        "max_tokens": 600,
        "ignore_eos": True,
    }
    try:
        async with httpx.AsyncClient(base_url=router.base_url, timeout=30) as http:
            request = asyncio.create_task(http.post("/v1/chat/completions", json=body))
            while True:
                nodes = (await http.get("/health")).json()["nodes"]
                if nodes[0]["in_flight"] == 1:
                    break
                await asyncio.sleep(0.01)
            router.process.send_signal(signal.SIGTERM)
            reply = await request
        exit_code = await asyncio.to_thread(router.process.wait, 15)
    finally:
        router.stop()
    assert reply.status_code == 200
    assert reply.json()["usage"]["completion_tokens"] == 600
    assert exit_code == 0
    with sqlite3.connect(tmp_path / "history.db") as connection:
        rows = connection.execute("SELECT outcome, completion_tokens FROM requests").fetchall()
    assert ("ok", 600) in rows
