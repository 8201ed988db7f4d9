"""The ``sollol`` command: serve, demo, make-model, shard, train, evaluate."""

import argparse
import asyncio
import dataclasses
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .config import ConfigError, Settings, load_settings
from .learning.commands import add_learning_parsers
from .membership_commands import add_membership_parsers
from .tenancy_commands import add_tenancy_parsers


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # Alembic lists every plugin it sets up, and httpx every request (the admin
    # commands), at INFO.
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        return int(args.handler(args) or 0)
    except ConfigError as exc:
        # Errors the router returned to an admin command are not about configuration.
        label = getattr(exc, "label", "configuration error")
        print(f"sollol: {label}: {exc}", file=sys.stderr)
        return 2


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sollol",
        description="OpenAI-compatible router in front of Ollama and llama.cpp nodes.",
    )
    parser.add_argument("--version", action="version", version=f"sollol {__version__}")
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the router")
    serve.add_argument("--config", type=Path, help="TOML config file")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument(
        "--port", type=int, help="port to listen on; 0 picks a free one (default 8000)"
    )
    serve.add_argument(
        "--node",
        action="append",
        default=[],
        metavar="[KIND=]URL",
        help="add a node, e.g. llamacpp=http://127.0.0.1:8080; KIND is llamacpp, ollama "
        "or openai (the default); repeat for more nodes",
    )
    serve.add_argument("--database-url", help="SQLAlchemy URL of the request history")
    serve.add_argument("--max-body-bytes", type=int, help="largest request body accepted, in bytes")
    serve.add_argument("--certfile", help="PEM certificate chain; with --keyfile serves HTTPS")
    serve.add_argument("--keyfile", help="PEM private key of --certfile")
    serve.set_defaults(handler=_serve_command)

    demo = commands.add_parser(
        "demo", help="start two llama-server nodes on a generated tiny model and the router"
    )
    demo.add_argument("--host", default="127.0.0.1", help="router address (default 127.0.0.1)")
    demo.add_argument("--port", type=int, default=8000, help="router port; 0 picks a free one")
    demo.add_argument(
        "--workdir",
        type=Path,
        default=Path("sollol-demo"),
        help="folder for the model, node logs and the SQLite history (default ./sollol-demo)",
    )
    demo.set_defaults(handler=_demo_command)

    make_model = commands.add_parser(
        "make-model", help="write the tiny random-weight llama GGUF used by the demo and tests"
    )
    make_model.add_argument("path", type=Path, help="output .gguf file")
    make_model.add_argument("--seed", type=int, default=0, help="random seed of the weights")
    make_model.set_defaults(handler=_make_model_command)
    add_learning_parsers(commands)
    _add_shard_parser(commands)
    add_tenancy_parsers(commands)
    add_membership_parsers(commands)
    return parser


def _add_shard_parser(commands: argparse._SubParsersAction) -> None:
    shard = commands.add_parser(
        "shard", help="run llama.cpp RPC shard groups ([[shard_groups]] in the config)"
    )
    actions = shard.add_subparsers(dest="shard_command", required=True)
    config_help = "TOML config file with [[shard_groups]] (default ./sollol.toml)"

    up = actions.add_parser(
        "up", help="start a group's local workers and coordinator, then supervise it"
    )
    up.add_argument("name", help="shard group name")
    up.add_argument("--config", type=Path, help=config_help)
    up.set_defaults(handler=lambda args: _shard_command("up", args))

    down = actions.add_parser("down", help="stop a group that `shard up` runs")
    down.add_argument("name", help="shard group name")
    down.add_argument("--config", type=Path, help=config_help)
    down.set_defaults(handler=lambda args: _shard_command("down", args))

    status = actions.add_parser("status", help="show each group's state, health and workers")
    status.add_argument("name", nargs="?", help="one group (default: all)")
    status.add_argument("--config", type=Path, help=config_help)
    status.set_defaults(handler=lambda args: _shard_command("status", args))


def _shard_command(action: str, args: argparse.Namespace) -> int:
    from .shard import commands

    handler = {"up": commands.up, "down": commands.down, "status": commands.status}[action]
    return handler(args.name, args.config)


def _serve_command(args: argparse.Namespace) -> int:
    settings = load_settings(
        args.config,
        overrides={
            "host": args.host,
            "port": args.port,
            "database_url": args.database_url,
            "max_body_bytes": args.max_body_bytes,
            "certfile": args.certfile,
            "keyfile": args.keyfile,
        },
        extra_nodes=args.node,
    )
    if not settings.nodes:
        settings = _with_local_nodes(settings)
    from .server import run

    run(lambda: serve_router(settings))
    return 0


def _with_local_nodes(settings: Settings) -> Settings:
    """Scan 127.0.0.1 on Ollama's and llama-server's default ports for nodes to start with.

    Only this machine is scanned; other networks need `sollol discover`.
    """
    from .discovery import DEFAULT_PORTS, LOOPBACK_CIDR, node_name, scan_network

    found = asyncio.run(scan_network(LOOPBACK_CIDR, DEFAULT_PORTS, timeout_s=2.0))
    nodes = []
    for node in found:
        name = node_name(node, [config.name for config in nodes])
        nodes.append(dataclasses.replace(node.config(name), source="discovered"))
        print(f"sollol: found {node.kind.value} node at {node.url}", file=sys.stderr, flush=True)
    if not nodes:
        print(
            "sollol: no nodes configured and none found on 127.0.0.1 ports "
            f"{', '.join(str(port) for port in DEFAULT_PORTS)}; nodes stored in the database "
            "still load, and `sollol nodes add URL` adds more",
            file=sys.stderr,
            flush=True,
        )
    return dataclasses.replace(settings, nodes=tuple(nodes))


async def serve_router(settings: Settings) -> None:
    """Bind, print the address, and serve until SIGINT or SIGTERM."""
    from .app import create_app
    from .server import (
        base_url_of,
        bind_socket,
        install_signal_handlers,
        serve_app,
        tune_interpreter,
    )

    try:
        sock = bind_socket(settings.host, settings.port)
    except OSError as exc:
        raise ConfigError(
            f"cannot listen on {settings.host}:{settings.port}: {exc.strerror}; "
            "choose another address or port (--host, --port)"
        ) from exc
    app = create_app(settings)
    tune_interpreter()
    shutdown = asyncio.Event()
    install_signal_handlers(shutdown)
    # Dashboard streams never end by themselves; they must not hold up the shutdown.
    app.state.dashboard.close_on(shutdown)
    url = base_url_of(sock, tls=bool(settings.certfile))
    print(
        f"sollol: listening on {url} (OpenAI base_url {url}/v1, dashboard {url}/dashboard)",
        flush=True,
    )
    await serve_app(
        app,
        sock,
        shutdown_event=shutdown,
        max_header_bytes=settings.max_header_bytes,
        certfile=settings.certfile,
        keyfile=settings.keyfile,
    )


def _demo_command(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(host=args.host, port=args.port, workdir=args.workdir)


def _make_model_command(args: argparse.Namespace) -> int:
    from .tinymodel import write_tiny_model

    path = write_tiny_model(args.path, seed=args.seed)
    print(f"wrote {path} ({path.stat().st_size} bytes)")
    return 0
