"""The ``sollol nodes`` and ``sollol discover`` commands.

``sollol nodes`` talks to a running router's admin API (``--url``, and
``--api-key`` when authentication is on) rather than to the database. The
router then checks the URL, detects the node's kind, probes it and applies
the change at once, and the reply shows the node's live state. The change is
stored in the database by the router, so the other routers on the same
database apply it within their ``membership_refresh_interval_s``.

``sollol discover`` scans a network range on some ports and prints the nodes
it recognises. With ``--add`` it adds each one through the admin API.
"""

import argparse
import asyncio
import os
import sys
from typing import Any
from urllib.parse import quote

import httpx
import orjson

from .config import ConfigError
from .discovery import (
    DEFAULT_CONCURRENCY,
    DEFAULT_MAX_TARGETS,
    DEFAULT_PORTS,
    DEFAULT_RATE_PER_S,
    scan_network,
)

DEFAULT_ROUTER_URL = "http://127.0.0.1:8000"
REQUEST_TIMEOUT_S = 30.0


def add_membership_parsers(commands: argparse._SubParsersAction) -> None:
    nodes = commands.add_parser(
        "nodes", help="list, add, remove and drain a running router's nodes"
    )
    actions = nodes.add_subparsers(dest="nodes_command", required=True)

    listing = actions.add_parser("list", help="list the nodes with their state and health")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _add_router_options(listing)
    listing.set_defaults(handler=_list_command)

    add = actions.add_parser("add", help="add a node, or put a drained node back in rotation")
    add.add_argument(
        "node_url", metavar="URL", help="the node's base URL, e.g. http://127.0.0.1:8080"
    )
    add.add_argument(
        "--kind",
        choices=["llamacpp", "ollama", "openai"],
        help="node kind (default: detected from the URL's replies)",
    )
    add.add_argument("--name", help="node name (default: HOST:PORT of the URL)")
    add.add_argument("--models", help="comma-separated models (default: read from the node)")
    _add_router_options(add)
    add.set_defaults(handler=_add_command)

    remove = actions.add_parser("remove", help="remove a node; requests in flight finish")
    remove.add_argument("name", help="node name, as `sollol nodes list` shows it")
    _add_router_options(remove)
    remove.set_defaults(handler=lambda args: _change_command(args, "DELETE", ""))

    drain = actions.add_parser(
        "drain", help="send a node no new requests; requests in flight finish"
    )
    drain.add_argument("name", help="node name, as `sollol nodes list` shows it")
    _add_router_options(drain)
    drain.set_defaults(handler=lambda args: _change_command(args, "POST", "/drain"))

    discover = commands.add_parser(
        "discover", help="scan a network range for Ollama, llama-server and OpenAI-compatible nodes"
    )
    discover.add_argument(
        "--cidr", required=True, help="addresses to scan, e.g. 127.0.0.1/32 or 192.0.2.0/28"
    )
    discover.add_argument(
        "--ports",
        default=",".join(str(port) for port in DEFAULT_PORTS),
        help="comma-separated ports (default 11434,8080)",
    )
    discover.add_argument(
        "--max-targets",
        type=int,
        default=DEFAULT_MAX_TARGETS,
        help=f"reject scans of more address and port pairs (default {DEFAULT_MAX_TARGETS})",
    )
    discover.add_argument(
        "--rate",
        type=float,
        default=DEFAULT_RATE_PER_S,
        help=f"new connections per second at most (default {DEFAULT_RATE_PER_S:g})",
    )
    discover.add_argument(
        "--concurrency",
        type=int,
        default=DEFAULT_CONCURRENCY,
        help=f"connections open at once at most (default {DEFAULT_CONCURRENCY})",
    )
    discover.add_argument(
        "--timeout", type=float, default=2.0, help="seconds to wait for each reply (default 2)"
    )
    discover.add_argument("--json", action="store_true", help="print JSON instead of a table")
    discover.add_argument(
        "--add", action="store_true", help="add every node found to the router at --url"
    )
    _add_router_options(discover)
    discover.set_defaults(handler=_discover_command)


def _add_router_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url",
        default=os.environ.get("SOLLOL_URL", DEFAULT_ROUTER_URL),
        help=f"the running router's base URL (default $SOLLOL_URL or {DEFAULT_ROUTER_URL})",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("SOLLOL_API_KEY"),
        help="an admin API key, needed when authentication is on (default $SOLLOL_API_KEY)",
    )


def _list_command(args: argparse.Namespace) -> int:
    body = _call(args, "GET", "/sollol/nodes")
    if args.json:
        print(orjson.dumps(body, option=orjson.OPT_INDENT_2).decode())
        return 0
    print(f"{'NAME':<24} {'KIND':<9} {'STATE':<9} {'HEALTHY':<8} {'SOURCE':<10} URL / MODELS")
    for node in body["nodes"]:
        print(
            f"{node['name']:<24} {node['kind']:<9} {node['state']:<9} "
            f"{'yes' if node['healthy'] else 'no':<8} {node['source']:<10} {node['url']} "
            f"{','.join(node['models'])}"
        )
    return 0


def _add_command(args: argparse.Namespace) -> int:
    request: dict[str, Any] = {"url": args.node_url}
    if args.kind:
        request["kind"] = args.kind
    if args.name:
        request["name"] = args.name
    if args.models:
        request["models"] = [model.strip() for model in args.models.split(",") if model.strip()]
    node = _call(args, "POST", "/sollol/nodes", request)
    state = "healthy" if node["healthy"] else f"not healthy yet ({node['last_error']})"
    models = ", ".join(node["models"]) or "none listed yet"
    print(f"added node {node['name']} ({node['kind']}, {node['url']}): {state}; models: {models}")
    return 0


def _change_command(args: argparse.Namespace, method: str, suffix: str) -> int:
    # A name may hold characters with a meaning in URLs ("?", "#", "%").
    node = _call(args, method, f"/sollol/nodes/{quote(args.name, safe='')}{suffix}")
    print(f"node {node['name']}: {node['state']}")
    return 0


def _discover_command(args: argparse.Namespace) -> int:
    try:
        ports = [int(port) for port in args.ports.split(",") if port.strip()]
    except ValueError:
        raise ConfigError(f"--ports {args.ports!r} must be comma-separated numbers") from None
    found = asyncio.run(
        scan_network(
            args.cidr,
            ports,
            timeout_s=args.timeout,
            max_targets=args.max_targets,
            rate_per_s=args.rate,
            concurrency=args.concurrency,
        )
    )
    if args.json:
        print(orjson.dumps([node.to_json() for node in found], option=orjson.OPT_INDENT_2).decode())
    else:
        for node in found:
            print(f"{node.kind.value:<9} {node.url} {','.join(node.models)}")
        print(f"{len(found)} nodes found", file=sys.stderr)
    if args.add:
        # A node the router has already (409) is skipped, so the command can run
        # again to pick up new ones. Any other error fails the command once the
        # remaining nodes were tried.
        failed = False
        for node in found:
            try:
                added = _call(
                    args, "POST", "/sollol/nodes", {"url": node.url, "kind": node.kind.value}
                )
            except RouterReplyError as exc:
                failed = failed or exc.status_code != 409
                print(f"not added: {node.url}: {exc}", file=sys.stderr)
                continue
            print(f"added node {added['name']} ({added['kind']}, {added['url']})", file=sys.stderr)
        if failed:
            return 1
    return 0


def _call(
    args: argparse.Namespace, method: str, path: str, body: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Send one admin request to the router; raise ConfigError with its error message."""
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    base = args.url.rstrip("/")
    try:
        response = httpx.request(
            method, base + path, json=body, headers=headers, timeout=REQUEST_TIMEOUT_S
        )
    except httpx.TransportError as exc:
        raise ConfigError(
            f"could not reach the router at {base} ({exc}); start it with `sollol serve` "
            "or pass its address with --url"
        ) from None
    try:
        reply = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        reply = None
    if response.status_code >= 400:
        message = reply["error"]["message"] if _is_error(reply) else response.text[:200]
        raise RouterReplyError(
            f"{method} {path} failed with HTTP {response.status_code}: {message}",
            status_code=response.status_code,
        )
    if not isinstance(reply, dict):
        raise ConfigError(f"{method} {path}: the router's reply is not a JSON object")
    return reply


class RouterReplyError(ConfigError):
    """An error status the router returned for an admin request."""

    label = "error"

    def __init__(self, message: str, *, status_code: int) -> None:
        super().__init__(message)
        self.status_code = status_code


def _is_error(reply: object) -> bool:
    return (
        isinstance(reply, dict)
        and isinstance(reply.get("error"), dict)
        and isinstance(reply["error"].get("message"), str)
    )
