"""Add the per-key token totals per quota period, shared by the routers on one database.

``key_quota_usage`` holds, per key and UTC day or month, the tokens charged
by every router on the database, so that a key's token quota holds across
routers (see sollol.shared_limits).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-09
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "key_quota_usage",
        sa.Column("key_id", sa.Integer, primary_key=True),
        sa.Column("period_start", sa.Float, primary_key=True),
        sa.Column("tokens", sa.BigInteger, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("key_quota_usage")
