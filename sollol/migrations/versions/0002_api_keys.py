"""Add API keys, and the key and cost of each request.

Creates the ``api_keys`` table, and adds ``key_id`` and ``cost`` to
``requests`` with an index for per-key usage reports over a time range.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("prefix", sa.String(32), nullable=False),
        sa.Column("secret_sha256", sa.String(64), nullable=False, unique=True),
        sa.Column("admin", sa.Boolean, nullable=False),
        sa.Column("models", sa.Text, nullable=True),
        sa.Column("rpm", sa.Integer, nullable=True),
        sa.Column("tpm", sa.Integer, nullable=True),
        sa.Column("quota_tokens", sa.BigInteger, nullable=True),
        sa.Column("quota_period", sa.String(8), nullable=True),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("revoked_at", sa.Float, nullable=True),
    )
    with op.batch_alter_table("requests") as batch:
        batch.add_column(sa.Column("key_id", sa.Integer, nullable=True))
        batch.add_column(sa.Column("cost", sa.Float, nullable=True))
    op.create_index("ix_requests_key_id_started_at", "requests", ["key_id", "started_at"])


def downgrade() -> None:
    op.drop_index("ix_requests_key_id_started_at", table_name="requests")
    with op.batch_alter_table("requests") as batch:
        batch.drop_column("cost")
        batch.drop_column("key_id")
    op.drop_table("api_keys")
