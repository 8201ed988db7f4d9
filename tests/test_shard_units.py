"""Shard groups without llama.cpp: config tables, placement arithmetic, the HELLO probe."""

from pathlib import Path

import pytest

from sollol.config import ConfigError, NodeKind, load_settings
from sollol.shard.config import DEFAULT_GROUP_COST_WEIGHT
from sollol.shard.errors import PlacementError, WorkerUnreachableError
from sollol.shard.placement import (
    ModelLayout,
    assign_layers,
    layer_split,
    plan_placement,
    read_model_layout,
)
from sollol.shard.rpc import RpcVersion, probe_worker
from sollol.tinymodel import TinyModelShape, write_tiny_model
from tests.support.fake_rpc_worker import FakeRpcWorker

GROUP = """
[[nodes]]
name = "box"
kind = "llamacpp"
url = "http://127.0.0.1:8080"

[[shard_groups]]
name = "big"
model = "models/big.gguf"
served_model = "big-model"
port = 8090
context_size = 2048
parallel = 2

[[shard_groups.workers]]
address = "127.0.0.1:50052"

[[shard_groups.workers]]
address = "10.0.0.2:50052"
memory_bytes = 8000
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sollol.toml"
    path.write_text(text)
    return path


# -- configuration ------------------------------------------------------------


def test_group_becomes_one_llamacpp_node(tmp_path):
    settings = load_settings(write(tmp_path, GROUP), environ={})
    (group,) = settings.shard_groups
    box, node = settings.nodes
    assert box.name == "box"
    assert node.name == "big"
    assert node.kind is NodeKind.LLAMACPP
    assert node.url == "http://127.0.0.1:8090"
    assert node.models == ("big-model",)
    assert node.cost_weight == DEFAULT_GROUP_COST_WEIGHT
    assert group.model_path == tmp_path / "models" / "big.gguf"
    assert (group.context_size, group.parallel) == (2048, 2)


def test_worker_start_defaults_to_loopback_only(tmp_path):
    (group,) = load_settings(write(tmp_path, GROUP), environ={}).shard_groups
    local, remote = group.workers
    assert (local.host, local.port, local.start, local.memory_bytes) == (
        "127.0.0.1",
        50052,
        True,
        None,
    )
    assert (remote.host, remote.start, remote.memory_bytes) == ("10.0.0.2", False, 8000)


def test_served_model_defaults_to_group_name(tmp_path):
    text = GROUP.replace('served_model = "big-model"\n', "")
    (group,) = load_settings(write(tmp_path, text), environ={}).shard_groups
    assert group.served_model == "big"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("port = 8090", "port = 0"), "port must be an integer from 1 to 65535"),
        (("port = 8090\n", ""), "missing port"),
        (('address = "127.0.0.1:50052"', 'address = "127.0.0.1"'), "expected HOST:PORT"),
        (('address = "10.0.0.2:50052"', 'address = "127.0.0.1:50052"'), "must be unique"),
        (("memory_bytes = 8000", "memory_bytes = -1"), "memory_bytes must be a positive"),
        (("parallel = 2", 'parallel = "two"'), "parallel must be a positive integer"),
        (("parallel = 2", 'colour = "red"'), "unknown keys: colour"),
        (("parallel = 2", "tensor_split = [1.0]"), "tensor_split must be a list of 2 numbers"),
        (("parallel = 2", "tensor_split = [0, 0]"), "must not all be 0"),
        (("parallel = 2", "cost_weight = 0"), "cost_weight must be a positive number"),
        (('name = "big"', 'name = "box"'), "node names must be unique; repeated: box"),
    ],
)
def test_invalid_group_tables(tmp_path, change, message):
    old, new = change
    assert old in GROUP
    with pytest.raises(ConfigError, match=message):
        load_settings(write(tmp_path, GROUP.replace(old, new, 1)), environ={})


def test_group_without_workers_is_rejected(tmp_path):
    text = GROUP.split("[[shard_groups.workers]]")[0] + "workers = []\n"
    with pytest.raises(ConfigError, match="workers must be a non-empty array"):
        load_settings(write(tmp_path, text), environ={})


def test_repeated_group_names_are_rejected(tmp_path):
    second = GROUP.split("[[shard_groups]]")[1].replace("port = 8090", "port = 8091")
    with pytest.raises(ConfigError, match="shard group names must be unique"):
        load_settings(write(tmp_path, GROUP + "[[shard_groups]]" + second), environ={})


# -- placement ----------------------------------------------------------------

# Four layers of 100 bytes, an output layer of 50, an input embedding of 30,
# and 2 bytes of KV cache per layer and token.
LAYOUT = ModelLayout(
    layer_bytes=(100, 100, 100, 100), output_bytes=50, input_bytes=30, kv_bytes_per_token=2
)


def test_layers_follow_memory():
    placement = plan_placement(
        LAYOUT, addresses=["a:1", "b:1"], memory_bytes=[3000, 1000], context_size=10
    )
    first, second = placement.shares
    assert (first.layers, first.has_output) == (3, False)
    assert (second.layers, second.has_output) == (1, True)
    # 3 layers x (100 weights + 10 tokens x 2 bytes of KV cache).
    assert first.needed_bytes == 360
    assert second.needed_bytes == 120 + 50
    assert placement.split_argument() == "3,2"


def test_equal_workers_get_equal_layers():
    placement = plan_placement(
        LAYOUT, addresses=["a:1", "b:1"], memory_bytes=[500, 500], context_size=0
    )
    assert [share.layers for share in placement.shares] == [2, 2]


def test_layer_split_matches_llama_cpp_rule():
    for layer_count, memory in [(2, [1, 1]), (10, [3, 1]), (7, [1, 1, 1]), (80, [24, 8, 8])]:
        split = layer_split(layer_count, memory)
        owners = assign_layers(layer_count, split)
        counts = [owners[:-1].count(worker) for worker in range(len(memory))]
        assert counts == [int(value) for value in split[:-1]] + [int(split[-1]) - 1]
        assert owners[-1] == len(memory) - 1


def test_explicit_tensor_split_uses_llama_cpp_boundaries():
    # llama.cpp compares layer il / (n + 1) with the cumulative share, so a
    # 1:1 split of 4 layers plus output gives 3 slots to the first worker.
    assert assign_layers(4, [1.0, 1.0]) == [0, 0, 0, 1, 1]
    placement = plan_placement(
        LAYOUT,
        addresses=["a:1", "b:1"],
        memory_bytes=[1000, 1000],
        context_size=0,
        tensor_split=[1.0, 1.0],
    )
    assert [share.layers for share in placement.shares] == [3, 1]


def test_model_too_large_is_rejected_with_figures():
    with pytest.raises(PlacementError) as caught:
        plan_placement(LAYOUT, addresses=["a:1", "b:1"], memory_bytes=[150, 150], context_size=10)
    message = str(caught.value)
    assert "the group cannot hold the model" in message
    assert "need 530 bytes on the workers, which have 300 bytes in all" in message
    assert "worker a:1 needs 240 bytes for 2 layers but has 150 bytes" in message
    assert "worker b:1 needs 290 bytes for 2 layers and the output layer" in message


def test_kv_cache_counts_against_memory():
    # The weights fit in 300 bytes per worker; a long context does not.
    plan_placement(LAYOUT, addresses=["a:1", "b:1"], memory_bytes=[300, 300], context_size=0)
    with pytest.raises(PlacementError, match="KV cache for 100 tokens"):
        plan_placement(LAYOUT, addresses=["a:1", "b:1"], memory_bytes=[300, 300], context_size=100)


def test_tensor_split_length_must_match_workers():
    with pytest.raises(PlacementError, match="tensor_split has 3 values for 2 workers"):
        plan_placement(
            LAYOUT,
            addresses=["a:1", "b:1"],
            memory_bytes=[1, 1],
            context_size=0,
            tensor_split=[1, 1, 1],
        )


def test_layout_read_from_gguf(tmp_path):
    shape = TinyModelShape()
    path = write_tiny_model(tmp_path / "tiny.gguf", shape=shape)
    layout = read_model_layout(path)
    e, ff, v = shape.embedding_length, shape.feed_forward_length, shape.vocab_size
    kv_dim = e // shape.head_count * shape.head_count_kv
    # F32: norms, q and output projections, k and v, and three FFN matrices.
    per_layer = 4 * (2 * e + 2 * e * e + 2 * kv_dim * e + 3 * ff * e)
    assert layout.layer_bytes == (per_layer,) * shape.block_count
    assert layout.output_bytes == 4 * (e + v * e)
    assert layout.input_bytes == 4 * v * e
    assert layout.kv_bytes_per_token == 2 * kv_dim * 2
    assert layout.weight_bytes < path.stat().st_size


def test_unreadable_model_is_reported(tmp_path):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"not a gguf file")
    with pytest.raises(PlacementError, match="cannot read GGUF model"):
        read_model_layout(path)


# -- the HELLO probe ----------------------------------------------------------


def test_probe_reads_version_and_memory():
    worker = FakeRpcWorker((7, 0, 0), free_bytes=3 * 2**30, total_bytes=4 * 2**30).start()
    try:
        report = probe_worker("127.0.0.1", worker.port, client_version=RpcVersion(7, 0, 0))
    finally:
        worker.stop()
    assert report.version == RpcVersion(7, 0, 0)
    assert (report.free_bytes, report.total_bytes) == (3 * 2**30, 4 * 2**30)


def test_probe_stops_after_hello_on_other_version():
    worker = FakeRpcWorker((8, 1, 0)).start()
    try:
        report = probe_worker("127.0.0.1", worker.port, client_version=RpcVersion(7, 0, 0))
    finally:
        worker.stop()
    assert str(report.version) == "8.1.0"
    assert report.free_bytes is None


def test_version_rule_follows_llama_cpp():
    client = RpcVersion(7, 1, 0)
    assert RpcVersion(7, 0, 5).accepted_by(client)
    assert RpcVersion(7, 1, 9).accepted_by(client)
    assert not RpcVersion(7, 2, 0).accepted_by(client)
    assert not RpcVersion(6, 0, 0).accepted_by(client)


def test_probe_of_closed_port_is_unreachable():
    worker = FakeRpcWorker((7, 0, 0))
    port = worker.port
    worker.stop()  # closes the listener before it ever accepts
    with pytest.raises(WorkerUnreachableError, match=f"127.0.0.1:{port} cannot be reached"):
        probe_worker("127.0.0.1", port, client_version=RpcVersion(7, 0, 0), timeout_s=1.0)


# -- routing between a group and a single node -------------------------------


def _twins():
    from sollol.routing import _score_c, _score_py

    return [_score_c.score_nodes, _score_py.score_nodes]


@pytest.mark.parametrize("score_nodes", _twins(), ids=["compiled", "pure"])
@pytest.mark.parametrize(
    ("group_decode_tps", "expected"), [(None, "single"), (25.0, "single"), (40.0, "group")]
)
def test_group_wins_only_when_predicted_faster(score_nodes, group_decode_tps, expected):
    """A group (cost weight 1.5) beside a single node at 20 tokens/s, both otherwise idle."""
    import numpy as np

    from sollol.routing.engine import NodeSignals
    from sollol.routing.layout import COL_DECODE_TPS, POLICY_IDS, REQ_COLUMNS, REQ_MAX_TOKENS

    signals = NodeSignals(2)
    single, group = 0, 1
    signals.set_static(single, is_gpu=False, cost_weight=1.0)
    signals.set_static(group, is_gpu=False, cost_weight=DEFAULT_GROUP_COST_WEIGHT)
    for node in (single, group):
        signals.set_healthy(node, True)
        signals.set_slots(node, 1)
    if group_decode_tps is not None:
        signals.matrix[single, COL_DECODE_TPS] = 20.0
        signals.matrix[group, COL_DECODE_TPS] = group_decode_tps
    request = np.zeros(REQ_COLUMNS)
    request[REQ_MAX_TOKENS] = 256
    scores = np.empty(2)
    chosen = score_nodes(
        signals.matrix,
        signals.model_state("m"),
        np.array([single, group], dtype=np.int64),
        request,
        POLICY_IDS["predicted_latency"],
        0,
        scores,
    )
    assert chosen == (group if expected == "group" else single)


def test_worker_closing_on_hello_is_a_version_mismatch():
    import socket as socket_module
    import threading

    from sollol.shard.errors import VersionMismatchError

    listener = socket_module.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def close_after_first_bytes() -> None:
        # An older worker reads the command and size, finds the size wrong and closes.
        connection, _ = listener.accept()
        with connection:
            connection.recv(9)

    thread = threading.Thread(target=close_after_first_bytes)
    thread.start()
    try:
        with pytest.raises(VersionMismatchError, match=r"rejected the HELLO of RPC protocol 7\.x"):
            probe_worker("127.0.0.1", port, client_version=RpcVersion(7, 0, 0), timeout_s=5.0)
    finally:
        thread.join(5)
        listener.close()
