"""The state file a running supervisor keeps, which ``shard down`` and ``shard status`` read.

``<runtime dir>/state.json`` holds the supervisor's pid, the group's state
(starting, running, restarting, failed, stopped) and the pids of the
processes it started. It is replaced atomically on each change.
"""

import contextlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

STATE_FILE = "state.json"


@dataclass
class WorkerState:
    address: str
    started_here: bool
    pid: int | None = None
    memory_bytes: int | None = None
    layers: int | None = None


@dataclass
class GroupState:
    group: str
    supervisor_pid: int
    state: str = "starting"
    url: str = ""
    coordinator_pid: int | None = None
    workers: list[WorkerState] = field(default_factory=list)
    restarts: int = 0
    last_error: str | None = None
    updated_at: float = 0.0

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.updated_at = time.time()
        temporary = folder / f".{STATE_FILE}.{os.getpid()}"
        temporary.write_text(json.dumps(asdict(self), indent=2), encoding="utf-8")
        temporary.replace(folder / STATE_FILE)


def load_state(folder: Path) -> GroupState | None:
    """Return the saved state, or None when there is none or it cannot be read."""
    try:
        data = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
        workers = [WorkerState(**entry) for entry in data.pop("workers", [])]
        return GroupState(**data, workers=workers)
    except (OSError, ValueError, TypeError):
        return None


def process_alive(pid: int | None, name_part: str) -> bool:
    """Return True when ``pid`` runs and its command line contains ``name_part``.

    The command-line check keeps a recycled pid from being taken for the
    process the state file recorded.
    """
    if not pid:
        return False
    try:
        command_line = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return False
    except OSError:
        # Without /proc (not Linux) only the pid can be checked.
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True
    with contextlib.suppress(OSError):
        status = Path(f"/proc/{pid}/stat").read_text()
        if status.rsplit(")", 1)[-1].split()[0] == "Z":
            return False  # exited, waiting for its parent to reap it
    return name_part.encode() in command_line
