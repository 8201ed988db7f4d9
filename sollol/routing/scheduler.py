"""Priority admission: requests wait here while every node that serves their model is full.

A node is full when the router has ``slots * (1 + node_queue_per_slot)``
requests in flight there. Besides one request per slot, the node keeps a short
queue of its own. A freed slot then starts its next request at once instead of
idling while the router hands one over. A node whose slot count is unknown is
never full, so its own queue takes the overflow. Waiting requests are served by effective priority,
``priority + waited_s / aging_s``, so a batch request (1) waiting long enough
overtakes new critical ones (10) and never starves. Ties go to the earliest.
"""

import asyncio
import itertools
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np

from .layout import COL_IN_FLIGHT, COL_SLOTS_TOTAL


class QueueFullError(Exception):
    """The model's queue has reached its bound."""


class QueueTimeoutError(Exception):
    """No node became free within the queue timeout."""


class ClientGoneError(Exception):
    """The client disconnected while its request waited."""


@dataclass(order=False, slots=True)
class _Waiter:
    priority: int
    enqueued_at: float
    sequence: int
    ready: asyncio.Future[None] = field(repr=False)

    def effective_priority(self, now: float, aging_s: float) -> float:
        return self.priority + (now - self.enqueued_at) / aging_s


class Scheduler:
    def __init__(
        self,
        *,
        signals: np.ndarray,
        candidates_of: Callable[[str], np.ndarray],
        max_queued_per_model: int,
        aging_s: float,
        timeout_s: float,
        node_queue_per_slot: float = 1.0,
    ) -> None:
        self._signals = signals
        self._capacity_per_slot = 1.0 + node_queue_per_slot
        self._candidates_of = candidates_of
        self.max_queued_per_model = max_queued_per_model
        self.aging_s = aging_s
        self.timeout_s = timeout_s
        self._queues: dict[str, list[_Waiter]] = {}
        self._sequence = itertools.count()

    def set_signals(self, signals: np.ndarray) -> None:
        """Read this matrix from now on; the cluster reallocates it when a node joins."""
        self._signals = signals

    def queued_by_model(self) -> dict[str, int]:
        return {model: len(queue) for model, queue in self._queues.items() if queue}

    def queued(self, model: str | None = None) -> int:
        if model is not None:
            return len(self._queues.get(model, ()))
        return sum(len(queue) for queue in self._queues.values())

    def is_full(self, model: str) -> bool:
        """Return True when every healthy node serving ``model`` has all its slots in use."""
        candidates = self._candidates_of(model)
        if len(candidates) == 0:
            return False  # nothing to wait for; the caller reports no node
        for node in candidates:
            slots = self._signals[node, COL_SLOTS_TOTAL]
            if math.isnan(slots):
                return False
            if self._signals[node, COL_IN_FLIGHT] < slots * self._capacity_per_slot:
                return False
        return True

    async def admit(
        self, model: str, priority: int, disconnected: Callable[[], Awaitable[None]]
    ) -> float:
        """Return at once, or once a node is free for this request; return the wait in ms.

        Raises QueueFullError when the model's queue is at its bound,
        QueueTimeoutError after ``timeout_s``, and ClientGoneError when the
        awaitable that ``disconnected()`` returns completes first. A request
        that leaves early is removed from the queue.
        """
        queue = self._queues.get(model)
        if not queue and not self.is_full(model):
            return 0.0
        if len(queue or ()) >= self.max_queued_per_model:
            raise QueueFullError(model)

        started = time.monotonic()
        waiter = _Waiter(
            priority,
            started,
            next(self._sequence),
            asyncio.get_running_loop().create_future(),
        )
        self._queues.setdefault(model, []).append(waiter)
        disconnect = asyncio.ensure_future(disconnected())
        try:
            done, _ = await asyncio.wait(
                {waiter.ready, disconnect},
                timeout=self.timeout_s,
                return_when=asyncio.FIRST_COMPLETED,
            )
            if waiter.ready in done:
                return (time.monotonic() - started) * 1000.0
            if disconnect in done:
                raise ClientGoneError(model)
            raise QueueTimeoutError(model)
        finally:
            disconnect.cancel()
            self._remove(model, waiter)

    def wake(self) -> None:
        """Let waiting requests go, best first, while their model has a free node."""
        now = time.monotonic()
        for model, queue in self._queues.items():
            # Each woken request takes a slot only once it runs, so count the
            # ones released in this call against the free capacity.
            free = self._free_slots(model)
            while queue and free > 0:
                best = max(
                    queue, key=lambda w: (w.effective_priority(now, self.aging_s), -w.sequence)
                )
                queue.remove(best)
                if not best.ready.done():
                    best.ready.set_result(None)
                free -= 1

    def _free_slots(self, model: str) -> float:
        candidates = self._candidates_of(model)
        if len(candidates) == 0:
            # No healthy node is left: let the waiters go now and fail with
            # 503 at once, rather than wait out the queue timeout.
            return math.inf
        free = 0.0
        for node in candidates:
            slots = self._signals[node, COL_SLOTS_TOTAL]
            if math.isnan(slots):
                return math.inf
            capacity = slots * self._capacity_per_slot
            free += max(0.0, capacity - self._signals[node, COL_IN_FLIGHT])
        return free

    def _remove(self, model: str, waiter: _Waiter) -> None:
        queue = self._queues.get(model)
        if queue and waiter in queue:
            queue.remove(waiter)
        if queue is not None and not queue:
            del self._queues[model]
