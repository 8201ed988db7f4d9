# cython: language_level=3
"""Compiled evaluation of an exported forest; the reference twin is sollol/learning/_forest_py.py.

The walk and the sums follow the twin operation by operation, so both return
the same predictions bit for bit. Every step checks its bounds, which costs a
compare per node and keeps a malformed forest from reading outside the arrays.
"""

from libc.math cimport INFINITY, exp, log1p
from libc.stdint cimport int64_t, uint8_t

# Must match sollol/routing/layout.py and the feature order of
# sollol/learning/features.py; test_learned_forest checks LAYOUT below.
cdef enum:
    COL_HEALTHY = 0
    COL_IN_FLIGHT = 1
    COL_QUEUE_DEPTH = 2
    COL_SLOTS_TOTAL = 3
    COL_TTFT_MS = 4
    COL_DECODE_TPS = 5
    NODE_COLUMNS = 9
    MODEL_LOADED = 0
    MODEL_FITS = 1
    MODEL_TTFT_MS = 2
    MODEL_DECODE_TPS = 3
    MODEL_COLUMNS = 4
    REQ_PROMPT_TOKENS = 0
    REQ_MAX_TOKENS = 1
    REQ_MODEL_LOAD_MS = 5
    REQ_COLUMNS = 6
    FEATURE_COUNT = 10

LAYOUT = {
    "COL_HEALTHY": COL_HEALTHY,
    "COL_IN_FLIGHT": COL_IN_FLIGHT,
    "COL_QUEUE_DEPTH": COL_QUEUE_DEPTH,
    "COL_SLOTS_TOTAL": COL_SLOTS_TOTAL,
    "COL_TTFT_MS": COL_TTFT_MS,
    "COL_DECODE_TPS": COL_DECODE_TPS,
    "NODE_COLUMNS": NODE_COLUMNS,
    "MODEL_LOADED": MODEL_LOADED,
    "MODEL_FITS": MODEL_FITS,
    "MODEL_TTFT_MS": MODEL_TTFT_MS,
    "MODEL_DECODE_TPS": MODEL_DECODE_TPS,
    "MODEL_COLUMNS": MODEL_COLUMNS,
    "REQ_PROMPT_TOKENS": REQ_PROMPT_TOKENS,
    "REQ_MAX_TOKENS": REQ_MAX_TOKENS,
    "REQ_MODEL_LOAD_MS": REQ_MODEL_LOAD_MS,
    "REQ_COLUMNS": REQ_COLUMNS,
    "FEATURE_COUNT": FEATURE_COUNT,
}


cdef int walk(
    double baseline,
    const int64_t[::1] roots,
    const int64_t[::1] feature,
    const double[::1] threshold,
    const int64_t[::1] left,
    const int64_t[::1] right,
    const uint8_t[::1] missing_left,
    const double[::1] value,
    const double* row,
    Py_ssize_t width,
    double* out,
) except -1:
    cdef Py_ssize_t count = feature.shape[0]
    cdef Py_ssize_t tree, node, child
    cdef int64_t column
    cdef double x
    cdef double total = baseline
    for tree in range(roots.shape[0]):
        node = roots[tree]
        if node < 0 or node >= count:
            raise ValueError(f"malformed forest: root {node} is outside the node arrays")
        while feature[node] >= 0:
            column = feature[node]
            if column >= width:
                raise ValueError(f"malformed forest: node {node} splits on feature {column}")
            x = row[column]
            if x != x:
                child = left[node] if missing_left[node] else right[node]
            elif x <= threshold[node]:
                child = left[node]
            else:
                child = right[node]
            if child <= node or child >= count:
                raise ValueError(f"malformed forest: node {node} has child {child}")
            node = child
        total = total + value[node]
    out[0] = total
    return 0


cdef inline double queue_offset(double in_flight, double slots) noexcept:
    # The twin's queue_offset explains this term; same operations, same order.
    if not slots >= 1.0:
        slots = 1.0
    if not in_flight > 0.0:
        in_flight = 0.0
    cdef double waiting = in_flight + 1.0 - slots
    return log1p(waiting / slots) if waiting > 0.0 else 0.0


cdef void check_forest(
    const int64_t[::1] feature,
    const double[::1] threshold,
    const int64_t[::1] left,
    const int64_t[::1] right,
    const uint8_t[::1] missing_left,
    const double[::1] value,
) except *:
    cdef Py_ssize_t count = feature.shape[0]
    if (threshold.shape[0] != count or left.shape[0] != count or right.shape[0] != count
            or missing_left.shape[0] != count or value.shape[0] != count):
        raise ValueError("forest node arrays must have equal lengths")


def predict_raw(
    double baseline,
    const int64_t[::1] roots,
    const int64_t[::1] feature,
    const double[::1] threshold,
    const int64_t[::1] left,
    const int64_t[::1] right,
    const uint8_t[::1] missing_left,
    const double[::1] value,
    const double[:, ::1] rows,
    double[::1] out,
):
    """Write the raw (log-scale) prediction of each row of ``rows`` into ``out``."""
    check_forest(feature, threshold, left, right, missing_left, value)
    if out.shape[0] < rows.shape[0]:
        raise ValueError("out must have room for every row")
    cdef Py_ssize_t i
    for i in range(rows.shape[0]):
        walk(baseline, roots, feature, threshold, left, right, missing_left, value,
             &rows[i, 0] if rows.shape[1] > 0 else NULL, rows.shape[1], &out[i])


def score_candidates(
    double baseline,
    const int64_t[::1] roots,
    const int64_t[::1] feature,
    const double[::1] threshold,
    const int64_t[::1] left,
    const int64_t[::1] right,
    const uint8_t[::1] missing_left,
    const double[::1] value,
    const double[:, ::1] signals,
    const double[:, ::1] model_state,
    const int64_t[::1] candidates,
    const double[::1] request,
    const double[::1] node_codes,
    double model_code,
    double[::1] row,
    double[::1] scores,
):
    """Predict each candidate's latency in ms into ``scores``; return the fastest node, or -1."""
    check_forest(feature, threshold, left, right, missing_left, value)
    if signals.shape[1] != NODE_COLUMNS:
        raise ValueError(f"signals must have {NODE_COLUMNS} columns, got {signals.shape[1]}")
    if model_state.shape[0] != signals.shape[0] or model_state.shape[1] != MODEL_COLUMNS:
        raise ValueError(f"model_state must be nodes x {MODEL_COLUMNS}")
    if node_codes.shape[0] != signals.shape[0]:
        raise ValueError("node_codes must have one entry per node")
    if request.shape[0] != REQ_COLUMNS:
        raise ValueError(f"request must have {REQ_COLUMNS} values, got {request.shape[0]}")
    if row.shape[0] != FEATURE_COUNT:
        raise ValueError(f"row must have {FEATURE_COUNT} values, got {row.shape[0]}")
    if scores.shape[0] < candidates.shape[0]:
        raise ValueError("scores must have room for every candidate")

    cdef Py_ssize_t node_count = signals.shape[0]
    cdef Py_ssize_t position
    cdef int64_t node
    cdef int64_t best = -1
    cdef double best_cost = INFINITY
    cdef double cost, raw, ttft_ms, decode_tps, load_ms
    for position in range(candidates.shape[0]):
        node = candidates[position]
        if node < 0 or node >= node_count:
            raise ValueError(f"candidate index {node} is out of range for {node_count} nodes")
        if not signals[node, COL_HEALTHY] > 0.0 or model_state[node, MODEL_FITS] <= 0.0:
            cost = INFINITY
        else:
            row[0] = node_codes[node]
            row[1] = model_code
            row[2] = request[REQ_PROMPT_TOKENS]
            row[3] = request[REQ_MAX_TOKENS]
            row[4] = signals[node, COL_IN_FLIGHT]
            row[5] = signals[node, COL_QUEUE_DEPTH]
            row[6] = signals[node, COL_SLOTS_TOTAL]
            row[7] = model_state[node, MODEL_LOADED]
            ttft_ms = model_state[node, MODEL_TTFT_MS]
            row[8] = signals[node, COL_TTFT_MS] if ttft_ms != ttft_ms else ttft_ms
            decode_tps = model_state[node, MODEL_DECODE_TPS]
            row[9] = signals[node, COL_DECODE_TPS] if decode_tps != decode_tps else decode_tps
            walk(baseline, roots, feature, threshold, left, right, missing_left, value,
                 &row[0], FEATURE_COUNT, &raw)
            raw = raw + queue_offset(row[4], row[6])
            cost = exp(raw) if raw < 709.0 else INFINITY
            if row[7] == 0.0:
                load_ms = request[REQ_MODEL_LOAD_MS]
                cost = cost + (load_ms if load_ms > 0.0 else 0.0)
        scores[position] = cost
        if cost < best_cost:
            best = node
            best_cost = cost
    return best
