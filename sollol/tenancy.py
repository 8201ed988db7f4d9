"""Keys, limits and usage of one router: which key sent a request, may it, what it cost.

``KeyCache`` keeps the active keys in memory and reads the ``api_keys`` table
again every ``keys_refresh_interval_s``, so a key created or revoked with
``sollol keys`` (or the admin API of another router on the same database)
takes effect within that interval. The admin API of this router refreshes
at once.

Authentication is on when ``auth = "required"``, or with ``auth = "auto"``
(the default) as soon as the table holds any key, revoked keys included: revoking
the last key must not open the router.
"""

import asyncio
import contextlib
import functools
import logging
import math
from collections.abc import Callable
from typing import NamedTuple

from sqlalchemy.engine import Engine

from .costs import CostTable
from .errors import ModelNotFoundError
from .history import RequestRecord
from .keys import ApiKey, KeyStore, hash_secret
from .quotas import KeyLimits
from .routing.features import RequestFeatures
from .shared_limits import SharedKeyLimits, has_limits, shares_limits
from .usage import tokens_since

log = logging.getLogger(__name__)

# Weight of the newest request in the moving average of prompt scales.
PROMPT_SCALE_WEIGHT = 0.2


class Reservation(NamedTuple):
    """Tokens reserved for a request until it ends, and its row in the shared database."""

    tokens: int = 0
    # The key_rate_events row when the key's limits are counted in PostgreSQL.
    event_id: int | None = None


class KeyCache:
    def __init__(self, store: KeyStore, *, required: bool, interval_s: float) -> None:
        self.store = store
        self.required = required
        self.interval_s = interval_s
        self._by_hash: dict[str, ApiKey] = {}
        self._by_id: dict[int, ApiKey] = {}
        self._any_keys = False
        self._task: asyncio.Task[None] | None = None
        # Called in the refresh thread with the keys just loaded.
        self.on_refresh: Callable[[list[ApiKey]], None] | None = None

    @property
    def enabled(self) -> bool:
        return self.required or self._any_keys

    def lookup(self, secret: str) -> ApiKey | None:
        return self._by_hash.get(hash_secret(secret))

    def by_id(self, key_id: int) -> ApiKey | None:
        return self._by_id.get(key_id)

    def refresh(self) -> None:
        """Read the table again; runs in a worker thread, never on the event loop."""
        active, total = self.store.load()
        if self.on_refresh is not None:
            self.on_refresh(list(active.values()))
        # Replaced whole, so the event loop never reads a half-updated mapping.
        self._by_hash = active
        self._by_id = {key.id: key for key in active.values()}
        if total and not self._any_keys:
            log.info("API keys found: authentication is on")
        self._any_keys = total > 0

    async def start(self) -> None:
        await asyncio.to_thread(self.refresh)
        if self.interval_s > 0:
            self._task = asyncio.create_task(self._watch(), name="sollol-keys")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await asyncio.to_thread(self.refresh)
            except Exception:
                # The keys loaded last stay in force until the database is reachable again.
                log.exception("reading the api_keys table failed; keeping the keys loaded before")


class Tenancy:
    """Per-request checks and accounting for the API key a request came with."""

    def __init__(
        self, engine: Engine, *, required: bool, interval_s: float, costs: CostTable | None
    ) -> None:
        self.engine = engine
        self.keys = KeyCache(KeyStore(engine), required=required, interval_s=interval_s)
        self.keys.on_refresh = self._load_quota_bases
        self.limits = KeyLimits()
        self.costs = costs
        # Limits counted across the routers sharing a PostgreSQL database.
        self.shared = SharedKeyLimits(engine) if shares_limits(engine) else None
        # Settlements still being written to the shared database.
        self._settling: set[asyncio.Future[None]] = set()
        # Real prompt tokens per text-estimated token, per model; see admit.
        self._prompt_scale: dict[str, float] = {}

    def check_model(self, key: ApiKey | None, model_key: str, shown_name: str) -> None:
        """Reject a model outside the key's allow-list as unknown (404), as listings hide it."""
        if key is not None and not key.allows_model(model_key):
            raise ModelNotFoundError(shown_name)

    async def admit(self, key: ApiKey | None, model: str, features: RequestFeatures) -> Reservation:
        """Apply the key's limits to a request; return what it reserved.

        The estimate is the prompt length estimated from its text, scaled by
        what the model's nodes reported for earlier prompts, plus the output
        limit. The text estimate alone leaves out the chat template and can be
        far off (measured 4 estimated against 64 real tokens on the test
        model), and an estimate too low lets a burst of concurrent requests
        overshoot a token limit.

        On PostgreSQL, a key with limits is checked in the shared database,
        in a worker thread. Raises RateLimitError.
        """
        if key is None:
            return Reservation()
        prompt_tokens = features.prompt_tokens * self._prompt_scale.get(model, 1.0)
        estimate = math.ceil(prompt_tokens + features.max_tokens)
        if self.shared is None or not has_limits(key):
            return Reservation(self.limits.admit(key, estimate))
        event_id = await asyncio.to_thread(self.shared.admit, key, estimate)
        return Reservation(estimate, event_id)

    def release(self, key: ApiKey | None, reservation: Reservation) -> None:
        """Give back a reservation of a request that ended before reaching a node."""
        if key is None:
            return
        if reservation.event_id is not None:
            self._settle_shared(key, reservation.event_id, 0)
        else:
            self.limits.settle(key, key.id, reservation.tokens, 0)

    def settle(self, record: RequestRecord) -> None:
        """Charge a finished request's tokens to its key and price them; Proxy.finish calls it."""
        tokens = (record.prompt_tokens or 0) + (record.completion_tokens or 0)
        self._learn_prompt_scale(record)
        if self.costs is not None and tokens:
            record.cost = self.costs.cost(
                record.model, record.node, record.prompt_tokens, record.completion_tokens
            )
        if record.key_id is None:
            return
        key = self.keys.by_id(record.key_id)
        if record.rate_event_id is not None:
            self._settle_shared(key, record.rate_event_id, tokens)
        else:
            self.limits.settle(key, record.key_id, record.reserved_tokens, tokens)
        record.reserved_tokens = 0
        record.rate_event_id = None

    def _settle_shared(self, key: ApiKey | None, event_id: int, tokens: int) -> None:
        """Write a settlement to the shared database in a worker thread, off the event loop.

        Until it commits, the request's reservation still counts, so a slow
        write can only reject too early, never admit too much.
        """
        assert self.shared is not None
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(None, self.shared.settle, key, event_id, tokens)
        self._settling.add(future)
        future.add_done_callback(functools.partial(self._settled, event_id))

    def _settled(self, event_id: int, future: asyncio.Future[None]) -> None:
        self._settling.discard(future)
        if not future.cancelled() and future.exception() is not None:
            # The reservation then counts until it leaves the window.
            log.error(
                "writing the tokens of key_rate_events row %d to the shared database failed",
                event_id,
                exc_info=future.exception(),
            )

    async def drain(self) -> None:
        """Wait for the settlements still being written; call before closing the engine."""
        if self._settling:
            await asyncio.gather(*self._settling, return_exceptions=True)

    def _learn_prompt_scale(self, record: RequestRecord) -> None:
        """Track the ratio of real to text-estimated prompt tokens per model (moving average)."""
        estimated = record.est_prompt_tokens
        if not record.prompt_tokens or not estimated or estimated <= 0:
            return
        ratio = record.prompt_tokens / estimated
        previous = self._prompt_scale.get(record.model)
        scale = ratio if previous is None else previous + PROMPT_SCALE_WEIGHT * (ratio - previous)
        self._prompt_scale[record.model] = scale

    def _load_quota_bases(self, keys: list[ApiKey]) -> None:
        if self.shared is not None:
            return  # the shared database counts quotas itself
        for key in keys:
            period_start = self.limits.needs_quota_base(key)
            if period_start is not None:
                used = tokens_since(self.engine, key.id, period_start)
                self.limits.set_quota_base(key.id, period_start, used)
