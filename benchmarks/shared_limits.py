"""Measure the cost and the accuracy of counting a key's requests per minute in PostgreSQL.

Usage: python benchmarks/shared_limits.py [--threads 4] [--requests 2000] [--rpm 500]
    [--postgresql-url postgresql+psycopg://...]

``--threads`` workers, standing in for the worker threads of several router
replicas, call ``SharedKeyLimits.admit`` for one key with an ``rpm`` limit ``--requests``
times in all. Printed: the latency of one call (median and 99th percentile),
calls per second in all, and how many were admitted against ``--rpm`` (the
whole run takes well under a minute, so exactly ``--rpm`` should pass).
Without ``--postgresql-url`` PostgreSQL runs as a throwaway cluster with its
default durability settings, started like the test suite's.
"""

import argparse
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from sollol.errors import RateLimitError  # noqa: E402
from sollol.history import create_history_engine  # noqa: E402
from sollol.keys import ApiKey  # noqa: E402
from sollol.shared_limits import SharedKeyLimits  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rpm", type=int, default=500)
    parser.add_argument("--postgresql-url")
    args = parser.parse_args()

    server = None
    url = args.postgresql_url
    if url is None:
        from tests.support.postgres import start_postgres_server

        server = start_postgres_server(durable=True)
        url = server.create_database("shared_limits")
    engine = create_history_engine(url)
    try:
        limits = SharedKeyLimits(engine)
        key = ApiKey(id=1, name="bench", prefix="sk-bench", rpm=args.rpm)
        latencies_ms: list[float] = []

        def call(_: int) -> bool:
            started = time.perf_counter()
            try:
                limits.admit(key, 0)
                admitted = True
            except RateLimitError:
                admitted = False
            latencies_ms.append((time.perf_counter() - started) * 1000.0)
            return admitted

        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=args.threads) as pool:
            admitted = sum(pool.map(call, range(args.requests)))
        elapsed_s = time.perf_counter() - started
    finally:
        engine.dispose()
        if server is not None:
            server.remove()

    latencies_ms.sort()
    p99 = latencies_ms[int(0.99 * (len(latencies_ms) - 1))]
    print(f"threads={args.threads} requests={args.requests} rpm={args.rpm}")
    print(f"admitted={admitted} (limit {args.rpm}) in {elapsed_s:.2f} s")
    print(f"calls/s={args.requests / elapsed_s:.0f}")
    print(f"latency ms: median={statistics.median(latencies_ms):.2f} p99={p99:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
