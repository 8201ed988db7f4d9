"""``sollol shard up | down | status``: the command-line side of shard groups."""

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.request import urlopen

from ..config import ConfigError, load_settings
from ..llamacpp import LlamaCppNotFoundError, find_bin_dir
from .config import ShardGroupConfig
from .errors import GroupNotRunningError, ShardError
from .state import load_state, process_alive

DEFAULT_CONFIG = Path("sollol.toml")
DOWN_TIMEOUT_S = 30.0


def load_groups(config_path: Path | None) -> list[ShardGroupConfig]:
    path = config_path or DEFAULT_CONFIG
    if not path.is_file():
        raise ConfigError(f"config file {path} not found; pass --config FILE")
    groups = list(load_settings(path, environ={}).shard_groups)
    if not groups:
        raise ConfigError(f"{path} has no [[shard_groups]] tables")
    return groups


def find_group(groups: list[ShardGroupConfig], name: str) -> ShardGroupConfig:
    for group in groups:
        if group.name == name:
            return group
    names = ", ".join(group.name for group in groups)
    raise ConfigError(f"no shard group named {name!r}; configured: {names}")


def up(name: str, config_path: Path | None) -> int:
    from .supervisor import GroupSupervisor

    group = find_group(load_groups(config_path), name)
    state = load_state(group.state_dir())
    if state is not None and process_alive(state.supervisor_pid, "sollol"):
        print(
            f"sollol shard: group {name} is already running (supervisor pid "
            f"{state.supervisor_pid}); stop it with `sollol shard down {name}`",
            file=sys.stderr,
        )
        return 1
    try:
        bin_dir = find_bin_dir()
    except LlamaCppNotFoundError as exc:
        print(f"sollol shard: {exc}", file=sys.stderr)
        return 1

    stop_event = threading.Event()

    def request_stop(signum: int, frame: object) -> None:
        stop_event.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)

    def console(message: str) -> None:
        print(f"sollol shard {name}: {message}", flush=True)

    supervisor = GroupSupervisor(group, bin_dir=bin_dir, stop_event=stop_event, console=console)
    return supervisor.run()


def down(name: str, config_path: Path | None) -> int:
    group = find_group(load_groups(config_path), name)
    try:
        stopped = stop_group(group)
    except ShardError as exc:
        print(f"sollol shard: {exc}", file=sys.stderr)
        return 1
    print(f"sollol shard: group {name} {stopped}")
    return 0


def stop_group(group: ShardGroupConfig, *, timeout_s: float = DOWN_TIMEOUT_S) -> str:
    """Stop a running group through its supervisor; return what was done.

    When the supervisor is gone but processes it started still run (it was
    killed), those are stopped directly.
    """
    state = load_state(group.state_dir())
    if state is None:
        raise GroupNotRunningError(
            f"group {group.name} is not running: no state file in {group.state_dir()}"
        )
    if process_alive(state.supervisor_pid, "sollol"):
        os.kill(state.supervisor_pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while process_alive(state.supervisor_pid, "sollol"):
            if time.monotonic() > deadline:
                raise ShardError(
                    f"supervisor pid {state.supervisor_pid} of group {group.name} did not "
                    f"stop within {timeout_s:.0f} s"
                )
            time.sleep(0.05)
        return "stopped"
    leftovers = [(state.coordinator_pid, "llama-server")] + [
        (worker.pid, "ggml-rpc-server") for worker in state.workers if worker.started_here
    ]
    killed = 0
    for pid, binary in leftovers:
        if pid and process_alive(pid, binary):
            os.kill(pid, signal.SIGKILL)
            killed += 1
    if killed:
        return f"had no supervisor; killed {killed} leftover process(es)"
    raise GroupNotRunningError(f"group {group.name} is not running (state: {state.state})")


def status(name: str | None, config_path: Path | None) -> int:
    groups = load_groups(config_path)
    if name is not None:
        groups = [find_group(groups, name)]
    for group in groups:
        for line in describe_group(group):
            print(line)
    return 0


def describe_group(group: ShardGroupConfig) -> list[str]:
    """Return status lines: the group's state, its coordinator's health and its workers."""
    state = load_state(group.state_dir())
    running = state is not None and process_alive(state.supervisor_pid, "sollol")
    if state is None:
        summary = "not started"
    elif running:
        summary = (
            f"{state.state} (supervisor pid {state.supervisor_pid}, {state.restarts} restarts)"
        )
    else:
        summary = f"not running (last state: {state.state})"
    lines = [
        f"{group.name}: {summary}; model '{group.served_model}' at {group.url}, "
        f"coordinator {_coordinator_health(group.url)}"
    ]
    if state is not None and state.last_error:
        lines.append(f"  last error: {state.last_error}")
    recorded = {worker.address: worker for worker in state.workers} if state else {}
    for worker in group.workers:
        entry = recorded.get(worker.address)
        where = "local" if worker.start else "remote"
        detail = ""
        if entry is not None and entry.pid:
            alive = process_alive(entry.pid, "ggml-rpc-server")
            detail = f", pid {entry.pid} {'running' if alive else 'exited'}"
        if entry is not None and entry.layers is not None:
            detail += f", {entry.layers} layer(s)"
        lines.append(f"  worker {worker.address} ({where}{detail})")
    return lines


def _coordinator_health(url: str) -> str:
    try:
        with urlopen(url + "/health", timeout=1.0) as response:
            body = json.loads(response.read() or b"{}")
            return "healthy" if body.get("status") == "ok" else f"answered {body}"
    except HTTPError as exc:
        return "loading the model" if exc.code == 503 else f"unhealthy (HTTP {exc.code})"
    except (URLError, OSError, ValueError):
        return "unreachable"
