"""Alembic migrations of the history database, on SQLite and a real PostgreSQL server."""

import socket

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
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
    insert,
    inspect,
    select,
)

from sollol.history import (
    HistoryStoreError,
    HistoryWriter,
    RequestRecord,
    create_history_engine,
    metadata,
    requests_table,
)
from sollol.migrations import current_revision, head_revision


def first_release_columns():
    """The requests table as SOLLOL wrote it before it had migrations."""
    return [
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("started_at", Float, nullable=False),
        Column("route", String(64), nullable=False),
        Column("model", String(256), nullable=False),
        Column("node", String(256), nullable=True),
        Column("stream", Boolean, nullable=False),
        Column("status", Integer, nullable=False),
        Column("outcome", String(32), nullable=False),
        Column("error", String(512), nullable=True),
        Column("attempts", Integer, nullable=False),
        Column("prompt_tokens", Integer, nullable=True),
        Column("completion_tokens", Integer, nullable=True),
        Column("ttft_ms", Float, nullable=True),
        Column("latency_ms", Float, nullable=False),
    ]


def routing_release_columns():
    """The table after routing policies were added, still before migrations."""
    return [
        *first_release_columns(),
        Column("policy", String(32), nullable=True),
        Column("priority", Integer, nullable=True),
        Column("queue_ms", Float, nullable=True),
        Column("scores", Text, nullable=True),
    ]


def old_row(index):
    return {
        "started_at": 1_700_000_000.0 + index,
        "route": "/v1/chat/completions",
        "model": "tiny",
        "node": f"node-{index}",
        "stream": index % 2 == 0,
        "status": 200,
        "outcome": "ok",
        "error": None,
        "attempts": 1,
        "prompt_tokens": 10 + index,
        "completion_tokens": 5,
        "ttft_ms": 12.5,
        "latency_ms": 40.0 + index,
    }


def write_old_history(url, columns, rows):
    old_metadata = MetaData()
    table = Table("requests", old_metadata, *columns)
    engine = create_engine(url)
    try:
        old_metadata.create_all(engine)
        with engine.begin() as connection:
            connection.execute(insert(table), rows)
    finally:
        engine.dispose()


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


def test_empty_database_reaches_head(open_engine, history_url):
    engine = open_engine(history_url)
    assert head_revision() is not None
    assert current_revision(engine) == head_revision()
    columns = {column["name"] for column in inspect(engine).get_columns("requests")}
    assert columns == {column.name for column in requests_table.columns}


def test_migrated_schema_matches_table(open_engine, history_url):
    engine = open_engine(history_url)
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        differences = compare_metadata(context, metadata)
    # The version table is Alembic's own, not part of SOLLOL's metadata.
    differences = [
        change
        for change in differences
        if not (change[0] == "remove_table" and change[1].name == "sollol_alembic_version")
    ]
    assert differences == []


def test_second_start_changes_nothing(open_engine, history_url):
    open_engine(history_url).dispose()
    engine = open_engine(history_url)
    assert current_revision(engine) == head_revision()


@pytest.mark.parametrize(
    "old_columns", [first_release_columns, routing_release_columns], ids=["first", "routing"]
)
def test_old_history_keeps_rows(open_engine, history_url, old_columns):
    rows = [old_row(index) for index in range(3)]
    if old_columns is routing_release_columns:
        rows = [{**row, "policy": "sollol", "priority": 5, "queue_ms": 0.0} for row in rows]
    write_old_history(history_url, old_columns(), rows)

    engine = open_engine(history_url)
    assert current_revision(engine) == head_revision()
    with engine.connect() as connection:
        stored = connection.execute(select(requests_table).order_by("id")).all()
    assert [row.node for row in stored] == ["node-0", "node-1", "node-2"]
    assert [row.prompt_tokens for row in stored] == [10, 11, 12]
    assert [row.stream for row in stored] == [True, False, True]
    assert all(row.node_in_flight is None for row in stored)
    assert all(row.decode_tps is None for row in stored)
    if old_columns is routing_release_columns:
        assert [row.policy for row in stored] == ["sollol"] * 3

    writer = HistoryWriter(engine)
    writer.start()
    writer.record(
        RequestRecord(
            started_at=1.0, route="/v1/completions", model="tiny", stream=False, node_slots=2
        )
    )
    writer.close()
    with engine.connect() as connection:
        new_row = connection.execute(select(requests_table).where(requests_table.c.id > 3)).one()
    assert new_row.node_slots == 2
    assert writer.dropped_rows == 0


def test_foreign_requests_table_rejected(history_url):
    foreign = [Column("id", Integer, primary_key=True), Column("payload", Text)]
    write_old_history(history_url, foreign, [{"payload": "not a SOLLOL row"}])
    with pytest.raises(HistoryStoreError, match="lacks the required column 'started_at'"):
        create_history_engine(history_url)


def test_unreachable_database_raises():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        # Nothing listens on this port while the socket is bound but not listening.
        port = holder.getsockname()[1]
        url = f"postgresql+psycopg://sollol@127.0.0.1:{port}/postgres"
        with pytest.raises(HistoryStoreError, match="could not open or upgrade"):
            create_history_engine(url)


@pytest.mark.parametrize(
    ("database_url", "message"),
    [
        ("notaurl", "is not a database URL"),
        ("mysql://user:secret@127.0.0.1:1/db", "needs a database driver that is not installed"),
    ],
)
def test_unusable_database_url_is_a_clear_error(database_url, message):
    with pytest.raises(HistoryStoreError, match=message) as raised:
        create_history_engine(database_url)
    assert "secret" not in str(raised.value)
