"""Shared fixtures: the tiny model, real llama-server nodes and a router process.

Every server listens on 127.0.0.1 on a port chosen at run time. Tests that
need llama.cpp fail, never skip, when its binaries are missing.
"""

import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from sollol.llamacpp import LlamaCppNotFoundError, LlamaServer, find_bin_dir
from sollol.tinymodel import write_tiny_model

ROUTER_START_TIMEOUT_S = 30.0


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("model") / "tiny.gguf")


@pytest.fixture(scope="session")
def llama_bin_dir() -> Path:
    try:
        return find_bin_dir()
    except LlamaCppNotFoundError as exc:
        pytest.fail(f"these tests need llama.cpp: {exc}")


def start_llama_server(
    bin_dir: Path, model: Path, log_dir: Path, name: str, **options
) -> LlamaServer:
    server = LlamaServer(model, log_path=log_dir / f"{name}.log", **options)
    server.start(bin_dir)
    try:
        server.wait_healthy(timeout_s=60)
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture(scope="session")
def llama_nodes(
    llama_bin_dir: Path, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[LlamaServer]]:
    """Two llama-server nodes on the tiny model; the second also serves embeddings."""
    log_dir = tmp_path_factory.mktemp("llama-logs")
    servers = []
    try:
        servers.append(start_llama_server(llama_bin_dir, tiny_model, log_dir, "node-a"))
        servers.append(
            start_llama_server(llama_bin_dir, tiny_model, log_dir, "node-b", embeddings=True)
        )
        yield servers
    finally:
        for server in servers:
            server.stop()


class RouterProcess:
    """``python -m sollol serve`` in a subprocess, the way a user starts it."""

    def __init__(self, config_path: Path, log_path: Path) -> None:
        self.config_path = config_path
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self.base_url = ""

    def start(self) -> "RouterProcess":
        command = [sys.executable, "-m", "sollol", "serve", "--config", str(self.config_path)]
        with open(self.log_path, "wb") as log_file:
            self.process = subprocess.Popen(
                command,
                stdout=subprocess.PIPE,
                stderr=log_file,
                stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        assert self.process.stdout is not None
        line = self.process.stdout.readline().decode()
        if "listening on" not in line:
            self.stop()
            pytest.fail(f"router did not start: {line!r}; log:\n{self.log_path.read_text()}")
        self.base_url = line.split("listening on ")[1].split()[0]
        self._wait_healthy()
        return self

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + ROUTER_START_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.base_url + "/health", timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        self.stop()
        pytest.fail(
            f"router not healthy after {ROUTER_START_TIMEOUT_S} s:\n{self.log_path.read_text()}"
        )

    def stop(self) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
        return self.process.returncode


def write_router_config(
    path: Path, *, database_path: Path, nodes: list[dict], server: dict | None = None
) -> Path:
    """Write a router config; ``server`` adds or overrides [server] settings."""
    settings = {
        "host": "127.0.0.1",
        "port": 0,
        "database_url": f"sqlite:///{database_path}",
        "health_interval_s": 1.0,
        # Queue in the router as soon as every slot is busy, so tests can fill it.
        "node_queue_per_slot": 0.0,
        **(server or {}),
    }
    lines = ["[server]"]
    for key, value in settings.items():
        lines.append(f'{key} = "{value}"' if isinstance(value, str) else f"{key} = {value}")
    lines.append("")
    for node in nodes:
        lines += [
            "[[nodes]]",
            f'name = "{node["name"]}"',
            f'kind = "{node.get("kind", "llamacpp")}"',
            f'url = "{node["url"]}"',
        ]
        if "models" in node:
            models = ", ".join(f'"{model}"' for model in node["models"])
            lines.append(f"models = [{models}]")
        if "memory_bytes" in node:
            lines.append(f"memory_bytes = {node['memory_bytes']}")
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def router(
    llama_nodes: list[LlamaServer], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RouterProcess]:
    """The router in front of both llama-server nodes, with a SQLite history."""
    workdir = tmp_path_factory.mktemp("router")
    config = write_router_config(
        workdir / "sollol.toml",
        database_path=workdir / "history.db",
        nodes=[
            {"name": "node-a", "url": llama_nodes[0].url, "models": ["tiny"]},
            {"name": "node-b", "url": llama_nodes[1].url, "models": ["tiny", "tiny-embed"]},
        ],
    )
    process = RouterProcess(config, workdir / "router.log").start()
    process.database_path = workdir / "history.db"  # type: ignore[attr-defined]
    try:
        yield process
    finally:
        process.stop()


def history_rows(database_path: Path, count: int, timeout_s: float = 5.0) -> list[dict]:
    """Wait until the history holds ``count`` rows and return them, oldest first.

    The router writes rows from a background thread in batches, so a test
    waits for them rather than reading once.
    """
    deadline = time.monotonic() + timeout_s
    rows: list[dict] = []
    while time.monotonic() < deadline:
        if database_path.exists():
            with sqlite3.connect(database_path) as connection:
                connection.row_factory = sqlite3.Row
                try:
                    found = connection.execute("SELECT * FROM requests ORDER BY id").fetchall()
                except sqlite3.OperationalError:  # the table is not created yet
                    found = []
            rows = [dict(row) for row in found]
            if len(rows) >= count:
                return rows
        time.sleep(0.05)
    pytest.fail(f"expected {count} history rows within {timeout_s} s, found {len(rows)}: {rows}")
