"""The feature table the latency model learns from, read from the request history.

Each row is one request that a node served, described by what the router knew
when it chose that node. The same features, in the same order, are built on
the request path from the routing signals (see _forest_py.score_candidates),
so a model trained here can score candidates there.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import numpy as np
from sqlalchemy import create_engine, func, inspect, select
from sqlalchemy.exc import SQLAlchemyError

from ..errors import TrainingDataError
from ..history import requests_table

# Raise when the meaning, order or encoding of a feature changes: artifacts
# trained on another schema are rejected at load time.
FEATURE_SCHEMA_VERSION = 1

# node_code and model_code index the artifact's sorted node and model names;
# NaN marks a node or model the model never saw.
FEATURE_NAMES = (
    "node_code",
    "model_code",
    "est_prompt_tokens",
    "max_tokens",
    "node_in_flight",
    "node_queue_depth",
    "node_slots",
    "model_loaded",
    "node_ttft_ms_avg",
    "node_decode_tps_avg",
)
FEATURE_COUNT = len(FEATURE_NAMES)

_HISTORY_COLUMNS = (
    "started_at",
    "node",
    "model",
    "ttft_ms",
    "latency_ms",
    *FEATURE_NAMES[2:],
)
READ_BATCH_ROWS = 50_000


@dataclass(slots=True)
class FeatureTable:
    """Served requests as a feature matrix with their measured outcomes."""

    features: np.ndarray  # rows x FEATURE_COUNT, float64, NaN where unknown
    latency_ms: np.ndarray
    ttft_ms: np.ndarray  # NaN where the request had no first-token time
    started_at: np.ndarray  # Unix time, seconds
    node_names: tuple[str, ...]  # node_code i is node_names[i]
    model_names: tuple[str, ...]

    @property
    def rows(self) -> int:
        return len(self.latency_ms)


def read_feature_table(
    database_url: str,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    progress: Callable[[str], None] | None = None,
) -> FeatureTable:
    """Read the requests that ended well and carry routing features, oldest first.

    Rows without a node, with a failed outcome, or written before the
    history recorded routing features are left out.
    """
    report = progress or (lambda _message: None)
    try:
        engine = create_engine(database_url)
    except (SQLAlchemyError, ValueError) as exc:
        raise TrainingDataError(f"invalid database URL {database_url!r}: {exc}") from exc
    try:
        return _read(engine, since, until, report)
    except SQLAlchemyError as exc:
        raise TrainingDataError(f"reading the history at {database_url!r} failed: {exc}") from exc
    finally:
        engine.dispose()


def _read(engine, since, until, report) -> FeatureTable:  # type: ignore[no-untyped-def]
    if not inspect(engine).has_table(requests_table.name):
        raise TrainingDataError(
            f"the database has no {requests_table.name!r} table; "
            "point --database-url at the history that `sollol serve` writes"
        )
    table = requests_table
    conditions = [
        table.c.outcome == "ok",
        table.c.node.is_not(None),
        table.c.latency_ms > 0,
        table.c.est_prompt_tokens.is_not(None),
        table.c.max_tokens.is_not(None),
    ]
    if since is not None:
        conditions.append(table.c.started_at >= since.timestamp())
    if until is not None:
        conditions.append(table.c.started_at < until.timestamp())

    with engine.connect() as connection:
        total = connection.execute(select(func.count()).where(*conditions)).scalar_one()
    report(f"reading {total:,} usable rows from the history")
    query = select(*(table.c[name] for name in _HISTORY_COLUMNS)).where(*conditions)
    # The DBAPI cursor returns plain tuples; SQLAlchemy's result rows cost
    # about four times as much per row, which dominated training on 1M rows.
    # Literal binds are safe: the only values are the two timestamps.
    sql = str(query.compile(dialect=engine.dialect, compile_kwargs={"literal_binds": True}))
    columns: list[list] = [[] for _ in _HISTORY_COLUMNS]
    connection = engine.raw_connection()
    try:
        cursor = connection.cursor()
        cursor.execute(sql)
        while batch := cursor.fetchmany(READ_BATCH_ROWS):
            for values, column in zip(zip(*batch, strict=True), columns, strict=True):
                column.extend(values)
            report(f"read {len(columns[0]):,} of {total:,} rows")
        cursor.close()
    finally:
        connection.close()
    return table_from_columns(dict(zip(_HISTORY_COLUMNS, columns, strict=True)))


def table_from_columns(columns: dict[str, list]) -> FeatureTable:
    """Build a FeatureTable from history columns (lists of values, NULL as None)."""
    node_names = tuple(sorted(set(columns["node"])))
    model_names = tuple(sorted(set(columns["model"])))
    rows = len(columns["node"])
    features = np.empty((rows, FEATURE_COUNT))
    features[:, 0] = _codes(columns["node"], node_names)
    features[:, 1] = _codes(columns["model"], model_names)
    for position, name in enumerate(FEATURE_NAMES[2:], start=2):
        features[:, position] = _floats(columns[name])
    started_at = _floats(columns["started_at"])
    # Sorting here is cheaper than ORDER BY on an unindexed column.
    order = np.argsort(started_at, kind="stable")
    return FeatureTable(
        features=features[order],
        latency_ms=_floats(columns["latency_ms"])[order],
        ttft_ms=_floats(columns["ttft_ms"])[order],
        started_at=started_at[order],
        node_names=node_names,
        model_names=model_names,
    )


def _codes(values: list[str], names: tuple[str, ...]) -> np.ndarray:
    index = {name: float(code) for code, name in enumerate(names)}
    return np.fromiter((index[value] for value in values), dtype=np.float64, count=len(values))


def _floats(values: list) -> np.ndarray:
    """Convert a column to float64; None (SQL NULL) and booleans become NaN and 0/1."""
    return np.fromiter(
        (math.nan if value is None else float(value) for value in values),
        dtype=np.float64,
        count=len(values),
    )
