"""The learned policy: its choice, exploration, and hot reload while requests flow."""

import asyncio
import json
import logging
import math
from collections import Counter

import numpy as np
import pytest
from sqlalchemy import create_engine, select

from sollol.app import create_app
from sollol.config import ConfigError, NodeConfig, NodeKind, Settings, load_settings
from sollol.history import requests_table
from sollol.learning.artifact import save_artifact
from sollol.learning.features import FEATURE_SCHEMA_VERSION
from sollol.learning.policy import LearnedScorer, ModelReloader
from sollol.routing.engine import NodeSignals, RoutingEngine
from sollol.routing.features import RequestFeatures
from sollol.routing.layout import COL_DECODE_TPS, COL_TTFT_MS
from tests.support.fake_node import FakeOpenAINode
from tests.support.learned_models import node_preference_model
from tests.test_app import mark_healthy

NAMES = ("a", "b", "c")
FEATURES = RequestFeatures(task="chat", prompt_tokens=10.0, max_tokens=32.0)


def engine_for(names=NAMES) -> RoutingEngine:
    signals = NodeSignals(len(names))
    for node in range(len(names)):
        signals.set_healthy(node, True)
    return RoutingEngine(signals, default_policy="learned")


def test_learned_picks_lowest_predicted_latency():
    engine = engine_for()
    engine.learned = LearnedScorer(node_preference_model(NAMES, "b"), list(NAMES))
    candidates = np.arange(3, dtype=np.int64)
    decision = engine.decide(candidates, FEATURES, model="tiny")
    assert decision.node == 1
    assert decision.policy == "learned"
    assert decision.scores.tolist() == pytest.approx([1000.0, 100.0, 1000.0])


def test_learned_maps_names_not_positions():
    # The router lists its nodes in another order than the artifact.
    engine = engine_for(("c", "b", "a"))
    engine.learned = LearnedScorer(node_preference_model(NAMES, "a"), ["c", "b", "a"])
    decision = engine.decide(np.arange(3, dtype=np.int64), FEATURES, model="tiny")
    assert decision.node == 2


def test_unknown_node_gets_nan_code():
    scorer = LearnedScorer(node_preference_model(NAMES, "a"), ["a", "new"])
    assert scorer.node_codes[0] == 0.0
    assert math.isnan(scorer.node_codes[1])
    assert scorer.unknown_nodes == ["new"]


def test_learned_without_model_falls_back():
    engine = engine_for()
    engine.signals.matrix[:, COL_TTFT_MS] = [500.0, 500.0, 20.0]
    engine.signals.matrix[:, COL_DECODE_TPS] = [10.0, 10.0, 90.0]
    decision = engine.decide(np.arange(3, dtype=np.int64), FEATURES)
    assert decision.policy == "predicted_latency"
    assert decision.node == 2


def test_exploration_share():
    engine = engine_for()
    engine.learned = LearnedScorer(node_preference_model(NAMES, "b"), list(NAMES))
    engine.explore_share = 0.2
    engine.random.seed(7)
    candidates = np.arange(3, dtype=np.int64)
    decisions = [engine.decide(candidates, FEATURES, model="tiny") for _ in range(2000)]
    labels = Counter(decision.policy for decision in decisions)
    assert set(labels) == {"learned", "learned:explore"}
    assert 0.17 < labels["learned:explore"] / 2000 < 0.23
    explored = Counter(d.node for d in decisions if d.policy == "learned:explore")
    assert set(explored) == {0, 2}
    assert all(d.node == 1 for d in decisions if d.policy == "learned")


def test_no_exploration_on_dry_run_or_zero_share():
    engine = engine_for()
    engine.learned = LearnedScorer(node_preference_model(NAMES, "b"), list(NAMES))
    engine.explore_share = 1.0
    candidates = np.arange(3, dtype=np.int64)
    assert engine.decide(candidates, FEATURES, dry_run=True).policy == "learned"
    engine.explore_share = 0.0
    assert {engine.decide(candidates, FEATURES).node for _ in range(200)} == {1}


def test_exploration_skips_ineligible_nodes():
    engine = engine_for()
    engine.signals.set_healthy(2, False)
    engine.learned = LearnedScorer(node_preference_model(NAMES, "b"), list(NAMES))
    engine.explore_share = 1.0
    nodes = {engine.decide(np.arange(3, dtype=np.int64), FEATURES).node for _ in range(100)}
    assert nodes == {0}


def test_config_accepts_learned_and_checks_share():
    settings = load_settings(environ={"SOLLOL_ROUTING_POLICY": "learned"})
    assert settings.routing_policy == "learned"
    with pytest.raises(ConfigError, match="explore_share must be from 0 to 1"):
        load_settings(environ={"SOLLOL_EXPLORE_SHARE": "1.5"})


def incompatible_artifact(path) -> None:
    save_artifact(node_preference_model(NAMES, "a"), path)
    document = json.loads(path.read_text())
    document["feature_schema_version"] = FEATURE_SCHEMA_VERSION + 1
    path.write_text(json.dumps(document))


def test_reloader_keeps_previous_model_on_rejection(tmp_path, caplog):
    path = tmp_path / "model.json"
    engine = engine_for()
    reloader = ModelReloader(engine, list(NAMES), path)
    assert not reloader.changed()
    save_artifact(node_preference_model(NAMES, "c"), path)
    assert reloader.changed()
    assert reloader.reload().loaded
    good = engine.learned
    incompatible_artifact(path)
    with caplog.at_level(logging.ERROR, logger="sollol.learning.policy"):
        result = reloader.reload()
    assert not result.loaded
    assert engine.learned is good
    assert "feature schema" in result.message
    assert any("learned model rejected" in r.getMessage() for r in caplog.records)
    assert any("keeping the previous model" in r.getMessage() for r in caplog.records)


@pytest.fixture
def fake_nodes():
    with FakeOpenAINode() as first, FakeOpenAINode() as second:
        yield first, second


def learned_settings(tmp_path, nodes, **overrides) -> Settings:
    configs = tuple(
        NodeConfig(url=node.url, kind=NodeKind.OPENAI, name=name, models=("tiny",))
        for name, node in zip(("a", "b"), nodes, strict=True)
    )
    values = {
        "database_url": f"sqlite:///{tmp_path / 'history.db'}",
        "routing_policy": "learned",
        "learned_model_path": str(tmp_path / "model.json"),
        "model_reload_interval_s": 0.05,
        "explore_share": 0.0,
        "nodes": configs,
        **overrides,
    }
    return Settings(**values)


CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


async def send_many(client, count: int, concurrency: int) -> list:
    """Send ``count`` chat requests, ``concurrency`` at a time; return the responses in order."""
    semaphore = asyncio.Semaphore(concurrency)

    async def one(index: int):
        async with semaphore:
            return index, await client.post("/v1/chat/completions", json=CHAT)

    results = await asyncio.gather(*(one(i) for i in range(count)))
    return [response for _index, response in sorted(results, key=lambda item: item[0])]


async def wait_for(condition, timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_reload_while_requests_flow(tmp_path, fake_nodes, caplog):
    import httpx

    path = tmp_path / "model.json"
    save_artifact(node_preference_model(("a", "b"), "a"), path)
    app = create_app(learned_settings(tmp_path, fake_nodes), probe_nodes=False)
    async with app.router.lifespan_context(app):
        for name in ("a", "b"):
            mark_healthy(app, name)
        reloader = app.state.learned.reloader
        assert reloader.loads == 1
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://router") as client:
            before = await send_many(client, 20, 4)
            assert {r.headers["x-sollol-node"] for r in before} == {"a"}

            # Swap to a model preferring b through the admin call, mid-traffic.
            flowing = asyncio.ensure_future(send_many(client, 80, 4))
            save_artifact(node_preference_model(("a", "b"), "b"), path)
            response = await client.post("/sollol/policy/reload")
            during = await flowing
            assert response.status_code == 200
            assert response.json()["loaded"] is True
            assert [r.status_code for r in during] == [200] * 80
            after = await send_many(client, 20, 4)
            assert {r.headers["x-sollol-node"] for r in after} == {"b"}

            # An incompatible file is refused; b stays preferred.
            current = app.state.cluster.engine.learned
            incompatible_artifact(path)
            with caplog.at_level(logging.ERROR, logger="sollol.learning.policy"):
                refused = await client.post("/sollol/policy/reload")
            assert refused.status_code == 409
            assert refused.json()["error"]["code"] == "model_not_loaded"
            assert "feature schema" in refused.json()["error"]["message"]
            assert app.state.cluster.engine.learned is current
            assert any("learned model rejected" in r.getMessage() for r in caplog.records)
            again = await send_many(client, 10, 2)
            assert {r.headers["x-sollol-node"] for r in again} == {"b"}

            # The watcher picks up a good file written in place of the bad one.
            loads = reloader.loads
            save_artifact(node_preference_model(("a", "b"), "a"), path)
            await wait_for(lambda: reloader.loads > loads)
            last = await send_many(client, 10, 2)
            assert {r.headers["x-sollol-node"] for r in last} == {"a"}


async def test_reload_without_file_is_409(tmp_path, fake_nodes):
    import httpx

    app = create_app(learned_settings(tmp_path, fake_nodes), probe_nodes=False)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://router") as client:
            response = await client.post("/sollol/policy/reload")
    assert response.status_code == 409
    assert "cannot read" in response.json()["error"]["message"]


async def test_explored_requests_recorded_as_such(tmp_path, fake_nodes):
    import httpx

    save_artifact(node_preference_model(("a", "b"), "a"), tmp_path / "model.json")
    settings = learned_settings(tmp_path, fake_nodes, explore_share=1.0)
    app = create_app(settings, probe_nodes=False)
    async with app.router.lifespan_context(app):
        for name in ("a", "b"):
            mark_healthy(app, name)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://router") as client:
            responses = await send_many(client, 5, 1)
    assert {r.headers["x-sollol-node"] for r in responses} == {"b"}
    assert {r.headers["x-sollol-policy"] for r in responses} == {"learned:explore"}
    engine = create_engine(settings.database_url)
    with engine.connect() as connection:
        rows = connection.execute(select(requests_table.c.policy, requests_table.c.node)).all()
    engine.dispose()
    assert sorted(rows) == [("learned:explore", "b")] * 5
