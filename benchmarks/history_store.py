"""Measure history rows written per second, and the event-loop stall meanwhile.

Usage: python benchmarks/history_store.py [--rows 200000] [--backend sqlite|postgresql|both]
    [--postgresql-url postgresql+psycopg://...]

An asyncio loop (uvloop when installed, as ``sollol serve`` runs) records
rows through ``HistoryWriter.record`` as fast as the writer takes them: it
pauses while more than ``--max-buffered-rows`` rows wait, so nothing is
dropped. Rows/s is the row count over the time from the first record to the
last row written. Meanwhile a task sleeps 1 ms at a time, and the longest
delay past each wake-up is the loop's stall.

Two switches try interpreter settings that bound the stall; ``sollol serve``
applies neither. ``--gc-freeze`` moves every object alive after start-up out
of the garbage collector's reach (``gc.freeze``). ``--switch-interval-ms``
sets how long a thread may hold the GIL while another waits
(``sys.setswitchinterval``, 5 ms by default).

Without ``--postgresql-url``, PostgreSQL runs as a throwaway cluster with
its default durability settings (fsync on, synchronous_commit on), started
like the test suite's (from tests/support/postgres.py).
"""

import argparse
import asyncio
import gc
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from sollol.history import HistoryWriter, RequestRecord, create_history_engine
from sollol.server import run

REPO_ROOT = Path(__file__).resolve().parent.parent
TICK_S = 0.001
ROWS_PER_STEP = 50


def sample_rows(count: int) -> list[RequestRecord]:
    """Build rows with every stored field set, as a served chat request fills them."""
    return [
        RequestRecord(
            started_at=time.time(),
            route="/v1/chat/completions",
            model="tiny",
            stream=index % 2 == 0,
            node=f"node-{index % 4}",
            status=200,
            outcome="ok",
            attempts=1,
            prompt_tokens=100 + index,
            completion_tokens=64,
            ttft_ms=35.5,
            latency_ms=420.0,
            policy="sollol",
            priority=5,
            scores='{"node-0": 1.5, "node-1": 2.25}',
            queue_ms=0.0,
            decode_tps=48.0,
            est_prompt_tokens=98.0,
            max_tokens=128.0,
            node_in_flight=index % 3,
            node_queue_depth=0.0,
            node_slots=4,
            model_loaded=True,
            node_ttft_ms_avg=40.0,
            node_decode_tps_avg=50.0,
        )
        for index in range(count)
    ]


class StallMonitor:
    """Sleeps ``TICK_S`` at a time and keeps how late each wake-up came."""

    def __init__(self) -> None:
        self.stalls_s: list[float] = []
        self._running = True

    async def run(self) -> None:
        # perf_counter, not loop.time(): uvloop's clock counts whole milliseconds.
        while self._running:
            began_s = time.perf_counter()
            await asyncio.sleep(TICK_S)
            self.stalls_s.append(time.perf_counter() - began_s - TICK_S)

    def stop(self) -> None:
        self._running = False

    def describe(self) -> str:
        stalls_ms = sorted(stall_s * 1000 for stall_s in self.stalls_s)
        p99_ms = stalls_ms[int(len(stalls_ms) * 0.99)]
        over_5ms = sum(stall_ms > 5 for stall_ms in stalls_ms)
        return (
            f"max stall {stalls_ms[-1]:6.2f} ms  p99 {p99_ms:5.2f} ms  "
            f"wake-ups > 5 ms late: {over_5ms} of {len(stalls_ms)}"
        )


async def watch_idle_loop(duration_s: float) -> StallMonitor:
    """Measure the stalls of a loop that does nothing else: the machine's own noise."""
    monitor = StallMonitor()
    task = asyncio.create_task(monitor.run())
    await asyncio.sleep(duration_s)
    monitor.stop()
    await task
    return monitor


async def record_rows(writer: HistoryWriter, rows: list[RequestRecord], total: int, high: int):
    """Record ``total`` rows, pausing while more than ``high`` wait; return the seconds taken."""
    monitor = StallMonitor()
    monitor_task = asyncio.create_task(monitor.run())
    began = time.perf_counter()
    recorded = 0
    while recorded < total:
        if writer.buffered_rows >= high:
            await asyncio.sleep(TICK_S)
            continue
        for _ in range(min(ROWS_PER_STEP, total - recorded)):
            writer.record(rows[recorded % len(rows)])
            recorded += 1
        await asyncio.sleep(0)
    while writer.written_rows + writer.dropped_rows < total:
        await asyncio.sleep(0.01)
    elapsed_s = time.perf_counter() - began
    monitor.stop()
    await monitor_task
    return elapsed_s, monitor


def measure(label: str, url: str, args: argparse.Namespace) -> None:
    engine = create_history_engine(url)
    writer = HistoryWriter(engine)
    writer.start()
    rows = sample_rows(1000)
    if args.gc_freeze:
        gc.collect()
        gc.freeze()
    result: dict = {}

    async def main() -> None:
        result["elapsed_s"], result["monitor"] = await record_rows(
            writer, rows, args.rows, args.max_buffered_rows
        )

    try:
        run(main)
    finally:
        writer.close()
        engine.dispose()
    print(
        f"{label:<11} {args.rows:>8} rows  {args.rows / result['elapsed_s']:>9,.0f} rows/s  "
        f"{result['monitor'].describe()}  dropped {writer.dropped_rows}"
    )


def start_postgresql():  # type: ignore[no-untyped-def]
    sys.path.insert(0, str(REPO_ROOT))
    from tests.support.postgres import start_postgres_server

    server = start_postgres_server(durable=True)
    return server, server.create_database("history_benchmark")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000, help="rows to record per backend")
    parser.add_argument("--backend", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument("--postgresql-url", help="an empty PostgreSQL database to write to")
    parser.add_argument(
        "--max-buffered-rows",
        type=int,
        default=20_000,
        help="rows waiting in the buffer above which the producer pauses",
    )
    parser.add_argument(
        "--idle-s", type=float, default=5.0, help="seconds to watch an idle loop first"
    )
    parser.add_argument(
        "--gc-freeze", action="store_true", help="call gc.freeze() once the engines are open"
    )
    parser.add_argument(
        "--switch-interval-ms", type=float, help="set sys.setswitchinterval (default 5 ms)"
    )
    args = parser.parse_args()
    if args.switch_interval_ms:
        sys.setswitchinterval(args.switch_interval_ms / 1000)
    print(
        f"python {platform.python_version()} on {platform.machine()}, "
        f"{os.cpu_count()} CPUs, GIL switch interval {sys.getswitchinterval() * 1000:.0f} ms, "
        f"gc.freeze {'on' if args.gc_freeze else 'off'}, load average "
        + " ".join(f"{load:.2f}" for load in os.getloadavg())
    )

    idle: dict = {}

    async def watch() -> None:
        idle["monitor"] = await watch_idle_loop(args.idle_s)

    run(watch)
    print(f"{'idle loop':<11} {'':>8}       {'':>9}         {idle['monitor'].describe()}")
    if args.backend in ("sqlite", "both"):
        with tempfile.TemporaryDirectory() as folder:
            measure("sqlite", f"sqlite:///{Path(folder) / 'history.db'}", args)
    if args.backend in ("postgresql", "both"):
        if args.postgresql_url:
            measure("postgresql", args.postgresql_url, args)
        else:
            server, url = start_postgresql()
            try:
                measure("postgresql", url, args)
            finally:
                server.remove()


if __name__ == "__main__":
    main()
