"""`sollol evaluate`: every policy on the same simulated request trace, with a report.

First a warm-up trace runs under sollol_heuristic, and its history rows go
through HistoryWriter into SQLite. Then `sollol train`'s own code path trains
the learned model on that file. Last, each policy, the oracle included, runs
the measured trace from a fresh cluster state. The report is a Markdown table
(report.md) and a plot (latency.png) in the output folder.
"""

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..history import HistoryWriter, create_history_engine
from .artifact import load_artifact
from .policy import LearnedScorer
from .scenario import Scenario
from .simulate import RunResult, Simulation, make_trace
from .train import TrainParams, train_from_history

Progress = Callable[[str], None]


@dataclass(slots=True)
class Evaluation:
    scenario: Scenario
    results: list[RunResult]
    model_info: dict
    report_path: Path
    plot_path: Path

    def result(self, policy: str) -> RunResult:
        return next(result for result in self.results if result.policy == policy)


def evaluate(
    scenario: Scenario,
    out_dir: Path,
    *,
    train_params: TrainParams | None = None,
    progress: Progress | None = None,
) -> Evaluation:
    report = progress or (lambda _message: None)
    train_params = train_params or TrainParams()
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    model_path = _warm_up_and_train(scenario, out_dir, train_params, report)
    model = load_artifact(model_path)
    node_names = [node.name for node in scenario.nodes]

    trace = make_trace(scenario, scenario.requests, scenario.seed)
    results = []
    for policy in scenario.policies:
        report(f"running {policy} on {len(trace):,} requests")
        learned = LearnedScorer(model, node_names) if policy == "learned" else None
        simulation = Simulation(scenario, trace, policy, learned=learned, seed=scenario.seed)
        results.append(simulation.run(progress=_progress_every(report, policy, len(trace))))

    evaluation = Evaluation(
        scenario=scenario,
        results=results,
        model_info=model.info,
        report_path=out_dir / "report.md",
        plot_path=out_dir / "latency.png",
    )
    evaluation.report_path.write_text(render_report(evaluation), encoding="utf-8")
    plot(evaluation)
    report(f"wrote {evaluation.report_path} and {evaluation.plot_path}")
    report(f"evaluation took {time.perf_counter() - started:.1f} s")
    return evaluation


def _warm_up_and_train(
    scenario: Scenario, out_dir: Path, params: TrainParams, report: Progress
) -> Path:
    database = out_dir / "warmup-history.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{database}{suffix}").unlink(missing_ok=True)
    url = f"sqlite:///{database}"
    engine = create_history_engine(url)
    writer = HistoryWriter(engine)
    writer.start()
    warmup = make_trace(scenario, scenario.warmup_requests, scenario.seed + 1)
    report(f"warm-up: sollol_heuristic on {len(warmup):,} requests, history in {database}")
    try:
        Simulation(scenario, warmup, "sollol_heuristic", record=writer.record).run(
            progress=_progress_every(report, "warm-up", len(warmup))
        )
    finally:
        writer.close()
        engine.dispose()
    model_path = out_dir / "model.json"
    train_from_history(url, model_path, params=params, progress=report)
    return model_path


def _progress_every(report: Progress, label: str, total: int) -> Callable[[int], None]:
    def step(done: int) -> None:
        if done % 2000 == 0 or done == total:
            report(f"  {label}: {done:,}/{total:,} requests")

    return step


def summarize(result: RunResult) -> dict[str, float]:
    latency, ttft = result.latency_s, result.ttft_s
    summary = {"served": float(len(latency)), "failures": float(result.failures)}
    for name, values in (("latency", latency), ("ttft", ttft)):
        summary[f"{name}_mean"] = float(values.mean()) if len(values) else float("nan")
        for q in (50, 95, 99):
            value = float(np.percentile(values, q)) if len(values) else float("nan")
            summary[f"{name}_p{q}"] = value
    summary["throughput"] = len(latency) / result.duration_s if result.duration_s > 0 else 0.0
    return summary


def target_checks(evaluation: Evaluation) -> list[tuple[str, bool, str]]:
    """Return (target, met, measured) for the three targets of the default scenario."""
    policies = {result.policy for result in evaluation.results}
    needed = {"learned", "round_robin", "sollol_heuristic", "oracle"}
    if not needed <= policies:
        return []
    learned = summarize(evaluation.result("learned"))
    round_robin = summarize(evaluation.result("round_robin"))
    heuristic = summarize(evaluation.result("sollol_heuristic"))
    oracle = summarize(evaluation.result("oracle"))
    cut_p50 = 1.0 - learned["latency_p50"] / round_robin["latency_p50"]
    cut_p95 = 1.0 - learned["latency_p95"] / heuristic["latency_p95"]
    over_oracle = learned["latency_p50"] / oracle["latency_p50"] - 1.0
    return [
        ("p50 end-to-end at least 30% below round_robin", cut_p50 >= 0.30, _below(cut_p50)),
        ("p95 end-to-end at least 15% below sollol_heuristic", cut_p95 >= 0.15, _below(cut_p95)),
        ("p50 end-to-end within 15% of the oracle", over_oracle <= 0.15, f"{over_oracle:+.1%}"),
    ]


def _below(cut: float) -> str:
    return f"{cut:.1%} below" if cut >= 0 else f"{-cut:.1%} above"


def render_report(evaluation: Evaluation) -> str:
    scenario = evaluation.scenario
    lines = [
        f"# SOLLOL evaluation: scenario {scenario.name!r}",
        "",
        f"{scenario.requests:,} requests (seed {scenario.seed}) on {len(scenario.nodes)} "
        f"simulated nodes; learned model trained on {scenario.warmup_requests:,} warm-up "
        f"requests under sollol_heuristic; explore share {scenario.explore_share:.0%}. "
        "Times in seconds of simulated time.",
        "",
        "| policy | mean | p50 | p95 | p99 | TTFT mean | TTFT p50 | TTFT p95 | TTFT p99 "
        "| req/s | failures |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for result in evaluation.results:
        s = summarize(result)
        lines.append(
            f"| {result.policy} | {s['latency_mean']:.2f} | {s['latency_p50']:.2f} "
            f"| {s['latency_p95']:.2f} | {s['latency_p99']:.2f} | {s['ttft_mean']:.2f} "
            f"| {s['ttft_p50']:.2f} | {s['ttft_p95']:.2f} | {s['ttft_p99']:.2f} "
            f"| {s['throughput']:.3f} | {result.failures} |"
        )
    checks = target_checks(evaluation)
    if checks:
        lines += ["", "| target | met | measured |", "|---|---|---|"]
        lines += [f"| {name} | {'yes' if met else 'no'} | {value} |" for name, met, value in checks]
    mape = evaluation.model_info.get("metrics", {}).get("latency_ms", {}).get("mape")
    if mape is not None:
        lines += ["", f"Learned model held-out MAPE (latency_ms): {mape:.1%}."]
    return "\n".join(lines) + "\n"


def plot(evaluation: Evaluation) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    policies = [result.policy for result in evaluation.results]
    summaries = [summarize(result) for result in evaluation.results]
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.27
    positions = np.arange(len(policies))
    for axis, prefix, title in (
        (axes[0], "latency", "End-to-end latency"),
        (axes[1], "ttft", "Time to first token"),
    ):
        for offset, q in enumerate((50, 95, 99)):
            values = [summary[f"{prefix}_p{q}"] for summary in summaries]
            axis.bar(positions + (offset - 1) * width, values, width, label=f"p{q}")
        axis.set_xticks(positions, policies, rotation=25, ha="right")
        axis.set_yscale("log")
        axis.set_ylabel("seconds (log scale)")
        axis.set_title(title)
        axis.legend()
    figure.suptitle(f"SOLLOL evaluation, scenario {evaluation.scenario.name!r}")
    figure.tight_layout()
    figure.savefig(evaluation.plot_path, dpi=100)
    plt.close(figure)
