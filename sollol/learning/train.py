"""`sollol train`: fit the latency model on the request history and write its artifact.

The model is a HistGradientBoostingRegressor on the logarithm of milliseconds,
so squared error on that scale weighs relative errors alike on fast and slow
nodes. For latency the known queueing term (``_forest_py.queue_offset``) is
subtracted first, so the trees learn the service time and the request path
scales it by the queue at decision time.

The oldest 80% of the rows (by start time) train the model. The newest 20%
measure its error (MAPE), per node and overall, as the next hours of traffic
would. The artifact contains the model trained on the 80%.

Of a long history only the newest ``max_train_rows`` of the training part are
fitted and the newest ``max_holdout_rows`` measured: a model of ten features
gains little from more rows, recent rows describe the nodes as they are now,
and the cap keeps training on a million rows within a minute on 2 cores.
"""

import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..errors import TrainingDataError
from ._forest_py import queue_offset
from .artifact import LatencyModel, save_artifact
from .features import FEATURE_NAMES, FeatureTable, read_feature_table
from .forest import Forest, export_hist_gradient_boosting

MIN_TRAINING_ROWS = 500
HOLDOUT_SHARE = 0.2
# Trees are added in steps of this many, so progress shows while fitting.
PROGRESS_TREES = 25

Progress = Callable[[str], None]


def prefer_passive_openmp() -> None:
    """Make idle OpenMP threads sleep instead of spin, unless the user chose otherwise.

    Measured on a 2-core machine shared with other work: fitting 100 trees on
    200,000 rows took 21 s with spinning threads and 2.9 s with passive ones.
    OpenMP reads the variable once, when scikit-learn first loads it, so this
    only has an effect before that import.
    """
    if "sklearn" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "passive")


@dataclass(frozen=True, slots=True)
class TrainParams:
    max_trees: int = 100
    max_leaf_nodes: int = 31
    learning_rate: float = 0.1
    min_samples_leaf: int = 20
    min_rows: int = MIN_TRAINING_ROWS
    max_train_rows: int = 200_000
    max_holdout_rows: int = 100_000
    seed: int = 0


def train_from_history(
    database_url: str,
    out: Path,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    params: TrainParams = TrainParams(),
    progress: Progress | None = None,
) -> LatencyModel:
    """Read the history, train, write the artifact to ``out`` and return the model."""
    report = progress or (lambda _message: None)
    started = time.perf_counter()
    table = read_feature_table(database_url, since=since, until=until, progress=report)
    report(f"read {table.rows:,} rows in {time.perf_counter() - started:.1f} s")
    model = train_latency_model(table, params=params, progress=report)
    save_artifact(model, out)
    report(f"wrote {out} in {time.perf_counter() - started:.1f} s in total")
    return model


def train_latency_model(
    table: FeatureTable, *, params: TrainParams = TrainParams(), progress: Progress | None = None
) -> LatencyModel:
    """Fit the latency and TTFT forests on ``table``; raise TrainingDataError if it is too small."""
    import sklearn

    report = progress or (lambda _message: None)
    if table.rows < params.min_rows:
        raise TrainingDataError(
            f"not enough history to train: {table.rows} usable rows (requests that a node "
            f"served, with routing features); at least {params.min_rows} are needed. "
            "Serve more traffic; `sollol train` can also widen --since/--until, and "
            "`sollol evaluate` can raise --warmup-requests"
        )
    split = int(table.rows * (1.0 - HOLDOUT_SHARE))
    latency, latency_metrics = _fit_target(
        table, table.latency_ms, split, "latency_ms", params, report
    )
    ttft, ttft_metrics = None, None
    has_ttft = np.isfinite(table.ttft_ms) & (table.ttft_ms > 0)
    if has_ttft[:split].sum() >= params.min_rows and has_ttft[split:].any():
        ttft, ttft_metrics = _fit_target(table, table.ttft_ms, split, "ttft_ms", params, report)
    else:
        report("too few rows with a time to first token; no ttft_ms model this time")
    info = {
        "sklearn_version": sklearn.__version__,
        "sollol_version": __version__,
        "trained_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "data_span": {
            "rows": table.rows,
            "train_rows": split,
            "holdout_rows": table.rows - split,
            "first": _iso(table.started_at[0]),
            "last": _iso(table.started_at[-1]),
        },
        "metrics": {"latency_ms": latency_metrics, "ttft_ms": ttft_metrics},
        "params": asdict(params),
    }
    return LatencyModel(
        latency=latency,
        ttft=ttft,
        node_names=table.node_names,
        model_names=table.model_names,
        info=info,
    )


def _fit_target(
    table: FeatureTable,
    target_ms: np.ndarray,
    split: int,
    name: str,
    params: TrainParams,
    report: Progress,
) -> tuple[Forest, dict[str, Any]]:
    from sklearn.ensemble import HistGradientBoostingRegressor

    usable = np.isfinite(target_ms) & (target_ms > 0)
    train_rows = np.flatnonzero(usable[:split])[-params.max_train_rows :]
    holdout_rows = (split + np.flatnonzero(usable[split:]))[-params.max_holdout_rows :]
    features = table.features[train_rows]
    offset = _offsets(table.features, train_rows) if name == "latency_ms" else 0.0
    log_target = np.log(target_ms[train_rows]) - offset
    regressor = HistGradientBoostingRegressor(
        max_iter=0,
        learning_rate=params.learning_rate,
        max_leaf_nodes=params.max_leaf_nodes,
        min_samples_leaf=params.min_samples_leaf,
        early_stopping=False,
        warm_start=True,
        random_state=params.seed,
    )
    fit_started = time.perf_counter()
    for trees in range(PROGRESS_TREES, params.max_trees + PROGRESS_TREES, PROGRESS_TREES):
        regressor.set_params(max_iter=min(trees, params.max_trees))
        regressor.fit(features, log_target)
        report(
            f"{name}: {regressor.n_iter_}/{params.max_trees} trees on {len(train_rows):,} rows, "
            f"{time.perf_counter() - fit_started:.1f} s"
        )
    metrics = _holdout_metrics(table, regressor, target_ms, holdout_rows, name == "latency_ms")
    metrics["train_rows"] = len(train_rows)
    report(_metrics_line(name, metrics))
    return export_hist_gradient_boosting(regressor), metrics


def _offsets(features: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Return the queueing term of each row, as _forest_py.queue_offset computes it."""
    in_flight = features[rows, FEATURE_NAMES.index("node_in_flight")]
    slots = features[rows, FEATURE_NAMES.index("node_slots")]
    return np.array([queue_offset(x, s) for x, s in zip(in_flight, slots, strict=True)])


def _holdout_metrics(
    table: FeatureTable,
    regressor: Any,
    target_ms: np.ndarray,
    rows: np.ndarray,
    with_offset: bool,
) -> dict[str, Any]:
    """Return MAPE over the held-out rows, overall and per node (None where a node has none)."""
    if len(rows) == 0:
        return {"holdout_rows": 0, "mape": None, "per_node": {}}
    offset = _offsets(table.features, rows) if with_offset else 0.0
    predicted = np.exp(regressor.predict(table.features[rows]) + offset)
    actual = target_ms[rows]
    errors = np.abs(predicted - actual) / actual
    nodes = table.features[rows, 0].astype(np.int64)
    per_node = {}
    for code, node_name in enumerate(table.node_names):
        mine = errors[nodes == code]
        per_node[node_name] = {
            "holdout_rows": len(mine),
            "mape": float(mine.mean()) if len(mine) else None,
        }
    return {"holdout_rows": len(rows), "mape": float(errors.mean()), "per_node": per_node}


def _metrics_line(name: str, metrics: dict[str, Any]) -> str:
    parts = [f"{name}: held-out MAPE {metrics['mape']:.1%} on {metrics['holdout_rows']:,} rows"]
    for node_name, node in metrics["per_node"].items():
        mape = "no held-out rows" if node["mape"] is None else f"{node['mape']:.1%}"
        parts.append(f"  {node_name}: {mape} ({node['holdout_rows']:,} rows)")
    return "\n".join(parts)


def _iso(unix_s: float) -> str:
    return datetime.fromtimestamp(float(unix_s), UTC).isoformat(timespec="seconds")
