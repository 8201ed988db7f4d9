"""The exported forest: equal to scikit-learn's predict, on both twins, and safe on bad input."""

import importlib
import json
import math

import numpy as np
import pytest
from sklearn.ensemble import HistGradientBoostingRegressor
from threadpoolctl import threadpool_limits

from sollol.errors import ModelArtifactError
from sollol.learning import _forest_py, select
from sollol.learning.features import FEATURE_COUNT, FEATURE_NAMES
from sollol.learning.forest import LEAF, Forest, export_hist_gradient_boosting
from sollol.routing import layout
from sollol.routing.engine import NodeSignals
from sollol.routing.layout import (
    MODEL_DECODE_TPS,
    MODEL_FITS,
    MODEL_LOADED,
    MODEL_TTFT_MS,
    REQ_COLUMNS,
    REQ_MAX_TOKENS,
    REQ_MODEL_LOAD_MS,
    REQ_PROMPT_TOKENS,
)
from tests.support.learned_models import one_split_forest


def _compiled():
    if select.NO_EXTENSIONS:
        pytest.skip("SOLLOL_NO_EXTENSIONS=1 forces the pure twin")
    if not select.COMPILED:
        pytest.fail("the compiled forest module did not load; run `pip install -e .`")
    from sollol.learning import _forest_c

    return _forest_c


@pytest.fixture(autouse=True)
def one_openmp_thread():
    # Spinning OpenMP threads slow fitting several-fold on a busy 2-core machine.
    with threadpool_limits(limits=1, user_api="openmp"):
        yield


@pytest.fixture(params=["compiled", "pure"])
def twin(request):
    return _compiled() if request.param == "compiled" else _forest_py


def test_compiled_layout_matches_python():
    compiled = _compiled()
    for name, value in compiled.LAYOUT.items():
        expected = FEATURE_COUNT if name == "FEATURE_COUNT" else getattr(layout, name)
        assert value == expected, name


def test_no_extensions_variable_forces_twin(monkeypatch):
    monkeypatch.setenv("SOLLOL_NO_EXTENSIONS", "1")
    try:
        reloaded = importlib.reload(select)
        assert not reloaded.COMPILED
        assert reloaded.score_candidates is _forest_py.score_candidates
    finally:
        monkeypatch.delenv("SOLLOL_NO_EXTENSIONS")
        importlib.reload(select)


def _fitted(seed: int = 0, trees: int = 30):
    rng = np.random.default_rng(seed)
    features = rng.uniform(0, 100, (3000, FEATURE_COUNT))
    features[rng.uniform(size=features.shape) < 0.1] = math.nan
    target = np.log1p(np.nan_to_num(features[:, 2]) * 3 + np.nan_to_num(features[:, 4]) ** 1.5 + 10)
    model = HistGradientBoostingRegressor(max_iter=trees, random_state=seed)
    return model.fit(features, target), rng


def _predict(twin, forest: Forest, rows: np.ndarray) -> np.ndarray:
    out = np.empty(len(rows))
    twin.predict_raw(
        forest.baseline, forest.roots, forest.feature, forest.threshold, forest.left,
        forest.right, forest.missing_left, forest.value, rows, out,
    )  # fmt: skip
    return out


def test_export_predicts_what_sklearn_predicts(twin):
    model, rng = _fitted()
    forest = export_hist_gradient_boosting(model)
    rows = rng.uniform(-10, 110, (500, FEATURE_COUNT))
    rows[rng.uniform(size=rows.shape) < 0.2] = math.nan
    np.testing.assert_allclose(_predict(twin, forest, rows), model.predict(rows), rtol=1e-12)


def test_twins_agree_bit_for_bit():
    compiled = _compiled()
    model, rng = _fitted(seed=3, trees=50)
    forest = export_hist_gradient_boosting(model)
    rows = rng.uniform(-10, 110, (1000, FEATURE_COUNT))
    rows[rng.uniform(size=rows.shape) < 0.3] = math.nan
    rows[::17, 2] = math.inf
    assert np.array_equal(_predict(compiled, forest, rows), _predict(_forest_py, forest, rows))


def test_round_trip_through_dict_keeps_predictions():
    model, rng = _fitted(seed=5)
    forest = export_hist_gradient_boosting(model)
    again = Forest.from_dict(forest.to_dict(), feature_count=FEATURE_COUNT)
    rows = rng.uniform(0, 100, (200, FEATURE_COUNT))
    assert np.array_equal(_predict(_forest_py, again, rows), model.predict(rows))


def test_infinite_threshold_survives_strict_json():
    forest = one_split_forest(3, math.inf, 100.0, 200.0)
    text = json.dumps(forest.to_dict(), allow_nan=False)
    again = Forest.from_dict(json.loads(text), feature_count=FEATURE_COUNT)
    assert again.threshold[0] == math.inf
    rows = np.array([[5.0] * FEATURE_COUNT, [math.nan] * FEATURE_COUNT])
    assert np.exp(_predict(_forest_py, again, rows)).tolist() == pytest.approx([100.0, 100.0])


def _cluster(nodes: int, rng):
    signals = NodeSignals(nodes)
    for node in range(nodes):
        signals.set_healthy(node, True)
        signals.set_slots(node, int(rng.integers(1, 5)))
        for _ in range(int(rng.integers(0, 3))):
            signals.acquire(node)
        signals.set_queue_depth(node, float(rng.integers(0, 3)))
        if rng.uniform() < 0.7:
            signals.observe(node, "tiny", ok=True, ttft_ms=rng.uniform(10, 900))
        if rng.uniform() < 0.7:
            signals.observe(node, ok=True, decode_tps=rng.uniform(5, 90))
    state = signals.model_state("tiny")
    state[:, MODEL_LOADED] = rng.choice([0.0, 1.0, math.nan], nodes)
    return signals, state


def test_candidates_scored_from_signals_as_history_records_them(twin):
    model, rng = _fitted(seed=7)
    forest = export_hist_gradient_boosting(model)
    signals, state = _cluster(5, rng)
    request = np.zeros(REQ_COLUMNS)
    request[REQ_PROMPT_TOKENS] = 42.0
    request[REQ_MAX_TOKENS] = 64.0
    request[REQ_MODEL_LOAD_MS] = 5000.0
    node_codes = np.array([0.0, 1.0, math.nan, 3.0, 4.0])
    candidates = np.arange(5, dtype=np.int64)
    scores = np.empty(5)
    best = twin.score_candidates(
        forest.baseline, forest.roots, forest.feature, forest.threshold, forest.left,
        forest.right, forest.missing_left, forest.value, signals.matrix, state, candidates,
        request, node_codes, 2.0, np.empty(FEATURE_COUNT), scores,
    )  # fmt: skip

    # The same rows built independently, from the snapshot the history records.
    rows = []
    for node in range(5):
        snapshot = signals.snapshot(node, "tiny")
        values = {
            "node_code": node_codes[node],
            "model_code": 2.0,
            "est_prompt_tokens": 42.0,
            "max_tokens": 64.0,
            "node_in_flight": snapshot.in_flight,
            "node_queue_depth": snapshot.queue_depth,
            "node_slots": snapshot.slots,
            "model_loaded": snapshot.model_loaded,
            "node_ttft_ms_avg": snapshot.ttft_ms,
            "node_decode_tps_avg": snapshot.decode_tps,
        }
        rows.append([math.nan if values[n] is None else float(values[n]) for n in FEATURE_NAMES])
    # The trees give the log service time, which the queue of requests ahead
    # scales. A model known not to be loaded adds the load estimate.
    expected = []
    for node, raw in enumerate(model.predict(np.array(rows))):
        snapshot = signals.snapshot(node, "tiny")
        slots = snapshot.slots or 1
        waiting = max(0, snapshot.in_flight + 1 - slots)
        cost = math.exp(raw) * (1 + waiting / slots)
        expected.append(cost + (5000.0 if snapshot.model_loaded is False else 0.0))
    np.testing.assert_allclose(scores, expected, rtol=1e-12)
    assert best == int(np.argmin(expected))


def test_unhealthy_and_unfit_nodes_are_ineligible(twin):
    forest = one_split_forest(0, 0.5, 100.0, 200.0)
    signals = NodeSignals(3)
    signals.set_healthy(1, True)
    signals.set_healthy(2, True)
    state = signals.model_state("tiny")
    state[2, MODEL_FITS] = 0.0
    scores = np.empty(3)
    best = twin.score_candidates(
        forest.baseline, forest.roots, forest.feature, forest.threshold, forest.left,
        forest.right, forest.missing_left, forest.value, signals.matrix, state,
        np.arange(3, dtype=np.int64), np.zeros(REQ_COLUMNS), np.arange(3.0), 0.0,
        np.empty(FEATURE_COUNT), scores,
    )  # fmt: skip
    assert best == 1
    assert scores[0] == math.inf
    assert scores[1] == pytest.approx(200.0)
    assert scores[2] == math.inf


def test_queue_ahead_scales_prediction(twin):
    forest = one_split_forest(0, 0.5, 100.0, 100.0)
    signals = NodeSignals(3)
    for node, (slots, in_flight) in enumerate([(2, 0), (2, 3), (None, 2)]):
        signals.set_healthy(node, True)
        signals.set_slots(node, slots)
        for _ in range(in_flight):
            signals.acquire(node)
    state = signals.model_state("tiny")
    state[2, MODEL_LOADED] = 0.0
    request = np.zeros(REQ_COLUMNS)
    request[REQ_MODEL_LOAD_MS] = 1000.0
    scores = np.empty(3)
    best = twin.score_candidates(
        forest.baseline, forest.roots, forest.feature, forest.threshold, forest.left,
        forest.right, forest.missing_left, forest.value, signals.matrix, state,
        np.arange(3, dtype=np.int64), request, np.zeros(3), 0.0,
        np.empty(FEATURE_COUNT), scores,
    )  # fmt: skip
    assert best == 0
    # Node 1: 3 in flight on 2 slots, so 2 requests ahead: 100 * (1 + 2/2).
    # Node 2: unknown slots count as 1, 2 ahead, plus the 1000 ms load.
    assert scores.tolist() == pytest.approx([100.0, 200.0, 1300.0])


def test_model_average_wins_over_node_average(twin):
    # Splits on node_ttft_ms_avg (feature 8): the model's own average must be used.
    forest = one_split_forest(8, 500.0, 100.0, 900.0)
    signals = NodeSignals(1)
    signals.set_healthy(0, True)
    signals.observe(0, ok=True, ttft_ms=50.0)
    state = signals.model_state("tiny")
    state[0, MODEL_TTFT_MS] = 800.0
    state[0, MODEL_DECODE_TPS] = math.nan
    scores = np.empty(1)
    twin.score_candidates(
        forest.baseline, forest.roots, forest.feature, forest.threshold, forest.left,
        forest.right, forest.missing_left, forest.value, signals.matrix, state,
        np.zeros(1, dtype=np.int64), np.zeros(REQ_COLUMNS), np.zeros(1), 0.0,
        np.empty(FEATURE_COUNT), scores,
    )  # fmt: skip
    assert scores[0] == pytest.approx(900.0)


@pytest.mark.parametrize(
    ("field", "value", "x"),
    [
        ("left", [0, LEAF, LEAF], 0.0),
        ("right", [7, LEAF, LEAF], 1.0),
        ("feature", [99, LEAF, LEAF], 1.0),
    ],
)
def test_malformed_forest_raises_in_both_twins(twin, field, value, x):
    forest = one_split_forest(0, 0.5, 100.0, 200.0)
    arrays = {name: getattr(forest, name) for name in ("feature", "left", "right")}
    arrays[field] = np.array(value, dtype=np.int64)
    rows = np.array([[x] * FEATURE_COUNT])
    with pytest.raises(ValueError, match="malformed forest"):
        twin.predict_raw(
            forest.baseline, forest.roots, arrays["feature"], forest.threshold, arrays["left"],
            arrays["right"], forest.missing_left, forest.value, rows, np.empty(1),
        )  # fmt: skip


def test_wrong_dtype_rejected_by_both_twins(twin):
    forest = one_split_forest(0, 0.5, 100.0, 200.0)
    with pytest.raises((TypeError, ValueError)):
        twin.predict_raw(
            forest.baseline, forest.roots.astype(np.int32), forest.feature, forest.threshold,
            forest.left, forest.right, forest.missing_left, forest.value,
            np.ones((1, FEATURE_COUNT)), np.empty(1),
        )  # fmt: skip


@pytest.mark.parametrize(
    "change",
    [
        {"left": [2, LEAF, LEAF]},  # a child outside the arrays
        {"left": [0, LEAF, LEAF]},  # a loop back to the parent
        {"feature": [FEATURE_COUNT, LEAF, LEAF]},
        {"value": [0.0, math.inf, 1.0]},
        {"roots": [5]},
        {"threshold": [0.5]},
        {"threshold": ["NaN", 0.0, 0.0]},
        {"threshold": ["fast", 0.0, 0.0]},
    ],
)
def test_forest_check_rejects_malformed_dict(change):
    data = one_split_forest(0, 0.5, 100.0, 200.0).to_dict()
    data.update(change)
    if "left" in change and change["left"][0] == 2:
        data["feature"] = [0, LEAF]
        data["threshold"] = [0.5, 0.0]
        data["left"] = [2, LEAF]
        data["right"] = [1, LEAF]
        data["missing_left"] = [1, 0]
        data["value"] = [0.0, 1.0]
    with pytest.raises(ModelArtifactError):
        Forest.from_dict(data, feature_count=FEATURE_COUNT)
