"""Alembic migrations of the history database, shipped inside the package.

``upgrade_to_head`` brings any history database to the current schema: it
creates the tables in an empty database, and adopts a history file written
before SOLLOL had migrations (see the first revision). The revision scripts
live in ``versions/``. To add one, write a new file there whose
``down_revision`` is the current head; ``make_alembic_config`` returns the
configuration that ``alembic.command`` functions (``revision``, ``upgrade``,
``downgrade``) take.
"""

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection, Engine

# Not Alembic's default ``alembic_version``, so that SOLLOL's history can share
# a PostgreSQL database with an application that has migrations of its own.
VERSION_TABLE = "sollol_alembic_version"


def make_alembic_config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", "sollol:migrations")
    config.attributes["connection"] = connection
    return config


def upgrade_to_head(engine: Engine) -> None:
    """Apply every revision the database lacks, in one transaction where the backend allows."""
    with engine.begin() as connection:
        command.upgrade(make_alembic_config(connection), "head")


def head_revision() -> str | None:
    return ScriptDirectory.from_config(make_alembic_config()).get_current_head()


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
        return context.get_current_revision()
