"""Add cluster membership and the shared per-key rate counters.

``nodes`` holds the membership changes made at run time (nodes added through
the admin API, and the drained or removed state of any node), so that they
survive a restart and every router on the database sees them.
``key_rate_events`` holds one row per admitted request and per settled token
count of keys with per-minute limits, so that routers sharing the database
count those limits together.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-08
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "nodes",
        sa.Column("name", sa.String(256), primary_key=True),
        sa.Column("url", sa.String(2048), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("models", sa.Text, nullable=True),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("added_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    op.create_table(
        "key_rate_events",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True),
        sa.Column("key_id", sa.Integer, nullable=False),
        sa.Column("at", sa.Float, nullable=False),
        sa.Column("requests", sa.Integer, nullable=False),
        sa.Column("tokens", sa.Integer, nullable=False),
    )
    op.create_index("ix_key_rate_events_key_id_at", "key_rate_events", ["key_id", "at"])


def downgrade() -> None:
    op.drop_index("ix_key_rate_events_key_id_at", table_name="key_rate_events")
    op.drop_table("key_rate_events")
    op.drop_table("nodes")
