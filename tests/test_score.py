"""The scoring core: each policy on constructed node states, and the twins against each other."""

import importlib
import importlib.machinery
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from sollol.routing import _score_py, layout, select
from sollol.routing.layout import (
    COL_DECODE_TPS,
    COL_ERROR_RATE,
    COL_HEALTHY,
    COL_IN_FLIGHT,
    COL_IS_GPU,
    COL_QUEUE_DEPTH,
    COL_SLOTS_TOTAL,
    COL_TTFT_MS,
    MODEL_COLUMNS,
    MODEL_DECODE_TPS,
    MODEL_FITS,
    MODEL_LOADED,
    MODEL_TTFT_MS,
    NODE_COLUMNS,
    POLICY_IDS,
    REQ_AFFINITY_NODE,
    REQ_COLUMNS,
    REQ_MAX_TOKENS,
    REQ_MODEL_LOAD_MS,
    REQ_PROMPT_TOKENS,
    REQ_WANTS_GPU,
)


def _compiled():
    if select.NO_EXTENSIONS:
        pytest.skip("SOLLOL_NO_EXTENSIONS=1 forces the pure twin")
    if not select.COMPILED:
        pytest.fail("the compiled routing core did not load")
    from sollol.routing import _score_c

    return _score_c


@pytest.fixture(params=["compiled", "pure"])
def score_nodes(request):
    return _compiled().score_nodes if request.param == "compiled" else _score_py.score_nodes


def _extension_files() -> list[Path]:
    folder = Path(select.__file__).parent
    return [
        path
        for suffix in importlib.machinery.EXTENSION_SUFFIXES
        for path in folder.glob(f"_score_c*{suffix}")
    ]


def test_extension_loaded_when_built():
    if select.NO_EXTENSIONS:
        assert not select.COMPILED
        return
    built = _extension_files()
    assert built, "the Cython extension was not built; run `pip install -e .` with Cython"
    assert select.COMPILED, f"extension {built[0].name} exists but did not import"


def test_no_extensions_variable_forces_twin(monkeypatch):
    monkeypatch.setenv("SOLLOL_NO_EXTENSIONS", "1")
    try:
        reloaded = importlib.reload(select)
        assert not reloaded.COMPILED
        assert reloaded.score_nodes is _score_py.score_nodes
    finally:
        monkeypatch.delenv("SOLLOL_NO_EXTENSIONS")
        importlib.reload(select)


def test_compiled_layout_matches_python():
    compiled = _compiled()
    for name, value in compiled.LAYOUT.items():
        assert getattr(layout, name) == value, name


class Cluster:
    """Constructed node states: every node healthy, idle, 2 slots, measured the same."""

    def __init__(self, nodes: int) -> None:
        self.signals = np.zeros((nodes, NODE_COLUMNS))
        self.signals[:, COL_HEALTHY] = 1
        self.signals[:, COL_SLOTS_TOTAL] = 2
        self.signals[:, COL_TTFT_MS] = 100
        self.signals[:, COL_DECODE_TPS] = 50
        self.model = np.full((nodes, MODEL_COLUMNS), np.nan)
        self.model[:, MODEL_LOADED] = 1
        self.model[:, MODEL_FITS] = 1
        self.request = np.zeros(REQ_COLUMNS)
        self.request[REQ_MAX_TOKENS] = 64
        self.request[REQ_AFFINITY_NODE] = -1
        self.request[REQ_MODEL_LOAD_MS] = 5000
        self.scores = np.zeros(nodes)

    def choose(self, score_nodes, policy: str, start: int = 0) -> int:
        candidates = np.arange(len(self.signals), dtype=np.int64)
        return score_nodes(
            self.signals, self.model, candidates, self.request,
            POLICY_IDS[policy], start, self.scores,
        )  # fmt: skip


SMART = ["sollol_heuristic", "predicted_latency"]


def test_round_robin_rotates(score_nodes):
    cluster = Cluster(3)
    assert [cluster.choose(score_nodes, "round_robin", start) for start in range(4)] == [0, 1, 2, 0]


def test_round_robin_skips_unhealthy(score_nodes):
    cluster = Cluster(3)
    cluster.signals[1, COL_HEALTHY] = 0
    assert cluster.choose(score_nodes, "round_robin", 1) == 2


def test_least_loaded_counts_node_queue(score_nodes):
    cluster = Cluster(2)
    cluster.signals[:, COL_IN_FLIGHT] = [1, 0]
    cluster.signals[:, COL_QUEUE_DEPTH] = [0, 3]
    assert cluster.choose(score_nodes, "least_loaded") == 0


@pytest.mark.parametrize("policy", SMART)
def test_loaded_model_preferred(score_nodes, policy):
    cluster = Cluster(2)
    cluster.model[:, MODEL_LOADED] = [0, 1]
    cluster.signals[:, COL_IN_FLIGHT] = [0, 1]
    assert cluster.choose(score_nodes, policy) == 1


@pytest.mark.parametrize("policy", SMART)
def test_model_that_cannot_fit_is_refused(score_nodes, policy):
    cluster = Cluster(2)
    cluster.model[:, MODEL_FITS] = [0, 1]
    cluster.signals[:, COL_IN_FLIGHT] = [0, 5]
    assert cluster.choose(score_nodes, policy) == 1
    assert math.isinf(cluster.scores[0])


@pytest.mark.parametrize("policy", SMART)
def test_full_node_avoided(score_nodes, policy):
    cluster = Cluster(2)
    cluster.signals[:, COL_IN_FLIGHT] = [2, 0]
    cluster.signals[:, COL_QUEUE_DEPTH] = [4, 0]
    assert cluster.choose(score_nodes, policy) == 1


@pytest.mark.parametrize("policy", SMART)
def test_failing_node_avoided(score_nodes, policy):
    cluster = Cluster(2)
    cluster.signals[:, COL_ERROR_RATE] = [0.6, 0.0]
    assert cluster.choose(score_nodes, policy) == 1


@pytest.mark.parametrize("policy", SMART)
def test_prefix_affinity_sticks_until_overloaded(score_nodes, policy):
    cluster = Cluster(2)
    cluster.request[REQ_PROMPT_TOKENS] = 2000
    cluster.request[REQ_AFFINITY_NODE] = 1
    assert cluster.choose(score_nodes, policy) == 1
    cluster.signals[1, COL_IN_FLIGHT] = 2  # all its slots busy
    assert cluster.choose(score_nodes, policy) == 0


def test_heuristic_gpu_bonus_when_wanted(score_nodes):
    cluster = Cluster(2)
    cluster.signals[:, COL_IS_GPU] = [0, 1]
    cluster.request[REQ_WANTS_GPU] = 1
    assert cluster.choose(score_nodes, "sollol_heuristic") == 1


def test_predicted_latency_prefers_faster_decode(score_nodes):
    cluster = Cluster(2)
    cluster.signals[:, COL_DECODE_TPS] = [20, 80]
    assert cluster.choose(score_nodes, "predicted_latency") == 1


def test_model_average_overrides_node_average(score_nodes):
    cluster = Cluster(2)
    # Node 0 is slower overall, but fast for this model.
    cluster.signals[:, COL_DECODE_TPS] = [10, 50]
    cluster.model[:, MODEL_DECODE_TPS] = [90, np.nan]
    cluster.model[:, MODEL_TTFT_MS] = [20, np.nan]
    assert cluster.choose(score_nodes, "predicted_latency") == 0


def test_unmeasured_node_is_not_shunned(score_nodes):
    cluster = Cluster(2)
    cluster.signals[0, COL_TTFT_MS] = np.nan
    cluster.signals[0, COL_DECODE_TPS] = np.nan
    cluster.signals[1, COL_IN_FLIGHT] = 6
    assert cluster.choose(score_nodes, "predicted_latency") == 0


@pytest.mark.parametrize("policy", SMART)
def test_unmeasured_node_scores_like_its_measured_peers(score_nodes, policy):
    # A fast node measured at 10 ms and 600 tokens/s, and one not measured
    # yet: the newcomer is assumed to be like the mean of its peers, so both
    # tie and rotation tries it, rather than fixed guesses ranking it ~50x slower.
    cluster = Cluster(3)
    cluster.signals[:, COL_TTFT_MS] = [10, np.nan, 30]
    cluster.signals[:, COL_DECODE_TPS] = [600, np.nan, 200]
    cluster.choose(score_nodes, policy)
    mean_node = Cluster(3)
    mean_node.signals[:, COL_TTFT_MS] = [10, 20, 30]
    mean_node.signals[:, COL_DECODE_TPS] = [600, 400, 200]
    mean_node.choose(score_nodes, policy)
    assert cluster.scores[1] == pytest.approx(mean_node.scores[1])
    assert cluster.scores[0] < cluster.scores[1] < cluster.scores[2]


@pytest.mark.parametrize("policy", sorted(POLICY_IDS))
def test_all_unhealthy_returns_minus_one(score_nodes, policy):
    cluster = Cluster(2)
    cluster.signals[:, COL_HEALTHY] = 0
    assert cluster.choose(score_nodes, policy) == -1


def test_empty_candidates(score_nodes):
    cluster = Cluster(2)
    empty = np.zeros(0, dtype=np.int64)
    args = (cluster.signals, cluster.model, empty, cluster.request)
    assert score_nodes(*args, POLICY_IDS["predicted_latency"], 0, cluster.scores) == -1


def test_bad_candidate_index(score_nodes):
    cluster = Cluster(2)
    bad = np.asarray([0, 7], dtype=np.int64)
    with pytest.raises(ValueError, match="out of range"):
        score_nodes(
            cluster.signals,
            cluster.model,
            bad,
            cluster.request,
            3,
            0,
            cluster.scores,
        )


def test_wrong_shapes_rejected(score_nodes):
    cluster = Cluster(2)
    candidates = np.arange(2, dtype=np.int64)
    with pytest.raises(ValueError, match="columns"):
        score_nodes(
            np.zeros((2, 3)),
            cluster.model,
            candidates,
            cluster.request,
            3,
            0,
            cluster.scores,
        )
    with pytest.raises(ValueError, match="request"):
        score_nodes(
            cluster.signals,
            cluster.model,
            candidates,
            np.zeros(2),
            3,
            0,
            cluster.scores,
        )
    with pytest.raises((TypeError, ValueError)):
        score_nodes(
            cluster.signals.astype(np.float32),
            cluster.model,
            candidates,
            cluster.request,
            3,
            0,
            cluster.scores,
        )


floats = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=64),
    st.sampled_from([0.0, 1.0, 2.0, -1.0, 5.0, 100.0]),
)


@st.composite
def scoring_inputs(draw):
    nodes = draw(st.integers(min_value=1, max_value=24))
    signals = draw(hnp.arrays(np.float64, (nodes, NODE_COLUMNS), elements=floats))
    model_state = draw(hnp.arrays(np.float64, (nodes, MODEL_COLUMNS), elements=floats))
    candidates = np.asarray(draw(st.lists(st.integers(0, nodes - 1), max_size=30)), dtype=np.int64)
    request = draw(hnp.arrays(np.float64, REQ_COLUMNS, elements=floats))
    if draw(st.booleans()):
        request[REQ_AFFINITY_NODE] = draw(st.integers(-1, nodes - 1))
    policy = draw(st.sampled_from(sorted(POLICY_IDS.values())))
    start = draw(st.integers(-1000, 1000))
    return signals, model_state, candidates, request, policy, start


@settings(max_examples=400, deadline=None)
@given(scoring_inputs())
def test_compiled_and_twin_agree(inputs):
    compiled = _compiled()
    signals, model_state, candidates, request, policy, start = inputs
    compiled_scores = np.full(len(candidates), -7.0)
    pure_scores = np.full(len(candidates), -7.0)
    chosen = compiled.score_nodes(
        signals, model_state, candidates, request, policy, start, compiled_scores
    )
    expected = _score_py.score_nodes(
        signals, model_state, candidates, request, policy, start, pure_scores
    )
    assert chosen == expected
    np.testing.assert_array_equal(compiled_scores, pure_scores)
