"""In-process tests through httpx.ASGITransport: validation and errors, no node contacted."""

import contextlib
import socket

import httpx
import orjson
import pytest
import pytest_asyncio

from sollol.app import create_app
from sollol.config import NodeConfig, NodeKind, Settings


@pytest.fixture
def refused_url():
    """A 127.0.0.1 URL whose port is bound but not listening, so connections are refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{holder.getsockname()[1]}"


@pytest_asyncio.fixture
async def app_client(tmp_path, refused_url):
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'history.db'}",
        max_body_bytes=4096,
        max_attempts=2,
        nodes=(
            NodeConfig(url=refused_url, kind=NodeKind.LLAMACPP, name="down", models=("tiny",)),
            NodeConfig(
                url="http://127.0.0.2:9", kind=NodeKind.OLLAMA, name="idle", models=("other",)
            ),
        ),
    )
    async with running_app(settings) as client:
        yield client


@contextlib.asynccontextmanager
async def running_app(settings: Settings, *healthy: str):
    """Yield an in-process client of the app, with its lifespan run and ``healthy`` nodes up.

    Node probing is off, so no request reaches a node unless a test sends one.
    """
    app = create_app(settings, probe_nodes=False)
    async with app.router.lifespan_context(app):
        for name in healthy:
            mark_healthy(app, name)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://router") as client:
            client.app = app  # type: ignore[attr-defined]
            yield client


def error_of(response: httpx.Response) -> dict:
    body = orjson.loads(response.content)
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def mark_healthy(app, name: str) -> None:
    cluster = app.state.cluster
    for node in cluster.nodes:
        if node.name == name:
            node.health.probe_ok()
    cluster._rebuild_candidates()


CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}


async def test_malformed_json_is_400(app_client):
    response = await app_client.post("/v1/chat/completions", content=b"{not json")
    assert response.status_code == 400
    assert error_of(response)["type"] == "invalid_request_error"


async def test_empty_body_is_400(app_client):
    response = await app_client.post("/v1/chat/completions", content=b"")
    assert response.status_code == 400
    assert "empty" in error_of(response)["message"]


async def test_non_object_body_is_400(app_client):
    response = await app_client.post("/v1/chat/completions", json=[1, 2])
    assert response.status_code == 400


@pytest.mark.parametrize(
    ("route", "body", "param"),
    [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}, "model"),
        ("/v1/chat/completions", {"model": 5, "messages": []}, "model"),
        ("/v1/chat/completions", {"model": "tiny"}, "messages"),
        ("/v1/chat/completions", {"model": "tiny", "messages": []}, "messages"),
        ("/v1/chat/completions", {"model": "tiny", "messages": ["hi"]}, "messages[0]"),
        ("/v1/chat/completions", {**CHAT, "stream": "yes"}, "stream"),
        ("/v1/chat/completions", {**CHAT, "stream_options": True}, "stream_options"),
        ("/v1/completions", {"model": "tiny"}, "prompt"),
        ("/v1/completions", {"model": "tiny", "prompt": []}, "prompt"),
        ("/v1/completions", {"model": "tiny", "prompt": {"a": 1}}, "prompt"),
        ("/v1/embeddings", {"model": "tiny"}, "input"),
        ("/v1/embeddings", {"model": "tiny", "input": [1.5]}, "input"),
        (
            "/v1/embeddings",
            {"model": "tiny", "input": "x", "encoding_format": "hex"},
            "encoding_format",
        ),
    ],
)
async def test_invalid_fields_are_400(app_client, route, body, param):
    response = await app_client.post(route, json=body)
    assert response.status_code == 400
    assert error_of(response)["param"] == param


async def test_unknown_model_is_404_without_contacting_nodes(app_client):
    mark_healthy(app_client.app, "down")
    response = await app_client.post(
        "/v1/chat/completions", json={**CHAT, "model": "missing", "stream": True}
    )
    assert response.status_code == 404
    assert error_of(response)["code"] == "model_not_found"
    assert "x-sollol-node" not in response.headers
    assert app_client.app.state.cluster.nodes[0].healthy, "no request should reach a node"


async def test_body_over_limit_is_413(app_client):
    response = await app_client.post(
        "/v1/chat/completions",
        json={**CHAT, "messages": [{"role": "user", "content": "x" * 5000}]},
    )
    assert response.status_code == 413
    assert "max_body_bytes" in error_of(response)["message"]


async def test_known_model_without_healthy_node_is_503(app_client):
    response = await app_client.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 503
    assert response.headers["retry-after"] == "2"
    assert error_of(response)["code"] == "no_node_available"


async def test_unreachable_node_is_502_and_marked_unhealthy(app_client):
    mark_healthy(app_client.app, "down")
    response = await app_client.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 502
    assert "could not be reached" in error_of(response)["message"]
    assert not app_client.app.state.cluster.nodes[0].healthy
    signals = app_client.app.state.cluster.signals
    assert [signals.in_flight(index) for index in range(2)] == [0, 0]


async def test_models_lists_only_healthy_nodes(app_client):
    mark_healthy(app_client.app, "idle")
    response = await app_client.get("/v1/models")
    assert response.status_code == 200
    assert [entry["id"] for entry in response.json()["data"]] == ["other"]


async def test_get_unknown_model_is_404(app_client):
    response = await app_client.get("/v1/models/tiny")
    assert response.status_code == 404
    assert error_of(response)["code"] == "model_not_found"


async def test_health_is_503_when_no_node_is_up(app_client):
    response = await app_client.get("/health")
    assert response.status_code == 503
    assert [node["name"] for node in response.json()["nodes"]] == ["down", "idle"]


async def test_unknown_route_is_404_in_openai_shape(app_client):
    response = await app_client.get("/v1/nothing")
    assert response.status_code == 404
    assert error_of(response)["type"] == "not_found_error"


async def test_wrong_method_is_405_in_openai_shape(app_client):
    response = await app_client.get("/v1/chat/completions")
    assert response.status_code == 405
    error_of(response)


def set_signal(app, name: str, column: int, value: float) -> None:
    cluster = app.state.cluster
    index = next(node.index for node in cluster.nodes if node.name == name)
    cluster.signals.matrix[index, column] = value


@pytest_asyncio.fixture
async def two_node_client(tmp_path, refused_url):
    nodes = (
        NodeConfig(url=refused_url, kind=NodeKind.LLAMACPP, name="slow", models=("tiny",)),
        NodeConfig(url="http://127.0.0.3:9", kind=NodeKind.LLAMACPP, name="fast", models=("tiny",)),
    )
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'history.db'}", nodes=nodes)
    async with running_app(settings, "slow", "fast") as client:
        yield client


async def test_route_explains_choice(two_node_client):
    from sollol.routing.layout import COL_DECODE_TPS, COL_TTFT_MS

    set_signal(two_node_client.app, "slow", COL_DECODE_TPS, 5.0)
    set_signal(two_node_client.app, "fast", COL_DECODE_TPS, 80.0)
    set_signal(two_node_client.app, "fast", COL_TTFT_MS, 50.0)
    response = await two_node_client.get("/sollol/route", params={"model": "tiny"})
    assert response.status_code == 200
    body = response.json()
    assert body["policy"] == "predicted_latency"
    assert body["chosen"] == "fast"
    scores = {entry["node"]: entry["score"] for entry in body["candidates"]}
    assert scores["fast"] < scores["slow"]
    fast = next(entry for entry in body["candidates"] if entry["node"] == "fast")
    assert fast["signals"]["decode_tokens_per_s"] == 80.0


async def test_route_with_other_policy(two_node_client):
    response = await two_node_client.get(
        "/sollol/route", params={"model": "tiny", "policy": "sollol_heuristic"}
    )
    assert response.json()["policy"] == "sollol_heuristic"


async def test_route_skips_unhealthy_node(two_node_client):
    cluster = two_node_client.app.state.cluster
    cluster.mark_unreachable(cluster.nodes[1], "test")
    body = (await two_node_client.get("/sollol/route", params={"model": "tiny"})).json()
    assert body["chosen"] == "slow"
    assert [entry["node"] for entry in body["candidates"]] == ["slow"]


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({}, "model"),
        ({"model": "tiny", "policy": "fastest"}, "policy"),
        ({"model": "tiny", "task": "rerank"}, "task"),
        ({"model": "tiny", "max_tokens": "lots"}, "max_tokens"),
        ({"model": "tiny", "priority": "11"}, "priority"),
    ],
)
async def test_route_rejects_bad_query(two_node_client, params, param):
    response = await two_node_client.get("/sollol/route", params=params)
    assert response.status_code == 400
    assert error_of(response)["param"] == param


async def test_route_unknown_model_is_404(two_node_client):
    response = await two_node_client.get("/sollol/route", params={"model": "nope"})
    assert response.status_code == 404


@pytest.mark.parametrize(
    ("body", "headers"),
    [
        ({**CHAT, "priority": 0}, {}),
        ({**CHAT, "priority": "high"}, {}),
        ({**CHAT, "priority": True}, {}),
        (CHAT, {"x-sollol-priority": "12"}),
        (CHAT, {"x-sollol-policy": "random"}),
    ],
)
async def test_bad_priority_or_policy_is_400(two_node_client, body, headers):
    response = await two_node_client.post("/v1/chat/completions", json=body, headers=headers)
    assert response.status_code == 400


async def test_full_queue_is_429(tmp_path, refused_url):
    from sollol.routing.layout import COL_IN_FLIGHT, COL_SLOTS_TOTAL

    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'history.db'}",
        max_queued_per_model=0,
        node_queue_per_slot=0.0,
        nodes=(NodeConfig(url=refused_url, kind=NodeKind.LLAMACPP, name="busy", models=("tiny",)),),
    )
    async with running_app(settings, "busy") as client:
        client.app.state.cluster.signals.matrix[0, COL_SLOTS_TOTAL] = 1
        client.app.state.cluster.signals.matrix[0, COL_IN_FLIGHT] = 1
        response = await client.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 429
    assert response.headers["retry-after"] == "2"
    assert error_of(response)["code"] == "queue_full"


async def test_route_dry_run_keeps_round_robin_turn(two_node_client):
    params = {"model": "tiny", "policy": "round_robin"}
    first = (await two_node_client.get("/sollol/route", params=params)).json()["chosen"]
    second = (await two_node_client.get("/sollol/route", params=params)).json()["chosen"]
    assert first == second


@pytest.mark.parametrize("value", ["inf", "1e400", "nan", "-1"])
async def test_route_rejects_non_finite_numbers(two_node_client, value):
    response = await two_node_client.get(
        "/sollol/route", params={"model": "tiny", "max_tokens": value}
    )
    assert response.status_code == 400
    assert error_of(response)["param"] == "max_tokens"


async def test_full_node_left_out_while_another_has_room(two_node_client):
    from sollol.routing.layout import COL_DECODE_TPS, COL_IN_FLIGHT, COL_SLOTS_TOTAL

    app = two_node_client.app
    set_signal(app, "fast", COL_DECODE_TPS, 500.0)
    set_signal(app, "slow", COL_DECODE_TPS, 1.0)
    for name in ("fast", "slow"):
        set_signal(app, name, COL_SLOTS_TOTAL, 1.0)
    # One slot plus one request waiting at the node: "fast" is at capacity.
    set_signal(app, "fast", COL_IN_FLIGHT, 2.0)
    body = (await two_node_client.get("/sollol/route", params={"model": "tiny"})).json()
    assert body["chosen"] == "slow"


@pytest.mark.parametrize(
    ("body", "headers"),
    [
        ({**CHAT, "priority": "5"}, {}),
        ({**CHAT, "priority": 5.0}, {}),
        ({**CHAT, "priority": 3}, {"x-sollol-priority": "high"}),
    ],
)
async def test_priority_must_be_integer(two_node_client, body, headers):
    response = await two_node_client.post("/v1/chat/completions", json=body, headers=headers)
    assert response.status_code == 400
    assert error_of(response)["param"] == "priority"
