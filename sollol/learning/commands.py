"""The `sollol train` and `sollol evaluate` subcommands: arguments, progress output, exit codes."""

import argparse
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from ..errors import LearningError

DEFAULT_DATABASE_URL = "sqlite:///sollol-history.db"
DEFAULT_MODEL_PATH = Path("sollol-model.json")


def add_learning_parsers(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser(
        "train", help="train the learned routing policy's latency model on the request history"
    )
    train.add_argument(
        "--database-url",
        default=DEFAULT_DATABASE_URL,
        help=f"SQLAlchemy URL of the request history (default {DEFAULT_DATABASE_URL})",
    )
    train.add_argument(
        "--since", type=_timestamp, help="use requests started at or after this ISO 8601 time"
    )
    train.add_argument("--until", type=_timestamp, help="use requests started before this time")
    train.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_MODEL_PATH,
        help=f"artifact to write; a running router reloads it (default {DEFAULT_MODEL_PATH})",
    )
    train.add_argument(
        "--trees", type=int, default=100, help="boosting iterations per model (default 100)"
    )
    train.set_defaults(handler=_train_command)

    evaluate = commands.add_parser(
        "evaluate", help="compare the routing policies on a simulated heterogeneous cluster"
    )
    evaluate.add_argument(
        "--out",
        type=Path,
        default=Path("sollol-evaluation"),
        help="folder for report.md, latency.png, the warm-up history and the model "
        "(default ./sollol-evaluation)",
    )
    evaluate.add_argument(
        "--requests", type=int, help="requests in the measured trace (default 6000)"
    )
    evaluate.add_argument(
        "--warmup-requests", type=int, help="warm-up requests to train on (default 8000)"
    )
    evaluate.add_argument("--seed", type=int, default=0, help="seed of the traces (default 0)")
    evaluate.set_defaults(handler=_evaluate_command)


def _timestamp(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid time {text!r}; expected ISO 8601, e.g. 2026-01-31T12:00:00"
        ) from None
    # A time without a zone is read as UTC, as the history's timestamps are.
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _progress(started: float):  # type: ignore[no-untyped-def]
    def report(message: str) -> None:
        for line in message.splitlines():
            print(f"[{time.perf_counter() - started:7.1f} s] {line}", file=sys.stderr, flush=True)

    return report


def _train_command(args: argparse.Namespace) -> int:
    from .train import TrainParams, prefer_passive_openmp

    prefer_passive_openmp()
    from .train import train_from_history

    if args.trees < 1:
        print("sollol train: --trees must be at least 1", file=sys.stderr)
        return 2
    try:
        model = train_from_history(
            args.database_url,
            args.out,
            since=args.since,
            until=args.until,
            params=TrainParams(max_trees=args.trees),
            progress=_progress(time.perf_counter()),
        )
    except LearningError as exc:
        print(f"sollol train: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}: {model.describe()}")
    return 0


def _evaluate_command(args: argparse.Namespace) -> int:
    from .train import prefer_passive_openmp

    prefer_passive_openmp()
    from dataclasses import replace

    from .evaluate import evaluate, target_checks
    from .scenario import DEFAULT_SCENARIO

    for name in ("requests", "warmup_requests"):
        value = getattr(args, name)
        if value is not None and value < 1:
            print(f"sollol evaluate: --{name.replace('_', '-')} must be positive", file=sys.stderr)
            return 2
    scenario = replace(DEFAULT_SCENARIO.scaled(args.requests, args.warmup_requests), seed=args.seed)
    try:
        evaluation = evaluate(scenario, args.out, progress=_progress(time.perf_counter()))
    except LearningError as exc:
        print(f"sollol evaluate: {exc}", file=sys.stderr)
        return 1
    print(evaluation.report_path.read_text(encoding="utf-8"))
    missed = [name for name, met, _measured in target_checks(evaluation) if not met]
    if missed:
        print(f"targets missed: {'; '.join(missed)}", file=sys.stderr)
    return 0
