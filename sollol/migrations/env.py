"""Alembic environment: runs revisions on the connection ``upgrade_to_head`` passes in."""

from alembic import context
from sqlalchemy import text

from sollol.history import metadata
from sollol.migrations import VERSION_TABLE

# An arbitrary constant that names SOLLOL's migration lock among the
# PostgreSQL advisory locks of other applications on the same server.
POSTGRESQL_LOCK_KEY = 0x5011_0001


def run_migrations() -> None:
    connection = context.config.attributes.get("connection")
    if connection is None:
        raise RuntimeError(
            "SOLLOL's migrations run on a connection passed in "
            "config.attributes['connection']; see sollol.migrations.upgrade_to_head"
        )
    if connection.dialect.name == "postgresql":
        # Two routers starting at once on an empty database would both create
        # the tables; the lock makes the second wait and then find them at head.
        # It is released when the transaction ends.
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": POSTGRESQL_LOCK_KEY})
    context.configure(
        connection=connection,
        target_metadata=metadata,
        version_table=VERSION_TABLE,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    raise RuntimeError(
        "SOLLOL's migrations need a database connection; offline mode is not supported"
    )
run_migrations()
