"""NodeHealth: probe hysteresis, the loading state, and the circuit breaker, without a clock."""

import pytest

from sollol.health import Breaker, HealthPolicy, NodeHealth

POLICY = HealthPolicy(
    evict_after=3, recover_after=2, breaker_failures=3, open_s=2.0, max_open_s=5.0
)


@pytest.fixture
def health() -> NodeHealth:
    node = NodeHealth(POLICY)
    node.probe_ok()
    return node


def test_first_good_probe_brings_a_new_node_in():
    node = NodeHealth(POLICY)
    assert not node.routable()
    assert node.probe_ok() is True
    assert node.routable()


def test_eviction_needs_consecutive_failed_probes(health):
    assert health.probe_failed(streaming=False) is False
    assert health.probe_failed(streaming=False) is False
    health.probe_ok()  # a success in between resets the count
    health.probe_failed(streaming=False)
    health.probe_failed(streaming=False)
    assert health.routable()
    assert health.probe_failed(streaming=False) is True
    assert not health.routable()


def test_recovery_needs_consecutive_good_probes(health):
    for _ in range(3):
        health.probe_failed(streaming=False)
    assert health.probe_ok() is False
    assert not health.routable()
    assert health.probe_ok() is True
    assert health.routable()


def test_failed_probe_while_streaming_does_not_count(health):
    for _ in range(10):
        assert health.probe_failed(streaming=True) is False
    assert health.routable()
    assert health.probe_failures == 0


def test_loading_is_not_ready_and_not_a_failure(health):
    assert health.probe_loading() is True
    assert not health.routable()
    assert health.probe_failures == 0
    # Once the model is loaded, a node that was up before needs the usual
    # run of good probes.
    assert health.probe_ok() is False
    assert health.probe_ok() is True
    assert health.routable()


def test_refused_connection_takes_the_node_out_at_once(health):
    assert health.unreachable() is True
    assert not health.routable()
    health.probe_ok()
    assert health.probe_ok() is True


def test_breaker_opens_after_consecutive_request_failures(health):
    assert health.request_failed(now=0.0) is False
    assert health.request_failed(now=0.0) is False
    assert health.request_failed(now=0.0) is True
    assert health.breaker is Breaker.OPEN
    assert not health.routable()
    # Probes that succeed do not close it: the node responds but fails its requests.
    health.probe_ok()
    assert not health.routable()


def test_success_resets_failure_count(health):
    health.request_failed(now=0.0)
    health.request_failed(now=0.0)
    health.request_succeeded()
    health.request_failed(now=0.0)
    assert health.breaker is Breaker.CLOSED


def test_half_open_lets_exactly_one_trial_through(health):
    for _ in range(3):
        health.request_failed(now=10.0)
    assert health.half_open_if_due(now=11.0) is False  # open for 2 s
    assert health.half_open_if_due(now=12.0) is True
    assert health.routable()
    assert health.request_started() is True  # the trial
    assert not health.routable()  # no other request while it runs
    assert health.request_succeeded() is True
    assert health.breaker is Breaker.CLOSED
    assert health.routable()


def test_failed_trial_doubles_open_time(health):
    for _ in range(3):
        health.request_failed(now=0.0)
    waits = []
    now = 0.0
    for _ in range(4):
        now = health.open_until
        health.half_open_if_due(now)
        health.request_started()
        health.request_failed(now)
        waits.append(health.open_until - now)
    assert waits == [4.0, 5.0, 5.0, 5.0]
    # A good trial resets the wait.
    health.half_open_if_due(health.open_until)
    health.request_started()
    health.request_succeeded()
    assert health.open_s == POLICY.open_s


def test_abandoned_trial_frees_the_half_open_slot(health):
    for _ in range(3):
        health.request_failed(now=0.0)
    health.half_open_if_due(now=2.0)
    health.request_started()
    assert health.request_abandoned() is True
    assert health.routable()
