"""Cost of the dashboard's bookkeeping: per request, and per summary of a busy window.

Usage: python benchmarks/dashboard_stats.py [--rate 100] [--groups-nodes 8]

Fills a 10-minute window (10 s buckets) with ``rate`` requests per second
spread over 2 models and ``--nodes`` nodes, then times:
- ``DashboardFeed.publish`` per request (the only dashboard work on the request path);
- a summary when a bucket has just closed (whole-window percentiles rebuilt);
- a summary between those (the open bucket only), as most dashboard updates are;
- the longest event-loop stall while summaries run in a worker thread, as the
  router runs them (after ``tune_interpreter``, as ``sollol serve`` does).
"""

import argparse
import asyncio
import statistics
import time

from sollol.app import create_app
from sollol.config import NodeConfig, NodeKind, Settings
from sollol.history import RequestRecord
from sollol.server import tune_interpreter
from sollol.window_stats import LatencyWindow

T0 = 1_000_000.0


def publish_cost_us(count: int) -> float:
    nodes = tuple(
        NodeConfig(url="http://127.0.0.1:9", kind=NodeKind.LLAMACPP, name=f"n{i}", models=("m",))
        for i in range(8)
    )
    settings = Settings(database_url="sqlite:///:memory:", nodes=nodes)
    feed = create_app(settings, probe_nodes=False).state.dashboard
    record = RequestRecord(
        started_at=time.time(), route="/v1/chat/completions", model="m", stream=True,
        node="n1", policy="predicted_latency", attempts=1, latency_ms=12.0, ttft_ms=3.0,
    )  # fmt: skip
    start = time.perf_counter()
    for _ in range(count):
        feed.publish(record)
    return (time.perf_counter() - start) / count * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=100.0, help="requests per second")
    parser.add_argument("--nodes", type=int, default=8)
    args = parser.parse_args()

    print(f"publish: {publish_cost_us(100_000):.2f} us per request")

    window = LatencyWindow(window_s=600, bucket_s=10)
    step_s = 1.0 / args.rate
    total = int(600 * args.rate)
    for i in range(total):
        window.add(
            T0 + i * step_s, model=f"m{i % 2}", node=f"n{i % args.nodes}",
            latency_ms=float(i % 500), ttft_ms=float(i % 50), failed=False, failover=False,
        )  # fmt: skip
    now = T0 + 600
    for _ in range(20):  # let the window summarise every closed bucket once
        window.summary(now)

    rebuilds, updates = [], []
    for k in range(10):
        now = T0 + 600 + 10 * k
        for j in range(int(10 * args.rate)):  # a full bucket of new requests
            window.add(
                now + j * step_s, model=f"m{j % 2}", node=f"n{j % args.nodes}",
                latency_ms=float(j % 500), ttft_ms=float(j % 50), failed=False, failover=False,
            )  # fmt: skip
        later = now + 10
        start = time.perf_counter()
        window.summary(later)
        rebuilds.append((time.perf_counter() - start) * 1000)
        start = time.perf_counter()
        window.summary(later + 1)
        updates.append((time.perf_counter() - start) * 1000)
    groups = 2 + args.nodes
    stall_ms = asyncio.run(loop_stall_ms(window, T0 + 700, args.rate, args.nodes))
    print(
        f"window: {total:,} requests, {groups} groups; summary after a bucket closes: "
        f"median {statistics.median(rebuilds):.1f} ms, max {max(rebuilds):.1f} ms; "
        f"between: median {statistics.median(updates):.2f} ms"
    )
    print(f"longest event-loop stall with 10 summaries in a worker thread: {stall_ms:.1f} ms")


async def loop_stall_ms(window: LatencyWindow, start: float, rate: float, nodes: int) -> float:
    """Run summaries after bucket closes in a thread; return the worst lateness of a 1 ms tick."""
    tune_interpreter()
    worst = 0.0
    running = True
    measuring = False  # only ticks that start and end while a summary runs count

    async def ticker() -> None:
        nonlocal worst
        while running:
            counted = measuring
            before = time.perf_counter()
            await asyncio.sleep(0.001)
            if counted and measuring:
                worst = max(worst, time.perf_counter() - before - 0.001)

    tick = asyncio.create_task(ticker())
    for k in range(10):
        now = start + 10 * k
        for j in range(int(10 * rate)):
            window.add(
                now + j / rate, model=f"m{j % 2}", node=f"n{j % nodes}",
                latency_ms=float(j % 500), ttft_ms=None, failed=False, failover=False,
            )  # fmt: skip
        await asyncio.sleep(0.005)  # let the ticker run before the summary starts
        measuring = True
        await asyncio.to_thread(window.summary, now + 10)
        measuring = False
    running = False
    await tick
    return worst * 1000


if __name__ == "__main__":
    main()
