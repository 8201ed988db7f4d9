"""LatencyWindow: bucketed percentiles per model and node, with explicit times."""

import numpy as np
import pytest

from sollol.window_stats import LatencyWindow

T0 = 1_000_000.0  # a multiple of the bucket length: bucket boundaries fall on T0 + 10 k


def add(window, at, latency_ms, *, model="m", node="a", ttft_ms=None, **flags):
    window.add(
        at,
        model=model,
        node=node,
        latency_ms=latency_ms,
        ttft_ms=ttft_ms,
        failed=flags.get("failed", False),
        failover=flags.get("failover", False),
    )


def test_percentiles_per_group_and_bucket():
    window = LatencyWindow(window_s=60, bucket_s=10)
    older = np.arange(1.0, 51.0)
    newer = np.arange(100.0, 121.0)
    for value in older:
        add(window, T0 + 1, value, node="a", ttft_ms=value / 2)
    for value in newer:
        add(window, T0 + 15, value, node="b", failed=value > 118)
    summary = window.summary(T0 + 15)

    assert summary["buckets"] == 6
    assert summary["requests"][-2:] == [50, 21]
    assert summary["errors"][-2:] == [0, 2]
    model = summary["by_model"]["m"]
    assert model["count"] == 71
    expected = np.percentile(np.concatenate([older, newer]), [50, 95, 99])
    assert [model["latency_ms"][p] for p in ("p50", "p95", "p99")] == pytest.approx(expected)
    assert model["ttft_ms"]["p50"] == pytest.approx(np.percentile(older / 2, 50))

    node_a, node_b = summary["by_node"]["a"], summary["by_node"]["b"]
    assert node_a["series"]["latency_ms"]["p50"] == [None] * 4 + [pytest.approx(25.5), None]
    assert node_b["series"]["latency_ms"]["p95"][-1] == pytest.approx(np.percentile(newer, 95))
    assert node_b["ttft_ms"] == {"p50": None, "p95": None, "p99": None}


def test_open_bucket_updates_between_rebuilds():
    window = LatencyWindow(window_s=60, bucket_s=10)
    add(window, T0 + 1, 10.0)
    add(window, T0 + 11, 20.0)
    first = window.summary(T0 + 12)
    assert first["by_model"]["m"]["count"] == 2
    add(window, T0 + 13, 40.0, node="new")
    second = window.summary(T0 + 14)
    assert second["requests"][-1] == 2
    assert second["by_model"]["m"]["count"] == 3
    assert second["by_model"]["m"]["series"]["latency_ms"]["p50"][-1] == pytest.approx(30.0)
    assert second["by_node"]["new"]["count"] == 1


def test_old_buckets_leave_the_window():
    window = LatencyWindow(window_s=30, bucket_s=10)
    add(window, T0 + 1, 10.0, node="gone")
    add(window, T0 + 31, 20.0, node="kept")
    summary = window.summary(T0 + 31)
    assert sum(summary["requests"]) == 1
    assert set(summary["by_node"]) == {"kept"}


def test_counts_stay_exact_beyond_the_sample_bound():
    window = LatencyWindow(window_s=60, bucket_s=10, max_samples=100)
    for value in range(1_000):
        add(window, T0 + 1, float(value))
    group = window.summary(T0 + 2)["by_model"]["m"]
    assert group["count"] == 1_000
    # Only the first 100 values are kept for the percentiles.
    assert group["latency_ms"]["p50"] == pytest.approx(49.5)


def test_window_summarises_a_few_closed_buckets_per_call():
    window = LatencyWindow(window_s=600, bucket_s=10)
    for bucket in range(60):
        add(window, T0 + 10 * bucket + 1, float(bucket))
    now = T0 + 595
    first = window.summary(now)
    # Four closed buckets summarised per call, plus the open one.
    assert sum(v is not None for v in first["by_model"]["m"]["series"]["latency_ms"]["p50"]) == 5
    for _ in range(20):
        last = window.summary(now)
    series = last["by_model"]["m"]["series"]["latency_ms"]["p50"]
    assert series == [pytest.approx(float(bucket)) for bucket in range(60)]
    assert last["by_model"]["m"]["count"] == 60
