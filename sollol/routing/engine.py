"""Per-node routing signals and the decision that turns them into a node choice.

``NodeSignals`` keeps the node-by-signal matrix the scoring core reads and
updates it in place from probes and finished requests; the request path never
rebuilds it. ``RoutingEngine.decide`` fills the request vector and calls the
core once per attempt.
"""

import math
import random
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .features import RequestFeatures
from .layout import (
    COL_COST_WEIGHT,
    COL_DECODE_TPS,
    COL_ERROR_RATE,
    COL_HEALTHY,
    COL_IN_FLIGHT,
    COL_IS_GPU,
    COL_QUEUE_DEPTH,
    COL_SLOTS_TOTAL,
    COL_TTFT_MS,
    LEARNED_EXPLORE_POLICY,
    LEARNED_FALLBACK_POLICY,
    LEARNED_POLICY,
    MODEL_COLUMNS,
    MODEL_DECODE_TPS,
    MODEL_LOADED,
    MODEL_TTFT_MS,
    NODE_COLUMNS,
    POLICY_IDS,
    REQ_AFFINITY_NODE,
    REQ_COLUMNS,
    REQ_MAX_TOKENS,
    REQ_MODEL_LOAD_MS,
    REQ_PRIORITY,
    REQ_PROMPT_TOKENS,
    REQ_WANTS_GPU,
    ROUTING_POLICIES,
)
from .select import score_nodes

# Weight of the newest observation in the moving averages.
EWMA_ALPHA = 0.2
MAX_AFFINITY_KEYS = 10_000
# Assumed time to load a model into memory where it is not loaded; an estimate
# until the node reports its own load times.
DEFAULT_MODEL_LOAD_MS = 10_000.0


class NodeSignals:
    def __init__(self, node_count: int) -> None:
        self._models: dict[str, np.ndarray] = {}
        self.matrix = np.full((node_count, NODE_COLUMNS), math.nan)
        self.matrix[:, COL_HEALTHY] = 0.0
        self.matrix[:, COL_IN_FLIGHT] = 0.0
        self.matrix[:, COL_QUEUE_DEPTH] = 0.0
        self.matrix[:, COL_ERROR_RATE] = 0.0
        self.matrix[:, COL_IS_GPU] = 0.0
        self.matrix[:, COL_COST_WEIGHT] = 1.0

    def add_node(self) -> int:
        """Append a row for a new node, all unknown, and return its index.

        The matrix and every per-model array are reallocated one row larger,
        so holders of ``matrix`` must read it again (``Cluster.on_membership``).
        """
        row = np.full((1, NODE_COLUMNS), math.nan)
        for column in (COL_HEALTHY, COL_IN_FLIGHT, COL_QUEUE_DEPTH, COL_ERROR_RATE, COL_IS_GPU):
            row[0, column] = 0.0
        row[0, COL_COST_WEIGHT] = 1.0
        self.matrix = np.vstack([self.matrix, row])
        unknown = np.full((1, MODEL_COLUMNS), math.nan)
        for model, state in self._models.items():
            self._models[model] = np.vstack([state, unknown])
        return self.matrix.shape[0] - 1

    def model_state(self, model: str) -> np.ndarray:
        """Return the nodes x MODEL_COLUMNS matrix for ``model``, created all-unknown."""
        state = self._models.get(model)
        if state is None:
            state = np.full((self.matrix.shape[0], MODEL_COLUMNS), math.nan)
            self._models[model] = state
        return state

    def set_static(self, node: int, *, is_gpu: bool, cost_weight: float) -> None:
        self.matrix[node, COL_IS_GPU] = 1.0 if is_gpu else 0.0
        self.matrix[node, COL_COST_WEIGHT] = cost_weight

    def set_healthy(self, node: int, healthy: bool) -> None:
        self.matrix[node, COL_HEALTHY] = 1.0 if healthy else 0.0

    def set_slots(self, node: int, slots: int | None) -> None:
        self.matrix[node, COL_SLOTS_TOTAL] = math.nan if slots is None else float(slots)

    def set_queue_depth(self, node: int, depth: float) -> None:
        self.matrix[node, COL_QUEUE_DEPTH] = depth

    def in_flight(self, node: int) -> int:
        return int(self.matrix[node, COL_IN_FLIGHT])

    def acquire(self, node: int) -> None:
        self.matrix[node, COL_IN_FLIGHT] += 1.0

    def release(self, node: int) -> None:
        self.matrix[node, COL_IN_FLIGHT] -= 1.0

    def observe(
        self,
        node: int,
        model: str | None = None,
        *,
        ok: bool,
        ttft_ms: float | None = None,
        decode_tps: float | None = None,
    ) -> None:
        """Fold one finished request into the node's, and the node's model's, moving averages."""
        row = self.matrix[node]
        row[COL_ERROR_RATE] += EWMA_ALPHA * ((0.0 if ok else 1.0) - row[COL_ERROR_RATE])
        model_row = self.model_state(model)[node] if model is not None else None
        if ttft_ms is not None and ttft_ms >= 0:
            row[COL_TTFT_MS] = _ewma(row[COL_TTFT_MS], ttft_ms)
            if model_row is not None:
                model_row[MODEL_TTFT_MS] = _ewma(model_row[MODEL_TTFT_MS], ttft_ms)
        if decode_tps is not None and decode_tps > 0:
            row[COL_DECODE_TPS] = _ewma(row[COL_DECODE_TPS], decode_tps)
            if model_row is not None:
                model_row[MODEL_DECODE_TPS] = _ewma(model_row[MODEL_DECODE_TPS], decode_tps)

    def snapshot(self, node: int, model: str) -> "NodeSnapshot":
        """Return what is known of ``node`` for ``model`` now, NaN folded to None."""
        row = self.matrix[node]
        model_row = self.model_state(model)[node]
        ttft_ms = model_row[MODEL_TTFT_MS]
        decode_tps = model_row[MODEL_DECODE_TPS]
        loaded = model_row[MODEL_LOADED]
        slots = row[COL_SLOTS_TOTAL]
        return NodeSnapshot(
            in_flight=int(row[COL_IN_FLIGHT]),
            queue_depth=float(row[COL_QUEUE_DEPTH]),
            slots=None if math.isnan(slots) else int(slots),
            model_loaded=None if math.isnan(loaded) else bool(loaded),
            ttft_ms=_finite_or_none(row[COL_TTFT_MS] if math.isnan(ttft_ms) else ttft_ms),
            decode_tps=_finite_or_none(
                row[COL_DECODE_TPS] if math.isnan(decode_tps) else decode_tps
            ),
        )

    def row(self, node: int) -> dict[str, float | None]:
        values = self.matrix[node]
        names = {
            "in_flight": COL_IN_FLIGHT,
            "queue_depth": COL_QUEUE_DEPTH,
            "slots_total": COL_SLOTS_TOTAL,
            "ttft_ms": COL_TTFT_MS,
            "decode_tokens_per_s": COL_DECODE_TPS,
            "error_rate": COL_ERROR_RATE,
        }
        return {name: _finite_or_none(values[column]) for name, column in names.items()}


@dataclass(frozen=True, slots=True)
class NodeSnapshot:
    """A node's signals for one model at decision time; None where unknown."""

    in_flight: int
    queue_depth: float
    slots: int | None
    model_loaded: bool | None
    ttft_ms: float | None  # the model's moving average on the node, else the node's
    decode_tps: float | None


@dataclass(slots=True)
class Decision:
    node: int
    policy: str
    candidates: np.ndarray  # node indices, int64
    scores: np.ndarray  # cost of each candidate, lower wins, +inf for ineligible

    def best(self, count: int) -> list[tuple[int, float]]:
        """Return up to ``count`` (node, score) pairs, lowest score first."""
        order = np.argsort(self.scores, kind="stable")[:count]
        return [(int(self.candidates[i]), float(self.scores[i])) for i in order]


class CandidateScorer(Protocol):
    """Scores candidates for the learned policy (sollol.learning.policy.LearnedScorer)."""

    def score(
        self,
        signals: np.ndarray,
        model_state: np.ndarray,
        candidates: np.ndarray,
        request: np.ndarray,
        model: str | None,
        scores: np.ndarray,
    ) -> int: ...


class RoutingEngine:
    def __init__(self, signals: NodeSignals, *, default_policy: str) -> None:
        if default_policy not in ROUTING_POLICIES:
            raise ValueError(f"unknown routing policy {default_policy!r}")
        # Set by the model reloader; replaced whole, never changed in place.
        self.learned: CandidateScorer | None = None
        # Share of learned decisions sent to a random other eligible node.
        self.explore_share = 0.0
        self.random = random.Random()
        self.signals = signals
        self.default_policy = default_policy
        self._request = np.zeros(REQ_COLUMNS)
        self._resize(signals.matrix.shape[0])
        self._affinity: OrderedDict[bytes, int] = OrderedDict()
        self._turn = 0

    def decide(
        self,
        candidates: np.ndarray,
        features: RequestFeatures,
        policy: str | None = None,
        *,
        model_state: np.ndarray | None = None,
        dry_run: bool = False,
        model: str | None = None,
    ) -> Decision | None:
        """Score ``candidates`` under ``policy`` (default: the configured one) and pick one.

        A ``dry_run`` returns what the next real decision would be, without
        moving round-robin on.
        """
        policy = policy or self.default_policy
        if self._unknown.shape[0] != self.signals.matrix.shape[0]:
            self._resize(self.signals.matrix.shape[0])
        request = self._request
        request[REQ_PROMPT_TOKENS] = features.prompt_tokens
        request[REQ_MAX_TOKENS] = features.max_tokens
        request[REQ_PRIORITY] = features.priority
        request[REQ_WANTS_GPU] = 0.0 if features.task == "embedding" else 1.0
        affinity = self._affinity.get(features.prefix_key, -1) if features.prefix_key else -1
        request[REQ_AFFINITY_NODE] = affinity
        request[REQ_MODEL_LOAD_MS] = DEFAULT_MODEL_LOAD_MS

        turn = self._turn + 1
        if not dry_run:
            self._turn = turn
        model_state = self._unknown if model_state is None else model_state
        if policy == LEARNED_POLICY:
            if self.learned is not None:
                return self._decide_learned(candidates, model_state, model, dry_run=dry_run)
            policy = LEARNED_FALLBACK_POLICY
        node = score_nodes(
            self.signals.matrix,
            model_state,
            candidates,
            request,
            POLICY_IDS[policy],
            turn,
            self._scores,
        )
        if node < 0:
            return None
        return Decision(
            node=node,
            policy=policy,
            candidates=candidates,
            scores=self._scores[: len(candidates)].copy(),
        )

    def _decide_learned(
        self, candidates: np.ndarray, model_state: np.ndarray, model: str | None, *, dry_run: bool
    ) -> Decision | None:
        scorer = self.learned
        assert scorer is not None
        node = scorer.score(
            self.signals.matrix, model_state, candidates, self._request, model, self._scores
        )
        if node < 0:
            return None
        scores = self._scores[: len(candidates)].copy()
        policy = LEARNED_POLICY
        if not dry_run and self.explore_share > 0.0 and self.random.random() < self.explore_share:
            others = [
                int(candidate)
                for candidate, score in zip(candidates, scores, strict=True)
                if math.isfinite(score) and candidate != node
            ]
            if others:
                node = self.random.choice(others)
                policy = LEARNED_EXPLORE_POLICY
        return Decision(node=node, policy=policy, candidates=candidates, scores=scores)

    def _resize(self, node_count: int) -> None:
        """Size the scratch arrays for ``node_count`` nodes, after membership grew."""
        self._scores = np.empty(node_count)
        self._unknown = np.full((node_count, MODEL_COLUMNS), math.nan)

    def remember_prefix(self, features: RequestFeatures, node: int) -> None:
        """Record that ``node`` now has this conversation's prompt in its cache."""
        if features.prefix_key is None:
            return
        self._affinity[features.prefix_key] = node
        self._affinity.move_to_end(features.prefix_key)
        if len(self._affinity) > MAX_AFFINITY_KEYS:
            self._affinity.popitem(last=False)


def _ewma(current: float, value: float) -> float:
    return value if math.isnan(current) else current + EWMA_ALPHA * (value - current)


def _finite_or_none(value: float) -> float | None:
    return None if math.isnan(value) else float(value)
