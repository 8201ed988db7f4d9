"""``[[shard_groups]]`` tables: one model spread over llama.cpp RPC workers.

Example::

    [[shard_groups]]
    name = "big"
    model = "models/big.gguf"        # relative paths start at the config file's folder
    served_model = "big"             # the model name clients request
    port = 8090                      # the coordinator llama-server's port
    context_size = 4096
    parallel = 2

    [[shard_groups.workers]]
    address = "127.0.0.1:50052"      # started by `sollol shard up`

    [[shard_groups.workers]]
    address = "10.0.0.2:50052"       # not loopback: started by its own machine
    memory_bytes = 8_000_000_000

To the router a group is one llama.cpp node named after the group, at the
coordinator's URL, serving ``served_model``.
"""

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import ConfigError, NodeConfig, NodeKind

# Routing cost of a group relative to a single node. A group pays a network
# hop between workers for every token, so the router picks it for a model that
# a single node also serves only when it predicts the group this much faster.
DEFAULT_GROUP_COST_WEIGHT = 1.5

_GROUP_KEYS = {
    "name",
    "model",
    "served_model",
    "host",
    "port",
    "context_size",
    "parallel",
    "threads",
    "workers",
    "tensor_split",
    "cost_weight",
    "runtime_dir",
    "start_timeout_s",
    "restart_initial_s",
    "restart_max_s",
    "max_restarts",
}
_WORKER_KEYS = {"address", "memory_bytes", "start", "threads"}


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    host: str
    port: int
    # Memory for the model's layers; None means: use what the worker reports.
    memory_bytes: int | None = None
    # Whether `sollol shard up` starts this worker itself (default: loopback hosts only).
    start: bool = True
    threads: int | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def loopback(self) -> bool:
        return _is_loopback(self.host)


@dataclass(frozen=True, slots=True)
class ShardGroupConfig:
    name: str
    model_path: Path
    served_model: str
    port: int
    workers: tuple[WorkerConfig, ...]
    host: str = "127.0.0.1"
    context_size: int = 4096
    parallel: int = 1
    threads: int | None = None
    tensor_split: tuple[float, ...] | None = None
    cost_weight: float = DEFAULT_GROUP_COST_WEIGHT
    runtime_dir: Path | None = None
    start_timeout_s: float = 120.0
    restart_initial_s: float = 1.0
    restart_max_s: float = 30.0
    # Failed starts in a row before the supervisor gives up.
    max_restarts: int = 10

    @property
    def url(self) -> str:
        host = self.host
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1"  # a wildcard bind is reached through loopback
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    def state_dir(self) -> Path:
        """Return the folder of the group's state file and process logs."""
        return self.runtime_dir or Path("sollol-shard") / self.name

    def as_node(self) -> NodeConfig:
        return NodeConfig(
            url=self.url,
            kind=NodeKind.LLAMACPP,
            name=self.name,
            models=(self.served_model,),
            cost_weight=self.cost_weight,
        )


def parse_shard_groups(tables: Any, *, source: str, base_dir: Path) -> list[ShardGroupConfig]:
    if not isinstance(tables, list):
        raise ConfigError(f"{source}: shard_groups must be an array of tables ([[shard_groups]])")
    groups = [
        _parse_group(table, where=f"{source} [[shard_groups]] #{position + 1}", base_dir=base_dir)
        for position, table in enumerate(tables)
    ]
    names = [group.name for group in groups]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ConfigError(f"{source}: shard group names must be unique; repeated: {repeated}")
    return groups


def _parse_group(table: Any, *, where: str, base_dir: Path) -> ShardGroupConfig:
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: must be a table")
    unknown = sorted(set(table) - _GROUP_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown keys: {', '.join(unknown)}")
    for key in ("name", "model", "port", "workers"):
        if key not in table:
            raise ConfigError(f"{where}: missing {key}")
    name = _text(table, "name", where)
    where = f"{where} ({name})"
    model_path = Path(_text(table, "model", where))
    if not model_path.is_absolute():
        model_path = base_dir / model_path

    workers_table = table["workers"]
    if not isinstance(workers_table, list) or not workers_table:
        raise ConfigError(f"{where}: workers must be a non-empty array of tables")
    workers = tuple(
        _parse_worker(entry, where=f"{where} workers #{position + 1}")
        for position, entry in enumerate(workers_table)
    )
    addresses = [worker.address for worker in workers]
    if len(set(addresses)) != len(addresses):
        raise ConfigError(f"{where}: worker addresses must be unique, got {addresses}")

    tensor_split = None
    if "tensor_split" in table:
        tensor_split = _tensor_split(table["tensor_split"], len(workers), where)
    runtime_dir = None
    if "runtime_dir" in table:
        runtime_dir = Path(_text(table, "runtime_dir", where))
        if not runtime_dir.is_absolute():
            runtime_dir = base_dir / runtime_dir

    return ShardGroupConfig(
        name=name,
        model_path=model_path,
        served_model=_text(table, "served_model", where) if "served_model" in table else name,
        host=_text(table, "host", where) if "host" in table else "127.0.0.1",
        port=_port(table["port"], f"{where}: port"),
        workers=workers,
        context_size=_positive_int(table, "context_size", 4096, where),
        parallel=_positive_int(table, "parallel", 1, where),
        threads=_positive_int(table, "threads", None, where),
        tensor_split=tensor_split,
        cost_weight=_positive_number(table, "cost_weight", DEFAULT_GROUP_COST_WEIGHT, where),
        runtime_dir=runtime_dir,
        start_timeout_s=_positive_number(table, "start_timeout_s", 120.0, where),
        restart_initial_s=_positive_number(table, "restart_initial_s", 1.0, where),
        restart_max_s=_positive_number(table, "restart_max_s", 30.0, where),
        max_restarts=_positive_int(table, "max_restarts", 10, where),
    )


def _parse_worker(entry: Any, *, where: str) -> WorkerConfig:
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: must be a table with an address")
    unknown = sorted(set(entry) - _WORKER_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown keys: {', '.join(unknown)}")
    if "address" not in entry:
        raise ConfigError(f"{where}: missing address (HOST:PORT)")
    address = _text(entry, "address", where)
    host, _, port_text = address.rpartition(":")
    host = host.strip("[]")
    if not host or not port_text.isdigit():
        raise ConfigError(f"{where}: address {address!r} is invalid: expected HOST:PORT")
    port = _port(int(port_text), f"{where}: address {address!r}")
    if port == 0:
        raise ConfigError(f"{where}: address {address!r} needs a port from 1 to 65535")
    start = entry.get("start", _is_loopback(host))
    if not isinstance(start, bool):
        raise ConfigError(f"{where}: start must be true or false")
    return WorkerConfig(
        host=host,
        port=port,
        memory_bytes=_positive_int(entry, "memory_bytes", None, where),
        start=start,
        threads=_positive_int(entry, "threads", None, where),
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _text(table: dict, key: str, where: str) -> str:
    value = table[key]
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}: {key} must be a non-empty string")
    return value.strip()


def _port(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= 65535:
        raise ConfigError(f"{where} must be an integer from 1 to 65535, got {value!r}")
    return value


def _positive_int(table: dict, key: str, default: int | None, where: str) -> Any:
    value = table.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{where}: {key} must be a positive integer, got {value!r}")
    return value


def _positive_number(table: dict, key: str, default: float, where: str) -> float:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigError(f"{where}: {key} must be a positive number, got {value!r}")
    return float(value)


def _tensor_split(value: Any, worker_count: int, where: str) -> tuple[float, ...]:
    if not isinstance(value, list) or len(value) != worker_count:
        raise ConfigError(
            f"{where}: tensor_split must be a list of {worker_count} numbers, one per worker"
        )
    if any(isinstance(item, bool) or not isinstance(item, int | float) for item in value):
        raise ConfigError(f"{where}: tensor_split must hold numbers, got {value!r}")
    if any(item < 0 for item in value) or not sum(value) > 0:
        raise ConfigError(
            f"{where}: tensor_split values must not be negative and must not all be 0"
        )
    return tuple(float(item) for item in value)
