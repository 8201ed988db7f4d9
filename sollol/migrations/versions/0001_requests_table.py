"""Create the requests table, or bring a pre-migration history file up to it.

SOLLOL wrote history files before it had migrations. Their ``requests`` table
has the first release's columns (``id`` to ``latency_ms``) plus some of the
nullable columns added since, and no version table. This revision creates the
whole table in an empty database, and adds only the missing columns to such a
file, keeping its rows.

Revision ID: 0001
Revises:
Create Date: 2026-12-05
"""

import logging

import sqlalchemy as sa
from alembic import op

from sollol.history import HistoryStoreError

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

log = logging.getLogger("sollol.migrations")


def _columns() -> list[sa.Column]:
    # The schema as of this revision, written out rather than imported from
    # sollol.history, so that later changes to the table do not alter it.
    return [
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("started_at", sa.Float, nullable=False),
        sa.Column("route", sa.String(64), nullable=False),
        sa.Column("model", sa.String(256), nullable=False),
        sa.Column("node", sa.String(256), nullable=True),
        sa.Column("stream", sa.Boolean, nullable=False),
        sa.Column("status", sa.Integer, nullable=False),
        sa.Column("outcome", sa.String(32), nullable=False),
        sa.Column("error", sa.String(512), nullable=True),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("prompt_tokens", sa.Integer, nullable=True),
        sa.Column("completion_tokens", sa.Integer, nullable=True),
        sa.Column("ttft_ms", sa.Float, nullable=True),
        sa.Column("latency_ms", sa.Float, nullable=False),
        sa.Column("policy", sa.String(32), nullable=True),
        sa.Column("priority", sa.Integer, nullable=True),
        sa.Column("queue_ms", sa.Float, nullable=True),
        sa.Column("scores", sa.Text, nullable=True),
        sa.Column("error_kind", sa.String(64), nullable=True),
        sa.Column("decode_tps", sa.Float, nullable=True),
        sa.Column("est_prompt_tokens", sa.Float, nullable=True),
        sa.Column("max_tokens", sa.Float, nullable=True),
        sa.Column("node_in_flight", sa.Integer, nullable=True),
        sa.Column("node_queue_depth", sa.Float, nullable=True),
        sa.Column("node_slots", sa.Integer, nullable=True),
        sa.Column("model_loaded", sa.Boolean, nullable=True),
        sa.Column("node_ttft_ms_avg", sa.Float, nullable=True),
        sa.Column("node_decode_tps_avg", sa.Float, nullable=True),
    ]


def upgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    if not inspector.has_table("requests"):
        op.create_table("requests", *_columns())
        return

    present = {column["name"] for column in inspector.get_columns("requests")}
    for column in _columns():
        if column.name in present:
            continue
        if not column.nullable:
            raise HistoryStoreError(
                f"the existing requests table lacks the required column {column.name!r}, "
                "so it was not written by SOLLOL; point database_url at another database"
            )
        op.add_column("requests", column)
        log.info("history: added column %s to the pre-migration requests table", column.name)


def downgrade() -> None:
    op.drop_table("requests")
