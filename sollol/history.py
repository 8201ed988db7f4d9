"""Request history: one row per request, written through SQLAlchemy off the event loop.

``HistoryWriter.record`` only appends to a bounded in-memory buffer, and a
background thread inserts the rows in batches. While the database is down,
the rows stay buffered and the thread retries. Only rows beyond the bound are
dropped and counted, so a slow or missing database does not slow requests.

The Alembic revisions in ``sollol/migrations`` define the schema, and
``create_history_engine`` upgrades a database to the latest one.
"""

import logging
import operator
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
)
from sqlalchemy.engine import URL, Dialect, Engine, make_url
from sqlalchemy.exc import (
    ArgumentError,
    DBAPIError,
    InterfaceError,
    NoSuchModuleError,
    OperationalError,
    SQLAlchemyError,
)

from .config import ConfigError
from .migrations import upgrade_to_head

log = logging.getLogger(__name__)

# How long a PostgreSQL connection attempt may take before it counts as a
# failed write (libpq's connect_timeout; without it libpq waits indefinitely).
POSTGRESQL_CONNECT_TIMEOUT_S = 5


class HistoryStoreError(ConfigError):
    """The history database could not be opened or upgraded to the current schema.

    A ConfigError, so that ``sollol serve`` reports it and exits with status 2:
    the usual cause is a ``database_url`` that names the wrong database.
    """


metadata = MetaData()

# A change to this table needs a new revision in sollol/migrations/versions.
requests_table = Table(
    "requests",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("started_at", Float, nullable=False, doc="Unix time, seconds"),
    Column("route", String(64), nullable=False),
    Column("model", String(256), nullable=False),
    Column("node", String(256), nullable=True, doc="None when no node was chosen"),
    Column("stream", Boolean, nullable=False),
    Column("status", Integer, nullable=False, doc="HTTP status sent to the client"),
    Column("outcome", String(32), nullable=False, doc="ok | error | timeout | cancelled"),
    Column("error", String(512), nullable=True),
    Column("attempts", Integer, nullable=False),
    Column("prompt_tokens", Integer, nullable=True),
    Column("completion_tokens", Integer, nullable=True),
    Column("ttft_ms", Float, nullable=True, doc="Time to the first streamed event"),
    Column("latency_ms", Float, nullable=False),
    Column("policy", String(32), nullable=True),
    Column("priority", Integer, nullable=True, doc="1 batch .. 10 critical"),
    Column("queue_ms", Float, nullable=True, doc="Time spent waiting for a free node"),
    Column("scores", Text, nullable=True, doc="JSON object: candidate node -> score (lower wins)"),
    Column("error_kind", String(64), nullable=True, doc="the error code sent to the client"),
    Column("decode_tps", Float, nullable=True, doc="decode tokens per second of the reply"),
    # What the router knew when it chose the node (the last attempt's node):
    # the features `sollol train` learns from.
    Column("est_prompt_tokens", Float, nullable=True, doc="prompt length estimated from text"),
    Column("max_tokens", Float, nullable=True, doc="output limit (or the default assumed)"),
    Column("node_in_flight", Integer, nullable=True, doc="requests in flight on the node"),
    Column("node_queue_depth", Float, nullable=True, doc="requests the node reported queued"),
    Column("node_slots", Integer, nullable=True, doc="the node's parallel slots, if known"),
    Column("model_loaded", Boolean, nullable=True, doc="model in the node's memory, if known"),
    Column("node_ttft_ms_avg", Float, nullable=True, doc="moving average TTFT, if measured"),
    Column("node_decode_tps_avg", Float, nullable=True, doc="moving average decode speed"),
    # Tenancy: who sent the request and what its tokens cost.
    Column("key_id", Integer, nullable=True, doc="api_keys.id; None when auth is off"),
    Column("cost", Float, nullable=True, doc="price of the tokens; None when no price is set"),
    Index("ix_requests_key_id_started_at", "key_id", "started_at"),
)

# API keys. Only the SHA-256 of each secret is stored; see sollol.keys.
api_keys_table = Table(
    "api_keys",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(128), nullable=False),
    Column("prefix", String(32), nullable=False, doc="first characters of the key, shown in lists"),
    Column("secret_sha256", String(64), nullable=False, unique=True, doc="hex digest"),
    Column("admin", Boolean, nullable=False),
    Column("models", Text, nullable=True, doc="JSON array of allowed models; None: all"),
    Column("rpm", Integer, nullable=True, doc="requests per minute; None: no limit"),
    Column("tpm", Integer, nullable=True, doc="tokens per minute; None: no limit"),
    Column("quota_tokens", BigInteger, nullable=True, doc="tokens per quota period"),
    Column("quota_period", String(8), nullable=True, doc="day | month (UTC calendar)"),
    Column("created_at", Float, nullable=False, doc="Unix time, seconds"),
    Column("revoked_at", Float, nullable=True, doc="Unix time, seconds; None: active"),
)
# Membership changes made at run time; see sollol.membership.
nodes_table = Table(
    "nodes",
    metadata,
    Column("name", String(256), primary_key=True),
    Column("url", String(2048), nullable=False),
    Column("kind", String(16), nullable=False, doc="llamacpp | ollama | openai"),
    Column("models", Text, nullable=True, doc="JSON array of model names; None: discovered"),
    Column("source", String(16), nullable=False, doc="config | env | api | discovered"),
    Column("state", String(16), nullable=False, doc="active | drained | removed"),
    Column("added_at", Float, nullable=False, doc="Unix time, seconds"),
    Column("updated_at", Float, nullable=False, doc="Unix time, seconds"),
)

# Requests admitted and tokens charged per key, shared by the routers on one
# database for per-minute limits; see sollol.shared_limits.
key_rate_events_table = Table(
    "key_rate_events",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True),
    Column("key_id", Integer, nullable=False),
    Column("at", Float, nullable=False, doc="Unix time, seconds"),
    Column("requests", Integer, nullable=False),
    Column("tokens", Integer, nullable=False),
    Index("ix_key_rate_events_key_id_at", "key_id", "at"),
)

# Tokens charged per key and quota period (UTC day or month) by every router
# on one database; see sollol.shared_limits.
key_quota_usage_table = Table(
    "key_quota_usage",
    metadata,
    Column("key_id", Integer, primary_key=True),
    Column("period_start", Float, primary_key=True, doc="Unix time, seconds"),
    Column("tokens", BigInteger, nullable=False),
)
COLUMN_NAMES = tuple(column.name for column in requests_table.columns if column.name != "id")
# PostgreSQL rejects a whole batch when one value is longer than its VARCHAR
# (SQLite does not check), and some strings come from nodes' error replies.
STRING_LENGTHS = tuple(
    (COLUMN_NAMES.index(column.name), column.type.length)
    for column in requests_table.columns
    if isinstance(column.type, String) and column.type.length is not None
)
_read_row_values = operator.attrgetter(*COLUMN_NAMES)
# Positional parameter markers by DB-API paramstyle (PEP 249).
_POSITIONAL_MARKERS = {"qmark": "?", "format": "%s", "pyformat": "%s"}


@dataclass(slots=True)
class RequestRecord:
    started_at: float
    route: str
    model: str
    stream: bool
    node: str | None = None
    status: int = 200
    outcome: str = "ok"
    error: str | None = None
    attempts: int = 0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    ttft_ms: float | None = None
    latency_ms: float = 0.0
    policy: str | None = None
    priority: int | None = None
    scores: str | None = None
    queue_ms: float | None = None
    error_kind: str | None = None
    decode_tps: float | None = None
    est_prompt_tokens: float | None = None
    max_tokens: float | None = None
    node_in_flight: int | None = None
    node_queue_depth: float | None = None
    node_slots: int | None = None
    model_loaded: bool | None = None
    node_ttft_ms_avg: float | None = None
    node_decode_tps_avg: float | None = None
    key_id: int | None = None
    cost: float | None = None
    # Not stored: tokens reserved against the key's limits while the request
    # runs, released when it ends (see sollol.quotas).
    reserved_tokens: int = 0
    # Not stored: the key_rate_events row that holds the reservation when
    # routers share limits in PostgreSQL (see sollol.shared_limits).
    rate_event_id: int | None = None
    # Not stored: the second-best candidate, for the dashboard's feed.
    runner_up: str | None = None
    # Reported by the node (llama-server's `timings`); feed the routing
    # signals and are not stored.
    node_ttft_ms: float | None = None
    node_decode_tps: float | None = None

    def read_ollama_counts(self, reply: dict[str, Any]) -> None:
        """Copy token counts and timings from an Ollama reply's last line."""
        if isinstance(reply.get("prompt_eval_count"), int):
            self.prompt_tokens = reply["prompt_eval_count"]
        if isinstance(reply.get("eval_count"), int):
            self.completion_tokens = reply["eval_count"]
        prompt_ns = reply.get("prompt_eval_duration")
        if isinstance(prompt_ns, int):
            self.node_ttft_ms = prompt_ns / 1e6
        eval_ns = reply.get("eval_duration")
        if isinstance(eval_ns, int) and eval_ns > 0 and self.completion_tokens:
            self.node_decode_tps = self.completion_tokens / (eval_ns / 1e9)

    def read_usage(self, reply: dict[str, Any]) -> None:
        """Copy token counts, and llama-server's timings when present, from a reply or chunk."""
        timings = reply.get("timings")
        if isinstance(timings, dict):
            prompt_ms = timings.get("prompt_ms")
            decode_tps = timings.get("predicted_per_second")
            if isinstance(prompt_ms, int | float):
                self.node_ttft_ms = float(prompt_ms)
            if isinstance(decode_tps, int | float):
                self.node_decode_tps = float(decode_tps)
        usage = reply.get("usage")
        if isinstance(usage, dict):
            prompt_tokens = usage.get("prompt_tokens")
            completion_tokens = usage.get("completion_tokens")
            if isinstance(prompt_tokens, int):
                self.prompt_tokens = prompt_tokens
            if isinstance(completion_tokens, int):
                self.completion_tokens = completion_tokens


def create_history_engine(database_url: str) -> Engine:
    """Open the history database and upgrade its schema to the latest revision.

    Raises HistoryStoreError when the database cannot be reached or upgraded.
    """
    try:
        url = make_url(database_url)
        engine = create_engine(url, **_engine_options(url))
    except ArgumentError as exc:
        raise HistoryStoreError(
            f"database_url {database_url!r} is not a database URL: {exc}; "
            "expected e.g. sqlite:///sollol-history.db or postgresql+psycopg://USER@HOST/DB"
        ) from exc
    except (NoSuchModuleError, ImportError) as exc:
        # A dialect, or the driver it needs, that is not installed (mysql://, say).
        raise HistoryStoreError(
            f"database_url {url.render_as_string(hide_password=True)!r} needs a database "
            f"driver that is not installed ({exc}); SOLLOL supports SQLite and PostgreSQL"
        ) from exc
    if engine.dialect.name == "sqlite":
        # WAL lets readers (reports, `sollol train`) run while the router writes.
        @event.listens_for(engine, "connect")
        def _set_sqlite_pragmas(dbapi_connection, _record):  # type: ignore[no-untyped-def]
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

    try:
        upgrade_to_head(engine)
    except SQLAlchemyError as exc:
        engine.dispose()
        raise HistoryStoreError(
            f"could not open or upgrade the history database "
            f"{url.render_as_string(hide_password=True)}: {exc}"
        ) from exc
    except HistoryStoreError:
        engine.dispose()
        raise
    return engine


def _engine_options(url: URL) -> dict[str, Any]:
    if url.get_backend_name() != "postgresql":
        return {}
    options: dict[str, Any] = {
        # Connections in the pool die when PostgreSQL restarts; test each one
        # before use so that the first write after an outage succeeds.
        "pool_pre_ping": True,
    }
    if "connect_timeout" not in url.query:
        options["connect_args"] = {"connect_timeout": POSTGRESQL_CONNECT_TIMEOUT_S}
    return options


class HistoryWriter:
    """Buffers rows in memory and inserts them in batches from a background thread.

    ``record`` runs on the event loop and only appends to a deque, so the loop
    never waits on the database. The thread writes when ``batch_rows`` rows are
    buffered or every ``flush_interval_s``, ``batch_rows`` rows per transaction.
    When a write fails because the database is unreachable or busy, the batch
    stays buffered and is retried after a delay that doubles up to
    ``max_retry_interval_s``; meanwhile new rows buffer up to
    ``max_buffered_rows``, and rows beyond that are dropped and counted.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        max_buffered_rows: int = 100_000,
        batch_rows: int = 1_000,
        flush_interval_s: float = 0.5,
        max_retry_interval_s: float = 5.0,
    ) -> None:
        self._engine = engine
        self._insert_sql = _insert_sql(engine.dialect)
        self._queue: deque[RequestRecord] = deque()
        # The batch the thread has taken from the queue and not yet written.
        self._batch: list[tuple[Any, ...]] = []
        self._batch_rows_taken = 0
        self._max_buffered_rows = max_buffered_rows
        self._batch_rows = batch_rows
        self._flush_interval_s = flush_interval_s
        self._max_retry_interval_s = max_retry_interval_s
        self._retry_interval_s = flush_interval_s
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._close_deadline = 0.0
        self._thread = threading.Thread(target=self._run, name="sollol-history", daemon=True)
        # Each counter has one writing thread: the event loop's for
        # _dropped_full, the writer thread's for the others.
        self._dropped_full = 0
        self._dropped_by_writer = 0
        self._buffer_full = False
        self._outage_started: float | None = None
        self.written_rows = 0

    @property
    def buffered_rows(self) -> int:
        """Rows recorded but not yet written."""
        return len(self._queue) + self._batch_rows_taken

    @property
    def dropped_rows(self) -> int:
        """Rows lost: the buffer was full, the database rejected them, or shutdown left them."""
        return self._dropped_full + self._dropped_by_writer

    @property
    def database_available(self) -> bool:
        """False from a write that failed for lack of the database until one succeeds."""
        return self._outage_started is None

    def start(self) -> None:
        self._thread.start()

    def record(self, row: RequestRecord) -> None:
        """Buffer a row for writing without waiting on the database or the writer thread."""
        if self.buffered_rows >= self._max_buffered_rows:
            self._dropped_full += 1
            if not self._buffer_full:
                self._buffer_full = True
                log.warning(
                    "history buffer is full (%d rows); dropping new rows until it drains",
                    self._max_buffered_rows,
                )
            return
        self._queue.append(row)
        if len(self._queue) == self._batch_rows:
            self._wake.set()

    def close(self, timeout_s: float = 10.0) -> None:
        """Write what is buffered, retrying for up to ``timeout_s``, then stop the thread."""
        if not self._thread.is_alive():
            return
        self._close_deadline = time.monotonic() + timeout_s
        self._stop.set()
        self._wake.set()
        # A database call in progress can outlast the deadline by its own
        # timeout; the thread is a daemon, so it cannot hold the process open.
        self._thread.join(timeout_s + 1.0)
        if self._thread.is_alive():
            log.error(
                "history writer did not finish within %.1f s; %d buffered rows may be lost",
                timeout_s,
                self.buffered_rows,
            )
        if self.dropped_rows:
            log.warning("history dropped %d rows in total", self.dropped_rows)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self._flush_interval_s)
            self._wake.clear()
            if not self._write_buffered():
                self._stop.wait(self._next_retry_interval_s())
        self._flush_before_exit()

    def _flush_before_exit(self) -> None:
        while not self._write_buffered():
            delay_s = self._next_retry_interval_s()
            if time.monotonic() + delay_s > self._close_deadline:
                break
            time.sleep(delay_s)
        unwritten = self.buffered_rows
        if unwritten:
            self._dropped_by_writer += unwritten
            self._queue.clear()
            self._batch = []
            self._batch_rows_taken = 0
            log.error("history database unavailable at shutdown; %d buffered rows lost", unwritten)

    def _next_retry_interval_s(self) -> float:
        interval_s = self._retry_interval_s
        self._retry_interval_s = min(interval_s * 2, self._max_retry_interval_s)
        return interval_s

    def _write_buffered(self) -> bool:
        """Write batches until the buffer is empty; return False if the database is unavailable."""
        while True:
            if not self._batch:
                self._take_batch()
                if not self._batch:
                    return True
            if not self._write(self._batch):
                return False
            self._batch = []
            self._batch_rows_taken = 0

    def _take_batch(self) -> None:
        count = min(len(self._queue), self._batch_rows)
        # Count the rows as taken before popping them, so that buffered_rows
        # never reads low and lets record() overfill the buffer.
        self._batch_rows_taken = count
        records = [self._queue.popleft() for _ in range(count)]
        self._batch = [_row_values(row) for row in records]

    def _write(self, batch: list[tuple[Any, ...]]) -> bool:
        try:
            with self._engine.begin() as connection:
                connection.exec_driver_sql(self._insert_sql, batch)
        except SQLAlchemyError as exc:
            if _is_unavailable(exc):
                self._note_unavailable(exc)
                return False
            # The database refused the rows themselves, so a retry would fail
            # the same way.
            self._dropped_by_writer += len(batch)
            log.error("history database rejected %d rows, dropping them: %s", len(batch), exc)
            return True
        self._note_available()
        self.written_rows += len(batch)
        return True

    def _note_unavailable(self, exc: SQLAlchemyError) -> None:
        if self._outage_started is None:
            self._outage_started = time.monotonic()
            log.error(
                "history database unavailable; buffering up to %d rows and retrying: %s",
                self._max_buffered_rows,
                exc,
            )
        else:
            log.debug("history write retry failed: %s", exc)

    def _note_available(self) -> None:
        self._retry_interval_s = self._flush_interval_s
        if self._outage_started is not None:
            log.warning(
                "history database available again after %.1f s; writing %d buffered rows",
                time.monotonic() - self._outage_started,
                self.buffered_rows,
            )
            self._outage_started = None
        if self._buffer_full and self.buffered_rows < self._max_buffered_rows:
            self._buffer_full = False
            log.warning("history buffer has room again; %d rows dropped so far", self._dropped_full)


def _insert_sql(dialect: Dialect) -> str:
    """Build the INSERT that takes a row as a tuple in ``COLUMN_NAMES`` order.

    The writer hands tuples straight to the driver's executemany, because
    SQLAlchemy's per-row parameter processing for a Core insert costs more
    than the database's own work on SQLite.
    """
    marker = _POSITIONAL_MARKERS.get(dialect.paramstyle)
    if marker is None:
        raise HistoryStoreError(
            f"the {dialect.name} driver uses the {dialect.paramstyle!r} paramstyle, which "
            "the history writer does not support; use SQLite or PostgreSQL (psycopg)"
        )
    quote = dialect.identifier_preparer.quote
    columns = ", ".join(quote(name) for name in COLUMN_NAMES)
    markers = ", ".join(marker for _ in COLUMN_NAMES)
    return f"INSERT INTO {quote(requests_table.name)} ({columns}) VALUES ({markers})"


def _row_values(row: RequestRecord) -> tuple[Any, ...]:
    values = _read_row_values(row)
    for position, length in STRING_LENGTHS:
        value = values[position]
        if value is not None and len(value) > length:
            values = (*values[:position], value[:length], *values[position + 1 :])
    return values


def _is_unavailable(exc: SQLAlchemyError) -> bool:
    """Tell a database that is down, busy or read-only apart from one that rejects the rows.

    SQLite reports a locked or read-only file, and PostgreSQL a refused or
    broken connection, as OperationalError.
    """
    if isinstance(exc, OperationalError | InterfaceError):
        return True
    return isinstance(exc, DBAPIError) and exc.connection_invalidated
