"""Per-key limits counted in the shared database, so that replicas count together.

Each router keeps its own in-memory windows (``sollol.quotas``), which are
exact for one router. When several routers share one PostgreSQL database,
the requests of a key with any limit (``rpm``, ``tpm`` or a token quota) are
counted in the database instead:

- ``key_rate_events`` contains one row per admitted request (``requests = 1``),
  whose ``tokens`` is the request's estimate while it runs (its reservation),
  and one row per finished request (``requests = 0``) with the tokens the node
  reported. Settling a request sets its reservation to 0 and inserts the
  real count in one transaction, so a token is never counted in neither.
- ``key_quota_usage`` contains the tokens charged per key and quota period. Its
  row for a period is seeded from the request history when the first
  request of the period is admitted, so usage from before the table existed,
  or from a router without it, counts too.

Admission is one transaction: a PostgreSQL advisory lock on the key id, one
read of the key's rows of the last two minutes, one read of its quota row,
and the insert of the admission row. Concurrent admissions of one key, from
any router, are thereby serialized, and each sees every reservation and
every settled count of every router. Requests per minute are exact (a moving
window over the routers' clocks, which agree on one machine and are assumed
to agree within NTP's error across machines). A token limit can be
overshot by what requests in flight use beyond their estimates, and by the
lone request that runs whatever its estimate (see ``sollol.quotas``).

A reservation counts against ``tpm`` for 60 seconds after its admission and
against the quota until its row is pruned (``KEEP_S``), so a router that
dies with requests in flight blocks nothing for long. NOTE: for the same
reason, a request still running after 60 seconds no longer holds its
reservation in the ``tpm`` window. Its real tokens count once it ends.

Settling runs in a worker thread after the reply, off the event loop. Keys
without limits never touch the tables. On SQLite, which one router process
uses alone, the tables are not used.
"""

import itertools
import time

from sqlalchemy import delete, func, insert, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import Connection, Engine

from .errors import RateLimitError
from .history import key_quota_usage_table, key_rate_events_table
from .keys import ApiKey
from .quotas import over_limit, period_bounds
from .usage import tokens_since

WINDOW_S = 60.0
# Rows older than this are deleted, every PRUNE_EVERY admissions per router.
KEEP_S = 2 * WINDOW_S
PRUNE_EVERY = 500


def has_limits(key: ApiKey) -> bool:
    return key.rpm is not None or key.tpm is not None or key.quota_tokens is not None


class SharedKeyLimits:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._admissions = itertools.count(1)

    def admit(self, key: ApiKey, estimated_tokens: int, now_s: float | None = None) -> int:
        """Check every limit of ``key`` across routers and count the request; blocks on I/O.

        Returns the id of the request's row, which ``settle`` needs. Raises
        RateLimitError, with the seconds until the limit frees up.
        """
        now_s = time.time() if now_s is None else now_s
        counts_tokens = key.tpm is not None or key.quota_tokens is not None
        with self.engine.begin() as connection:
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key.id})
            recent = _read_recent(connection, key.id, now_s)
            if key.quota_tokens is not None and key.quota_period is not None:
                used = self._quota_used(connection, key, now_s)
                _check_quota(key, used, recent["reserved_kept"], estimated_tokens, now_s)
            if key.tpm is not None:
                _check_tpm(key, recent, estimated_tokens, now_s)
            if key.rpm is not None and recent["requests"] >= key.rpm:
                raise RateLimitError(
                    f"API key {key.prefix}... is over its limit of {key.rpm} requests per "
                    "minute (counted across every router on this database)",
                    code="rate_limit_requests",
                    retry_after_s=max(1.0, recent["oldest_request_at"] + WINDOW_S - now_s),
                )
            row = insert(key_rate_events_table).values(
                key_id=key.id,
                at=now_s,
                requests=1,
                tokens=estimated_tokens if counts_tokens else 0,
            )
            event_id = connection.execute(row.returning(key_rate_events_table.c.id)).scalar_one()
            if next(self._admissions) % PRUNE_EVERY == 0:
                table = key_rate_events_table
                connection.execute(delete(table).where(table.c.at < now_s - KEEP_S))
        return int(event_id)

    def settle(
        self, key: ApiKey | None, event_id: int, tokens: int, now_s: float | None = None
    ) -> None:
        """Release a request's reservation and charge its real tokens; blocks on I/O.

        ``key`` is None when the key was revoked while the request ran, and
        ``tokens`` is 0 for a request that never reached a node: then only
        the reservation is released.
        """
        now_s = time.time() if now_s is None else now_s
        events = key_rate_events_table
        with self.engine.begin() as connection:
            connection.execute(update(events).where(events.c.id == event_id).values(tokens=0))
            if key is None or tokens <= 0:
                return
            if key.tpm is not None:
                connection.execute(
                    insert(events).values(key_id=key.id, at=now_s, requests=0, tokens=tokens)
                )
            if key.quota_period is not None:
                start, _ = period_bounds(key.quota_period, now_s)
                charge = pg_insert(key_quota_usage_table).values(
                    key_id=key.id, period_start=start, tokens=tokens
                )
                connection.execute(
                    charge.on_conflict_do_update(
                        index_elements=["key_id", "period_start"],
                        set_={"tokens": key_quota_usage_table.c.tokens + tokens},
                    )
                )

    def _quota_used(self, connection: Connection, key: ApiKey, now_s: float) -> int:
        """Return the key's tokens charged this period, seeding the period's row if missing."""
        assert key.quota_period is not None
        start, _ = period_bounds(key.quota_period, now_s)
        table = key_quota_usage_table
        used = connection.execute(
            select(table.c.tokens).where(table.c.key_id == key.id, table.c.period_start == start)
        ).scalar_one_or_none()
        if used is not None:
            return int(used)
        # Once per key and period, count what only the history contains: usage
        # from before this table existed, or from routers that do not write it.
        seeded = tokens_since(self.engine, key.id, start)
        seed = pg_insert(table).values(key_id=key.id, period_start=start, tokens=seeded)
        connection.execute(seed.on_conflict_do_nothing())
        return seeded


def _read_recent(connection: Connection, key_id: int, now_s: float) -> dict[str, float]:
    """Sum the key's rows of the last ``KEEP_S`` seconds, split as the checks need them."""
    table = key_rate_events_table
    in_window = table.c.at > now_s - WINDOW_S
    admitted = table.c.requests > 0
    query = select(
        func.count().filter(in_window, admitted).label("requests"),
        func.min(table.c.at).filter(in_window, admitted).label("oldest_request_at"),
        func.coalesce(func.sum(table.c.tokens).filter(in_window, ~admitted), 0).label("used"),
        func.coalesce(func.sum(table.c.tokens).filter(in_window, admitted), 0).label("reserved"),
        func.min(table.c.at).filter(in_window, table.c.tokens > 0).label("oldest_tokens_at"),
        func.coalesce(func.sum(table.c.tokens).filter(admitted), 0).label("reserved_kept"),
    ).where(table.c.key_id == key_id, table.c.at > now_s - KEEP_S)
    return dict(connection.execute(query).one()._mapping)


def _check_quota(key: ApiKey, used: int, reserved: int, estimate: int, now_s: float) -> None:
    assert key.quota_tokens is not None and key.quota_period is not None
    if not over_limit(used, reserved, estimate, key.quota_tokens):
        return
    _, end = period_bounds(key.quota_period, now_s)
    raise RateLimitError(
        f"API key {key.prefix}... used {used} of its {key.quota_tokens} tokens this "
        f"{key.quota_period} (UTC), with {reserved} more reserved by requests in flight, "
        "counted across every router on this database; the quota renews at the start of "
        f"the next {key.quota_period}",
        code="quota_exceeded",
        retry_after_s=end - now_s,
    )


def _check_tpm(key: ApiKey, recent: dict[str, float], estimate: int, now_s: float) -> None:
    assert key.tpm is not None
    used, reserved = int(recent["used"]), int(recent["reserved"])
    if not over_limit(used, reserved, estimate, key.tpm):
        return
    oldest = recent["oldest_tokens_at"]
    retry_after_s = 1.0 if oldest is None else max(1.0, oldest + WINDOW_S - now_s)
    raise RateLimitError(
        f"API key {key.prefix}... is over its limit of {key.tpm} tokens per minute "
        f"({used} used, {reserved} reserved by requests in flight, {estimate} estimated "
        "for this one, counted across every router on this database)",
        code="rate_limit_tokens",
        retry_after_s=retry_after_s,
    )


def shares_limits(engine: Engine) -> bool:
    """Return True for a database that several routers may share (PostgreSQL)."""
    return engine.dialect.name == "postgresql"
