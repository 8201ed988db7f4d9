"""Rows the router writes for served requests, on SQLite and on a real PostgreSQL server."""

import httpx
from sqlalchemy import create_engine, select

from sollol.app import create_app
from sollol.config import NodeConfig, NodeKind, Settings
from sollol.history import requests_table
from tests.support.fake_node import FakeOpenAINode

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}


async def test_served_requests_are_stored(history_url):
    with FakeOpenAINode() as node:
        settings = Settings(
            database_url=history_url,
            nodes=(NodeConfig(url=node.url, kind=NodeKind.OPENAI, name="fake", models=("tiny",)),),
        )
        app = create_app(settings, probe_nodes=False)
        async with app.router.lifespan_context(app):
            fake = app.state.cluster.nodes[0]
            fake.health.probe_ok()
            app.state.cluster._rebuild_candidates()
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://router") as client:
                unary = await client.post("/v1/chat/completions", json=CHAT)
                streamed = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
        # Leaving the lifespan closes the writer, which writes what is buffered.

    assert unary.status_code == 200
    assert streamed.status_code == 200
    engine = create_engine(history_url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(select(requests_table).order_by("id")).all()
    finally:
        engine.dispose()
    assert [row.stream for row in rows] == [False, True]
    for row in rows:
        assert row.node == "fake"
        assert row.status == 200
        assert row.outcome == "ok"
        assert row.max_tokens == 8
        assert row.est_prompt_tokens > 0
        assert row.node_in_flight == 0
