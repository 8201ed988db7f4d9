"""The history writer against SQLite and a real PostgreSQL server."""

import logging
import sqlite3
import time

import pytest
from sqlalchemy import func, select

from sollol.history import HistoryWriter, RequestRecord, create_history_engine, requests_table

WAIT_TIMEOUT_S = 10.0


def make_row(**fields):
    defaults = {"route": "/v1/chat/completions", "model": "tiny", "stream": False}
    return RequestRecord(started_at=time.time(), **{**defaults, **fields})


def count_rows(engine):
    with engine.connect() as connection:
        return connection.execute(select(func.count()).select_from(requests_table)).scalar_one()


def wait_for(condition, timeout_s=WAIT_TIMEOUT_S):
    """Poll ``condition`` until it is true; the writer works on its own thread."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError(f"condition not met within {timeout_s} s")


@pytest.fixture
def open_engine():
    """Open history engines and dispose of them, closing pooled connections, after the test."""
    engines = []

    def open_engine(url):
        engines.append(create_history_engine(url))
        return engines[-1]

    yield open_engine
    for engine in engines:
        engine.dispose()


@pytest.fixture
def fast_writer_options():
    return {"flush_interval_s": 0.05, "max_retry_interval_s": 0.2}


def test_close_flushes_buffered_rows(open_engine, history_url):
    engine = open_engine(history_url)
    writer = HistoryWriter(engine, flush_interval_s=60)
    writer.start()
    for index in range(250):
        writer.record(make_row(node="node-a", prompt_tokens=index, latency_ms=1.5))
    writer.close()
    assert count_rows(engine) == 250
    assert writer.written_rows == 250
    assert writer.dropped_rows == 0
    assert writer.buffered_rows == 0


def test_full_batch_is_written_before_interval(open_engine, history_url):
    engine = open_engine(history_url)
    writer = HistoryWriter(engine, batch_rows=100, flush_interval_s=60)
    writer.start()
    for _ in range(100):
        writer.record(make_row())
    wait_for(lambda: writer.written_rows == 100)
    writer.close()
    assert count_rows(engine) == 100


def test_rows_keep_their_fields(open_engine, history_url):
    engine = open_engine(history_url)
    writer = HistoryWriter(engine)
    writer.start()
    writer.record(make_row(node="node-b", status=502, outcome="error", error="boom", attempts=2))
    writer.close()
    with engine.connect() as connection:
        row = connection.execute(select(requests_table)).one()
    assert (row.node, row.status, row.outcome, row.error, row.attempts) == (
        "node-b",
        502,
        "error",
        "boom",
        2,
    )
    assert row.stream is False


def test_rows_keep_decision_features(open_engine, history_url):
    engine = open_engine(history_url)
    writer = HistoryWriter(engine)
    writer.start()
    writer.record(
        make_row(
            node="node-a",
            est_prompt_tokens=12.5,
            max_tokens=64.0,
            node_in_flight=3,
            node_queue_depth=1.0,
            node_slots=4,
            model_loaded=True,
            node_ttft_ms_avg=80.0,
            node_decode_tps_avg=None,
            decode_tps=41.0,
            error_kind=None,
        )
    )
    writer.close()
    with engine.connect() as connection:
        row = connection.execute(select(requests_table)).one()
    assert (row.est_prompt_tokens, row.max_tokens, row.node_in_flight, row.node_slots) == (
        12.5,
        64.0,
        3,
        4,
    )
    assert (row.model_loaded, row.node_ttft_ms_avg, row.node_decode_tps_avg) == (True, 80.0, None)
    assert row.decode_tps == 41.0


def test_long_strings_are_truncated(open_engine, history_url):
    engine = open_engine(history_url)
    writer = HistoryWriter(engine)
    writer.start()
    writer.record(make_row(error="e" * 2000, error_kind="k" * 100, node="n" * 300))
    writer.close()
    with engine.connect() as connection:
        row = connection.execute(select(requests_table)).one()
    assert row.error == "e" * 512
    assert row.error_kind == "k" * 64
    assert row.node == "n" * 256
    assert writer.dropped_rows == 0


def test_full_buffer_drops_and_counts(open_engine, history_url):
    engine = open_engine(history_url)
    writer = HistoryWriter(engine, max_buffered_rows=10)
    # The writer thread is not started, so nothing drains the buffer.
    for _ in range(15):
        writer.record(make_row())
    assert writer.buffered_rows == 10
    assert writer.dropped_rows == 5


def test_rejected_row_is_dropped(open_engine, history_url, fast_writer_options):
    engine = open_engine(history_url)
    writer = HistoryWriter(engine, batch_rows=1, **fast_writer_options)
    writer.start()
    # route is NOT NULL, so both databases reject this row; retrying would
    # fail the same way and block the rows behind it.
    writer.record(make_row(route=None))
    writer.record(make_row(node="node-a"))
    writer.close()
    assert writer.dropped_rows == 1
    assert writer.written_rows == 1
    assert count_rows(engine) == 1


def test_locked_sqlite_buffers_then_flushes(open_engine, tmp_path, fast_writer_options, caplog):
    path = tmp_path / "history.db"
    # A busy timeout of 0.1 s, so that each write attempt fails fast while
    # another connection holds the write lock.
    engine = open_engine(f"sqlite:///{path}?timeout=0.1")
    writer = HistoryWriter(engine, max_buffered_rows=25, **fast_writer_options)
    writer.start()
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        for _ in range(30):
            writer.record(make_row())
        wait_for(lambda: not writer.database_available)
        assert writer.buffered_rows == 25
        assert writer.dropped_rows == 5
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    wait_for(lambda: writer.written_rows == 25)
    assert writer.database_available
    assert writer.buffered_rows == 0
    writer.close()
    assert count_rows(engine) == 25
    full_warnings = [r for r in caplog.records if "history buffer is full" in r.getMessage()]
    assert len(full_warnings) == 1


def test_postgresql_outage_buffers_then_flushes(
    open_engine, own_postgres_server, fast_writer_options, caplog
):
    caplog.set_level(logging.INFO, logger="sollol.history")
    engine = open_engine(own_postgres_server.create_database("history"))
    writer = HistoryWriter(engine, max_buffered_rows=25, **fast_writer_options)
    writer.start()
    for _ in range(10):
        writer.record(make_row(node="before"))
    wait_for(lambda: writer.written_rows == 10)

    own_postgres_server.stop()
    for _ in range(30):
        writer.record(make_row(node="during"))
    wait_for(lambda: not writer.database_available)
    assert writer.buffered_rows == 25
    assert writer.dropped_rows == 5

    own_postgres_server.start()
    wait_for(lambda: writer.written_rows == 35)
    assert writer.database_available
    assert writer.buffered_rows == 0
    writer.record(make_row(node="after"))
    writer.close()
    with engine.connect() as connection:
        nodes = connection.execute(select(requests_table.c.node).order_by("id")).scalars().all()
    assert nodes == ["before"] * 10 + ["during"] * 25 + ["after"]
    messages = [record.getMessage() for record in caplog.records]
    assert sum("history database unavailable" in message for message in messages) == 1
    assert sum("history buffer is full" in message for message in messages) == 1
    assert sum("history database available again" in message for message in messages) == 1


def test_close_during_outage_is_bounded(open_engine, own_postgres_server, fast_writer_options):
    engine = open_engine(own_postgres_server.create_database("history"))
    writer = HistoryWriter(engine, **fast_writer_options)
    writer.start()
    own_postgres_server.stop()
    for _ in range(5):
        writer.record(make_row())
    started = time.monotonic()
    writer.close(timeout_s=0.5)
    assert time.monotonic() - started < 3.0
    assert writer.dropped_rows == 5
    assert writer.buffered_rows == 0
    assert writer.written_rows == 0
