"""Pure-Python node scoring, the reference for csrc/_score_c.pyx.

Both modules take the same arrays and return the same choice and scores, bit
for bit: the arithmetic below is written in the same order in both, and the
tests compare them on random inputs, NaN and infinities included.

Every score is a cost: lower is better, +inf means "not eligible".
"""

import math

import numpy as np

from .layout import (
    COL_COST_WEIGHT,
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
    POLICY_HEURISTIC,
    POLICY_LEAST_LOADED,
    POLICY_ROUND_ROBIN,
    REQ_AFFINITY_NODE,
    REQ_COLUMNS,
    REQ_MAX_TOKENS,
    REQ_MODEL_LOAD_MS,
    REQ_PRIORITY,
    REQ_PROMPT_TOKENS,
    REQ_WANTS_GPU,
    UNKNOWN_DECODE_TPS,
    UNKNOWN_PREFILL_TPS,
    UNKNOWN_TTFT_MS,
)

INF = math.inf


def _known(value: float, default: float) -> float:
    # NaN means "not measured yet"; infinities are kept as real extremes.
    # float() turns numpy scalars into Python floats, whose arithmetic
    # overflows to inf silently, as C doubles do.
    value = float(value)
    return default if value != value else value


def _at_least(value: float, floor: float) -> float:
    return floor if value < floor else value


def _at_most(value: float, ceiling: float) -> float:
    return ceiling if value > ceiling else value


def _peer_defaults(
    signals: np.ndarray, model_state: np.ndarray, candidates: np.ndarray
) -> tuple[float, float]:
    """Return the stand-ins for a candidate's unmeasured TTFT and decode speed.

    They are the means over the candidates measured so far, so a node that has
    not served the model yet scores like its peers and gets tried and measured.
    Fixed guesses far from the real speeds would shun or flood it. With no
    candidate measured, the fixed guesses apply.
    """
    ttft_sum = tps_sum = 0.0
    ttft_count = tps_count = 0
    node_count = signals.shape[0]
    for node in candidates:
        node = int(node)
        if node < 0 or node >= node_count:
            continue
        ttft_ms = _known(model_state[node, MODEL_TTFT_MS], float(signals[node, COL_TTFT_MS]))
        if ttft_ms == ttft_ms:
            ttft_sum += ttft_ms
            ttft_count += 1
        tps = _known(model_state[node, MODEL_DECODE_TPS], float(signals[node, COL_DECODE_TPS]))
        if tps == tps:
            tps_sum += tps
            tps_count += 1
    return (
        ttft_sum / ttft_count if ttft_count else UNKNOWN_TTFT_MS,
        tps_sum / tps_count if tps_count else UNKNOWN_DECODE_TPS,
    )


def _node_cost(
    signals: np.ndarray,
    model_state: np.ndarray,
    node: int,
    request: np.ndarray,
    policy: int,
    unknown_ttft_ms: float,
    unknown_decode_tps: float,
) -> float:
    if _known(signals[node, COL_HEALTHY], 0.0) <= 0.0:
        return INF
    in_flight = _at_least(_known(signals[node, COL_IN_FLIGHT], 0.0), 0.0)
    queued = _at_least(_known(signals[node, COL_QUEUE_DEPTH], 0.0), 0.0)
    if policy == POLICY_LEAST_LOADED:
        return in_flight + queued

    if _known(model_state[node, MODEL_FITS], 1.0) <= 0.0:
        return INF
    # Clamping keeps every denominator below at or above 1 (or positive), so
    # no input divides by zero, in Python or in C.
    slots = _at_least(_known(signals[node, COL_SLOTS_TOTAL], 1.0), 1.0)
    load = (in_flight + queued) / slots
    # This model's own averages on this node win over the node-wide ones.
    node_ttft_ms = _known(signals[node, COL_TTFT_MS], unknown_ttft_ms)
    ttft_ms = _at_least(_known(model_state[node, MODEL_TTFT_MS], node_ttft_ms), 0.0)
    node_decode_tps = _known(signals[node, COL_DECODE_TPS], unknown_decode_tps)
    decode_tps = _at_least(_known(model_state[node, MODEL_DECODE_TPS], node_decode_tps), 1e-3)
    error_rate = _at_most(_at_least(_known(signals[node, COL_ERROR_RATE], 0.0), 0.0), 1.0)
    is_gpu = _known(signals[node, COL_IS_GPU], 0.0) > 0.0
    cost_weight = _known(signals[node, COL_COST_WEIGHT], 1.0)
    is_loaded = _known(model_state[node, MODEL_LOADED], 1.0) > 0.0
    affinity_node = _known(request[REQ_AFFINITY_NODE], -1.0)
    has_affinity = float(node) == affinity_node and in_flight < slots
    prompt_tokens = _at_least(_known(request[REQ_PROMPT_TOKENS], 0.0), 0.0)
    max_tokens = _at_least(_known(request[REQ_MAX_TOKENS], 0.0), 0.0)
    priority = _at_most(_at_least(_known(request[REQ_PRIORITY], 5.0), 1.0), 10.0)

    if policy == POLICY_HEURISTIC:
        # The original SOLLOL's multiplicative score, turned into a cost.
        latency_penalty = ttft_ms / 1000.0 * (1.0 + (priority - 5.0) / 10.0)
        score = 100.0 * (1.0 - error_rate) / (1.0 + latency_penalty)
        if is_gpu and request[REQ_WANTS_GPU] > 0.0:
            score = score * 1.5
        score = score / (1.0 + load)
        if not is_loaded:
            score = score / 4.0
        if has_affinity:
            score = score * 1.3
        score = score / cost_weight if cost_weight > 0.0 else score
        return -score

    # POLICY_PREDICTED_LATENCY: expected milliseconds until the reply is complete.
    prefill_ms = prompt_tokens / UNKNOWN_PREFILL_TPS * 1000.0
    if has_affinity:
        prefill_ms = prefill_ms * 0.25
    service_ms = ttft_ms + prefill_ms + max_tokens / decode_tps * 1000.0
    waiting = in_flight + queued + 1.0 - slots
    wait_ms = waiting / slots * service_ms if waiting > 0.0 else 0.0
    predicted = wait_ms + service_ms
    if not is_loaded:
        predicted = predicted + _at_least(_known(request[REQ_MODEL_LOAD_MS], 0.0), 0.0)
    # A node with cost weight w wins only when predicted w times faster (a
    # shard group, say, which pays network hops that a single node does not).
    if cost_weight > 0.0:
        predicted = predicted * cost_weight
    return predicted / (1.0 - error_rate) if error_rate < 1.0 else INF


def score_nodes(
    signals: np.ndarray,
    model_state: np.ndarray,
    candidates: np.ndarray,
    request: np.ndarray,
    policy: int,
    start: int,
    scores: np.ndarray,
) -> int:
    """Score each candidate into ``scores`` and return the best node index, or -1.

    ``signals`` is a nodes x NODE_COLUMNS matrix, and ``model_state`` a nodes
    x MODEL_COLUMNS matrix for the requested model, NaN meaning unknown.
    ``request`` is a REQ_COLUMNS vector. ``scores[i]`` receives the cost of
    ``candidates[i]``. Ties, and round-robin, rotate from position ``start``.
    When no candidate has a finite cost, the result is -1.
    """
    _check(signals, model_state, candidates, request, scores)
    n = len(candidates)
    if n == 0:
        return -1
    node_count = signals.shape[0]
    offset = start % n
    unknown_ttft_ms, unknown_decode_tps = _peer_defaults(signals, model_state, candidates)

    best = -1
    best_cost = INF
    for k in range(n):
        position = (offset + k) % n
        node = int(candidates[position])
        if node < 0 or node >= node_count:
            raise ValueError(f"candidate index {node} is out of range for {node_count} nodes")
        if policy == POLICY_ROUND_ROBIN:
            cost = float(k) if _known(signals[node, COL_HEALTHY], 0.0) > 0.0 else INF
        else:
            cost = _node_cost(
                signals, model_state, node, request, policy, unknown_ttft_ms, unknown_decode_tps
            )
        if cost != cost:
            cost = INF
        scores[position] = cost
        if cost < best_cost:
            best = node
            best_cost = cost
    return best


def _check(signals, model_state, candidates, request, scores) -> None:  # type: ignore[no-untyped-def]
    # The compiled twin takes typed memoryviews, so anything else must fail
    # here too, or the two implementations would drift.
    for name, array, dtype, ndim in (
        ("signals", signals, np.float64, 2),
        ("model_state", model_state, np.float64, 2),
        ("candidates", candidates, np.int64, 1),
        ("request", request, np.float64, 1),
        ("scores", scores, np.float64, 1),
    ):
        if not isinstance(array, np.ndarray) or array.dtype != dtype or array.ndim != ndim:
            raise TypeError(f"{name} must be a {ndim}-D numpy {np.dtype(dtype).name} array")
        if not array.flags.c_contiguous:
            raise ValueError(f"{name} must be C-contiguous")
    if signals.shape[1] != NODE_COLUMNS:
        raise ValueError(f"signals must have {NODE_COLUMNS} columns, got {signals.shape[1]}")
    if model_state.shape[0] != signals.shape[0] or model_state.shape[1] != MODEL_COLUMNS:
        raise ValueError(f"model_state must be nodes x {MODEL_COLUMNS}")
    if len(request) != REQ_COLUMNS:
        raise ValueError(f"request must have {REQ_COLUMNS} values, got {len(request)}")
    if len(scores) < len(candidates):
        raise ValueError("scores must have room for every candidate")
