"""Request history: one row per request, written through SQLAlchemy off the event loop.

``HistoryWriter.record`` only appends to a bounded in-memory queue; a
background thread inserts the rows in batches. When the queue is full the row
is dropped and counted, so a slow or missing database never slows requests.
"""

import logging
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    Boolean,
    Column,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    insert,
    inspect,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

log = logging.getLogger(__name__)

metadata = MetaData()

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
)
COLUMN_NAMES = tuple(column.name for column in requests_table.columns if column.name != "id")


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
    engine = create_engine(database_url)
    if engine.dialect.name == "sqlite":
        # WAL lets readers (reports, `sollol train`) run while the router writes.
        @event.listens_for(engine, "connect")
        def _set_sqlite_pragmas(dbapi_connection, _record):  # type: ignore[no-untyped-def]
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

    metadata.create_all(engine)
    _add_missing_columns(engine)
    return engine


def _add_missing_columns(engine: Engine) -> None:
    """Add nullable columns that a history file from an older SOLLOL lacks.

    NOTE: a stopgap until the schema has real migrations; it only adds
    columns, never changes or drops them.
    """
    present = {column["name"] for column in inspect(engine).get_columns("requests")}
    with engine.begin() as connection:
        for column in requests_table.columns:
            if column.name not in present and column.nullable:
                kind = column.type.compile(dialect=engine.dialect)
                connection.exec_driver_sql(f"ALTER TABLE requests ADD COLUMN {column.name} {kind}")
                log.info("history: added column %s to the requests table", column.name)


class HistoryWriter:
    """Batches rows in memory and inserts them from a background thread.

    ``record`` is a lock-free ``deque.append``: it never blocks and never
    wakes the writer thread, which instead wakes every ``flush_interval_s``
    and inserts everything queued, ``batch_rows`` rows per transaction.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        max_queued_rows: int = 100_000,
        batch_rows: int = 1_000,
        flush_interval_s: float = 0.5,
    ) -> None:
        self._engine = engine
        self._queue: deque[RequestRecord] = deque()
        self._max_queued_rows = max_queued_rows
        self._batch_rows = batch_rows
        self._flush_interval_s = flush_interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sollol-history", daemon=True)
        self.dropped_rows = 0
        self.written_rows = 0

    @property
    def buffered_rows(self) -> int:
        """Rows recorded but not yet written."""
        return len(self._queue)

    def start(self) -> None:
        self._thread.start()

    def record(self, row: RequestRecord) -> None:
        """Queue a row for writing; never blocks."""
        if len(self._queue) >= self._max_queued_rows:
            if self.dropped_rows == 0:
                log.warning("history queue is full; dropping rows until it drains")
            self.dropped_rows += 1
            return
        self._queue.append(row)

    def close(self, timeout_s: float = 10.0) -> None:
        """Write what is queued, then stop the writer thread."""
        if not self._thread.is_alive():
            return
        self._stop.set()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.error("history writer did not finish within %.1f s; rows may be lost", timeout_s)
        if self.dropped_rows:
            log.warning("history dropped %d rows in total", self.dropped_rows)

    def _run(self) -> None:
        while not self._stop.wait(self._flush_interval_s):
            self._drain()
        self._drain()

    def _drain(self) -> None:
        while self._queue:
            batch = []
            while self._queue and len(batch) < self._batch_rows:
                batch.append(self._queue.popleft())
            self._write(batch)

    def _write(self, batch: list[RequestRecord]) -> None:
        try:
            with self._engine.begin() as connection:
                rows = [{name: getattr(row, name) for name in COLUMN_NAMES} for row in batch]
                connection.execute(insert(requests_table), rows)
        except SQLAlchemyError as exc:
            # NOTE: a failed batch is dropped, not retried; buffering across a
            # database outage is still to be built.
            self.dropped_rows += len(batch)
            log.error("history write of %d rows failed: %s", len(batch), exc)
        else:
            self.written_rows += len(batch)
