"""Reading node load signals, with canned node replies in place of a network."""

import pytest

from sollol.cluster import Cluster
from sollol.config import NodeConfig, NodeKind
from sollol.probes import llama_deferred, llama_load
from sollol.routing.layout import COL_QUEUE_DEPTH, COL_SLOTS_TOTAL

METRICS = """# HELP llamacpp:requests_processing Number of requests processing.
# TYPE llamacpp:requests_processing gauge
llamacpp:requests_processing 2
# HELP llamacpp:requests_deferred Number of requests deferred.
# TYPE llamacpp:requests_deferred gauge
llamacpp:requests_deferred 3
"""


class CannedClient:
    def __init__(self, replies: dict[str, object], text: dict[str, str] | None = None) -> None:
        self.replies = replies
        self.text = text or {}

    async def get(self, url, *, timeout_s, pooled=True):  # type: ignore[no-untyped-def]
        path = "/" + url.split("/", 3)[3]
        return (200, self.replies[path]) if path in self.replies else (404, None)

    async def get_text(self, url, *, timeout_s):  # type: ignore[no-untyped-def]
        path = "/" + url.split("/", 3)[3]
        return (200, self.text[path]) if path in self.text else (404, "")


def llama_node():
    config = NodeConfig(url="http://127.0.0.1:9", kind=NodeKind.LLAMACPP, name="n", models=("m",))
    return Cluster([config])


async def test_llama_load_reads_slots_and_deferred():
    cluster = llama_node()
    client = CannedClient(
        {
            "/props": {"total_slots": 4, "endpoint_metrics": True},
            "/slots": [{"id": 0, "is_processing": True}, {"id": 1, "is_processing": False}],
        },
        {"/metrics": METRICS},
    )
    load = await llama_load(client, cluster.nodes[0], 1.0)  # type: ignore[arg-type]
    assert (load.total_slots, load.busy_slots, load.deferred) == (4, 1, 3)


async def test_llama_load_without_metrics_endpoint():
    cluster = llama_node()
    client = CannedClient({"/props": {"total_slots": 2, "endpoint_metrics": False}})
    load = await llama_load(client, cluster.nodes[0], 1.0)  # type: ignore[arg-type]
    assert (load.total_slots, load.busy_slots, load.deferred) == (2, None, 0)


@pytest.mark.parametrize("text", ["", "llamacpp:requests_deferred nan\n", "garbage"])
async def test_deferred_defaults_to_zero(text):
    cluster = llama_node()
    client = CannedClient({}, {"/metrics": text})
    assert await llama_deferred(client, cluster.nodes[0], 1.0) == 0  # type: ignore[arg-type]


async def test_other_clients_load_counts_as_queue():
    cluster = llama_node()
    cluster.nodes[0].health.probe_ok()
    client = CannedClient(
        {
            "/props": {"total_slots": 2, "endpoint_metrics": True},
            "/slots": [{"is_processing": True}, {"is_processing": True}],
        },
        {"/metrics": METRICS},
    )
    cluster.acquire(cluster.nodes[0])  # one of the two busy slots is the router's
    await cluster._read_load_signals(client, cluster.nodes[0], 1.0)  # type: ignore[arg-type]
    assert cluster.signals.matrix[0, COL_SLOTS_TOTAL] == 2
    assert cluster.signals.matrix[0, COL_QUEUE_DEPTH] == 1 + 3
