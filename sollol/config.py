"""Router settings from a TOML file, ``SOLLOL_*`` environment variables and the command line.

Later sources override earlier ones: defaults, then the file, then the
environment, then command-line flags. A minimal file::

    [server]
    port = 8000
    database_url = "sqlite:///sollol-history.db"

    [[nodes]]
    name = "box-1"
    kind = "llamacpp"          # llamacpp | ollama | openai
    url = "http://127.0.0.1:8080"
    models = ["tiny"]          # optional: discovered from the node when left out
"""

import dataclasses
import enum
import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from .routing.layout import ROUTING_POLICIES

if TYPE_CHECKING:
    from .costs import CostTable
    from .shard.config import ShardGroupConfig

DEFAULT_ROUTING_POLICY = "predicted_latency"


class ConfigError(ValueError):
    """An invalid setting; the message names the setting and its source."""


class NodeKind(enum.StrEnum):
    LLAMACPP = "llamacpp"
    OLLAMA = "ollama"
    OPENAI = "openai"


_HOST_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


def validate_node_url(url: str) -> str:
    """Check a node's base URL and return it without a trailing slash.

    Accepted: ``http`` or ``https``, a host name of DNS labels, an IPv4
    address or a bracketed IPv6 address, and an optional port from 1 to 65535.
    Rejected: any other scheme, user or password parts (they would reach the
    logs), a path, a query, a fragment and the unspecified address (0.0.0.0,
    ``[::]``), which names no node. Raises ConfigError naming the URL.
    """
    if not isinstance(url, str) or not url.strip() or len(url) > 2048:
        raise ConfigError(f"node URL {url!r} is invalid: expected http://HOST:PORT")
    if any(ord(char) <= 32 or ord(char) == 127 for char in url):
        raise ConfigError(f"node URL {url!r} contains spaces or control characters")
    stripped = url.rstrip("/")
    try:
        parts = urlsplit(stripped)
    except ValueError:  # urlsplit checks a bracketed host itself
        raise ConfigError(f"node URL {url!r} has an invalid host") from None
    if parts.scheme not in ("http", "https"):
        raise ConfigError(f"node URL {url!r} is invalid: the scheme must be http or https")
    if parts.username is not None or parts.password is not None:
        raise ConfigError(
            f"node URL {_without_userinfo(url)!r} must not carry a user name or password"
        )
    if parts.path or parts.query or parts.fragment or "?" in stripped or "#" in stripped:
        raise ConfigError(
            f"node URL {url!r} must not carry a path, query or fragment; give the server's base URL"
        )
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"node URL {url!r} has an invalid port") from None
    if port == 0:
        raise ConfigError(f"node URL {url!r} has an invalid port: 0")
    _check_host(parts.hostname, parts.netloc, url)
    return stripped


def _check_host(host: str | None, netloc: str, url: str) -> None:
    if not host:
        raise ConfigError(f"node URL {url!r} is invalid: expected http://HOST:PORT")
    if netloc.startswith("["):
        try:
            address: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(f"node URL {url!r} has an invalid IPv6 address") from None
    else:
        try:
            address = ipaddress.IPv4Address(host)
        except ValueError:
            labels = host.removesuffix(".").split(".")
            if len(host) > 253 or not all(_HOST_LABEL.match(label) for label in labels):
                raise ConfigError(f"node URL {url!r} has an invalid host name") from None
            if labels[-1].isdigit():
                # All-numeric last label: a malformed IPv4 address such as 10.0.0.256.
                raise ConfigError(f"node URL {url!r} has an invalid IPv4 address") from None
            return
    if address.is_unspecified:
        raise ConfigError(f"node URL {url!r} names the unspecified address, not a node")


def _without_userinfo(url: str) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return f"{parts.scheme}://***@{host}"


@dataclass(frozen=True, slots=True)
class NodeConfig:
    url: str
    kind: NodeKind = NodeKind.OPENAI
    name: str = ""
    models: tuple[str, ...] = ()
    gpu: bool = False
    # Memory available for models, in bytes; larger models are not sent here.
    memory_bytes: int | None = None
    # Relative cost of sending work to this node (energy, price); 1 is neutral.
    cost_weight: float = 1.0
    # Where the node came from: config, env, flag, api or discovered.
    source: str = "config"

    def __post_init__(self) -> None:
        url = validate_node_url(self.url)
        object.__setattr__(self, "url", url)
        if not self.name:
            object.__setattr__(self, "name", urlsplit(url).netloc)


@dataclass(frozen=True, slots=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8000
    database_url: str = "sqlite:///sollol-history.db"
    max_body_bytes: int = 16 * 1024 * 1024
    # Larger request heads (request line and headers) get 431. The default is Hypercorn's.
    max_header_bytes: int = 16 * 1024
    health_interval_s: float = 5.0
    connect_timeout_s: float = 5.0
    # Wait for a node's first token (for a non-streamed reply: the whole
    # reply). A long prompt's prefill on a CPU node can take minutes.
    first_token_timeout_s: float = 300.0
    # Maximum silence between two reads once a stream has started.
    idle_timeout_s: float = 60.0
    total_timeout_s: float = 1800.0
    # A stream waiting this long for its node gets an SSE comment line, so
    # clients and proxies in between keep the connection open.
    keepalive_interval_s: float = 10.0
    max_attempts: int = 2
    # Health: failed probes in a row that take a node out, and good ones that
    # bring it back. Then failed requests in a row that open its breaker, and
    # how long it stays open before one trial request (doubled per failed trial).
    evict_after_failures: int = 3
    recover_after_successes: int = 2
    breaker_failures: int = 3
    breaker_open_s: float = 2.0
    breaker_max_open_s: float = 60.0
    retry_after_s: int = 2
    max_upstream_connections: int = 256
    # round_robin | least_loaded | sollol_heuristic | predicted_latency | learned
    routing_policy: str = DEFAULT_ROUTING_POLICY
    # The artifact `sollol train` writes; the router loads it at start, when
    # the file changes (checked every model_reload_interval_s) and on
    # POST /sollol/policy/reload. Empty: no learned model.
    learned_model_path: str = "sollol-model.json"
    model_reload_interval_s: float = 5.0
    # Share of the learned policy's decisions sent to a random other node, so
    # the history keeps measuring every node. Recorded as "learned:explore".
    explore_share: float = 0.02
    # Requests wait in a per-model queue while every node serving the model
    # has all its slots in use.
    max_queued_per_model: int = 256
    queue_aging_s: float = 10.0  # waiting this long raises a request's priority by 1
    queue_timeout_s: float = 120.0
    # Requests per slot a node may hold waiting in its own queue before the
    # router starts queueing; keeps each node busy between requests.
    node_queue_per_slot: float = 1.0
    # How often the dashboard's open pages get a new state (at most once per interval).
    dashboard_interval_s: float = 1.0
    # Authentication: "auto" turns it on once any API key exists in the
    # history database (revoked keys count), "required" turns it on always.
    auth: str = "auto"
    # How often a running router reads the api_keys table again, so new and
    # revoked keys take effect within this many seconds.
    keys_refresh_interval_s: float = 2.0
    # How often a running router reads the nodes table again, so nodes added,
    # drained or removed through another router take effect within this time.
    membership_refresh_interval_s: float = 2.0
    # TLS: PEM certificate chain and private key; both empty serves plain HTTP.
    certfile: str = ""
    keyfile: str = ""
    # Prices of tokens per node or model ([costs] in the config file); None: no prices.
    costs: "CostTable | None" = None
    nodes: tuple[NodeConfig, ...] = field(default_factory=tuple)
    # llama.cpp RPC shard groups; each also appears in ``nodes`` as one llamacpp node.
    shard_groups: tuple["ShardGroupConfig", ...] = field(default_factory=tuple)


_SERVER_KEYS = {
    f.name: f.type
    for f in dataclasses.fields(Settings)
    if f.name not in ("nodes", "shard_groups", "costs")
}
AUTH_MODES = ("auto", "required")


OLLAMA_DEFAULT_PORT = 11434


# Tables allowed at the top level of a config file.
_TOP_LEVEL_TABLES = frozenset({"server", "nodes", "shard_groups", "costs"})


def parse_node_spec(spec: str, *, source: str = "flag") -> NodeConfig:
    """Parse a ``--node`` value: ``URL`` or ``KIND=URL``, e.g. ``llamacpp=http://127.0.0.1:8080``.

    An ``ollama=`` URL may take Ollama's own host form, ``HOST[:PORT]`` with
    no scheme and port 11434 by default, as in ``ollama=127.0.0.1``.
    """
    kind = NodeKind.OPENAI
    url = spec.strip()
    if "=" in url and not url.startswith(("http://", "https://")):
        kind_text, url = url.split("=", 1)
        kind = _parse_kind(kind_text, source=f"--node {spec!r}")
    if kind is NodeKind.OLLAMA:
        url = ollama_host_url(url)
    return NodeConfig(url=url, kind=kind, source=source)


def ollama_host_url(host: str) -> str:
    """Turn an ``OLLAMA_HOST`` value (``HOST``, ``HOST:PORT`` or a URL) into a node URL.

    Ollama's clients read a missing scheme as http and a missing port as
    11434. A server address of 0.0.0.0 (listen on every interface) names
    this machine when used as a client address, so it becomes 127.0.0.1.
    """
    text = host.strip()
    if not text.startswith(("http://", "https://")):
        text = "http://" + text
    parts = urlsplit(text.rstrip("/"))
    netloc = parts.netloc
    try:
        port = parts.port
    except ValueError:
        port = None  # validate_node_url reports the bad port with the whole URL
    if parts.hostname == "0.0.0.0":
        netloc = netloc.replace("0.0.0.0", "127.0.0.1", 1)
    if port is None and ":" not in netloc.rpartition("]")[2]:
        netloc = f"{netloc}:{OLLAMA_DEFAULT_PORT}"
    return f"{parts.scheme}://{netloc}{parts.path}"


def load_settings(
    config_path: str | os.PathLike[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    extra_nodes: Sequence[str] = (),
) -> Settings:
    """Merge defaults, the TOML file, ``SOLLOL_*`` variables and command-line overrides."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    nodes: list[NodeConfig] = []
    shard_groups: list[ShardGroupConfig] = []

    if config_path is not None:
        path = Path(config_path)
        try:
            document = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
        unknown = sorted(set(document) - _TOP_LEVEL_TABLES)
        if unknown:
            raise ConfigError(
                f"config file {path}: unknown tables or keys: {', '.join(unknown)}; "
                f"expected {', '.join(sorted(_TOP_LEVEL_TABLES))}"
            )
        values.update(_server_section(document.get("server", {}), source=str(path)))
        nodes.extend(_node_tables(document.get("nodes", []), source=str(path)))
        if "shard_groups" in document:
            from .shard.config import parse_shard_groups

            shard_groups = parse_shard_groups(
                document["shard_groups"], source=str(path), base_dir=path.parent
            )
            # To the router a group is one llama.cpp node at its coordinator.
            nodes.extend(group.as_node() for group in shard_groups)
        if "costs" in document:
            from .costs import parse_costs

            values["costs"] = parse_costs(document["costs"], source=str(path))

    for key in _SERVER_KEYS:
        env_name = f"SOLLOL_{key.upper()}"
        if env_name in environ:
            values[key] = _coerce(key, environ[env_name], source=env_name)
    if environ.get("SOLLOL_NODES"):
        nodes.extend(
            parse_node_spec(spec, source="env")
            for spec in environ["SOLLOL_NODES"].split(",")
            if spec.strip()
        )
    if environ.get("OLLAMA_HOST"):
        try:
            ollama = NodeConfig(
                url=ollama_host_url(environ["OLLAMA_HOST"]), kind=NodeKind.OLLAMA, source="env"
            )
        except ConfigError as exc:
            raise ConfigError(f"OLLAMA_HOST: {exc}") from exc
        if all(node.url != ollama.url for node in nodes):
            nodes.append(ollama)

    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = _coerce(key, value, source=f"--{key.replace('_', '-')}")
    nodes.extend(parse_node_spec(spec) for spec in extra_nodes)

    policy = values.get("routing_policy", DEFAULT_ROUTING_POLICY)
    if policy not in ROUTING_POLICIES:
        raise ConfigError(
            f"unknown routing_policy {policy!r}; "
            f"expected one of {', '.join(sorted(ROUTING_POLICIES))}"
        )
    if values.get("auth", "auto") not in AUTH_MODES:
        raise ConfigError(
            f"unknown auth mode {values['auth']!r}; expected one of {', '.join(AUTH_MODES)}"
        )
    if bool(values.get("certfile")) != bool(values.get("keyfile")):
        raise ConfigError("TLS needs both certfile and keyfile; one of them is missing")
    if values.get("explore_share", 0.0) > 1.0:
        raise ConfigError(f"explore_share must be from 0 to 1, got {values['explore_share']}")

    names = [node.name for node in nodes]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ConfigError(f"node names must be unique; repeated: {', '.join(duplicates)}")
    return Settings(**values, nodes=tuple(nodes), shard_groups=tuple(shard_groups))


def _server_section(table: Any, *, source: str) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: [server] must be a table")
    unknown = sorted(set(table) - set(_SERVER_KEYS))
    if unknown:
        raise ConfigError(f"{source}: unknown [server] keys: {', '.join(unknown)}")
    return {
        key: _coerce(key, value, source=f"{source} [server] {key}") for key, value in table.items()
    }


def _node_tables(tables: Any, *, source: str) -> list[NodeConfig]:
    if not isinstance(tables, list):
        raise ConfigError(f"{source}: nodes must be an array of tables ([[nodes]])")
    nodes = []
    for position, table in enumerate(tables):
        where = f"{source} [[nodes]] #{position + 1}"
        if not isinstance(table, dict) or "url" not in table:
            raise ConfigError(f"{where}: missing url")
        known_keys = {"url", "kind", "name", "models", "gpu", "memory_bytes", "cost_weight"}
        unknown = sorted(set(table) - known_keys)
        if unknown:
            raise ConfigError(f"{where}: unknown keys: {', '.join(unknown)}")
        models = table.get("models", [])
        if not isinstance(models, list) or not all(isinstance(m, str) and m for m in models):
            raise ConfigError(f"{where}: models must be a list of non-empty strings")
        gpu = table.get("gpu", False)
        if not isinstance(gpu, bool):
            raise ConfigError(f"{where}: gpu must be true or false")
        memory_bytes = table.get("memory_bytes")
        if memory_bytes is not None and (
            isinstance(memory_bytes, bool) or not isinstance(memory_bytes, int) or memory_bytes <= 0
        ):
            raise ConfigError(f"{where}: memory_bytes must be a positive integer")
        cost_weight = table.get("cost_weight", 1.0)
        if isinstance(cost_weight, bool) or not isinstance(cost_weight, int | float):
            raise ConfigError(f"{where}: cost_weight must be a number")
        if not cost_weight > 0:
            raise ConfigError(f"{where}: cost_weight must be positive, got {cost_weight}")
        try:
            nodes.append(
                NodeConfig(
                    url=str(table["url"]),
                    kind=_parse_kind(table.get("kind", "openai")),
                    name=str(table.get("name", "")),
                    models=tuple(models),
                    gpu=gpu,
                    memory_bytes=memory_bytes,
                    cost_weight=float(cost_weight),
                )
            )
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from exc
    return nodes


def _parse_kind(text: Any, *, source: str | None = None) -> NodeKind:
    try:
        return NodeKind(str(text).strip().lower())
    except ValueError:
        choices = ", ".join(kind.value for kind in NodeKind)
        where = f"{source}: " if source else ""
        raise ConfigError(f"{where}unknown node kind {text!r}; expected one of {choices}") from None


def _coerce(key: str, value: Any, *, source: str) -> Any:
    expected = _SERVER_KEYS[key]
    try:
        if expected == "int" or expected is int:
            if isinstance(value, bool):
                raise ValueError
            coerced: Any = int(value)
        elif expected == "float" or expected is float:
            coerced = float(value)
        else:
            coerced = str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: {value!r} is not a valid {key}") from None
    if isinstance(coerced, int | float) and coerced < 0:
        raise ConfigError(f"{source}: {key} must not be negative, got {value!r}")
    if key == "port" and coerced > 65535:
        raise ConfigError(f"{source}: port must be from 0 to 65535, got {value!r}")
    return coerced
