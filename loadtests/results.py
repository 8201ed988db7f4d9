"""Read a load run's results and print its report.

The docstring of ``loadtests/run.py`` explains how failures are classified,
and ``caused_by_kill`` implements that classification.
"""

import csv
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# A failure this long after a kill of the node that sent it is explained by
# the kill. The router ends a cut stream as soon as its connection to the
# node breaks, so this only covers scheduling delays on a busy machine.
KILL_GRACE_S = 10.0
# Failure messages are cut to this length when grouped.
MAX_MESSAGE_CHARS = 240
# The maximum number of distinct router log messages printed.
MAX_LOG_GROUPS = 8
MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class EndpointStats:
    name: str
    requests: int
    failures: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    requests_per_s: float


@dataclass(frozen=True, slots=True)
class Failure:
    """One failed request, as the locustfile logged it."""

    time: float  # Unix time at which the request ended
    name: str
    kind: str
    message: str
    status: int | None = None
    node: str | None = None
    events: int | None = None


@dataclass(slots=True)
class Kill:
    node: str
    port: int
    killed_at: float  # Unix time
    restarted_at: float | None = None  # Unix time at which the node was healthy again


@dataclass(frozen=True, slots=True)
class RssSummary:
    idle_bytes: int | None  # before the load started
    start_bytes: int  # first sample after the warm-up
    max_bytes: int
    end_bytes: int

    @property
    def growth_percent(self) -> float:
        return (self.end_bytes - self.start_bytes) / self.start_bytes * 100.0


def read_stats(path: Path) -> list[EndpointStats]:
    """Read locust's ``*_stats.csv``, whose last row, named "all" here, sums every endpoint."""
    rows = []
    with open(path, newline="", encoding="utf-8") as stats_file:
        for row in csv.DictReader(stats_file):
            name = "all" if row["Name"] == "Aggregated" else row["Name"]
            rows.append(
                EndpointStats(
                    name=name,
                    requests=int(row["Request Count"]),
                    failures=int(row["Failure Count"]),
                    p50_ms=_number(row["50%"]),
                    p95_ms=_number(row["95%"]),
                    p99_ms=_number(row["99%"]),
                    requests_per_s=_number(row["Requests/s"]),
                )
            )
    return rows


def read_exceptions(path: Path) -> list[str]:
    """Read locust's ``*_exceptions.csv``: errors raised by the locustfile itself."""
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as exceptions_file:
        return [f"{row['Count']} x {row['Message']}" for row in csv.DictReader(exceptions_file)]


def read_failures(path: Path) -> list[Failure]:
    if not path.exists():
        return []
    failures = []
    with open(path, encoding="utf-8") as log_file:
        for line in log_file:
            record = json.loads(line)
            failures.append(
                Failure(
                    time=record["time"],
                    name=record["name"],
                    kind=record["kind"],
                    message=record["message"],
                    status=record.get("status"),
                    node=record.get("node"),
                    events=record.get("events"),
                )
            )
    return failures


def caused_by_kill(failure: Failure, kills: Sequence[Kill]) -> bool:
    """Return whether a kill explains ``failure``: a stream from the killed node cut by it."""
    if failure.kind != "error_event":
        return False
    return any(
        failure.node == kill.node
        and kill.killed_at <= failure.time <= kill.killed_at + KILL_GRACE_S
        for kill in kills
    )


def print_report(
    stats: Sequence[EndpointStats],
    failures: Sequence[Failure],
    kills: Sequence[Kill],
    rss: RssSummary | None,
    *,
    warmup_s: float,
) -> tuple[int, int]:
    """Print the report and return the numbers of failures caused by kills and by the router."""
    print_stats(stats)
    counted = sum(row.failures for row in stats if row.name == "all")
    if counted != len(failures):
        print(f"NOTE: locust counted {counted} failures but logged {len(failures)}")
    kill_failures = [failure for failure in failures if caused_by_kill(failure, kills)]
    router_failures = [failure for failure in failures if not caused_by_kill(failure, kills)]
    print()
    print(f"failures counted against the router: {len(router_failures)}")
    print_failure_groups(router_failures)
    if kills:
        print(f"failures caused by the node kills: {len(kill_failures)}")
        print_failure_groups(kill_failures)
        before_first_event = sum(1 for failure in kill_failures if failure.events == 0)
        if before_first_event:
            print(
                f"  {before_first_event} of them were cut before their first event, "
                "after the router had already sent 200"
            )
    print()
    print_rss(rss, warmup_s=warmup_s)
    return len(kill_failures), len(router_failures)


def print_router_log(path: Path) -> None:
    """Print the router's WARNING and ERROR lines, grouped by text, the most frequent first."""
    groups: Counter[str] = Counter()
    with open(path, encoding="utf-8", errors="replace") as log_file:
        for line in log_file:
            # Lines read "DATE TIME LEVEL LOGGER: MESSAGE" (the format `sollol` sets).
            fields = line.rstrip("\n").split(" ", 3)
            if len(fields) == 4 and fields[2] in ("WARNING", "ERROR"):
                groups[f"{fields[2]} {fields[3]}"[:MAX_MESSAGE_CHARS]] += 1
            elif line.startswith("Traceback"):
                groups["Traceback (see the log)"] += 1
    print(f"router log: {groups.total()} lines at WARNING or ERROR level")
    for text, count in groups.most_common(MAX_LOG_GROUPS):
        print(f"  {count:>6} x {text}")
    if len(groups) > MAX_LOG_GROUPS:
        print(f"  and {len(groups) - MAX_LOG_GROUPS} other messages")


def print_stats(stats: Sequence[EndpointStats]) -> None:
    header = f"{'endpoint':<18} {'requests':>8} {'failures':>8} {'p50 ms':>8} {'p95 ms':>8} "
    print(header + f"{'p99 ms':>8} {'req/s':>7}")
    for row in stats:
        print(
            f"{row.name:<18} {row.requests:>8} {row.failures:>8} {row.p50_ms:>8.0f} "
            f"{row.p95_ms:>8.0f} {row.p99_ms:>8.0f} {row.requests_per_s:>7.1f}"
        )


def print_failure_groups(failures: Sequence[Failure]) -> None:
    """Print failures grouped by endpoint and message, the most frequent first."""
    groups = Counter((failure.name, failure.message[:MAX_MESSAGE_CHARS]) for failure in failures)
    for (name, message), count in groups.most_common():
        print(f"  {count:>6} x {name}: {message}")


def print_rss(rss: RssSummary | None, *, warmup_s: float) -> None:
    if rss is None:
        print("router RSS: no sample after the warm-up; use a longer --duration")
        return
    idle = "-" if rss.idle_bytes is None else f"{rss.idle_bytes / MIB:.1f} MiB"
    print(
        f"router RSS: idle {idle}, start (after {warmup_s:.0f} s of load) "
        f"{rss.start_bytes / MIB:.1f} MiB, max {rss.max_bytes / MIB:.1f} MiB, "
        f"end {rss.end_bytes / MIB:.1f} MiB, growth {rss.growth_percent:+.1f}% (end over start)"
    )


def _number(text: str) -> float:
    # Locust writes "N/A" for a percentile of an endpoint without requests.
    try:
        return float(text)
    except ValueError:
        return float("nan")
