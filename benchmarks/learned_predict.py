"""Cost of one learned routing decision: scikit-learn's predict against the exported forest.

    .venv/bin/python benchmarks/learned_predict.py [--trees 100] [--candidates 6]

Trains a model like `sollol train` does (on synthetic rows), then times, per
request, scoring every candidate node:
- scikit-learn ``predict`` on a candidates x features array;
- the exported forest through the compiled routine (csrc/_forest_c.pyx);
- the same through the pure-Python twin;
- RoutingEngine.decide with the learned policy (compiled), as the router calls it.
"""

import argparse
import math
import time

import numpy as np
from threadpoolctl import threadpool_limits

from sollol.learning import _forest_py
from sollol.learning.artifact import LatencyModel
from sollol.learning.features import FEATURE_COUNT
from sollol.learning.forest import export_hist_gradient_boosting
from sollol.learning.policy import LearnedScorer
from sollol.learning.synthetic import synthetic_columns
from sollol.learning.train import TrainParams, prefer_passive_openmp
from sollol.routing.engine import NodeSignals, RoutingEngine
from sollol.routing.features import RequestFeatures


def _table(rows: int):  # type: ignore[no-untyped-def]
    from sollol.learning.features import table_from_columns

    columns = {name: list(values) for name, values in synthetic_columns(rows).items()}
    return table_from_columns(columns)


def _time_per_call_us(call, repeat: int) -> float:  # type: ignore[no-untyped-def]
    for _ in range(min(100, repeat)):
        call()
    best = math.inf
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(repeat):
            call()
        best = min(best, (time.perf_counter() - started) / repeat * 1e6)
    return best


def main() -> None:
    prefer_passive_openmp()
    from sklearn.ensemble import HistGradientBoostingRegressor

    from sollol.learning import _forest_c

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trees", type=int, default=100)
    parser.add_argument("--candidates", type=int, default=6)
    args = parser.parse_args()

    # The same estimator settings as `sollol train` (TrainParams defaults).
    params = TrainParams(max_trees=args.trees)
    table = _table(50_000)
    regressor = HistGradientBoostingRegressor(
        max_iter=params.max_trees,
        max_leaf_nodes=params.max_leaf_nodes,
        min_samples_leaf=params.min_samples_leaf,
        early_stopping=False,
        random_state=params.seed,
    ).fit(table.features, np.log(table.latency_ms))
    forest = export_hist_gradient_boosting(regressor)
    count = args.candidates
    rows = np.ascontiguousarray(np.resize(table.features[:4], (count, FEATURE_COUNT)))
    out = np.empty(count)
    arrays = (
        forest.baseline, forest.roots, forest.feature, forest.threshold, forest.left,
        forest.right, forest.missing_left, forest.value, rows, out,
    )  # fmt: skip

    with threadpool_limits(limits=1, user_api="openmp"):
        sklearn_us = _time_per_call_us(lambda: regressor.predict(rows), 200)
    compiled_us = _time_per_call_us(lambda: _forest_c.predict_raw(*arrays), 20_000)
    pure_us = _time_per_call_us(lambda: _forest_py.predict_raw(*arrays), 20)

    model = LatencyModel(
        latency=forest, ttft=None, node_names=table.node_names, model_names=table.model_names
    )
    node_names = [table.node_names[i % len(table.node_names)] for i in range(count)]
    signals = NodeSignals(count)
    for node in range(count):
        signals.set_healthy(node, True)
        signals.set_slots(node, 2)
    engine = RoutingEngine(signals, default_policy="learned")
    engine.learned = LearnedScorer(model, node_names)
    candidates = np.arange(count, dtype=np.int64)
    features = RequestFeatures(task="chat", prompt_tokens=300.0, max_tokens=256.0)
    decide_us = _time_per_call_us(
        lambda: engine.decide(candidates, features, model="small"), 20_000
    )
    print(f"forest: {args.trees} trees, {forest.node_count} nodes; {count} candidates a request")
    print("| what, per request | microseconds |")
    print("|---|---|")
    print(f"| scikit-learn predict (1 thread) | {sklearn_us:.1f} |")
    print(f"| exported forest, compiled | {compiled_us:.1f} |")
    print(f"| exported forest, pure Python | {pure_us:.1f} |")
    print(f"| RoutingEngine.decide, learned policy, compiled | {decide_us:.1f} |")


if __name__ == "__main__":
    main()
