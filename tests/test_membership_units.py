"""Membership changes on a cluster and the nodes table, with no network."""

import numpy as np
import pytest

from sollol.cluster import Cluster
from sollol.config import NodeConfig, NodeKind, load_settings, ollama_host_url
from sollol.history import create_history_engine
from sollol.membership import Membership, NodeNameTaken, NodeNotFound, NodeStore
from sollol.routing.features import RequestFeatures
from sollol.routing.layout import COL_IN_FLIGHT
from sollol.routing.scheduler import Scheduler

FEATURES = RequestFeatures(prompt_tokens=10, max_tokens=10, task="chat")


def node_config(name, port, models=("m",)):
    return NodeConfig(
        url=f"http://127.0.0.1:{port}", kind=NodeKind.OPENAI, name=name, models=models
    )


def up(cluster, node):
    node.health.probe_ok()
    cluster._rebuild_candidates()


def cluster_of(*names):
    cluster = Cluster([node_config(name, 9000 + i) for i, name in enumerate(names)])
    for node in cluster.nodes:
        up(cluster, node)
    return cluster


def test_added_node_gets_new_row():
    cluster = cluster_of("a")
    node = cluster.add_node(node_config("b", 9100), source="api")
    assert node.index == 1
    assert cluster.signals.matrix.shape[0] == 2
    assert cluster.signals.model_state("m").shape[0] == 2
    assert node.source == "api"
    assert list(cluster.candidates_of("m")) == [0]
    up(cluster, node)
    assert list(cluster.candidates_of("m")) == [0, 1]


def test_added_node_is_chosen():
    cluster = cluster_of("a")
    cluster.add_node(node_config("b", 9100), source="api")
    up(cluster, cluster.find("b"))
    cluster.drain(cluster.find("a"))
    decision = cluster.choose("m", FEATURES)
    assert decision is not None
    assert cluster.node_at(decision.node).name == "b"


def test_added_name_taken():
    cluster = cluster_of("a")
    with pytest.raises(ValueError, match="already exists"):
        cluster.add_node(node_config("a", 9100), source="api")


def test_drain_keeps_in_flight():
    cluster = cluster_of("a", "b")
    a = cluster.find("a")
    cluster.acquire(a)
    cluster.drain(a)
    assert list(cluster.candidates_of("m")) == [1]
    assert cluster.state_of(a) == "draining"
    cluster.release(a)
    assert cluster.state_of(a) == "drained"
    cluster.drain(a, False)
    assert cluster.state_of(a) == "active"
    assert list(cluster.candidates_of("m")) == [0, 1]


def test_removed_node_is_tombstone():
    cluster = cluster_of("a", "b")
    a = cluster.find("a")
    cluster.acquire(a)
    cluster.remove(a)
    assert [node.name for node in cluster.nodes] == ["b"]
    assert cluster.find("a") is None
    assert cluster.node_at(0) is a
    assert list(cluster.candidates_of("m")) == [1]
    # The request in flight still releases its own row.
    cluster.release(a)
    assert cluster.signals.matrix[0, COL_IN_FLIGHT] == 0.0
    again = cluster.add_node(node_config("a", 9200), source="api")
    assert again.index == 2
    assert cluster.node_names_by_index() == ["a", "b", "a"]


def test_scheduler_reads_grown_matrix():
    cluster = cluster_of("a")
    scheduler = Scheduler(
        signals=cluster.signals.matrix,
        candidates_of=cluster.candidates_of,
        max_queued_per_model=4,
        aging_s=10.0,
        timeout_s=1.0,
    )
    cluster.on_membership = lambda: scheduler.set_signals(cluster.signals.matrix)  # type: ignore[method-assign]
    node = cluster.add_node(node_config("b", 9100), source="api")
    up(cluster, node)
    assert not scheduler.is_full("m")
    assert scheduler._signals is cluster.signals.matrix


def test_engine_scores_after_growth():
    cluster = cluster_of("a")
    for port in range(9100, 9105):
        up(cluster, cluster.add_node(node_config(f"n{port}", port), source="api"))
    decision = cluster.choose("m", FEATURES, policy="least_loaded")
    assert decision is not None
    assert len(decision.candidates) == 6
    assert np.isfinite(decision.scores).all()


@pytest.fixture
def membership(tmp_path):
    engine = create_history_engine(f"sqlite:///{tmp_path / 'h.db'}")
    cluster = cluster_of("a")
    store = NodeStore(engine)
    yield Membership(cluster, store, client=None, probe_timeout_s=1.0, refresh_interval_s=0)  # type: ignore[arg-type]
    engine.dispose()


async def test_membership_add_drain_remove(membership):
    membership.probing = False
    node = await membership.add(node_config("b", 9100, models=("x",)))
    assert node.source == "api"
    rows = {row.name: row for row in membership.store.load()}
    assert rows["b"].state == "active"
    assert rows["b"].models == ("x",)

    await membership.drain("a")
    assert membership.cluster.find("a").draining
    assert {row.name: row.state for row in membership.store.load()}["a"] == "drained"

    await membership.remove("b")
    assert membership.cluster.find("b") is None
    assert {row.name: row.state for row in membership.store.load()}["b"] == "removed"


async def test_membership_errors(membership):
    membership.probing = False
    with pytest.raises(NodeNotFound, match="no node named 'zz'"):
        await membership.drain("zz")
    with pytest.raises(NodeNameTaken, match="already exists"):
        await membership.add(node_config("a", 9999))
    # Node "a" is at port 9000: the same server under another name would count twice.
    with pytest.raises(NodeNameTaken, match="is node 'a' already"):
        await membership.add(node_config("a-again", 9000))


async def test_add_resumes_drained(membership):
    membership.probing = False
    await membership.drain("a")
    same = membership.cluster.find("a").config
    node = await membership.add(same)
    assert not node.draining


async def test_second_router_applies_rows(membership):
    membership.probing = False
    await membership.add(node_config("b", 9100))
    await membership.drain("a")
    other = Membership(
        cluster_of("a"),
        membership.store,
        None,
        probe_timeout_s=1.0,
        refresh_interval_s=0,  # type: ignore[arg-type]
    )
    other.probing = False
    await other.refresh()
    assert [node.name for node in other.cluster.nodes] == ["a", "b"]
    assert other.cluster.find("a").draining
    await membership.remove("b")
    await other.refresh()
    assert other.cluster.find("b") is None


def test_ollama_host_forms():
    assert ollama_host_url("127.0.0.1") == "http://127.0.0.1:11434"
    assert ollama_host_url("0.0.0.0:9999") == "http://127.0.0.1:9999"
    assert ollama_host_url("http://localhost") == "http://localhost:11434"
    assert ollama_host_url("[::1]") == "http://[::1]:11434"


def test_env_sources():
    settings = load_settings(
        environ={
            "SOLLOL_NODES": "llamacpp=http://127.0.0.1:8080,ollama=127.0.0.1:9",
            "OLLAMA_HOST": "127.0.0.1",
        }
    )
    assert [(node.kind, node.url, node.source) for node in settings.nodes] == [
        (NodeKind.LLAMACPP, "http://127.0.0.1:8080", "env"),
        (NodeKind.OLLAMA, "http://127.0.0.1:9", "env"),
        (NodeKind.OLLAMA, "http://127.0.0.1:11434", "env"),
    ]


def test_ollama_host_invalid():
    from sollol.config import ConfigError

    with pytest.raises(ConfigError, match="OLLAMA_HOST"):
        load_settings(environ={"OLLAMA_HOST": "http://user:pw@127.0.0.1"})


def test_learned_policy_after_growth(tmp_path):
    from sollol.learning.artifact import save_artifact
    from sollol.learning.policy import ModelReloader
    from tests.support.learned_models import node_preference_model

    cluster = cluster_of("a", "b")
    path = tmp_path / "model.json"
    save_artifact(node_preference_model(("a", "b", "c"), "c"), path)
    reloader = ModelReloader(cluster.engine, cluster.node_names_by_index(), path)
    assert reloader.reload().loaded
    cluster.on_membership = lambda: reloader.set_node_names(cluster.node_names_by_index())  # type: ignore[method-assign]
    up(cluster, cluster.add_node(node_config("c", 9100), source="api"))
    decision = cluster.choose("m", FEATURES, policy="learned")
    assert decision is not None
    # The model knows "c" as the fast node, at the index it got when it joined.
    assert cluster.node_at(decision.node).name == "c"
