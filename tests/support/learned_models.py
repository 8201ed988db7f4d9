"""Hand-built latency models whose predictions are known in advance."""

import math

import numpy as np

from sollol.learning.artifact import LatencyModel
from sollol.learning.forest import LEAF, Forest


def one_split_forest(feature: int, threshold: float, left_ms: float, right_ms: float) -> Forest:
    """Return one tree: ``left_ms`` at most ``threshold`` (or NaN), else ``right_ms``."""
    return Forest(
        baseline=0.0,
        roots=np.array([0], dtype=np.int64),
        feature=np.array([feature, LEAF, LEAF], dtype=np.int64),
        threshold=np.array([threshold, 0.0, 0.0]),
        left=np.array([1, LEAF, LEAF], dtype=np.int64),
        right=np.array([2, LEAF, LEAF], dtype=np.int64),
        missing_left=np.array([1, 0, 0], dtype=np.uint8),
        value=np.array([0.0, math.log(left_ms), math.log(right_ms)]),
    )


def node_preference_model(node_names: tuple[str, ...], fast: str) -> LatencyModel:
    """A model predicting 100 ms on ``fast`` and 1000 ms on every other node."""
    fast_code = node_names.index(fast)
    forest = Forest(
        baseline=0.0,
        roots=np.array([0, 3], dtype=np.int64),
        # Tree 1 splits at fast_code - 0.5, tree 2 at fast_code + 0.5; the
        # fast node is the only one on the "between" side of both.
        feature=np.array([0, LEAF, LEAF, 0, LEAF, LEAF], dtype=np.int64),
        threshold=np.array([fast_code - 0.5, 0, 0, fast_code + 0.5, 0, 0], dtype=np.float64),
        left=np.array([1, LEAF, LEAF, 4, LEAF, LEAF], dtype=np.int64),
        right=np.array([2, LEAF, LEAF, 5, LEAF, LEAF], dtype=np.int64),
        missing_left=np.zeros(6, dtype=np.uint8),
        value=np.array([0, math.log(1000), math.log(100), 0, 0, math.log(10)], dtype=np.float64),
    )
    info = {"trained_at": "test", "data_span": {"rows": 0}, "metrics": {}}
    return LatencyModel(
        latency=forest, ttft=None, node_names=node_names, model_names=("tiny",), info=info
    )
