import time

from sqlalchemy import func, select

from sollol.history import HistoryWriter, RequestRecord, create_history_engine, requests_table


def make_row(**fields):
    return RequestRecord(
        started_at=time.time(), route="/v1/chat/completions", model="tiny", stream=False, **fields
    )


def count_rows(engine):
    with engine.connect() as connection:
        return connection.execute(select(func.count()).select_from(requests_table)).scalar_one()


def test_close_flushes_queued_rows(tmp_path):
    engine = create_history_engine(f"sqlite:///{tmp_path / 'h.db'}")
    writer = HistoryWriter(engine, flush_interval_s=60)
    writer.start()
    for index in range(250):
        writer.record(make_row(node="node-a", prompt_tokens=index, latency_ms=1.5))
    writer.close()
    assert count_rows(engine) == 250
    assert writer.written_rows == 250
    assert writer.dropped_rows == 0


def test_rows_keep_their_fields(tmp_path):
    engine = create_history_engine(f"sqlite:///{tmp_path / 'h.db'}")
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


def test_full_queue_drops_and_counts(tmp_path):
    engine = create_history_engine(f"sqlite:///{tmp_path / 'h.db'}")
    writer = HistoryWriter(engine, max_queued_rows=10)
    # The writer thread is not started, so nothing drains the queue.
    for _ in range(15):
        writer.record(make_row())
    assert writer.dropped_rows == 5


def test_failed_write_is_counted_not_raised(tmp_path):
    engine = create_history_engine(f"sqlite:///{tmp_path / 'h.db'}")
    with engine.begin() as connection:
        connection.exec_driver_sql("DROP TABLE requests")
    writer = HistoryWriter(engine)
    writer.start()
    writer.record(make_row())
    writer.close()
    assert writer.dropped_rows == 1


def test_rows_keep_decision_features(tmp_path):
    engine = create_history_engine(f"sqlite:///{tmp_path / 'h.db'}")
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
