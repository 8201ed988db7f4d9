"""Token usage and cost per key, model and node, read from the request history.

The counts are those the nodes reported (``usage`` of OpenAI-style replies,
``prompt_eval_count`` and ``eval_count`` of Ollama's), stored per request by
the router. Rows still buffered in a running router's history writer (at
most ``flush_interval_s``, 0.5 s by default, unless the database is down) are
not counted yet.
"""

import re
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from .history import api_keys_table, requests_table

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_SECONDS_PER_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True, slots=True)
class UsageRow:
    key_id: int | None
    key_name: str | None
    model: str
    node: str | None
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost: float | None  # None: no price applies to any of these requests

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def parse_since(text: str, *, now_s: float | None = None) -> float:
    """Parse a start time: a duration back from now (``90m``, ``24h``, ``7d``) or an ISO date.

    An ISO date or time without a zone is taken as UTC. Raises ValueError.
    """
    now_s = time.time() if now_s is None else now_s
    match = _DURATION.match(text.strip())
    if match:
        return now_s - float(match.group(1)) * _SECONDS_PER_UNIT[match.group(2)]
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"invalid start time {text!r}: expected a duration such as 24h or 7d, "
            "or an ISO 8601 date such as 2026-01-31"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def tokens_since(engine: Engine, key_id: int, since_s: float) -> int:
    """Return the prompt and completion tokens the history holds for a key since ``since_s``."""
    table = requests_table
    query = select(
        func.coalesce(func.sum(table.c.prompt_tokens), 0)
        + func.coalesce(func.sum(table.c.completion_tokens), 0)
    ).where(table.c.key_id == key_id, table.c.started_at >= since_s)
    with engine.connect() as connection:
        return int(connection.execute(query).scalar_one())


def usage_report(
    engine: Engine, *, since_s: float | None = None, key_id: int | None = None
) -> list[UsageRow]:
    """Return usage grouped by key, model and node, ordered by key id, model and node."""
    requests = requests_table
    keys = api_keys_table
    query = (
        select(
            requests.c.key_id,
            keys.c.name,
            requests.c.model,
            requests.c.node,
            func.count().label("requests"),
            func.coalesce(func.sum(requests.c.prompt_tokens), 0).label("prompt_tokens"),
            func.coalesce(func.sum(requests.c.completion_tokens), 0).label("completion_tokens"),
            func.sum(requests.c.cost).label("cost"),
        )
        .select_from(requests.outerjoin(keys, requests.c.key_id == keys.c.id))
        .group_by(requests.c.key_id, keys.c.name, requests.c.model, requests.c.node)
        .order_by(requests.c.key_id, requests.c.model, requests.c.node)
    )
    if since_s is not None:
        query = query.where(requests.c.started_at >= since_s)
    if key_id is not None:
        query = query.where(requests.c.key_id == key_id)
    with engine.connect() as connection:
        rows = connection.execute(query).all()
    return [
        UsageRow(
            key_id=row.key_id,
            key_name=row.name,
            model=row.model,
            node=row.node,
            requests=int(row.requests),
            prompt_tokens=int(row.prompt_tokens),
            completion_tokens=int(row.completion_tokens),
            cost=None if row.cost is None else float(row.cost),
        )
        for row in rows
    ]


def totals_by_key(rows: list[UsageRow]) -> list[UsageRow]:
    """Sum the rows of each key over its models and nodes; model and node become ``*``."""
    totals: dict[int | None, dict[str, Any]] = {}
    for row in rows:
        total = totals.setdefault(
            row.key_id,
            {
                "key_id": row.key_id,
                "key_name": row.key_name,
                "model": "*",
                "node": "*",
                "requests": 0,
                "prompt_tokens": 0,
                "completion_tokens": 0,
                "cost": None,
            },
        )
        total["requests"] += row.requests
        total["prompt_tokens"] += row.prompt_tokens
        total["completion_tokens"] += row.completion_tokens
        if row.cost is not None:
            total["cost"] = (total["cost"] or 0.0) + row.cost
    return [UsageRow(**total) for total in totals.values()]


def format_report(rows: list[UsageRow], *, currency: str = "") -> str:
    """Render the rows and each key's total as an aligned text table for the terminal."""
    header = ("key", "model", "node", "requests", "prompt_tok", "completion_tok", "cost")
    lines = [header]
    for row in [*rows, *totals_by_key(rows)]:
        key = "-" if row.key_id is None else f"{row.key_id} {row.key_name or ''}".strip()
        cost = "-" if row.cost is None else f"{row.cost:.6f} {currency}".strip()
        lines.append(
            (
                key,
                row.model,
                row.node or "-",
                str(row.requests),
                str(row.prompt_tokens),
                str(row.completion_tokens),
                cost,
            )
        )
    widths = [max(len(line[column]) for line in lines) for column in range(len(header))]
    text = []
    for position, line in enumerate(lines):
        if position == len(rows) + 1:
            text.append("totals per key (model and node *):")
        text.append("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)))
    return "\n".join(text).rstrip() + "\n"
