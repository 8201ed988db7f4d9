"""A discrete-event simulation, in simulated time, of the router in front of a cluster.

Every policy but the oracle decides through the production routing code: the
same NodeSignals, RoutingEngine.decide, scoring core and learned scorer the
server uses. They get the signals the server would get: in-flight counts at
dispatch and release, moving averages from finished requests, and queue depth
and loaded models from periodic probes. Only the nodes are simulated: slots, a
FIFO queue per node, model loading with LRU eviction when memory is full,
batched decode that slows as streams are added, and failed attempts that
the router retries on another node.

NOTE: a stream's decode speed is fixed when it starts, from the streams then
running; real batched decoding speeds up again as neighbours finish.
"""

import heapq
import math
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..history import RequestRecord
from ..routing.engine import NodeSignals, RoutingEngine
from ..routing.features import RequestFeatures
from ..routing.layout import MODEL_FITS, MODEL_LOADED
from .scenario import ModelProfile, NodeProfile, Scenario

ORACLE_POLICY = "oracle"
# Simulated time 0 is this Unix time in the history rows.
EPOCH_S = 1_767_225_600.0
MAX_ATTEMPTS_DRAWN = 4


@dataclass(slots=True)
class Trace:
    """A request stream drawn once and replayed to every policy."""

    arrival_s: np.ndarray
    model: np.ndarray  # index into scenario.models
    prompt_tokens: np.ndarray
    est_prompt_tokens: np.ndarray
    max_tokens: np.ndarray
    output_tokens: np.ndarray
    failure_draw: np.ndarray  # requests x attempts, uniform 0..1
    failure_point: np.ndarray  # requests x attempts: share of the work done when it fails

    def __len__(self) -> int:
        return len(self.arrival_s)


def make_trace(scenario: Scenario, count: int, seed: int) -> Trace:
    rng = np.random.default_rng(seed)
    arrival_s = _arrivals(scenario, count, rng)
    shares = np.array([model.share for model in scenario.models])
    model = rng.choice(len(scenario.models), count, p=shares / shares.sum())
    class_shares = np.array([kind.share for kind in scenario.classes])
    kind = rng.choice(len(scenario.classes), count, p=class_shares / class_shares.sum())
    medians = np.array([c.prompt_median_tokens for c in scenario.classes])[kind]
    sigmas = np.array([c.prompt_sigma for c in scenario.classes])[kind]
    prompt_tokens = np.maximum(1.0, np.round(medians * np.exp(sigmas * rng.standard_normal(count))))
    max_tokens = np.array([c.max_tokens for c in scenario.classes], dtype=float)[kind]
    low = np.array([c.output_share[0] for c in scenario.classes])[kind]
    high = np.array([c.output_share[1] for c in scenario.classes])[kind]
    output_tokens = np.maximum(1.0, np.round(max_tokens * rng.uniform(low, high)))
    noise = np.exp(scenario.prompt_estimate_sigma * rng.standard_normal(count))
    return Trace(
        arrival_s=arrival_s,
        model=model,
        prompt_tokens=prompt_tokens,
        est_prompt_tokens=prompt_tokens * noise,
        max_tokens=max_tokens,
        output_tokens=output_tokens,
        failure_draw=rng.uniform(size=(count, MAX_ATTEMPTS_DRAWN)),
        failure_point=rng.uniform(size=(count, MAX_ATTEMPTS_DRAWN)),
    )


def _arrivals(scenario: Scenario, count: int, rng: np.random.Generator) -> np.ndarray:
    """Draw Poisson arrivals whose rate is multiplied by burst_factor during bursts."""
    peak = scenario.rate_per_s * scenario.burst_factor
    times = np.empty(count)
    now = 0.0
    drawn = 0
    # Thinning: draw at the peak rate and keep each arrival with probability rate(t)/peak.
    while drawn < count:
        now += rng.exponential(1.0 / peak)
        in_burst = (now % scenario.burst_every_s) < scenario.burst_length_s
        rate = peak if in_burst else scenario.rate_per_s
        if rng.uniform() * peak < rate:
            times[drawn] = now
            drawn += 1
    return times


@dataclass(slots=True)
class Job:
    request: int
    attempt: int
    node: int
    dispatched_s: float
    tried: frozenset[int]
    started_s: float = math.nan
    first_token_s: float = math.nan
    end_s: float = math.nan
    service_s: float = math.nan
    fails: bool = False
    record: RequestRecord | None = None


@dataclass(slots=True)
class SimNode:
    profile: NodeProfile
    index: int
    running: dict[int, Job] = field(default_factory=dict)  # by id(job)
    waiting: deque[Job] = field(default_factory=deque)
    resident: OrderedDict[int, None] = field(default_factory=OrderedDict)  # model indices, LRU

    def used_bytes(self, models: tuple[ModelProfile, ...]) -> int:
        return sum(models[index].size_bytes for index in self.resident)


@dataclass(slots=True)
class RunResult:
    policy: str
    latency_s: np.ndarray  # end to end, requests that succeeded
    ttft_s: np.ndarray
    failures: int
    duration_s: float
    decisions: dict[str, int]


class Simulation:
    """One policy run over one trace. ``record`` receives a history row per request."""

    def __init__(
        self,
        scenario: Scenario,
        trace: Trace,
        policy: str,
        *,
        learned: object | None = None,
        record: Callable[[RequestRecord], None] | None = None,
        seed: int = 0,
    ) -> None:
        self.scenario = scenario
        self.trace = trace
        self.policy = policy
        self.models = scenario.models
        self.nodes = [SimNode(profile, index) for index, profile in enumerate(scenario.nodes)]
        self.signals = NodeSignals(len(self.nodes))
        engine_policy = "round_robin" if policy == ORACLE_POLICY else policy
        self.engine = RoutingEngine(self.signals, default_policy=engine_policy)
        self.engine.learned = learned  # type: ignore[assignment]
        self.engine.explore_share = scenario.explore_share
        self.engine.random.seed(seed)
        self.record = record
        self.candidates = [
            np.array(
                [n.index for n in self.nodes if model.size_bytes <= n.profile.memory_bytes],
                dtype=np.int64,
            )
            for model in self.models
        ]
        self._events: list[tuple[float, int, str, object]] = []
        self._sequence = 0
        self._latency_s: list[float] = []
        self._ttft_s: list[float] = []
        self._failures = 0
        self._last_end_s = 0.0
        self._decisions: dict[str, int] = {}
        self._setup_nodes()

    def _setup_nodes(self) -> None:
        for node in self.nodes:
            profile = node.profile
            self.signals.set_static(node.index, is_gpu=profile.gpu, cost_weight=1.0)
            self.signals.set_healthy(node.index, True)
            self.signals.set_slots(node.index, profile.slots)
            # Preload the most requested models that fit.
            for index in sorted(range(len(self.models)), key=lambda i: -self.models[i].share):
                size = self.models[index].size_bytes
                if node.used_bytes(self.models) + size <= profile.memory_bytes:
                    node.resident[index] = None
            for model in self.models:
                state = self.signals.model_state(model.name)
                state[node.index, MODEL_FITS] = float(model.size_bytes <= profile.memory_bytes)
        self._probe()

    # -- event loop --------------------------------------------------------

    def run(self, progress: Callable[[int], None] | None = None) -> RunResult:
        for request in range(len(self.trace)):
            self._push(float(self.trace.arrival_s[request]), "arrive", request)
        self._push(self.scenario.probe_interval_s, "probe", None)
        arrived = 0
        pending = len(self.trace)
        while self._events and pending > 0:
            now, _, kind, item = heapq.heappop(self._events)
            if kind == "arrive":
                self._dispatch(int(item), 1, frozenset(), now)  # type: ignore[call-overload]
                arrived += 1
                if progress is not None and arrived % 1000 == 0:
                    progress(arrived)
            elif kind == "finish":
                pending -= self._finish(item, now)  # type: ignore[arg-type]
            else:
                self._probe()
                self._push(now + self.scenario.probe_interval_s, "probe", None)
        first_s = float(self.trace.arrival_s[0]) if len(self.trace) else 0.0
        return RunResult(
            policy=self.policy,
            latency_s=np.array(self._latency_s),
            ttft_s=np.array(self._ttft_s),
            failures=self._failures,
            duration_s=self._last_end_s - first_s,
            decisions=dict(self._decisions),
        )

    def _push(self, time_s: float, kind: str, item: object) -> None:
        self._sequence += 1
        heapq.heappush(self._events, (time_s, self._sequence, kind, item))

    def _probe(self) -> None:
        """Copy what a health probe would report: queued requests and loaded models."""
        for node in self.nodes:
            self.signals.set_queue_depth(node.index, float(len(node.waiting)))
            for index, model in enumerate(self.models):
                loaded = 1.0 if index in node.resident else 0.0
                self.signals.model_state(model.name)[node.index, MODEL_LOADED] = loaded

    # -- routing -----------------------------------------------------------

    def _dispatch(self, request: int, attempt: int, tried: frozenset[int], now: float) -> bool:
        """Send the request to a node; return False when no node is left to try."""
        model = self.models[int(self.trace.model[request])]
        candidates = self.candidates[int(self.trace.model[request])]
        if tried:
            candidates = candidates[~np.isin(candidates, list(tried))]
        if self.policy == ORACLE_POLICY:
            node_index, label = self._oracle_choice(request, candidates, now), ORACLE_POLICY
        else:
            features = RequestFeatures(
                task="chat",
                prompt_tokens=float(self.trace.est_prompt_tokens[request]),
                max_tokens=float(self.trace.max_tokens[request]),
            )
            decision = self.engine.decide(
                candidates,
                features,
                model_state=self.signals.model_state(model.name),
                model=model.name,
            )
            node_index = -1 if decision is None else decision.node
            label = "" if decision is None else decision.policy
        if node_index < 0:
            return False
        self._decisions[label] = self._decisions.get(label, 0) + 1
        job = Job(request, attempt, node_index, now, tried | {node_index})
        job.record = self._new_record(job, model.name, label, now)
        self.signals.acquire(node_index)
        node = self.nodes[node_index]
        if len(node.running) < node.profile.slots:
            self._start(node, job, now)
        else:
            node.waiting.append(job)
        return True

    def _new_record(self, job: Job, model: str, label: str, now: float) -> RequestRecord | None:
        if self.record is None:
            return None
        snapshot = self.signals.snapshot(job.node, model)
        return RequestRecord(
            started_at=EPOCH_S + float(self.trace.arrival_s[job.request]),
            route="/v1/chat/completions",
            model=model,
            stream=True,
            node=self.nodes[job.node].profile.name,
            attempts=job.attempt,
            policy=label,
            prompt_tokens=int(self.trace.prompt_tokens[job.request]),
            est_prompt_tokens=float(self.trace.est_prompt_tokens[job.request]),
            max_tokens=float(self.trace.max_tokens[job.request]),
            node_in_flight=snapshot.in_flight,
            node_queue_depth=snapshot.queue_depth,
            node_slots=snapshot.slots,
            model_loaded=snapshot.model_loaded,
            node_ttft_ms_avg=snapshot.ttft_ms,
            node_decode_tps_avg=snapshot.decode_tps,
        )

    # -- nodes -------------------------------------------------------------

    def _service_times(self, node: SimNode, request: int, running: int) -> tuple[float, float]:
        """Return (seconds to first token, total seconds) once started, model loaded."""
        profile = node.profile
        model = self.models[int(self.trace.model[request])]
        prefill_s = self.trace.prompt_tokens[request] * model.cost_factor / profile.prefill_tps
        stream_tps = profile.decode_tps / model.cost_factor
        stream_tps /= 1.0 + profile.batch_slowdown * max(0, running - 1)
        decode_s = self.trace.output_tokens[request] / stream_tps
        return float(prefill_s), float(prefill_s + decode_s)

    def _load_s(self, node: SimNode, model_index: int) -> float:
        if model_index in node.resident:
            return 0.0
        return self.models[model_index].size_bytes / node.profile.load_bytes_per_s

    def _start(self, node: SimNode, job: Job, now: float) -> None:
        model_index = int(self.trace.model[job.request])
        load_s = self._load_s(node, model_index)
        self._make_resident(node, model_index)
        node.running[id(job)] = job
        prefill_s, service_s = self._service_times(node, job.request, len(node.running))
        job.started_s = now
        job.first_token_s = now + load_s + prefill_s
        job.service_s = load_s + service_s
        attempt = min(job.attempt, MAX_ATTEMPTS_DRAWN) - 1
        job.fails = self.trace.failure_draw[job.request, attempt] < node.profile.failure_rate
        if job.fails:
            job.end_s = now + job.service_s * float(self.trace.failure_point[job.request, attempt])
        else:
            job.end_s = now + job.service_s
        self._push(job.end_s, "finish", job)

    def _make_resident(self, node: SimNode, model_index: int) -> None:
        node.resident[model_index] = None
        node.resident.move_to_end(model_index)
        while node.used_bytes(self.models) > node.profile.memory_bytes and len(node.resident) > 1:
            node.resident.popitem(last=False)

    def _finish(self, job: Job, now: float) -> int:
        """Complete one attempt; return 1 when the request is done (served or failed)."""
        node = self.nodes[job.node]
        del node.running[id(job)]
        self.signals.release(job.node)
        if node.waiting:
            self._start(node, node.waiting.popleft(), now)
        model = self.models[int(self.trace.model[job.request])]
        arrival_s = float(self.trace.arrival_s[job.request])
        if job.fails:
            self.signals.observe(job.node, model.name, ok=False)
            if job.attempt < self.scenario.max_attempts and self._dispatch(
                job.request, job.attempt + 1, job.tried, now
            ):
                self._write(job, "error", arrival_s, now)
                return 0
            self._failures += 1
            self._write(job, "error", arrival_s, now)
            return 1
        decode_s = now - job.first_token_s
        decode_tps = self.trace.output_tokens[job.request] / decode_s if decode_s > 0 else None
        self.signals.observe(
            job.node,
            model.name,
            ok=True,
            ttft_ms=(job.first_token_s - job.dispatched_s) * 1000.0,
            decode_tps=None if decode_tps is None else float(decode_tps),
        )
        self._latency_s.append(now - arrival_s)
        self._ttft_s.append(job.first_token_s - arrival_s)
        self._last_end_s = max(self._last_end_s, now)
        self._write(job, "ok", arrival_s, now, decode_tps=decode_tps)
        return 1

    def _write(
        self, job: Job, outcome: str, arrival_s: float, now: float, decode_tps: float | None = None
    ) -> None:
        record = job.record
        if record is None or self.record is None:
            return
        record.outcome = outcome
        record.status = 200 if outcome == "ok" else 502
        record.latency_ms = (now - arrival_s) * 1000.0
        if outcome == "ok":
            record.ttft_ms = (job.first_token_s - arrival_s) * 1000.0
            record.completion_tokens = int(self.trace.output_tokens[job.request])
            record.decode_tps = None if decode_tps is None else float(decode_tps)
        else:
            record.error_kind = "upstream_error"
        self.record(record)

    # -- oracle ------------------------------------------------------------

    def _oracle_choice(self, request: int, candidates: np.ndarray, now: float) -> int:
        """Pick the node that would finish this request first, knowing every true state."""
        best, best_end_s = -1, math.inf
        model_index = int(self.trace.model[request])
        for candidate in candidates:
            node = self.nodes[int(candidate)]
            slot_free_s = sorted(job.end_s for job in node.running.values())
            slot_free_s += [now] * (node.profile.slots - len(slot_free_s))
            heapq.heapify(slot_free_s)
            busy = len(node.running) + len(node.waiting) + 1
            running = min(node.profile.slots, busy)
            for waiting in node.waiting:
                start_s = heapq.heappop(slot_free_s)
                _, service_s = self._service_times(node, waiting.request, running)
                heapq.heappush(slot_free_s, start_s + service_s)
            start_s = heapq.heappop(slot_free_s)
            _, service_s = self._service_times(node, request, running)
            end_s = start_s + self._load_s(node, model_index) + service_s
            # A failed attempt costs about the attempt again elsewhere.
            end_s += (end_s - now) * node.profile.failure_rate
            if end_s < best_end_s:
                best, best_end_s = int(candidate), end_s
        return best
