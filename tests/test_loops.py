"""Routing loops: a router rejects requests that have passed through it already."""

import httpx
import openai
import pytest

from sollol.app import create_app
from sollol.config import Settings
from sollol.loops import MAX_HOPS, VIA_HEADER

MESSAGES = [{"role": "user", "content": "Where am I?"}]


@pytest.fixture
def app(tmp_path):
    return create_app(Settings(database_url=f"sqlite:///{tmp_path / 'h.db'}"), probe_nodes=False)


async def post(app, path: str, via: str) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://router") as client:
        return await client.post(path, json={"model": "m"}, headers={VIA_HEADER: via})


async def own_id(app) -> str:
    # The id the router sends to nodes, taken from its own upstream client.
    return app.state.client.instance_id


async def test_own_id_gets_508(app):
    response = await post(app, "/v1/chat/completions", f"other,{await own_id(app)}")
    assert response.status_code == 508
    assert response.json()["error"]["code"] == "routing_loop"


async def test_loop_on_ollama_route_shape(app):
    response = await post(app, "/api/chat", await own_id(app))
    assert response.status_code == 508
    assert set(response.json()) == {"error"}


async def test_too_many_hops_get_508(app):
    too_many = ",".join(f"router-{n}" for n in range(MAX_HOPS))
    assert (await post(app, "/v1/chat/completions", too_many)).status_code == 508
    # One hop fewer passes the guard and meets the usual checks (here: no messages).
    fewer = ",".join(f"router-{n}" for n in range(MAX_HOPS - 1))
    assert (await post(app, "/v1/chat/completions", fewer)).status_code == 400


@pytest.mark.llamacpp
def test_router_rejects_itself_as_node(router):
    url = router.base_url
    rejected = httpx.post(url + "/sollol/nodes", json={"url": url, "name": "self"})
    assert rejected.status_code == 400
    assert "is this router" in rejected.json()["error"]["message"]

    # Given a kind, nothing is detected and the node is added. Its probes get
    # 508, so it never becomes healthy and requests go to the real nodes.
    added = httpx.post(url + "/sollol/nodes", json={"url": url, "name": "self", "kind": "ollama"})
    assert added.status_code == 201
    try:
        with openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0) as sdk:
            for _ in range(4):
                raw = sdk.chat.completions.with_raw_response.create(
                    model="tiny", messages=MESSAGES, max_tokens=2
                )
                assert raw.headers["x-sollol-node"] in {"node-a", "node-b"}
        nodes = {node["name"]: node for node in httpx.get(url + "/health").json()["nodes"]}
        assert nodes["self"]["healthy"] is False
    finally:
        httpx.delete(url + "/sollol/nodes/self")
