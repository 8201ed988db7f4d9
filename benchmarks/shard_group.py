"""Shard group figures: cold start to first token, and decode speed of a group vs one llama-server.

Usage: python benchmarks/shard_group.py [--runs 3] [--tokens 128] [--embedding 256 --layers 2]

Cold start is measured the way an operator meets it: from launching
``sollol shard up`` (a new Python process) for a group of two local workers
until the first streamed token arrives from the coordinator. Decode speed is
llama-server's own ``timings.predicted_per_second`` for a completion of
``--tokens`` tokens, for the group and for a single llama-server on the same
model file, every process with one thread. Everything listens on 127.0.0.1
on ports picked at run time.
"""

import argparse
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from sollol.llamacpp import LlamaServer, find_bin_dir
from sollol.tinymodel import TinyModelShape, write_tiny_model

PROMPT = "The router sends each request to the node that will serve it fastest."
START_TIMEOUT_S = 120.0


def free_port() -> int:
    with contextlib.closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_config(folder: Path, model: Path) -> tuple[Path, str]:
    """Write a config with one group of two local workers; return it and the coordinator URL."""
    port = free_port()
    lines = [
        "[[shard_groups]]",
        'name = "bench"',
        f'model = "{model}"',
        f"port = {port}",
        "context_size = 1024",
        "threads = 1",
        f'runtime_dir = "{folder / "runtime"}"',
    ]
    for _ in range(2):
        lines += ["[[shard_groups.workers]]", f'address = "127.0.0.1:{free_port()}"', "threads = 1"]
    config = folder / "sollol.toml"
    config.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return config, f"http://127.0.0.1:{port}"


def first_token_s(url: str, launched: float) -> float:
    """Poll until the coordinator streams a first token; return seconds since ``launched``."""
    deadline = launched + START_TIMEOUT_S
    body = {"prompt": PROMPT, "max_tokens": 4, "stream": True, "ignore_eos": True}
    while time.monotonic() < deadline:
        try:
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as reply:
                if reply.status_code == 200:
                    for line in reply.iter_lines():
                        if line.startswith("data: ") and '"text"' in line:
                            return time.monotonic() - launched
        except httpx.TransportError:
            pass
        time.sleep(0.02)
    raise RuntimeError(f"no first token from {url} within {START_TIMEOUT_S} s")


def cold_start(folder: Path, model: Path) -> float:
    config, url = write_config(folder, model)
    launched = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, "-m", "sollol", "shard", "up", "bench", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        return first_token_s(url, launched)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)


def decode_tokens_per_s(url: str, tokens: int, runs: int) -> list[float]:
    speeds = []
    body = {"prompt": PROMPT, "max_tokens": tokens, "ignore_eos": True, "cache_prompt": False}
    for _ in range(runs + 1):
        reply = httpx.post(url + "/v1/completions", json=body, timeout=300).json()
        speeds.append(float(reply["timings"]["predicted_per_second"]))
    return speeds[1:]  # the first request warms up


def group_decode(folder: Path, model: Path, tokens: int, runs: int) -> list[float]:
    config, url = write_config(folder, model)
    launched = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, "-m", "sollol", "shard", "up", "bench", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        first_token_s(url, launched)
        return decode_tokens_per_s(url, tokens, runs)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)


def single_decode(folder: Path, model: Path, tokens: int, runs: int) -> list[float]:
    server = LlamaServer(model, port=free_port(), threads=1, log_path=folder / "single.log")
    server.start(find_bin_dir())
    try:
        server.wait_healthy(timeout_s=START_TIMEOUT_S)
        return decode_tokens_per_s(server.url, tokens, runs)
    finally:
        server.stop()


def summary(values: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), 2),
        "min": round(min(values), 2),
        "max": round(max(values), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="measurements of each figure")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per decode measurement")
    parser.add_argument("--embedding", type=int, default=256, help="model embedding length")
    parser.add_argument("--layers", type=int, default=2, help="model layer count")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="sollol-shard-bench-") as name:
        folder = Path(name)
        shape = TinyModelShape(
            embedding_length=args.embedding,
            feed_forward_length=2 * args.embedding,
            block_count=args.layers,
        )
        model = write_tiny_model(folder / "model.gguf", shape=shape)
        starts = []
        for run in range(args.runs):
            run_folder = folder / f"start-{run}"
            run_folder.mkdir()
            starts.append(cold_start(run_folder, model))
        group_folder = folder / "group"
        group_folder.mkdir()
        results = {
            "model_bytes": model.stat().st_size,
            "layers": args.layers,
            "cold_start_to_first_token_s": summary(starts),
            "group_decode_tokens_per_s": summary(
                group_decode(group_folder, model, args.tokens, args.runs)
            ),
            "single_decode_tokens_per_s": summary(
                single_decode(folder, model, args.tokens, args.runs)
            ),
        }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
