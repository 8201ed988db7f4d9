# cython: language_level=3
"""Compiled node selection; the reference twin is sollol/routing/_select_py.py.

Both modules expose the same functions with the same argument checks, and the
test suite runs every selection test against each of them.
"""

from libc.stdint cimport int64_t


def least_loaded(const int64_t[::1] in_flight, const int64_t[::1] candidates, Py_ssize_t start):
    """Return the candidate node index with the fewest requests in flight, or -1.

    ``candidates`` contains indices into ``in_flight``. The scan starts at
    position ``start`` (taken modulo the number of candidates) so that ties
    rotate between nodes instead of always going to the first one.
    Raises ValueError when a candidate index is outside ``in_flight``.
    """
    cdef Py_ssize_t n = candidates.shape[0]
    cdef Py_ssize_t node_count = in_flight.shape[0]
    cdef Py_ssize_t offset, position, k
    cdef Py_ssize_t bad_position = -1
    cdef int64_t node, load
    cdef int64_t best = -1
    cdef int64_t best_load = 0

    if n == 0:
        return -1
    offset = start % n
    if offset < 0:
        offset += n

    with nogil:
        for k in range(n):
            position = offset + k
            if position >= n:
                position -= n
            node = candidates[position]
            if node < 0 or node >= node_count:
                bad_position = position
                break
            load = in_flight[node]
            if best == -1 or load < best_load:
                best = node
                best_load = load

    if bad_position >= 0:
        raise ValueError(
            f"candidate index {candidates[bad_position]} is out of range for {node_count} nodes"
        )
    return best
