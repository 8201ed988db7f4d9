"""Per-node health: probe verdicts with hysteresis, and a circuit breaker fed by requests.

Two independent questions decide whether a node gets traffic:

* Is it up? Active probes answer this. A node leaves rotation only after
  ``evict_after`` failed probes in a row, and comes back after
  ``recover_after`` good ones, so one slow probe does not flap it. A failed
  probe does not count while the node is visibly streaming tokens: a node
  busy generating can be slow to answer ``/health`` and is not dead.
  llama-server's 503 while it loads its model is "not ready yet": the node
  waits outside rotation, and the wait counts as neither failure nor success.
* Do its requests succeed? The breaker answers this from real traffic.
  ``breaker_failures`` failed requests in a row (or one refused connection)
  open it; an open node gets no requests for ``open_s``, doubled on every
  failed trial up to ``max_open_s``. Then it is half-open: exactly one trial
  request goes through, and its outcome closes or reopens the breaker.

A node that fails fast looks idle to a load-based policy and would otherwise
attract ever more requests; the breaker is what stops that.

The class is pure state: callers pass the time in and act on the returned
flags, so tests drive it without a clock or a network.
"""

import enum
from dataclasses import dataclass


class Breaker(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True, slots=True)
class HealthPolicy:
    evict_after: int = 3
    recover_after: int = 2
    breaker_failures: int = 3
    open_s: float = 2.0
    max_open_s: float = 60.0


class NodeHealth:
    """The health of one node; every method returns True when routability changed."""

    def __init__(self, policy: HealthPolicy) -> None:
        self.policy = policy
        self.up = False
        self.loading = False
        # Until the first good probe, one success is enough to join.
        self.ever_up = False
        self.probe_failures = 0
        self.probe_successes = 0
        self.breaker = Breaker.CLOSED
        self.request_failures = 0
        self.open_until = 0.0
        self.open_s = policy.open_s
        self.trial_in_flight = False

    def routable(self) -> bool:
        if not self.up:
            return False
        if self.breaker is Breaker.OPEN:
            return False
        return not (self.breaker is Breaker.HALF_OPEN and self.trial_in_flight)

    # -- probes ----------------------------------------------------------

    def probe_ok(self) -> bool:
        before = self.routable()
        self.loading = False
        self.probe_failures = 0
        self.probe_successes += 1
        needed = self.policy.recover_after if self.ever_up else 1
        if not self.up and self.probe_successes >= needed:
            self.up = True
            self.ever_up = True
        return before != self.routable()

    def probe_loading(self) -> bool:
        """Record llama-server's 503 "loading": the node is not ready, and not failing."""
        before = self.routable()
        self.loading = True
        self.up = False
        self.probe_successes = 0
        return before != self.routable()

    def probe_failed(self, *, streaming: bool) -> bool:
        """Count a failed probe, unless the node is producing tokens right now."""
        if streaming:
            return False
        before = self.routable()
        self.loading = False
        self.probe_successes = 0
        self.probe_failures += 1
        if self.probe_failures >= self.policy.evict_after or not self.ever_up:
            self.up = False
        return before != self.routable()

    def unreachable(self) -> bool:
        """Take the node out after a refused connection: nothing listens there now.

        The node leaves rotation at once; probes bring it back.
        """
        before = self.routable()
        self.up = False
        self.probe_successes = 0
        self.probe_failures = max(self.probe_failures, self.policy.evict_after)
        return before != self.routable()

    # -- requests ----------------------------------------------------------

    def request_started(self) -> bool:
        if self.breaker is Breaker.HALF_OPEN and not self.trial_in_flight:
            self.trial_in_flight = True
            return True
        return False

    def request_succeeded(self) -> bool:
        before = self.routable()
        self.request_failures = 0
        if self.breaker is not Breaker.CLOSED:
            self.breaker = Breaker.CLOSED
            self.open_s = self.policy.open_s
        self.trial_in_flight = False
        return before != self.routable()

    def request_failed(self, now: float) -> bool:
        before = self.routable()
        self.request_failures += 1
        if self.breaker is Breaker.HALF_OPEN:
            # The trial failed: wait longer before the next one.
            self.open_s = min(self.open_s * 2.0, self.policy.max_open_s)
            self._open(now)
        elif self.request_failures >= self.policy.breaker_failures:
            self._open(now)
        return before != self.routable()

    def request_abandoned(self) -> bool:
        """Record a request that ended with no verdict on the node (the client left)."""
        if self.trial_in_flight:
            self.trial_in_flight = False
            return True
        return False

    def half_open_if_due(self, now: float) -> bool:
        """Move an open breaker whose wait is over to half-open."""
        if self.breaker is Breaker.OPEN and now >= self.open_until:
            before = self.routable()
            self.breaker = Breaker.HALF_OPEN
            self.trial_in_flight = False
            return before != self.routable()
        return False

    def _open(self, now: float) -> None:
        self.breaker = Breaker.OPEN
        self.open_until = now + self.open_s
        self.trial_in_flight = False

    def describe(self) -> dict[str, object]:
        return {
            "up": self.up,
            "loading": self.loading,
            "breaker": self.breaker.value,
            "probe_failures": self.probe_failures,
            "request_failures": self.request_failures,
        }
