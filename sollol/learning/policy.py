"""The learned policy on the request path, and hot reload of its artifact.

``LearnedScorer`` binds a loaded model to this router's node list and scores
candidates through the compiled forest walk (or its twin). ``ModelReloader``
swaps a new scorer into the routing engine with one attribute assignment, so
decisions already made keep their node and the next one uses the new model:
no request waits for, or fails because of, a reload.
"""

import asyncio
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ModelArtifactError
from ..routing.engine import RoutingEngine
from .artifact import LatencyModel, load_artifact
from .features import FEATURE_COUNT
from .select import score_candidates

log = logging.getLogger(__name__)


class LearnedScorer:
    """Predicts each candidate's latency with the model's forest; lower wins."""

    def __init__(self, model: LatencyModel, node_names: list[str] | tuple[str, ...]) -> None:
        self.model = model
        codes = {name: float(code) for code, name in enumerate(model.node_names)}
        # Nodes the model never saw get NaN, which the trees route as missing.
        self.node_codes = np.array([codes.get(name, math.nan) for name in node_names])
        self.unknown_nodes = [name for name in node_names if name not in codes]
        self._model_codes = {name: float(code) for code, name in enumerate(model.model_names)}
        self._row = np.empty(FEATURE_COUNT)

    def score(
        self,
        signals: np.ndarray,
        model_state: np.ndarray,
        candidates: np.ndarray,
        request: np.ndarray,
        model: str | None,
        scores: np.ndarray,
    ) -> int:
        """Write predicted latencies (ms) of ``candidates`` into ``scores``; return the best."""
        forest = self.model.latency
        model_code = self._model_codes.get(model, math.nan) if model is not None else math.nan
        return score_candidates(
            forest.baseline,
            forest.roots,
            forest.feature,
            forest.threshold,
            forest.left,
            forest.right,
            forest.missing_left,
            forest.value,
            signals,
            model_state,
            candidates,
            request,
            self.node_codes,
            model_code,
            self._row,
            scores,
        )


@dataclass(frozen=True, slots=True)
class ReloadResult:
    loaded: bool
    path: str
    message: str


class ModelReloader:
    """Loads the artifact at ``path`` into ``engine`` on request or when the file changes."""

    def __init__(self, engine: RoutingEngine, node_names: list[str], path: Path) -> None:
        self.engine = engine
        self.node_names = list(node_names)
        self.path = Path(path)
        self._seen: tuple[int, int, int] | None = None
        self.loads = 0
        self.rejections = 0

    def reload(self) -> ReloadResult:
        """Load the artifact now; on any problem keep the current model and say why."""
        stamp = self._stamp()
        try:
            model = load_artifact(self.path)
        except ModelArtifactError as exc:
            self._seen = stamp
            self.rejections += 1
            keeping = self._current_description()
            log.error("learned model rejected: %s; keeping %s", exc, keeping)
            return ReloadResult(False, str(self.path), f"{exc}; keeping {keeping}")
        scorer = LearnedScorer(model, self.node_names)
        self.engine.learned = scorer  # one assignment: the swap is atomic for decide()
        self._seen = stamp
        self.loads += 1
        message = f"loaded learned model {self.path}: {model.describe()}"
        log.info("%s", message)
        if scorer.unknown_nodes:
            log.warning(
                "learned model %s has no history for nodes %s; they are scored as unseen",
                self.path,
                ", ".join(scorer.unknown_nodes),
            )
        return ReloadResult(True, str(self.path), message)

    def set_node_names(self, node_names: list[str]) -> None:
        """Score for these nodes (by index) from now on; called when membership changes.

        The current model, if any, is rebound at once, because a scorer built
        for fewer nodes would reject the larger signal matrix.
        """
        self.node_names = list(node_names)
        current = self.engine.learned
        if isinstance(current, LearnedScorer):
            self.engine.learned = LearnedScorer(current.model, self.node_names)

    def changed(self) -> bool:
        """Return whether the file appeared or changed since the last load or rejection."""
        stamp = self._stamp()
        return stamp is not None and stamp != self._seen

    async def watch(self, interval_s: float) -> None:
        """Reload the file whenever it changes, polling every ``interval_s``, until cancelled."""
        while True:
            if self.changed():
                await asyncio.to_thread(self.reload)
            await asyncio.sleep(interval_s)

    def _stamp(self) -> tuple[int, int, int] | None:
        try:
            status = os.stat(self.path)
        except OSError:
            return None
        return (status.st_mtime_ns, status.st_size, status.st_ino)

    def _current_description(self) -> str:
        current = self.engine.learned
        if isinstance(current, LearnedScorer):
            return f"the previous model ({current.model.describe()})"
        return "no learned model (the learned policy falls back to predicted_latency)"
