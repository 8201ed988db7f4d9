"""Latency percentiles over a sliding window, kept in fixed time buckets.

Each finished request adds its latency and time to first token to the bucket
of the current ``bucket_s`` interval, under its model and under its node.
A bucket's percentiles are computed once, when the bucket is closed; only the
open bucket and the whole-window figures are computed again per summary. So
the cost of a summary grows with the traffic of one bucket, not of the window,
and the request path only appends to lists.

Threads: ``add`` runs on the event loop; ``summary`` may run in a worker
thread at the same time. Only ``add`` drops old buckets, and ``summary``
iterates over copies of the bucket deque and of each bucket's groups, so they
do not change while it reads them. Lists only grow, and it reads a prefix.

Each group keeps at most ``max_samples`` values per bucket; counts stay exact
and beyond that bound the percentiles come from the first values of the bucket.
Whole-window percentiles take an even share of each bucket's values when the
window holds more than ``MAX_WINDOW_SAMPLES`` of them.
"""

import itertools
from collections import deque
from typing import Any

import numpy as np

PERCENTILES = (50, 95, 99)
# Whole-window percentiles read at most about this many values per group.
MAX_WINDOW_SAMPLES = 2_000
# Closed buckets summarised per call; the rest follow in later calls, so the
# first summary after a busy, unwatched window does not stall the caller.
MAX_NEW_BUCKET_SUMMARIES = 4
_NO_VALUES: dict[str, float | None] = {f"p{p}": None for p in PERCENTILES}

Group = tuple[str, str]  # ("model" | "node", name)


class _Bucket:
    __slots__ = ("errors", "failovers", "index", "requests", "samples", "summary")

    def __init__(self, index: int) -> None:
        self.index = index  # start time // bucket_s
        self.requests = 0
        self.errors = 0
        self.failovers = 0
        # Per group: request count, latencies, times to first token.
        self.samples: dict[Group, tuple[list[int], list[float], list[float]]] = {}
        self.summary: dict[Group, tuple[dict, dict]] | None = None  # set once closed


class LatencyWindow:
    def __init__(self, *, window_s: float, bucket_s: float, max_samples: int = 2_000) -> None:
        self.bucket_s = bucket_s
        self.bucket_count = max(1, int(window_s // bucket_s))
        self.max_samples = max_samples
        self._buckets: deque[_Bucket] = deque()
        # The summary of the closed buckets, and the bucket it was built for.
        self._built_for: int | None = None
        self._summary: dict[str, Any] = {}
        self._groups: dict[Group, dict[str, Any]] = {}
        self._closed_counts: dict[Group, int] = {}

    def add(
        self,
        now: float,
        *,
        model: str,
        node: str,
        latency_ms: float,
        ttft_ms: float | None,
        failed: bool,
        failover: bool,
    ) -> None:
        bucket = self._bucket_at(int(now // self.bucket_s))
        bucket.requests += 1
        bucket.errors += failed
        bucket.failovers += failover
        for group in (("model", model), ("node", node)):
            samples = bucket.samples.get(group)
            if samples is None:
                samples = bucket.samples[group] = ([0], [], [])
            count, latencies, ttfts = samples
            count[0] += 1
            if count[0] <= self.max_samples:
                latencies.append(latency_ms)
                if ttft_ms is not None:
                    ttfts.append(ttft_ms)

    def summary(self, now: float) -> dict[str, Any]:
        """Per-bucket and whole-window figures, oldest bucket first.

        The closed buckets are summarised once per bucket interval, when the
        newest bucket changes; between those, only the open bucket's figures
        are updated. Whole-window percentiles therefore trail by up to one
        bucket, while the counts and the newest bucket are always current.
        """
        newest = int(now // self.bucket_s)
        if newest != self._built_for:
            self._rebuild(newest)
        self._update_open(newest)
        return self._summary

    def _rebuild(self, newest: int) -> None:
        first = newest - self.bucket_count + 1
        count = self.bucket_count
        requests, errors, failovers = [0] * count, [0] * count, [0] * count
        groups: dict[Group, dict[str, Any]] = {}
        window: dict[Group, tuple[list[list[float]], list[list[float]]]] = {}

        budget = MAX_NEW_BUCKET_SUMMARIES
        pending = False
        for bucket in list(self._buckets):
            if bucket.index < first:
                continue
            closed = bucket.index < newest
            position = bucket.index - first
            if closed and bucket.summary is None:
                if budget == 0:
                    pending = True
                    continue
                budget -= 1
            if closed:
                requests[position] = bucket.requests
                errors[position] = bucket.errors
                failovers[position] = bucket.failovers
            for group, (latency, ttft) in self._bucket_summary(bucket, newest).items():
                entry = groups.get(group)
                if entry is None:
                    entry = groups[group] = _empty_group(count)
                    window[group] = ([], [])
                n, latencies, ttfts = bucket.samples[group]
                window[group][0].append(latencies)
                window[group][1].append(ttfts)
                if not closed:
                    continue
                entry["count"] += n[0]
                _set_bucket(entry, position, latency, ttft)

        for group, (latencies, ttfts) in window.items():
            groups[group]["latency_ms"] = _percentiles(latencies)
            groups[group]["ttft_ms"] = _percentiles(ttfts)

        self._closed_counts = {group: entry["count"] for group, entry in groups.items()}
        self._groups = groups
        self._summary = {
            "bucket_s": self.bucket_s,
            "start": first * self.bucket_s,
            "buckets": count,
            "requests": requests,
            "errors": errors,
            "failovers": failovers,
            "by_model": _by_kind(groups, "model"),
            "by_node": _by_kind(groups, "node"),
        }
        # With buckets still to summarise, build again at the next call.
        self._built_for = None if pending else newest

    def _update_open(self, newest: int) -> None:
        bucket = self._buckets[-1] if self._buckets else None
        if bucket is None or bucket.index != newest:
            return
        summary = self._summary
        summary["requests"][-1] = bucket.requests
        summary["errors"][-1] = bucket.errors
        summary["failovers"][-1] = bucket.failovers
        for group, (latency, ttft) in self._bucket_summary(bucket, newest).items():
            entry = self._groups.get(group)
            if entry is None:
                entry = self._groups[group] = _empty_group(self.bucket_count)
                summary["by_" + group[0]][group[1]] = entry
            entry["count"] = self._closed_counts.get(group, 0) + bucket.samples[group][0][0]
            _set_bucket(entry, -1, latency, ttft)

    def _bucket_at(self, index: int) -> _Bucket:
        if self._buckets and self._buckets[-1].index == index:
            return self._buckets[-1]
        bucket = _Bucket(index)
        self._buckets.append(bucket)
        self._drop_before(index - self.bucket_count + 1)
        return bucket

    def _drop_before(self, index: int) -> None:
        while self._buckets and self._buckets[0].index < index:
            self._buckets.popleft()

    def _bucket_summary(self, bucket: _Bucket, newest: int) -> dict[Group, tuple[dict, dict]]:
        if bucket.summary is not None:
            return bucket.summary
        summary = {
            group: (_percentiles([latencies]), _percentiles([ttfts]))
            for group, (_, latencies, ttfts) in list(bucket.samples.items())
        }
        if bucket.index < newest:  # closed: no value will be added to it
            bucket.summary = summary
        return summary


def _empty_group(buckets: int) -> dict[str, Any]:
    return {
        "count": 0,
        "latency_ms": _NO_VALUES,
        "ttft_ms": _NO_VALUES,
        "series": {
            "latency_ms": {name: [None] * buckets for name in _NO_VALUES},
            "ttft_ms": {name: [None] * buckets for name in _NO_VALUES},
        },
    }


def _set_bucket(entry: dict[str, Any], position: int, latency: dict, ttft: dict) -> None:
    """Write one bucket's percentiles into a group's series."""
    for name, value in latency.items():
        entry["series"]["latency_ms"][name][position] = value
    for name, value in ttft.items():
        entry["series"]["ttft_ms"][name][position] = value


def _by_kind(groups: dict[Group, dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {name: groups[(k, name)] for k, name in sorted(groups) if k == kind}


def _percentiles(parts: list[list[float]]) -> dict[str, float | None]:
    total = sum(map(len, parts))
    if total == 0:
        return _NO_VALUES
    if total > MAX_WINDOW_SAMPLES:
        # Every stride-th value of each bucket: the same share of each, so the
        # busy buckets still weigh as much as their traffic.
        stride = -(-total // MAX_WINDOW_SAMPLES)
        parts = [part[::stride] for part in parts]
        total = sum(map(len, parts))
    values = np.fromiter(itertools.chain.from_iterable(parts), dtype=float, count=total)
    found = np.percentile(values, PERCENTILES)
    return {f"p{p}": round(float(v), 2) for p, v in zip(PERCENTILES, found, strict=True)}
