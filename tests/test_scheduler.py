import asyncio

import numpy as np
import pytest

from sollol.routing.layout import COL_IN_FLIGHT, COL_SLOTS_TOTAL, NODE_COLUMNS
from sollol.routing.scheduler import (
    ClientGoneError,
    QueueFullError,
    QueueTimeoutError,
    Scheduler,
)


def make_scheduler(
    *,
    slots=1.0,
    in_flight=1.0,
    max_queued=8,
    aging_s=1000.0,
    timeout_s=5.0,
    node_queue=0.0,
    candidates=None,
):
    signals = np.zeros((1, NODE_COLUMNS))
    signals[0, COL_SLOTS_TOTAL] = slots
    signals[0, COL_IN_FLIGHT] = in_flight
    candidates = np.zeros(1, dtype=np.int64) if candidates is None else candidates
    scheduler = Scheduler(
        signals=signals,
        candidates_of=lambda model: candidates,
        max_queued_per_model=max_queued,
        aging_s=aging_s,
        timeout_s=timeout_s,
        node_queue_per_slot=node_queue,
    )
    return scheduler, signals


def never_disconnects():
    return asyncio.Event().wait()


async def wait_until_queued(scheduler, count):
    while scheduler.queued("m") < count:
        await asyncio.sleep(0)


async def free_one_slot(scheduler, signals):
    signals[0, COL_IN_FLIGHT] -= 1
    scheduler.wake()
    await asyncio.sleep(0)
    signals[0, COL_IN_FLIGHT] += 1  # the admitted request now occupies the slot


async def test_free_node_admits_at_once():
    scheduler, _ = make_scheduler(in_flight=0)
    assert await scheduler.admit("m", 5, never_disconnects) == 0.0


async def test_unknown_slot_count_is_never_full():
    scheduler, _ = make_scheduler(slots=np.nan, in_flight=50)
    assert await scheduler.admit("m", 5, never_disconnects) == 0.0


async def test_highest_priority_first():
    scheduler, signals = make_scheduler()
    admitted = []

    async def request(priority):
        await scheduler.admit("m", priority, never_disconnects)
        admitted.append(priority)

    tasks = [asyncio.create_task(request(priority)) for priority in (1, 10, 5)]
    await wait_until_queued(scheduler, 3)
    for _ in range(3):
        await free_one_slot(scheduler, signals)
    await asyncio.gather(*tasks)
    assert admitted == [10, 5, 1]


async def test_equal_priority_is_first_come_first_served():
    scheduler, signals = make_scheduler()
    admitted = []

    async def request(name):
        await scheduler.admit("m", 5, never_disconnects)
        admitted.append(name)

    tasks = []
    for name in ("first", "second", "third"):
        tasks.append(asyncio.create_task(request(name)))
        await wait_until_queued(scheduler, len(tasks))
    for _ in range(3):
        await free_one_slot(scheduler, signals)
    await asyncio.gather(*tasks)
    assert admitted == ["first", "second", "third"]


async def test_aging_lets_old_low_priority_through():
    scheduler, signals = make_scheduler(aging_s=0.01)
    admitted = []

    async def request(priority):
        await scheduler.admit("m", priority, never_disconnects)
        admitted.append(priority)

    old = asyncio.create_task(request(1))
    await wait_until_queued(scheduler, 1)
    await asyncio.sleep(0.2)  # 20 aging steps: effective priority 21
    new = asyncio.create_task(request(10))
    await wait_until_queued(scheduler, 2)
    await free_one_slot(scheduler, signals)
    await free_one_slot(scheduler, signals)
    await asyncio.gather(old, new)
    assert admitted == [1, 10]


async def test_full_queue_raises():
    scheduler, _ = make_scheduler(max_queued=2)
    waiting = [asyncio.create_task(scheduler.admit("m", 5, never_disconnects)) for _ in range(2)]
    await wait_until_queued(scheduler, 2)
    with pytest.raises(QueueFullError):
        await scheduler.admit("m", 5, never_disconnects)
    for task in waiting:
        task.cancel()
    await asyncio.gather(*waiting, return_exceptions=True)
    assert scheduler.queued() == 0


async def test_zero_bound_rejects_when_full():
    scheduler, _ = make_scheduler(max_queued=0)
    with pytest.raises(QueueFullError):
        await scheduler.admit("m", 5, never_disconnects)


async def test_disconnect_leaves_queue():
    scheduler, _ = make_scheduler()
    disconnected = asyncio.Event()
    task = asyncio.create_task(scheduler.admit("m", 5, disconnected.wait))
    await wait_until_queued(scheduler, 1)
    disconnected.set()
    with pytest.raises(ClientGoneError):
        await task
    assert scheduler.queued() == 0


async def test_timeout_leaves_queue():
    scheduler, _ = make_scheduler(timeout_s=0.05)
    with pytest.raises(QueueTimeoutError):
        await scheduler.admit("m", 5, never_disconnects)
    assert scheduler.queued() == 0


async def test_wait_time_is_reported():
    scheduler, signals = make_scheduler()
    task = asyncio.create_task(scheduler.admit("m", 5, never_disconnects))
    await wait_until_queued(scheduler, 1)
    await asyncio.sleep(0.05)
    await free_one_slot(scheduler, signals)
    assert await task >= 40.0


async def test_node_queue_headroom_admits_beyond_slots():
    scheduler, signals = make_scheduler(slots=2.0, in_flight=3.0, node_queue=1.0)
    assert await scheduler.admit("m", 5, never_disconnects) == 0.0
    signals[0, COL_IN_FLIGHT] = 4.0
    assert scheduler.is_full("m")


async def test_waiters_released_when_no_node_is_left():
    candidates = np.zeros(1, dtype=np.int64)
    scheduler, _ = make_scheduler(candidates=candidates)
    task = asyncio.create_task(scheduler.admit("m", 5, never_disconnects))
    await wait_until_queued(scheduler, 1)
    candidates.resize(0, refcheck=False)  # the only node became unhealthy
    scheduler.wake()
    assert await task >= 0.0
