"""Pure-Python evaluation of an exported forest, the reference for csrc/_forest_c.pyx.

Both twins walk the same arrays (forest.py describes them) and add leaf values
in tree order. Both build each candidate's feature row from the routing
signals, in the order of features.FEATURE_NAMES. So they return the same
predictions bit for bit. Tests compare them with each other and with
scikit-learn's ``predict``.
"""

import math

import numpy as np

from ..routing.layout import (
    COL_DECODE_TPS,
    COL_HEALTHY,
    COL_IN_FLIGHT,
    COL_QUEUE_DEPTH,
    COL_SLOTS_TOTAL,
    COL_TTFT_MS,
    MODEL_COLUMNS,
    MODEL_DECODE_TPS,
    MODEL_FITS,
    MODEL_LOADED,
    MODEL_TTFT_MS,
    NODE_COLUMNS,
    REQ_COLUMNS,
    REQ_MAX_TOKENS,
    REQ_MODEL_LOAD_MS,
    REQ_PROMPT_TOKENS,
)
from .features import FEATURE_COUNT

INF = math.inf


def _walk(roots, feature, threshold, left, right, missing_left, value, row, baseline) -> float:  # type: ignore[no-untyped-def]
    # Bounds are checked on every step, as in the compiled twin, so a
    # malformed forest raises instead of reading outside the arrays or looping.
    count = len(feature)
    width = len(row)
    total = float(baseline)
    for root in roots:
        node = int(root)
        if node < 0 or node >= count:
            raise ValueError(f"malformed forest: root {node} is outside the node arrays")
        while feature[node] >= 0:
            column = int(feature[node])
            if column >= width:
                raise ValueError(f"malformed forest: node {node} splits on feature {column}")
            x = float(row[column])
            if x != x:
                child = int(left[node]) if missing_left[node] else int(right[node])
            elif x <= threshold[node]:
                child = int(left[node])
            else:
                child = int(right[node])
            if child <= node or child >= count:
                raise ValueError(f"malformed forest: node {node} has child {child}")
            node = child
        total = total + float(value[node])
    return total


def predict_raw(
    baseline: float,
    roots: np.ndarray,
    feature: np.ndarray,
    threshold: np.ndarray,
    left: np.ndarray,
    right: np.ndarray,
    missing_left: np.ndarray,
    value: np.ndarray,
    rows: np.ndarray,
    out: np.ndarray,
) -> None:
    """Write the raw (log-scale) prediction of each row of ``rows`` into ``out``."""
    _check_forest(roots, feature, threshold, left, right, missing_left, value)
    _check_array("rows", rows, np.float64, 2)
    _check_array("out", out, np.float64, 1)
    if len(out) < rows.shape[0]:
        raise ValueError("out must have room for every row")
    for i in range(rows.shape[0]):
        out[i] = _walk(
            roots, feature, threshold, left, right, missing_left, value, rows[i], baseline
        )


def queue_offset(in_flight: float, slots: float) -> float:
    """Return log(1 + waiting / slots): the latency model's known queueing term.

    With ``in_flight`` requests on a node of ``slots`` slots, a new request
    waits for ``in_flight + 1 - slots`` of them to finish, each taking about
    one service time per slot. The trees learn the log service time, and this
    term, added to their sum, scales it up with the queue. So predictions grow
    with load beyond anything the history showed, where trees alone stay flat.
    """
    slots = slots if slots >= 1.0 else 1.0  # NaN (unknown) counts as one slot
    in_flight = in_flight if in_flight > 0.0 else 0.0
    waiting = in_flight + 1.0 - slots
    return math.log1p(waiting / slots) if waiting > 0.0 else 0.0


def swap_penalty_ms(model_load_ms: float) -> float:
    """Return the cost added where the model is known not to be loaded.

    Loading a model into a full node evicts another one, and the requests
    for that one then pay a load too. No single history row shows that cost,
    so the trees cannot learn it. The router's own load-time estimate is
    used in its place.
    """
    return model_load_ms if model_load_ms > 0.0 else 0.0


def fill_features(
    signals: np.ndarray,
    model_state: np.ndarray,
    node: int,
    request: np.ndarray,
    node_code: float,
    model_code: float,
    row: np.ndarray,
) -> None:
    """Write the feature row of ``node`` for this request, as history rows record it."""
    row[0] = node_code
    row[1] = model_code
    row[2] = request[REQ_PROMPT_TOKENS]
    row[3] = request[REQ_MAX_TOKENS]
    row[4] = signals[node, COL_IN_FLIGHT]
    row[5] = signals[node, COL_QUEUE_DEPTH]
    row[6] = signals[node, COL_SLOTS_TOTAL]
    row[7] = model_state[node, MODEL_LOADED]
    # The model's own averages on the node win over the node-wide ones, as in
    # NodeSignals.snapshot.
    ttft_ms = float(model_state[node, MODEL_TTFT_MS])
    row[8] = signals[node, COL_TTFT_MS] if ttft_ms != ttft_ms else ttft_ms
    decode_tps = float(model_state[node, MODEL_DECODE_TPS])
    row[9] = signals[node, COL_DECODE_TPS] if decode_tps != decode_tps else decode_tps


def score_candidates(
    baseline: float,
    roots: np.ndarray,
    feature: np.ndarray,
    threshold: np.ndarray,
    left: np.ndarray,
    right: np.ndarray,
    missing_left: np.ndarray,
    value: np.ndarray,
    signals: np.ndarray,
    model_state: np.ndarray,
    candidates: np.ndarray,
    request: np.ndarray,
    node_codes: np.ndarray,
    model_code: float,
    row: np.ndarray,
    scores: np.ndarray,
) -> int:
    """Predict each candidate's latency in ms into ``scores``; return the fastest node, or -1.

    Unhealthy nodes, and nodes the model does not fit, score +inf. Of equal
    predictions the earlier candidate wins.
    """
    _check_forest(roots, feature, threshold, left, right, missing_left, value)
    _check_signals(signals, model_state, candidates, request, node_codes, row, scores)
    node_count = signals.shape[0]
    best = -1
    best_cost = INF
    for position in range(len(candidates)):
        node = int(candidates[position])
        if node < 0 or node >= node_count:
            raise ValueError(f"candidate index {node} is out of range for {node_count} nodes")
        healthy = float(signals[node, COL_HEALTHY])
        fits = float(model_state[node, MODEL_FITS])
        if not healthy > 0.0 or fits <= 0.0:
            cost = INF
        else:
            fill_features(signals, model_state, node, request, node_codes[node], model_code, row)
            raw = _walk(roots, feature, threshold, left, right, missing_left, value, row, baseline)
            raw = raw + queue_offset(float(row[4]), float(row[6]))
            cost = math.exp(raw) if raw < 709.0 else INF
            if row[7] == 0.0:
                cost = cost + swap_penalty_ms(float(request[REQ_MODEL_LOAD_MS]))
        scores[position] = cost
        if cost < best_cost:
            best = node
            best_cost = cost
    return best


def _check_array(name: str, array: object, dtype: type, ndim: int) -> None:
    # The compiled twin takes typed memoryviews, so anything else must fail
    # here too, or the two would accept different inputs.
    if not isinstance(array, np.ndarray) or array.dtype != dtype or array.ndim != ndim:
        raise TypeError(f"{name} must be a {ndim}-D numpy {np.dtype(dtype).name} array")
    if not array.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous")


def _check_forest(roots, feature, threshold, left, right, missing_left, value) -> None:  # type: ignore[no-untyped-def]
    for name, array, dtype in (
        ("roots", roots, np.int64),
        ("feature", feature, np.int64),
        ("threshold", threshold, np.float64),
        ("left", left, np.int64),
        ("right", right, np.int64),
        ("missing_left", missing_left, np.uint8),
        ("value", value, np.float64),
    ):
        _check_array(name, array, dtype, 1)
    count = len(feature)
    if any(len(array) != count for array in (threshold, left, right, missing_left, value)):
        raise ValueError("forest node arrays must have equal lengths")


def _check_signals(signals, model_state, candidates, request, node_codes, row, scores) -> None:  # type: ignore[no-untyped-def]
    _check_array("signals", signals, np.float64, 2)
    _check_array("model_state", model_state, np.float64, 2)
    _check_array("candidates", candidates, np.int64, 1)
    _check_array("request", request, np.float64, 1)
    _check_array("node_codes", node_codes, np.float64, 1)
    _check_array("row", row, np.float64, 1)
    _check_array("scores", scores, np.float64, 1)
    if signals.shape[1] != NODE_COLUMNS:
        raise ValueError(f"signals must have {NODE_COLUMNS} columns, got {signals.shape[1]}")
    if model_state.shape[0] != signals.shape[0] or model_state.shape[1] != MODEL_COLUMNS:
        raise ValueError(f"model_state must be nodes x {MODEL_COLUMNS}")
    if len(node_codes) != signals.shape[0]:
        raise ValueError("node_codes must have one entry per node")
    if len(request) != REQ_COLUMNS:
        raise ValueError(f"request must have {REQ_COLUMNS} values, got {len(request)}")
    if len(row) != FEATURE_COUNT:
        raise ValueError(f"row must have {FEATURE_COUNT} values, got {len(row)}")
    if len(scores) < len(candidates):
        raise ValueError("scores must have room for every candidate")
