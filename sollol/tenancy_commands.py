"""The ``sollol keys`` and ``sollol usage`` commands, run on the history database directly.

A running router on the same database applies a new or revoked key within its
``keys_refresh_interval_s`` (2 s by default).
"""

import argparse
import sys
from datetime import UTC, datetime
from pathlib import Path

import orjson

from .config import ConfigError, Settings, load_settings


def add_tenancy_parsers(commands: argparse._SubParsersAction) -> None:
    keys = commands.add_parser("keys", help="create, list and revoke API keys")
    actions = keys.add_subparsers(dest="keys_command", required=True)

    create = actions.add_parser("create", help="create a key and print its secret once")
    create.add_argument("name", help="who or what the key is for, e.g. team-search")
    create.add_argument("--admin", action="store_true", help="allow the admin routes")
    create.add_argument(
        "--models", help="comma-separated models the key may use (default: every model)"
    )
    create.add_argument("--rpm", type=int, help="maximum requests per minute")
    create.add_argument("--tpm", type=int, help="maximum tokens (prompt + completion) per minute")
    create.add_argument("--quota-tokens", type=int, help="tokens allowed per --quota-period")
    create.add_argument(
        "--quota-period", choices=["day", "month"], help="quota period, a UTC calendar day or month"
    )
    _add_database_options(create)
    create.set_defaults(handler=_create_command)

    listing = actions.add_parser("list", help="list keys, revoked ones included; never secrets")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _add_database_options(listing)
    listing.set_defaults(handler=_list_command)

    revoke = actions.add_parser("revoke", help="revoke a key by its id")
    revoke.add_argument("id", type=int, help="key id, as `sollol keys list` shows it")
    _add_database_options(revoke)
    revoke.set_defaults(handler=_revoke_command)

    usage = commands.add_parser(
        "usage", help="tokens and cost per API key, model and node from the request history"
    )
    usage.add_argument(
        "--since", help="start: a duration back (90m, 24h, 7d) or an ISO 8601 date (UTC)"
    )
    usage.add_argument("--key", type=int, help="only this key id")
    usage.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _add_database_options(usage)
    usage.set_defaults(handler=_usage_command)


def _add_database_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="TOML config file of the router")
    parser.add_argument("--database-url", help="SQLAlchemy URL of the request history")


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(args.config, overrides={"database_url": args.database_url})


def _store(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from .history import create_history_engine
    from .keys import KeyStore

    return KeyStore(create_history_engine(_settings(args).database_url))


def _create_command(args: argparse.Namespace) -> int:
    if args.quota_tokens is not None and args.quota_period is None:
        raise ConfigError("--quota-tokens needs --quota-period day or month")
    if args.quota_period is not None and args.quota_tokens is None:
        raise ConfigError("--quota-period needs --quota-tokens")
    models = None if args.models is None else args.models.split(",")
    key, secret = _store(args).create(
        args.name,
        admin=args.admin,
        models=models,
        rpm=args.rpm,
        tpm=args.tpm,
        quota_tokens=args.quota_tokens,
        quota_period=args.quota_period,
    )
    print(f"created key {key.id} ({key.name}); this is the only time the secret is shown:")
    print(secret)
    return 0


def _list_command(args: argparse.Namespace) -> int:
    from .admin_api import key_json

    keys = _store(args).list()
    if args.json:
        print(orjson.dumps([key_json(key) for key in keys]).decode())
        return 0
    rows = [("id", "name", "prefix", "admin", "models", "rpm", "tpm", "quota", "state")]
    for key in keys:
        quota = "-" if key.quota_tokens is None else f"{key.quota_tokens}/{key.quota_period}"
        state = "active" if key.active else f"revoked {_utc(key.revoked_at or 0.0)}"
        rows.append(
            (
                str(key.id),
                key.name,
                key.prefix + "...",
                "yes" if key.admin else "no",
                "*" if key.models is None else ",".join(sorted(key.models)),
                "-" if key.rpm is None else str(key.rpm),
                "-" if key.tpm is None else str(key.tpm),
                quota,
                state,
            )
        )
    print(_table(rows), end="")
    return 0


def _revoke_command(args: argparse.Namespace) -> int:
    key = _store(args).revoke(args.id)
    print(f"revoked key {key.id} ({key.name}) at {_utc(key.revoked_at or 0.0)}")
    return 0


def _usage_command(args: argparse.Namespace) -> int:
    from .history import create_history_engine
    from .usage import format_report, parse_since, totals_by_key, usage_report

    settings = _settings(args)
    since_s = None
    if args.since:
        try:
            since_s = parse_since(args.since)
        except ValueError as exc:
            print(f"sollol: {exc}", file=sys.stderr)
            return 2
    engine = create_history_engine(settings.database_url)
    rows = usage_report(engine, since_s=since_s, key_id=args.key)
    currency = settings.costs.currency if settings.costs else ""
    if args.json:
        body = {
            "since": since_s,
            "currency": currency,
            "rows": [row.to_json() for row in rows],
            "totals": [row.to_json() for row in totals_by_key(rows)],
        }
        print(orjson.dumps(body).decode())
        return 0
    print(format_report(rows, currency=currency), end="")
    return 0


def _utc(timestamp_s: float) -> str:
    return datetime.fromtimestamp(timestamp_s, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in rows
    ]
    return "\n".join(line.rstrip() for line in lines) + "\n"
