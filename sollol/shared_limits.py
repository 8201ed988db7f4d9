"""Requests-per-minute limits counted in the shared database, so replicas count together.

Each router keeps its own in-memory windows (``sollol.quotas``), which are
exact for one router. When several routers share one PostgreSQL database, a
key's ``rpm`` must hold across all of them, so each request of a key with an
``rpm`` limit is also counted in the ``key_rate_events`` table. One
transaction per request takes a PostgreSQL advisory lock on the key id,
counts the key's rows of the last 60 seconds, and inserts one row when the
count is under the limit. Concurrent admissions of one key, from any
router, are thereby serialized, and the shared count is exact (a moving
window over the routers' clocks, which agree on one machine and are assumed
to agree within NTP's error across machines).

The cost is one database round trip per request of a limited key, made in a
worker thread. Keys without ``rpm`` never touch the table. On SQLite, which
one router process uses alone, the table is not used.

NOTE: tokens per minute and token quotas still count per router: a key's
``tpm`` can be exceeded by up to the number of replicas times its limit.
"""

import itertools
import time

from sqlalchemy import delete, func, insert, select, text
from sqlalchemy.engine import Engine

from .history import key_rate_events_table

WINDOW_S = 60.0
# Rows older than this are deleted, every PRUNE_EVERY admissions per router.
KEEP_S = 2 * WINDOW_S
PRUNE_EVERY = 500


class SharedRequestCounter:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._admissions = itertools.count(1)

    def admit(self, key_id: int, rpm: int, now_s: float | None = None) -> float | None:
        """Count one request of ``key_id`` if the key is under ``rpm``; blocks on the database.

        Returns None when the request is admitted, or the seconds until the
        oldest request in the window leaves it.
        """
        now_s = time.time() if now_s is None else now_s
        table = key_rate_events_table
        with self.engine.begin() as connection:
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key_id})
            window = (
                select(func.count(), func.min(table.c.at))
                .where(table.c.key_id == key_id, table.c.at > now_s - WINDOW_S)
                .where(table.c.requests > 0)
            )
            count, oldest = connection.execute(window).one()
            if count >= rpm:
                return max(1.0, oldest + WINDOW_S - now_s)
            connection.execute(
                insert(table).values(key_id=key_id, at=now_s, requests=1, tokens=0)
            )
            if next(self._admissions) % PRUNE_EVERY == 0:
                connection.execute(delete(table).where(table.c.at < now_s - KEEP_S))
        return None


def shares_limits(engine: Engine) -> bool:
    """Return True for a database that several routers may share (PostgreSQL)."""
    return engine.dialect.name == "postgresql"
