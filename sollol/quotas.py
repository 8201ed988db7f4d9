"""Per-key limits: requests per minute, tokens per minute and a token quota per period.

A request's tokens are known only once its node has replied, so each limit
on tokens works in two steps. ``admit`` checks the tokens used so far plus
the tokens that requests still in flight have reserved, and reserves this
request's estimate (estimated prompt tokens plus its output limit). ``settle``
releases the reservation and charges the node's real counts. Reserving keeps
a burst of concurrent requests from all passing a check that none of them has
been charged against yet.

A request whose estimate alone exceeds a token limit still runs when the key
has used nothing in the window and has nothing in flight. Otherwise a large
``max_tokens`` would lock a key out for good. Its real tokens then fill the
minute's window up to the limit, and count in full against the quota.

The windows come from the ``limits`` package, in memory: a moving window for
requests per minute (exact), a sliding window counter for tokens per minute
(constant memory per key, where a moving window keeps one entry per token).
The quota follows the UTC calendar day or month.

Everything runs on the event loop, so a check and its reservation cannot be
interleaved with another request's.
"""

import calendar
import time
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime

from limits import RateLimitItemPerMinute
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter, SlidingWindowCounterRateLimiter

from .errors import RateLimitError
from .keys import ApiKey


def period_bounds(period: str, now_s: float) -> tuple[float, float]:
    """Return the start and end, as Unix seconds, of the UTC day or month holding ``now_s``."""
    moment = datetime.fromtimestamp(now_s, UTC)
    if period == "day":
        start = moment.replace(hour=0, minute=0, second=0, microsecond=0)
        return start.timestamp(), start.timestamp() + 86400.0
    start = moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    days = calendar.monthrange(start.year, start.month)[1]
    return start.timestamp(), start.timestamp() + days * 86400.0


class KeyLimits:
    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        storage = MemoryStorage()
        self._requests = MovingWindowRateLimiter(storage)
        self._tokens = SlidingWindowCounterRateLimiter(storage)
        # Tokens reserved by the key's requests in flight.
        self._reserved: dict[int, int] = defaultdict(int)
        # Quota use per key: (period start, tokens charged by this router in it).
        self._quota_charged: dict[int, tuple[float, int]] = {}
        # Tokens of the key's period that the history held when the router
        # first saw the key; see set_quota_base.
        self._quota_base: dict[int, tuple[float, int]] = {}

    def reserved(self, key_id: int) -> int:
        return self._reserved.get(key_id, 0)

    def needs_quota_base(self, key: ApiKey) -> float | None:
        """Return the period start to load the key's past usage from, or None if loaded."""
        if key.quota_tokens is None or key.quota_period is None:
            return None
        start, _ = period_bounds(key.quota_period, self._clock())
        base = self._quota_base.get(key.id)
        return start if base is None else None

    def set_quota_base(self, key_id: int, period_start: float, tokens: int) -> None:
        """Count tokens the history already holds for this key's period (earlier runs)."""
        self._quota_base.setdefault(key_id, (period_start, tokens))

    def admit(self, key: ApiKey, estimated_tokens: int) -> int:
        """Check every limit of ``key``, then count the request; return the tokens reserved.

        Raises RateLimitError, with the seconds until the limit frees up.
        """
        reserved = self._reserved.get(key.id, 0)
        if key.quota_tokens is not None and key.quota_period is not None:
            used = self.quota_used(key)
            if over_limit(used, reserved, estimated_tokens, key.quota_tokens):
                _, end = period_bounds(key.quota_period, self._clock())
                raise RateLimitError(
                    f"API key {key.prefix}... used {used} of its {key.quota_tokens} tokens "
                    f"this {key.quota_period} (UTC), with {reserved} more reserved by "
                    "requests in flight; the quota renews at the start of the next "
                    f"{key.quota_period}",
                    code="quota_exceeded",
                    retry_after_s=end - self._clock(),
                )
        if key.tpm is not None:
            item = RateLimitItemPerMinute(key.tpm)
            stats = self._tokens.get_window_stats(item, "tpm", str(key.id))
            used = key.tpm - stats.remaining
            if over_limit(used, reserved, estimated_tokens, key.tpm):
                raise RateLimitError(
                    f"API key {key.prefix}... is over its limit of {key.tpm} tokens per minute "
                    f"({used} used, {reserved} reserved by requests in flight, "
                    f"{estimated_tokens} estimated for this one)",
                    code="rate_limit_tokens",
                    retry_after_s=self._retry_after_s(stats.reset_time),
                )
        if key.rpm is not None:
            item = RateLimitItemPerMinute(key.rpm)
            if not self._requests.hit(item, "rpm", str(key.id)):
                stats = self._requests.get_window_stats(item, "rpm", str(key.id))
                raise RateLimitError(
                    f"API key {key.prefix}... is over its limit of {key.rpm} requests per minute",
                    code="rate_limit_requests",
                    retry_after_s=self._retry_after_s(stats.reset_time),
                )
        self._reserved[key.id] = reserved + estimated_tokens
        return estimated_tokens

    def settle(self, key: ApiKey | None, key_id: int, reserved_tokens: int, tokens: int) -> None:
        """Release a request's reservation and charge its real token count.

        ``key`` is None when the key was revoked while the request ran; its
        reservation is released and nothing more is counted.
        """
        left = self._reserved.get(key_id, 0) - reserved_tokens
        if left > 0:
            self._reserved[key_id] = left
        else:
            self._reserved.pop(key_id, None)
        if key is None or tokens <= 0:
            return
        if key.tpm is not None:
            item = RateLimitItemPerMinute(key.tpm)
            remaining = self._tokens.get_window_stats(item, "tpm", str(key.id)).remaining
            # The window cannot count past its limit, and a full window already
            # rejects every request until it slides, so the excess is dropped.
            charge = min(tokens, remaining)
            if charge > 0:
                self._tokens.hit(item, "tpm", str(key.id), cost=charge)
        if key.quota_period is not None:
            start, _ = period_bounds(key.quota_period, self._clock())
            period, charged = self._quota_charged.get(key.id, (start, 0))
            self._quota_charged[key.id] = (start, (charged if period == start else 0) + tokens)

    def quota_used(self, key: ApiKey) -> int:
        """Return the tokens counted against the key's quota in the current period."""
        if key.quota_period is None:
            return 0
        start, _ = period_bounds(key.quota_period, self._clock())
        period, charged = self._quota_charged.get(key.id, (start, 0))
        base_period, base = self._quota_base.get(key.id, (start, 0))
        used = charged if period == start else 0
        if base_period == start:
            used += base
        return used

    def _retry_after_s(self, reset_time: float) -> float:
        return max(1.0, reset_time - self._clock())


def over_limit(used: int, reserved: int, estimate: int, limit: int) -> bool:
    if used >= limit:
        return True
    if used == 0 and reserved == 0:
        return False  # a lone request runs whatever its estimate
    return used + reserved + estimate > limit
