"""A trained boosted-tree model as plain arrays that the request path evaluates.

scikit-learn's ``predict`` took about 3 ms per call for 6 rows on a 2-core
machine (benchmarks/learned_predict.py), too slow for every request. So the
trained HistGradientBoostingRegressor is exported into flat node arrays. The compiled
routine in csrc/_forest_c.pyx and its pure-Python twin in _forest_py.py walk
these arrays directly.

Node ``i`` of the flat arrays is a leaf when ``feature[i] == -1``; its
``value[i]`` is then added to the sum. Otherwise a row goes to ``left[i]``
when its feature value is at most ``threshold[i]``, to ``right[i]`` when it
is larger, and NaN follows ``missing_left[i]``. Child indices are absolute.
The raw prediction is ``baseline`` plus one leaf value per tree, added in tree
order. Models are trained on the logarithm of milliseconds, so ``exp(raw)``
is in milliseconds. The latency model's trees learn the service time: the
request path adds the queueing term ``_forest_py.queue_offset`` to ``raw``
(training subtracted it) and a swap penalty where the model is not loaded.
"""

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ModelArtifactError

LEAF = -1


@dataclass(frozen=True, slots=True)
class Forest:
    baseline: float
    roots: np.ndarray  # int64, the first node of each tree
    feature: np.ndarray  # int64, LEAF for a leaf
    threshold: np.ndarray  # float64
    left: np.ndarray  # int64
    right: np.ndarray  # int64
    missing_left: np.ndarray  # uint8, 1 when NaN goes left
    value: np.ndarray  # float64, used at leaves

    @property
    def node_count(self) -> int:
        return len(self.feature)

    def to_dict(self) -> dict[str, Any]:
        return {
            "baseline": self.baseline,
            "roots": self.roots.tolist(),
            "feature": self.feature.tolist(),
            # A split that sends every number one way and only NaN the other
            # has an infinite threshold, which strict JSON cannot hold as a number.
            "threshold": [_json_float(value) for value in self.threshold.tolist()],
            "left": self.left.tolist(),
            "right": self.right.tolist(),
            "missing_left": self.missing_left.tolist(),
            "value": self.value.tolist(),
        }

    @classmethod
    def from_dict(cls, data: Any, *, feature_count: int) -> "Forest":
        """Rebuild a forest written by ``to_dict``; raise ModelArtifactError if unusable."""
        if not isinstance(data, dict):
            raise ModelArtifactError("a forest must be a JSON object")
        try:
            forest = cls(
                baseline=float(data["baseline"]),
                roots=np.asarray(data["roots"], dtype=np.int64),
                feature=np.asarray(data["feature"], dtype=np.int64),
                threshold=np.array([float(value) for value in data["threshold"]]),
                left=np.asarray(data["left"], dtype=np.int64),
                right=np.asarray(data["right"], dtype=np.int64),
                missing_left=np.asarray(data["missing_left"], dtype=np.uint8),
                value=np.asarray(data["value"], dtype=np.float64),
            )
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise ModelArtifactError(f"a forest field is missing or malformed: {exc}") from exc
        forest.check(feature_count)
        return forest

    def check(self, feature_count: int) -> None:
        """Raise ModelArtifactError unless every walk ends at a leaf inside the arrays."""
        count = self.node_count
        arrays = (self.threshold, self.left, self.right, self.missing_left, self.value)
        if any(array.ndim != 1 or len(array) != count for array in (self.feature, *arrays)):
            raise ModelArtifactError("forest node arrays must be 1-D and of equal length")
        if self.roots.ndim != 1 or not math.isfinite(self.baseline):
            raise ModelArtifactError("forest roots must be 1-D and the baseline finite")
        if len(self.roots) and (self.roots.min() < 0 or self.roots.max() >= count):
            raise ModelArtifactError("a forest root points outside the node arrays")
        split = self.feature != LEAF
        if np.any((self.feature < LEAF) | (self.feature >= feature_count)):
            raise ModelArtifactError(f"a split uses a feature outside 0..{feature_count - 1}")
        nodes = np.arange(count)
        # Children come after their parent, so every walk ends, at a leaf.
        for children in (self.left[split], self.right[split]):
            if np.any(children <= nodes[split]) or np.any(children >= count):
                raise ModelArtifactError("a split points to a child outside its tree")
        if not np.all(np.isfinite(self.value[~split])):
            raise ModelArtifactError("a leaf value is not finite")
        if np.any(np.isnan(self.threshold[split])):
            raise ModelArtifactError("a split threshold is NaN")


def _json_float(value: float) -> float | str:
    if math.isfinite(value):
        return value
    return "Infinity" if value > 0 else "-Infinity"


def export_hist_gradient_boosting(model: Any) -> Forest:
    """Flatten a fitted single-output HistGradientBoostingRegressor into a Forest.

    NOTE: reads the estimator's private ``_predictors`` and
    ``_baseline_prediction`` (scikit-learn 1.4 to 1.9 keep them as read
    here). The export test compares the result with ``predict``, so a change
    in a later release fails that test instead of scoring silently wrong.
    """
    predictors = getattr(model, "_predictors", None)
    baseline = getattr(model, "_baseline_prediction", None)
    if predictors is None or baseline is None:
        raise ModelArtifactError(
            "this scikit-learn version does not expose the fitted trees the export reads"
        )
    roots, parts = [], []
    offset = 0
    for iteration in predictors:
        nodes = iteration[0].nodes
        if np.any(nodes["is_categorical"][nodes["is_leaf"] == 0]):
            raise ModelArtifactError("categorical splits cannot be exported")
        roots.append(offset)
        parts.append((nodes, offset))
        offset += len(nodes)
    return Forest(
        baseline=float(np.ravel(baseline)[0]),
        roots=np.asarray(roots, dtype=np.int64),
        feature=_joined(parts, lambda n, _o: np.where(n["is_leaf"] == 1, LEAF, n["feature_idx"])),
        threshold=_joined(parts, lambda n, _o: n["num_threshold"].astype(np.float64)),
        left=_joined(parts, lambda n, o: np.where(n["is_leaf"] == 1, LEAF, n["left"] + o)),
        right=_joined(parts, lambda n, o: np.where(n["is_leaf"] == 1, LEAF, n["right"] + o)),
        missing_left=_joined(parts, lambda n, _o: n["missing_go_to_left"]).astype(np.uint8),
        value=_joined(parts, lambda n, _o: n["value"].astype(np.float64)),
    )


def _joined(parts, take) -> np.ndarray:  # type: ignore[no-untyped-def]
    if not parts:
        return np.empty(0, dtype=np.int64)
    chunks = [np.asarray(take(nodes, offset)) for nodes, offset in parts]
    joined = np.concatenate(chunks)
    return joined.astype(np.int64) if joined.dtype.kind in "iu" else joined
