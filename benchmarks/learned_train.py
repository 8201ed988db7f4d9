"""Time `sollol train` on a synthetic history of N rows (default 1,000,000) in SQLite.

    .venv/bin/python benchmarks/learned_train.py [--rows N] [--workdir DIR]

Writing the history is timed apart from training. The training figure covers
what `sollol train` does: reading the rows through SQLAlchemy, fitting both
models with held-out MAPE, and writing the artifact.
"""

import argparse
import os
import tempfile
import time
from pathlib import Path

from sollol.history import create_history_engine
from sollol.learning.synthetic import write_synthetic_history
from sollol.learning.train import prefer_passive_openmp, train_from_history


def main() -> None:
    prefer_passive_openmp()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--workdir", type=Path, help="keep the history and artifact here")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="sollol-train-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    database = workdir / f"history-{args.rows}.db"
    url = f"sqlite:///{database}"
    if not database.exists():
        started = time.perf_counter()
        engine = create_history_engine(url)
        write_synthetic_history(engine, args.rows)
        engine.dispose()
        print(f"wrote {args.rows:,} synthetic rows in {time.perf_counter() - started:.1f} s")

    started = time.perf_counter()
    model = train_from_history(url, workdir / "model.json", progress=_quiet_progress())
    elapsed_s = time.perf_counter() - started
    mape = model.info["metrics"]["latency_ms"]["mape"]
    print(
        f"sollol train on {args.rows:,} rows: {elapsed_s:.1f} s on {os.cpu_count()} cores; "
        f"latency_ms held-out MAPE {mape:.1%}"
    )


def _quiet_progress():  # type: ignore[no-untyped-def]
    started = time.perf_counter()

    def report(message: str) -> None:
        first_line = message.splitlines()[0]
        print(f"  [{time.perf_counter() - started:6.1f} s] {first_line}", flush=True)

    return report


if __name__ == "__main__":
    main()
