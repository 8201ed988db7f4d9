# cython: language_level=3
"""Compiled node scoring; the reference twin is sollol/routing/_score_py.py.

The arithmetic follows the twin operation by operation, so both return the
same choice and the same scores bit for bit (no -ffast-math here). The inner
loop touches only typed memoryviews and C doubles.
"""

from libc.math cimport INFINITY
from libc.stdint cimport int64_t

# Must match sollol/routing/layout.py; test_score checks LAYOUT below.
cdef enum:
    COL_HEALTHY = 0
    COL_IN_FLIGHT = 1
    COL_QUEUE_DEPTH = 2
    COL_SLOTS_TOTAL = 3
    COL_TTFT_MS = 4
    COL_DECODE_TPS = 5
    COL_ERROR_RATE = 6
    COL_IS_GPU = 7
    COL_COST_WEIGHT = 8
    NODE_COLUMNS = 9
    MODEL_LOADED = 0
    MODEL_FITS = 1
    MODEL_TTFT_MS = 2
    MODEL_DECODE_TPS = 3
    MODEL_COLUMNS = 4
    REQ_PROMPT_TOKENS = 0
    REQ_MAX_TOKENS = 1
    REQ_PRIORITY = 2
    REQ_WANTS_GPU = 3
    REQ_AFFINITY_NODE = 4
    REQ_MODEL_LOAD_MS = 5
    REQ_COLUMNS = 6
    POLICY_ROUND_ROBIN = 0
    POLICY_LEAST_LOADED = 1
    POLICY_HEURISTIC = 2
    POLICY_PREDICTED_LATENCY = 3

cdef double UNKNOWN_TTFT_MS = 200.0
cdef double UNKNOWN_DECODE_TPS = 20.0
cdef double UNKNOWN_PREFILL_TPS = 200.0

LAYOUT = {
    "COL_HEALTHY": COL_HEALTHY,
    "COL_IN_FLIGHT": COL_IN_FLIGHT,
    "COL_QUEUE_DEPTH": COL_QUEUE_DEPTH,
    "COL_SLOTS_TOTAL": COL_SLOTS_TOTAL,
    "COL_TTFT_MS": COL_TTFT_MS,
    "COL_DECODE_TPS": COL_DECODE_TPS,
    "COL_ERROR_RATE": COL_ERROR_RATE,
    "COL_IS_GPU": COL_IS_GPU,
    "COL_COST_WEIGHT": COL_COST_WEIGHT,
    "NODE_COLUMNS": NODE_COLUMNS,
    "MODEL_LOADED": MODEL_LOADED,
    "MODEL_FITS": MODEL_FITS,
    "MODEL_TTFT_MS": MODEL_TTFT_MS,
    "MODEL_DECODE_TPS": MODEL_DECODE_TPS,
    "MODEL_COLUMNS": MODEL_COLUMNS,
    "REQ_PROMPT_TOKENS": REQ_PROMPT_TOKENS,
    "REQ_MAX_TOKENS": REQ_MAX_TOKENS,
    "REQ_PRIORITY": REQ_PRIORITY,
    "REQ_WANTS_GPU": REQ_WANTS_GPU,
    "REQ_AFFINITY_NODE": REQ_AFFINITY_NODE,
    "REQ_MODEL_LOAD_MS": REQ_MODEL_LOAD_MS,
    "REQ_COLUMNS": REQ_COLUMNS,
    "POLICY_ROUND_ROBIN": POLICY_ROUND_ROBIN,
    "POLICY_LEAST_LOADED": POLICY_LEAST_LOADED,
    "POLICY_HEURISTIC": POLICY_HEURISTIC,
    "POLICY_PREDICTED_LATENCY": POLICY_PREDICTED_LATENCY,
    "UNKNOWN_TTFT_MS": UNKNOWN_TTFT_MS,
    "UNKNOWN_DECODE_TPS": UNKNOWN_DECODE_TPS,
    "UNKNOWN_PREFILL_TPS": UNKNOWN_PREFILL_TPS,
}


cdef inline double known(double value, double default) noexcept nogil:
    return default if value != value else value


cdef inline double at_least(double value, double floor) noexcept nogil:
    return floor if value < floor else value


cdef inline double at_most(double value, double ceiling) noexcept nogil:
    return ceiling if value > ceiling else value


cdef void peer_defaults(
    const double[:, ::1] signals,
    const double[:, ::1] model_state,
    const int64_t[::1] candidates,
    double* unknown_ttft_ms,
    double* unknown_decode_tps,
) noexcept nogil:
    # See _peer_defaults in the pure twin: means over the measured candidates.
    cdef double ttft_sum = 0.0, tps_sum = 0.0, value
    cdef Py_ssize_t ttft_count = 0, tps_count = 0, k
    cdef int64_t node
    for k in range(candidates.shape[0]):
        node = candidates[k]
        if node < 0 or node >= signals.shape[0]:
            continue
        value = known(model_state[node, MODEL_TTFT_MS], signals[node, COL_TTFT_MS])
        if value == value:
            ttft_sum += value
            ttft_count += 1
        value = known(model_state[node, MODEL_DECODE_TPS], signals[node, COL_DECODE_TPS])
        if value == value:
            tps_sum += value
            tps_count += 1
    unknown_ttft_ms[0] = ttft_sum / ttft_count if ttft_count else UNKNOWN_TTFT_MS
    unknown_decode_tps[0] = tps_sum / tps_count if tps_count else UNKNOWN_DECODE_TPS


cdef double node_cost(
    const double[:, ::1] signals,
    const double[:, ::1] model_state,
    Py_ssize_t node,
    const double[::1] request,
    int policy,
    double unknown_ttft_ms,
    double unknown_decode_tps,
) noexcept nogil:
    cdef double in_flight, queued, slots, load, ttft_ms, decode_tps, error_rate
    cdef double cost_weight, affinity_node, prompt_tokens, max_tokens, priority
    cdef double node_ttft_ms, node_decode_tps
    cdef double latency_penalty, score, prefill_ms, service_ms, waiting, wait_ms, predicted
    cdef bint is_gpu, is_loaded, has_affinity

    if known(signals[node, COL_HEALTHY], 0.0) <= 0.0:
        return INFINITY
    in_flight = at_least(known(signals[node, COL_IN_FLIGHT], 0.0), 0.0)
    queued = at_least(known(signals[node, COL_QUEUE_DEPTH], 0.0), 0.0)
    if policy == POLICY_LEAST_LOADED:
        return in_flight + queued

    if known(model_state[node, MODEL_FITS], 1.0) <= 0.0:
        return INFINITY
    slots = at_least(known(signals[node, COL_SLOTS_TOTAL], 1.0), 1.0)
    load = (in_flight + queued) / slots
    node_ttft_ms = known(signals[node, COL_TTFT_MS], unknown_ttft_ms)
    ttft_ms = at_least(known(model_state[node, MODEL_TTFT_MS], node_ttft_ms), 0.0)
    node_decode_tps = known(signals[node, COL_DECODE_TPS], unknown_decode_tps)
    decode_tps = at_least(known(model_state[node, MODEL_DECODE_TPS], node_decode_tps), 1e-3)
    error_rate = at_most(at_least(known(signals[node, COL_ERROR_RATE], 0.0), 0.0), 1.0)
    is_gpu = known(signals[node, COL_IS_GPU], 0.0) > 0.0
    cost_weight = known(signals[node, COL_COST_WEIGHT], 1.0)
    is_loaded = known(model_state[node, MODEL_LOADED], 1.0) > 0.0
    affinity_node = known(request[REQ_AFFINITY_NODE], -1.0)
    has_affinity = <double>node == affinity_node and in_flight < slots
    prompt_tokens = at_least(known(request[REQ_PROMPT_TOKENS], 0.0), 0.0)
    max_tokens = at_least(known(request[REQ_MAX_TOKENS], 0.0), 0.0)
    priority = at_most(at_least(known(request[REQ_PRIORITY], 5.0), 1.0), 10.0)

    if policy == POLICY_HEURISTIC:
        latency_penalty = ttft_ms / 1000.0 * (1.0 + (priority - 5.0) / 10.0)
        score = 100.0 * (1.0 - error_rate) / (1.0 + latency_penalty)
        if is_gpu and request[REQ_WANTS_GPU] > 0.0:
            score = score * 1.5
        score = score / (1.0 + load)
        if not is_loaded:
            score = score / 4.0
        if has_affinity:
            score = score * 1.3
        if cost_weight > 0.0:
            score = score / cost_weight
        return -score

    prefill_ms = prompt_tokens / UNKNOWN_PREFILL_TPS * 1000.0
    if has_affinity:
        prefill_ms = prefill_ms * 0.25
    service_ms = ttft_ms + prefill_ms + max_tokens / decode_tps * 1000.0
    waiting = in_flight + queued + 1.0 - slots
    wait_ms = waiting / slots * service_ms if waiting > 0.0 else 0.0
    predicted = wait_ms + service_ms
    if not is_loaded:
        predicted = predicted + at_least(known(request[REQ_MODEL_LOAD_MS], 0.0), 0.0)
    if cost_weight > 0.0:
        predicted = predicted * cost_weight
    return predicted / (1.0 - error_rate) if error_rate < 1.0 else INFINITY


def score_nodes(
    const double[:, ::1] signals,
    const double[:, ::1] model_state,
    const int64_t[::1] candidates,
    const double[::1] request,
    int policy,
    Py_ssize_t start,
    double[::1] scores,
):
    """Score each candidate into ``scores`` and return the best node index, or -1.

    Same contract as the pure twin's ``score_nodes``.
    """
    cdef Py_ssize_t n = candidates.shape[0]
    cdef Py_ssize_t node_count = signals.shape[0]
    cdef Py_ssize_t offset, position, k
    cdef Py_ssize_t bad_position = -1
    cdef int64_t node
    cdef int64_t best = -1
    cdef double cost
    cdef double best_cost = INFINITY
    cdef double unknown_ttft_ms, unknown_decode_tps

    if signals.shape[1] != NODE_COLUMNS:
        raise ValueError(f"signals must have {NODE_COLUMNS} columns, got {signals.shape[1]}")
    if model_state.shape[0] != node_count or model_state.shape[1] != MODEL_COLUMNS:
        raise ValueError(f"model_state must be nodes x {MODEL_COLUMNS}")
    if request.shape[0] != REQ_COLUMNS:
        raise ValueError(f"request must have {REQ_COLUMNS} values, got {request.shape[0]}")
    if scores.shape[0] < n:
        raise ValueError("scores must have room for every candidate")
    if n == 0:
        return -1
    offset = start % n
    if offset < 0:
        offset += n

    with nogil:
        peer_defaults(signals, model_state, candidates, &unknown_ttft_ms, &unknown_decode_tps)
        for k in range(n):
            position = offset + k
            if position >= n:
                position -= n
            node = candidates[position]
            if node < 0 or node >= node_count:
                bad_position = position
                break
            if policy == POLICY_ROUND_ROBIN:
                cost = <double>k if known(signals[node, COL_HEALTHY], 0.0) > 0.0 else INFINITY
            else:
                cost = node_cost(
                    signals, model_state, node, request, policy,
                    unknown_ttft_ms, unknown_decode_tps,
                )
            if cost != cost:
                cost = INFINITY
            scores[position] = cost
            if cost < best_cost:
                best = node
                best_cost = cost

    if bad_position >= 0:
        raise ValueError(
            f"candidate index {candidates[bad_position]} is out of range for {node_count} nodes"
        )
    return best
