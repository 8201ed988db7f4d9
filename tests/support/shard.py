"""Shard group test helpers: configs on free loopback ports, ``sollol shard up`` as a process."""

import contextlib
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from sollol.shard.state import load_state

GROUP_START_TIMEOUT_S = 30.0


def free_port() -> int:
    """Return a port that was free on 127.0.0.1 a moment ago (for processes that need one fixed)."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def group_table(
    *,
    name: str,
    model: Path,
    runtime_dir: Path,
    workers: list[dict],
    served_model: str = "tiny-shard",
    restart_initial_s: float = 0.2,
    extra: str = "",
) -> str:
    """Return a ``[[shard_groups]]`` table; each worker dict has ``address`` and optional keys."""
    lines = [
        "[[shard_groups]]",
        f'name = "{name}"',
        f'model = "{model}"',
        f'served_model = "{served_model}"',
        f"port = {free_port()}",
        "context_size = 1024",
        "parallel = 2",
        "threads = 1",
        f'runtime_dir = "{runtime_dir}"',
        f"restart_initial_s = {restart_initial_s}",
        f"restart_max_s = {max(restart_initial_s, 1.0)}",
        "start_timeout_s = 30",
        extra,
        "",
    ]
    for worker in workers:
        lines.append("[[shard_groups.workers]]")
        for key, value in {"threads": 1, **worker}.items():
            text = f'"{value}"' if isinstance(value, str) else str(value).lower()
            lines.append(f"{key} = {text}")
        lines.append("")
    return "\n".join(lines)


def local_workers(count: int) -> list[dict]:
    return [{"address": f"127.0.0.1:{free_port()}"} for _ in range(count)]


class ShardUp:
    """``python -m sollol shard up NAME`` in a subprocess, its console lines collected."""

    def __init__(self, config_path: Path, name: str) -> None:
        self.config_path = config_path
        self.name = name
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "sollol", "shard", "up", name, "--config", str(config_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            self._queue.put(raw.decode(errors="replace").rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, text: str, timeout_s: float = GROUP_START_TIMEOUT_S) -> str:
        """Return the next console line containing ``text``; fail on exit or timeout."""
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"no line with {text!r} within {timeout_s} s; output:\n{self.output}")
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                pytest.fail(f"shard up exited before printing {text!r}; output:\n{self.output}")
            self.lines.append(line)
            if text in line:
                return line

    def wait_exit(self, timeout_s: float = GROUP_START_TIMEOUT_S) -> int:
        code = self.process.wait(timeout_s)
        while True:
            line = self._queue.get(timeout=5)
            if line is None:
                return code
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def worker_pids(self, runtime_dir: Path) -> list[int]:
        state = load_state(runtime_dir)
        assert state is not None, f"no state file in {runtime_dir}"
        return [worker.pid for worker in state.workers if worker.pid]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
