"""Pure-Python node selection, the reference for csrc/_select_c.pyx.

Every function here has the same name, arguments, result and errors as its
compiled twin; the tests run each selection test against both.
"""

import numpy as np


def _check_int64_vector(name: str, array: np.ndarray) -> None:
    # The compiled twin takes ``const int64_t[::1]`` memoryviews, so anything
    # else must fail here too, or the two implementations would drift.
    if not isinstance(array, np.ndarray) or array.dtype != np.int64 or array.ndim != 1:
        raise TypeError(f"{name} must be a 1-D numpy int64 array")
    if not array.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous")


def least_loaded(in_flight: np.ndarray, candidates: np.ndarray, start: int) -> int:
    """Return the candidate node index with the fewest requests in flight, or -1.

    ``candidates`` contains indices into ``in_flight``. The scan starts at
    position ``start`` (taken modulo the number of candidates) so that ties
    rotate between nodes instead of always going to the first one.
    Raises ValueError when a candidate index is outside ``in_flight``.
    """
    _check_int64_vector("in_flight", in_flight)
    _check_int64_vector("candidates", candidates)
    n = len(candidates)
    if n == 0:
        return -1
    node_count = len(in_flight)
    offset = start % n

    best = -1
    best_load = 0
    for k in range(n):
        node = int(candidates[(offset + k) % n])
        if node < 0 or node >= node_count:
            raise ValueError(f"candidate index {node} is out of range for {node_count} nodes")
        load = int(in_flight[node])
        if best == -1 or load < best_load:
            best = node
            best_load = load
    return best
