"""Synthetic request histories for tests and the training benchmark.

Rows follow a simple known law: each node has its own prefill and decode
speed, and latency grows with the requests already in flight. That is
enough to check that training finds per-node differences. It is not a model
of any real cluster, and the evaluation's simulator is closer to one.
"""

import numpy as np
from sqlalchemy import Engine, insert

from ..history import COLUMN_NAMES, requests_table

# name: (prefill tokens/s, decode tokens/s, slots)
SYNTHETIC_NODES = {
    "fast-gpu": (4000.0, 80.0, 4),
    "slow-gpu": (1500.0, 35.0, 2),
    "big-cpu": (400.0, 12.0, 4),
    "small-cpu": (150.0, 8.0, 2),
}
SYNTHETIC_MODELS = ("small", "large")
EPOCH_S = 1_767_225_600.0  # 2026-01-01 00:00 UTC


def synthetic_columns(rows: int, *, seed: int = 0) -> dict[str, np.ndarray]:
    """Return ``rows`` served requests as history columns (NumPy arrays)."""
    rng = np.random.default_rng(seed)
    names = list(SYNTHETIC_NODES)
    node = rng.integers(0, len(names), rows)
    prefill_tps, decode_tps, slots = (
        np.array([SYNTHETIC_NODES[name][i] for name in names])[node] for i in range(3)
    )
    model = rng.integers(0, len(SYNTHETIC_MODELS), rows)
    model_factor = np.where(model == 1, 3.0, 1.0)
    prompt_tokens = rng.lognormal(5.5, 1.0, rows).clip(1, 8000)
    max_tokens = rng.choice([64.0, 256.0, 512.0], rows)
    completion_tokens = (max_tokens * rng.uniform(0.3, 1.0, rows)).round()
    in_flight = rng.integers(0, 8, rows).astype(float)
    ttft_ms = prompt_tokens / prefill_tps * model_factor * 1000.0 + 20.0
    decode_ms = completion_tokens / decode_tps * model_factor * 1000.0
    waiting = np.maximum(in_flight + 1.0 - slots, 0.0)
    queue_ms = waiting / slots * (ttft_ms + decode_ms)
    noise = rng.lognormal(0.0, 0.1, rows)
    latency_ms = (queue_ms + ttft_ms + decode_ms) * noise
    return {
        "started_at": EPOCH_S + np.arange(rows) * 0.05,
        "node": np.array(names, dtype=object)[node],
        "model": np.array(SYNTHETIC_MODELS, dtype=object)[model],
        "ttft_ms": (queue_ms + ttft_ms) * noise,
        "latency_ms": latency_ms,
        "prompt_tokens": prompt_tokens.round(),
        "completion_tokens": completion_tokens,
        "decode_tps": decode_tps / model_factor,
        "est_prompt_tokens": prompt_tokens * rng.lognormal(0.0, 0.1, rows),
        "max_tokens": max_tokens,
        "node_in_flight": in_flight,
        "node_queue_depth": np.maximum(in_flight - slots, 0.0),
        "node_slots": slots.astype(float),
        "model_loaded": np.ones(rows),
        "node_ttft_ms_avg": 1000.0 * 300.0 / prefill_tps * model_factor + 20.0,
        "node_decode_tps_avg": decode_tps / model_factor,
    }


def write_synthetic_history(
    engine: Engine, rows: int, *, seed: int = 0, batch_rows: int = 50_000
) -> None:
    """Insert ``rows`` synthetic served requests into the history behind ``engine``."""
    for start in range(0, rows, batch_rows):
        count = min(batch_rows, rows - start)
        columns = synthetic_columns(count, seed=seed + start)
        columns["started_at"] = columns["started_at"] + start * 0.05
        with engine.begin() as connection:
            connection.execute(insert(requests_table), list(_records(columns, count)))


def _records(columns: dict[str, np.ndarray], count: int):  # type: ignore[no-untyped-def]
    fixed = {
        "route": "/v1/chat/completions",
        "stream": True,
        "status": 200,
        "outcome": "ok",
        "attempts": 1,
        "policy": "sollol_heuristic",
    }
    lists = {name: values.tolist() for name, values in columns.items()}
    for i in range(count):
        record = dict(fixed)
        for name, values in lists.items():
            record[name] = values[i]
        record["model_loaded"] = bool(record["model_loaded"])
        for name in ("node_in_flight", "node_slots", "prompt_tokens", "completion_tokens"):
            record[name] = int(record[name])
        yield {name: record.get(name) for name in COLUMN_NAMES}
