"""A small `sollol evaluate` run: every policy, the report, the plot, reproducibility."""

import numpy as np
import pytest
from sqlalchemy import create_engine, func, select
from threadpoolctl import threadpool_limits

from sollol.history import requests_table
from sollol.learning.evaluate import evaluate, summarize
from sollol.learning.scenario import DEFAULT_SCENARIO
from sollol.learning.simulate import Simulation, make_trace
from sollol.learning.train import TrainParams

SMALL = DEFAULT_SCENARIO.scaled(requests=400, warmup_requests=1500)


@pytest.fixture(autouse=True)
def one_openmp_thread():
    # Spinning OpenMP threads slow fitting several-fold on a busy 2-core machine.
    with threadpool_limits(limits=1, user_api="openmp"):
        yield


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory):
    with threadpool_limits(limits=1, user_api="openmp"):
        out = tmp_path_factory.mktemp("evaluation")
        messages: list[str] = []
        result = evaluate(
            SMALL, out, train_params=TrainParams(max_trees=20), progress=messages.append
        )
    return result, messages


def test_every_policy_serves_the_trace(evaluation):
    evaluation, _messages = evaluation
    assert [r.policy for r in evaluation.results] == list(SMALL.policies)
    for result in evaluation.results:
        summary = summarize(result)
        assert summary["served"] + result.failures == SMALL.requests
        assert 0 < summary["latency_p50"] <= summary["latency_p95"] <= summary["latency_p99"]
        assert np.all(result.ttft_s <= result.latency_s)


def test_learned_run_uses_the_model(evaluation):
    evaluation, _messages = evaluation
    decisions = evaluation.result("learned").decisions
    assert decisions.get("learned", 0) > 0.9 * sum(decisions.values())
    assert evaluation.result("oracle").decisions.keys() == {"oracle"}


def test_report_and_plot_written(evaluation):
    evaluation, messages = evaluation
    text = evaluation.report_path.read_text()
    for policy in SMALL.policies:
        assert f"| {policy} |" in text
    assert "p95 end-to-end at least 15% below sollol_heuristic" in text
    assert evaluation.plot_path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert any("running oracle" in message for message in messages)


def test_warmup_history_feeds_training(evaluation):
    evaluation, _messages = evaluation
    url = f"sqlite:///{evaluation.report_path.parent / 'warmup-history.db'}"
    engine = create_engine(url)
    with engine.connect() as connection:
        policies = connection.execute(select(requests_table.c.policy).distinct()).scalars().all()
        rows = connection.execute(select(func.count()).select_from(requests_table)).scalar_one()
    engine.dispose()
    assert policies == ["sollol_heuristic"]
    # One row per attempt, so retried requests add rows.
    assert rows >= SMALL.warmup_requests
    assert evaluation.model_info["data_span"]["rows"] > 0.9 * SMALL.warmup_requests


def test_simulation_is_reproducible():
    trace = make_trace(SMALL, 300, seed=5)
    first = Simulation(SMALL, trace, "sollol_heuristic").run()
    second = Simulation(SMALL, make_trace(SMALL, 300, seed=5), "sollol_heuristic").run()
    assert np.array_equal(first.latency_s, second.latency_s)
    assert first.failures == second.failures


def test_oracle_beats_round_robin():
    trace = make_trace(SMALL, 300, seed=2)
    oracle = summarize(Simulation(SMALL, trace, "oracle").run())
    round_robin = summarize(Simulation(SMALL, trace, "round_robin").run())
    assert oracle["latency_p50"] < round_robin["latency_p50"]
