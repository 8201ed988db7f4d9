"""Time one routing decision of the scoring core, compiled and pure, at 16 and 1,000 nodes.

Usage: python benchmarks/scoring.py [--decisions 20000]
Each decision scores every node with the predicted_latency policy on random
but fixed node states, as the request path calls it (arrays built once).
Prints p50 and p99 of single-call wall time, measured with perf_counter_ns.
"""

import argparse
import platform
import time

import numpy as np

from sollol.routing import _score_py, select
from sollol.routing.engine import NodeSignals, RoutingEngine
from sollol.routing.features import RequestFeatures
from sollol.routing.layout import (
    COL_DECODE_TPS,
    COL_HEALTHY,
    COL_IN_FLIGHT,
    COL_SLOTS_TOTAL,
    COL_TTFT_MS,
    MODEL_COLUMNS,
    MODEL_FITS,
    MODEL_LOADED,
    NODE_COLUMNS,
    POLICY_IDS,
    REQ_AFFINITY_NODE,
    REQ_COLUMNS,
    REQ_MAX_TOKENS,
    REQ_PROMPT_TOKENS,
)


def node_state(nodes: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    signals = np.zeros((nodes, NODE_COLUMNS))
    signals[:, COL_HEALTHY] = 1
    signals[:, COL_IN_FLIGHT] = rng.integers(0, 8, nodes)
    signals[:, COL_SLOTS_TOTAL] = rng.integers(1, 8, nodes)
    signals[:, COL_TTFT_MS] = rng.uniform(20, 500, nodes)
    signals[:, COL_DECODE_TPS] = rng.uniform(5, 120, nodes)
    model_state = np.full((nodes, MODEL_COLUMNS), np.nan)
    model_state[:, MODEL_LOADED] = (rng.random(nodes) > 0.3).astype(np.float64)
    model_state[:, MODEL_FITS] = 1.0
    candidates = np.arange(nodes, dtype=np.int64)
    request = np.zeros(REQ_COLUMNS)
    request[REQ_PROMPT_TOKENS] = 500
    request[REQ_MAX_TOKENS] = 128
    request[REQ_AFFINITY_NODE] = -1
    return signals, model_state, candidates, request


def time_decisions(score_nodes, nodes: int, decisions: int) -> np.ndarray:  # type: ignore[no-untyped-def]
    signals, model_state, candidates, request = node_state(nodes, np.random.default_rng(0))
    scores = np.empty(nodes)
    policy = POLICY_IDS["predicted_latency"]
    timings = np.empty(decisions, dtype=np.int64)
    for index in range(decisions):
        began = time.perf_counter_ns()
        score_nodes(signals, model_state, candidates, request, policy, index, scores)
        timings[index] = time.perf_counter_ns() - began
    return timings / 1000.0


def time_engine_decisions(nodes: int, decisions: int) -> np.ndarray:
    """Time RoutingEngine.decide, the whole request-path call around the core."""
    signals, model_state, candidates, _ = node_state(nodes, np.random.default_rng(0))
    node_signals = NodeSignals(nodes)
    node_signals.matrix[:] = signals
    engine = RoutingEngine(node_signals, default_policy="predicted_latency")
    features = RequestFeatures(task="chat", prompt_tokens=500, max_tokens=128)
    timings = np.empty(decisions, dtype=np.int64)
    for index in range(decisions):
        began = time.perf_counter_ns()
        engine.decide(candidates, features, model_state=model_state)
        timings[index] = time.perf_counter_ns() - began
    return timings / 1000.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--decisions", type=int, default=20000)
    args = parser.parse_args()
    if not select.COMPILED:
        raise SystemExit("the compiled core is not loaded; run `pip install -e .` first")
    from sollol.routing import _score_c

    print(f"# {platform.machine()}, Python {platform.python_version()}, {args.decisions} decisions")
    print("| nodes | implementation | p50 µs | p99 µs |")
    print("|---|---|---|---|")
    medians = {}
    for nodes in (16, 1000):
        for name, function in (("compiled", _score_c.score_nodes), ("pure", _score_py.score_nodes)):
            count = args.decisions if name == "compiled" else max(200, args.decisions // 20)
            micros = time_decisions(function, nodes, count)
            medians[nodes, name] = np.percentile(micros, 50)
            p50, p99 = np.percentile(micros, [50, 99])
            print(f"| {nodes} | {name} | {p50:.1f} | {p99:.1f} |", flush=True)
    for nodes in (16, 1000):
        p50, p99 = np.percentile(time_engine_decisions(nodes, args.decisions), [50, 99])
        print(f"| {nodes} | RoutingEngine.decide (compiled) | {p50:.1f} | {p99:.1f} |")
    for nodes in (16, 1000):
        ratio = medians[nodes, "pure"] / medians[nodes, "compiled"]
        print(f"\ncompiled is {ratio:.0f}x faster than the pure twin at {nodes} nodes (p50)")


if __name__ == "__main__":
    main()
