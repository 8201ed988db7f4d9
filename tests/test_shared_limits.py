"""Per-key limits counted in a real PostgreSQL database by two routers' counters.

Each counter has an engine of its own, as two router processes would. Times
are passed in, so the windows are checked without waiting.
"""

import itertools
import math
import time

import pytest
from sqlalchemy import insert

from sollol.errors import RateLimitError
from sollol.history import create_history_engine, requests_table
from sollol.keys import ApiKey
from sollol.quotas import period_bounds
from sollol.shared_limits import SharedKeyLimits

NOW_S = 1_800_000_000.0
_numbers = itertools.count()


@pytest.fixture
def routers(postgres_server):
    url = postgres_server.create_database(f"shared_limits_{time.monotonic_ns()}")
    engines = [create_history_engine(url), create_history_engine(url)]
    try:
        yield [SharedKeyLimits(engine) for engine in engines]
    finally:
        for engine in engines:
            engine.dispose()


def make_key(**limits) -> ApiKey:
    number = next(_numbers)
    return ApiKey(id=number, name=f"key-{number}", prefix=f"sk-{number}", **limits)


def rejection_code(limits: SharedKeyLimits, key: ApiKey, estimate: int, now_s: float) -> str:
    with pytest.raises(RateLimitError) as caught:
        limits.admit(key, estimate, now_s)
    return caught.value.code


def test_rpm_counts_both_routers(routers):
    one, two = routers
    key = make_key(rpm=3)
    one.admit(key, 0, NOW_S)
    two.admit(key, 0, NOW_S + 1)
    one.admit(key, 0, NOW_S + 2)
    assert rejection_code(two, key, 0, NOW_S + 3) == "rate_limit_requests"
    # The first request leaves the window 60 s after it was admitted.
    two.admit(key, 0, NOW_S + 60.5)


def test_tpm_sees_other_routers_reservations(routers):
    one, two = routers
    key = make_key(tpm=100)
    first = one.admit(key, 40, NOW_S)
    two.admit(key, 40, NOW_S)  # 40 reserved + 40 fits
    assert rejection_code(one, key, 40, NOW_S) == "rate_limit_tokens"  # 80 + 40 > 100
    one.settle(key, first, 10, NOW_S + 1)
    two.admit(key, 40, NOW_S + 2)  # 10 used + 40 reserved + 40 fits


def test_tpm_charges_real_tokens(routers):
    one, two = routers
    key = make_key(tpm=100)
    event_id = one.admit(key, 10, NOW_S)
    one.settle(key, event_id, 95, NOW_S + 1)  # the reply was longer than estimated
    with pytest.raises(RateLimitError) as caught:
        two.admit(key, 10, NOW_S + 2)
    assert caught.value.code == "rate_limit_tokens"
    # The reservation row at NOW_S holds 0 now; the 95 tokens leave at NOW_S + 61.
    assert caught.value.headers["Retry-After"] == "59"
    two.admit(key, 10, NOW_S + 61.5)


def test_lone_request_runs_whatever_estimate(routers):
    one, two = routers
    key = make_key(tpm=100)
    event_id = one.admit(key, 500, NOW_S)
    assert rejection_code(two, key, 1, NOW_S) == "rate_limit_tokens"  # the 500 are reserved
    one.settle(key, event_id, 300, NOW_S + 1)
    assert rejection_code(two, key, 1, NOW_S + 2) == "rate_limit_tokens"  # the window is full


def test_reservation_released_without_tokens(routers):
    one, two = routers
    key = make_key(tpm=100)
    first = one.admit(key, 60, NOW_S)
    assert rejection_code(two, key, 60, NOW_S) == "rate_limit_tokens"
    one.settle(None, first, 500, NOW_S)  # revoked while it ran: nothing is charged
    two.admit(key, 60, NOW_S + 1)


def test_quota_counts_both_routers_and_history(routers):
    one, two = routers
    key = make_key(quota_tokens=100, quota_period="day")
    start, end = period_bounds("day", NOW_S)
    history = insert(requests_table).values(
        started_at=start + 10,
        route="/v1/chat/completions",
        model="tiny",
        stream=False,
        status=200,
        outcome="ok",
        attempts=1,
        latency_ms=5.0,
        key_id=key.id,
        prompt_tokens=20,
        completion_tokens=20,
    )
    with one.engine.begin() as connection:
        connection.execute(history)

    event_id = one.admit(key, 30, NOW_S)  # 40 in the history + 30 fits
    assert rejection_code(two, key, 31, NOW_S) == "quota_exceeded"  # 40 + 30 + 31 > 100
    one.settle(key, event_id, 50, NOW_S)
    event_id = two.admit(key, 10, NOW_S)  # 90 used + 10 fits
    two.settle(key, event_id, 10, NOW_S)
    with pytest.raises(RateLimitError) as caught:
        one.admit(key, 1, NOW_S)
    assert caught.value.code == "quota_exceeded"
    assert caught.value.headers["Retry-After"] == str(math.ceil(end - NOW_S))
    # A new day starts from 0.
    one.admit(key, 90, end + 1)
