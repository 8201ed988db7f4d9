"""Measure what SOLLOL adds over calling a node directly, beside a bare pass-through proxy.

Usage:
    python benchmarks/router_overhead.py [--requests 2000] [--llama-requests 300]

Everything runs on 127.0.0.1 in one go, each server in its own process:
- an instant OpenAI-shaped backend (benchmarks/instant_backend.py),
- the bare Starlette + Hypercorn pass-through (benchmarks/passthrough.py) with
  an aiohttp and with an httpx upstream client,
- ``sollol serve`` with routing and the SQLite history on,
- a real llama-server on the generated tiny model (8 tokens per reply).
A closed loop of N requests per case (this process, aiohttp, uvloop) runs at
concurrency 1 and 16, non-streaming and streaming, and prints Markdown tables.
All processes share the machine's cores with the load generator.
"""

import argparse
import asyncio
import contextlib
import itertools
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import numpy as np
import orjson
import uvloop

from sollol.llamacpp import LlamaServer, find_bin_dir
from sollol.tinymodel import write_tiny_model

HERE = Path(__file__).resolve().parent
CONCURRENCIES = (1, 16)
TIME_LIMIT_S = 120.0  # per case, so a stuck server cannot hold the run


@dataclass
class Result:
    requests: int
    errors: int
    wall_s: float
    latency_ms: np.ndarray
    ttft_ms: np.ndarray

    @property
    def throughput(self) -> float:
        return self.requests / self.wall_s

    def p(self, values: np.ndarray, q: float) -> float:
        return float(np.percentile(values, q)) if len(values) else float("nan")


def start_server(command: list[str], log_path: Path) -> tuple[subprocess.Popen, str]:
    """Start a process that prints 'listening on URL' first; return it and the URL."""
    log = open(log_path, "wb")  # noqa: SIM115
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL
    )
    log.close()
    line = process.stdout.readline().decode()
    if "listening on" not in line:
        process.kill()
        raise RuntimeError(f"{command[:3]} did not start: {line!r}; see {log_path}")
    return process, line.split("listening on ")[1].split()[0]


async def wait_ready(url: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(url) as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.05)
    raise RuntimeError(f"{url} not ready after {timeout_s} s")


async def run_load(
    url: str, body: bytes, *, concurrency: int, total: int, stream: bool, fresh_connections: bool
) -> Result:
    latencies: list[float] = []
    ttfts: list[float] = []
    errors = 0
    tickets = itertools.count()
    deadline = time.monotonic() + TIME_LIMIT_S
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=fresh_connections)
    headers = {"Content-Type": "application/json"}

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal errors
        while next(tickets) < total and time.monotonic() < deadline:
            started = time.perf_counter()
            first = None
            try:
                async with session.post(url, data=body, headers=headers) as response:
                    if stream:
                        async for _ in response.content.iter_any():
                            if first is None:
                                first = time.perf_counter()
                    else:
                        await response.read()
                    ok = response.status == 200
            except aiohttp.ClientError:
                ok = False
            finished = time.perf_counter()
            if not ok:
                errors += 1
                continue
            latencies.append((finished - started) * 1000)
            if first is not None:
                ttfts.append((first - started) * 1000)

    async with aiohttp.ClientSession(connector=connector) as session:
        began = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        wall = time.perf_counter() - began
    return Result(len(latencies), errors, wall, np.array(latencies), np.array(ttfts))


def chat_body(model: str, *, stream: bool, max_tokens: int | None = None) -> bytes:
    body: dict = {"model": model, "messages": [{"role": "user", "content": "Hello there"}]}
    if stream:
        body["stream"] = True
    if max_tokens:
        body.update(max_tokens=max_tokens, ignore_eos=True, temperature=0)
    return orjson.dumps(body)


async def measure(
    targets: dict[str, str], model: str, total: int, max_tokens: int | None
) -> list[str]:
    rows = []
    for stream in (False, True):
        body = chat_body(model, stream=stream, max_tokens=max_tokens)
        for concurrency in CONCURRENCIES:
            for name, base in targets.items():
                url = base + "/v1/chat/completions"
                # llama-server closes the connection after each streamed reply,
                # so a client calling it directly must reconnect every time.
                options = {
                    "concurrency": concurrency,
                    "stream": stream,
                    "fresh_connections": stream and name == "direct" and model == "tiny",
                }
                await run_load(url, body, total=min(200, total), **options)
                result = await run_load(url, body, total=total, **options)
                ttft = f"{result.p(result.ttft_ms, 50):.2f}" if stream else "-"
                rows.append(
                    f"| {'stream' if stream else 'plain'} | {concurrency} | {name} "
                    f"| {result.throughput:,.0f} | {result.p(result.latency_ms, 50):.2f} "
                    f"| {result.p(result.latency_ms, 99):.2f} | {ttft} | {result.errors} |"
                )
                print(rows[-1], flush=True)
    return rows


@contextlib.contextmanager
def processes() -> Iterator[list[subprocess.Popen]]:
    started: list[subprocess.Popen] = []
    try:
        yield started
    finally:
        for process in started:
            process.terminate()
        for process in started:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()


def start_proxies(upstream: str, node_kind: str, workdir: Path, started: list) -> dict[str, str]:
    targets = {"direct": upstream}
    for client in ("aiohttp", "httpx"):
        process, url = start_server(
            [sys.executable, str(HERE / "passthrough.py"), upstream, "--client", client],
            workdir / f"passthrough-{client}-{node_kind}.log",
        )
        started.append(process)
        targets[f"pass-through ({client})"] = url
    process, url = start_server(
        [
            sys.executable, "-m", "sollol", "serve", "--port", "0",
            "--node", f"{node_kind}={upstream}",
            "--database-url", f"sqlite:///{workdir / f'history-{node_kind}.db'}",
        ],
        workdir / f"sollol-{node_kind}.log",
    )  # fmt: skip
    started.append(process)
    targets["sollol"] = url
    return targets


HEADER = [
    "| mode | concurrency | target | req/s | p50 ms | p99 ms | TTFT p50 ms | errors |",
    "|---|---|---|---|---|---|---|---|",
]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--requests", type=int, default=2000, help="requests per case, instant backend"
    )
    parser.add_argument(
        "--llama-requests", type=int, default=300, help="requests per case, llama-server"
    )
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="sollol-bench-"))
    machine = platform.processor() or platform.machine()
    print(f"# {machine}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print(f"# logs in {workdir}\n")

    with processes() as started:
        backend, backend_url = start_server(
            [sys.executable, str(HERE / "instant_backend.py")], workdir / "backend.log"
        )
        started.append(backend)
        targets = start_proxies(backend_url, "openai", workdir, started)
        await wait_ready(targets["sollol"] + "/health")
        print("## Instant backend\n")
        print("\n".join(HEADER), flush=True)
        await measure(targets, "bench", args.requests, None)

    with processes() as started:
        model = write_tiny_model(workdir / "tiny.gguf")
        node = LlamaServer(model, log_path=workdir / "llama-server.log", parallel=2, threads=1)
        node.start(find_bin_dir())
        started.append(node.process)
        node.wait_healthy()
        targets = start_proxies(node.url, "llamacpp", workdir, started)
        await wait_ready(targets["sollol"] + "/health")
        print("\n## llama-server, tiny model, 8 tokens per reply\n")
        print("\n".join(HEADER), flush=True)
        await measure(targets, "tiny", args.llama_requests, 8)


if __name__ == "__main__":
    uvloop.run(main())
