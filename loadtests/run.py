"""Load and soak runs: two llama-server nodes, the router and locust, all started here.

    python loadtests/run.py --duration 60 --users 8
    python loadtests/run.py --soak --duration 600

The runner writes the tiny GGUF model and starts two llama-server nodes on
it. ``node-1`` serves ``tiny``, and ``node-2``, with embeddings on, serves
``tiny`` and ``tiny-embed``. It starts ``python -m sollol serve`` in front of
them and runs ``loadtests/locustfile.py`` headless for ``--duration`` seconds.
Every process listens on 127.0.0.1 on a port picked at run time. While the load
runs, the router's resident memory (VmRSS in /proc/PID/status) is sampled
every ``--sample-interval`` seconds. At the end it prints requests, failures
grouped by message, latency percentiles and requests/s per endpoint, and the
RSS before the load, after ``--warmup`` seconds of load, at its maximum and at
the end. The temporary folder with the logs is removed unless the run failed
or ``--workdir`` names one.

``--soak`` also kills ``node-1`` with SIGKILL every ``--kill-interval``
seconds of load and restarts it on the same port ``--down-time`` seconds
later, so the router's configuration stays valid. ``node-1`` is the victim
because ``node-2`` can serve everything it serves. ``node-2`` is never
killed, being the only embeddings node, so every request always has a
healthy node that could serve it.

Failures are classified as follows:

- Caused by a node kill: a stream that ``node-1`` was sending when it was
  killed, which the router ended with an in-band error event. The client
  already had a 200 and possibly part of the reply, so the router does not
  hand such a request to another node. Such a stream counts as caused by a kill when its error event
  arrived at most ``results.KILL_GRACE_S`` seconds after a kill of the node
  named in the stream's ``x-sollol-node`` header.
- Counted against the router: every other failure. Since another healthy
  node could always serve the request, this includes any 5xx the router
  returned (also a 502 naming the killed node, which means failover did not
  happen), any error reply whose body is not an OpenAI error object, a 200
  whose body lacks the route's fields, a stream that ends without
  ``data: [DONE]`` and without an error event, an error event from a node
  that was not just killed, and a request that got no reply within
  ``--request-timeout`` seconds (a hang) or whose connection broke. Without
  ``--soak``, every failure is counted against the router.

Exit status: 0 when no failure is counted against the router, 1 when some
are, 2 when the run could not be completed (llama.cpp missing, a process
that did not start, a node that could not be restarted, locust or the
locustfile failing), 130 on Ctrl-C and 143 on SIGTERM. Every process started
here is stopped on every path out, Ctrl-C and SIGTERM included, unless the
runner itself is killed with SIGKILL.
"""

import argparse
import contextlib
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.error import URLError
from urllib.request import urlopen

from results import (
    Kill,
    RssSummary,
    print_report,
    print_router_log,
    read_exceptions,
    read_failures,
    read_stats,
)

import sollol
from sollol.llamacpp import LlamaCppNotFoundError, LlamaServer, LlamaServerStartError, find_bin_dir
from sollol.tinymodel import write_tiny_model

LOCUSTFILE = Path(__file__).resolve().with_name("locustfile.py")
CHAT_MODEL = "tiny"
EMBEDDING_MODEL = "tiny-embed"
VICTIM = "node-1"
NODE_START_TIMEOUT_S = 60.0
ROUTER_START_TIMEOUT_S = 30.0
PROCESS_STOP_TIMEOUT_S = 15.0
# Time the locust process gets beyond --duration and --request-timeout
# to start, write its CSV files and exit.
LOCUST_EXIT_MARGIN_S = 60.0
# A kill is scheduled only when the node has this long, after its restart,
# before the load ends.
RESTART_MARGIN_S = 10.0
RESTART_ATTEMPTS = 3


class RunError(Exception):
    """The run could not be completed. The message names the step that failed."""


class Terminated(Exception):
    """The exception raised in the main thread on SIGTERM, so that cleanup runs as on Ctrl-C."""


def raise_terminated(_signum: int, _frame: object) -> None:
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, raise_terminated)
    keep = args.workdir is not None
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="sollol-load-"))
    workdir.mkdir(parents=True, exist_ok=True)
    status = 2
    try:
        status = run(args, workdir.resolve())
    except RunError as exc:
        print(f"run.py: {exc}", file=sys.stderr)
    except (KeyboardInterrupt, Terminated) as exc:
        print("run.py: interrupted, stopped every process it started", file=sys.stderr)
        status = 130 if isinstance(exc, KeyboardInterrupt) else 128 + signal.SIGTERM
    finally:
        if keep or status != 0:
            print(f"run.py: logs are in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return status


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Run locust against the router in front of two local llama-server nodes."
    )
    parser.add_argument("--duration", type=int, default=60, help="seconds of load (default 60)")
    parser.add_argument("--users", type=int, default=8, help="concurrent locust users (default 8)")
    parser.add_argument(
        "--spawn-rate", type=float, help="users started per second (default: all in 1 s)"
    )

    parser.add_argument(
        "--warmup",
        type=float,
        default=10.0,
        help="seconds of load before the RSS start sample (default 10)",
    )
    parser.add_argument(
        "--sample-interval", type=float, default=2.0, help="seconds between RSS samples (default 2)"
    )
    parser.add_argument(
        "--request-timeout",
        type=float,
        default=30.0,
        help="seconds a request may wait to connect or between two reads before it fails "
        "as a hang (default 30)",
    )

    parser.add_argument(
        "--soak", action="store_true", help=f"kill and restart {VICTIM} during the load"
    )
    parser.add_argument(
        "--kill-interval",
        type=float,
        default=60.0,
        help="with --soak, seconds of load between kills (default 60)",
    )
    parser.add_argument(
        "--down-time",
        type=float,
        default=10.0,
        help="with --soak, seconds a killed node stays down before its restart (default 10)",
    )

    parser.add_argument(
        "--workdir",
        type=Path,
        help="folder for the model, logs, history and locust's CSV files, kept after the run "
        "(default: a temporary folder, removed unless the run failed)",
    )
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.users < 1 or args.duration < 1:
        parser.error("--users and --duration must be at least 1")
    if args.warmup >= args.duration:
        parser.error(f"--warmup ({args.warmup:g} s) must be shorter than --duration")
    if args.soak and not kill_offsets(args):
        parser.error(
            f"--duration must be at least --kill-interval + --down-time + {RESTART_MARGIN_S:g} s "
            "so that one kill and restart fit in the run"
        )
    return args


def kill_offsets(args: argparse.Namespace) -> list[float]:
    """Return the kill times in seconds after the load starts."""
    offsets = []
    offset = args.kill_interval
    while offset + args.down_time + RESTART_MARGIN_S <= args.duration:
        offsets.append(offset)
        offset += args.kill_interval
    return offsets


def run(args: argparse.Namespace, workdir: Path) -> int:
    try:
        bin_dir = find_bin_dir()
    except LlamaCppNotFoundError as exc:
        raise RunError(str(exc)) from exc
    model_path = write_tiny_model(workdir / "tiny.gguf")

    with contextlib.ExitStack() as cleanup:
        nodes = start_nodes(bin_dir, model_path, workdir, cleanup)
        config_path = write_router_config(workdir, nodes)
        router = RouterProcess(config_path, workdir / "router.log")
        cleanup.callback(router.stop)
        router.start()
        node_urls = ", ".join(f"{name} {node.url}" for name, node in nodes.items())
        print(f"run.py: router at {router.base_url} (pid {router.pid}), nodes {node_urls}")
        print(f"run.py: the router runs sollol from {Path(sollol.__file__).parent}")

        sampler = RssSampler(router.pid, interval_s=args.sample_interval)
        idle_rss = read_rss_bytes(router.pid)
        load = LocustProcess(args, router.base_url, workdir)
        cleanup.callback(load.stop)
        cleanup.callback(sampler.stop)
        sampler.start()
        load.start()
        kills = []
        if args.soak:
            kills = run_kill_schedule(nodes[VICTIM], bin_dir, load, kill_offsets(args), args)
        returncode = load.wait()
        sampler.stop()

    if returncode not in (0, 1):
        raise RunError(f"locust exited with status {returncode}; see {load.log_path}")
    return report(args, load, sampler, idle_rss, kills, workdir)


def report(
    args: argparse.Namespace,
    load: "LocustProcess",
    sampler: "RssSampler",
    idle_rss: int | None,
    kills: list[Kill],
    workdir: Path,
) -> int:
    stats_path = Path(f"{load.csv_prefix}_stats.csv")
    if not stats_path.exists():
        raise RunError(f"locust wrote no {stats_path.name}; see {load.log_path}")
    mode = "soak" if args.soak else "load"
    print(f"\n{mode} run: {args.duration} s, {args.users} users")
    for kill in kills:
        restart = "not restarted before the end"
        if kill.restarted_at is not None:
            healthy_after_s = kill.restarted_at - kill.killed_at
            restart = f"restarted, healthy {healthy_after_s:.1f} s after the kill"
        print(f"  {kill.node} (port {kill.port}) killed with SIGKILL; {restart}")
    failures = read_failures(load.failure_log)
    _, router_failures = print_report(
        read_stats(stats_path),
        failures,
        kills,
        sampler.summary(idle_rss, load.started + args.warmup),
        warmup_s=args.warmup,
    )
    print_router_log(workdir / "router.log")

    exceptions = read_exceptions(Path(f"{load.csv_prefix}_exceptions.csv"))
    if exceptions:
        raise RunError("the locustfile raised errors: " + "; ".join(exceptions))
    return 1 if router_failures else 0


def start_nodes(
    bin_dir: Path, model_path: Path, workdir: Path, cleanup: contextlib.ExitStack
) -> dict[str, LlamaServer]:
    nodes = {
        "node-1": LlamaServer(model_path, log_path=workdir / "node-1.log"),
        "node-2": LlamaServer(model_path, embeddings=True, log_path=workdir / "node-2.log"),
    }
    for node in nodes.values():
        cleanup.callback(node.stop)
        node.start(bin_dir)
    try:
        for node in nodes.values():
            node.wait_healthy(timeout_s=NODE_START_TIMEOUT_S)
    except LlamaServerStartError as exc:
        raise RunError(str(exc)) from exc
    return nodes


def write_router_config(workdir: Path, nodes: dict[str, LlamaServer]) -> Path:
    """Write the router's TOML: port 0 on 127.0.0.1, a SQLite history, the two nodes."""
    served = {"node-1": [CHAT_MODEL], "node-2": [CHAT_MODEL, EMBEDDING_MODEL]}
    lines = [
        "[server]",
        'host = "127.0.0.1"',
        "port = 0",
        f'database_url = "sqlite:///{workdir / "history.db"}"',
        "",
    ]
    for name, node in nodes.items():
        models = ", ".join(f'"{model}"' for model in served[name])
        lines += [
            "[[nodes]]",
            f'name = "{name}"',
            'kind = "llamacpp"',
            f'url = "{node.url}"',
            f"models = [{models}]",
            "",
        ]
    path = workdir / "sollol.toml"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


class RouterProcess:
    """``python -m sollol serve --config FILE``, the way a user starts the router."""

    def __init__(self, config_path: Path, log_path: Path) -> None:
        self.config_path = config_path
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self.base_url = ""

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> None:
        command = [sys.executable, "-m", "sollol", "serve", "--config", str(self.config_path)]
        with open(self.log_path, "wb") as log_file:
            # `-m sollol` imports from the current folder first. Run from the
            # working folder, it imports the same package as this script.
            self.process = subprocess.Popen(
                command,
                cwd=self.config_path.parent,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log_file,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        # The router prints "sollol: listening on URL (...)" once its socket is bound.
        line = self._read_first_line(ROUTER_START_TIMEOUT_S)
        if "listening on " not in line:
            raise RunError(f"router failed to start, output {line!r}; see {self.log_path}")
        self.base_url = line.split("listening on ")[1].split()[0]
        if not wait_for_status_200(self.base_url + "/health", ROUTER_START_TIMEOUT_S):
            raise RunError(
                f"router not healthy after {ROUTER_START_TIMEOUT_S:g} s; see {self.log_path}"
            )

    def _read_first_line(self, timeout_s: float) -> str:
        assert self.process is not None and self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], timeout_s)
        if not ready:
            return f"no output within {timeout_s:g} s"
        return self.process.stdout.readline().decode(errors="replace")

    def stop(self) -> None:
        if self.process is None:
            return
        stop_process(self.process)
        if self.process.stdout is not None:
            self.process.stdout.close()


class LocustProcess:
    """Locust, headless, in its own process: gevent stays out of the runner."""

    def __init__(self, args: argparse.Namespace, base_url: str, workdir: Path) -> None:
        self.args = args
        self.base_url = base_url
        self.csv_prefix = workdir / "locust"
        self.failure_log = workdir / "failures.jsonl"
        self.log_path = workdir / "locust.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.started = 0.0  # time.monotonic() at start

    def start(self) -> None:
        args = self.args
        spawn_rate = args.spawn_rate or args.users
        # When the time is up, users finish the request they are in. A hung
        # request still ends, as a failure, after --request-timeout.
        stop_timeout_s = int(args.request_timeout) + 5

        command = [
            sys.executable, "-m", "locust",
            "-f", str(LOCUSTFILE),
            "--headless", "--only-summary",
            "--host", self.base_url,
            "--users", str(args.users),
            "--spawn-rate", str(spawn_rate),
            "--run-time", f"{args.duration}s",
            "--stop-timeout", str(stop_timeout_s),
            "--csv", str(self.csv_prefix),
        ]  # fmt: skip

        env = {
            **os.environ,
            "SOLLOL_CHAT_MODEL": CHAT_MODEL,
            "SOLLOL_EMBEDDING_MODEL": EMBEDDING_MODEL,
            "SOLLOL_LOAD_TIMEOUT_S": str(args.request_timeout),
            "SOLLOL_LOAD_FAILURE_LOG": str(self.failure_log),
        }
        # A kept --workdir may hold the failures of an earlier run.
        self.failure_log.unlink(missing_ok=True)
        print(f"run.py: locust with {args.users} users for {args.duration} s; log {self.log_path}")
        with open(self.log_path, "wb") as log_file:
            self.process = subprocess.Popen(
                command,
                cwd=self.csv_prefix.parent,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
            )
        self.started = time.monotonic()

    def wait_until(self, deadline: float) -> bool:
        """Wait until ``deadline`` (time.monotonic()) and return whether locust exited before."""
        assert self.process is not None
        try:
            self.process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            return False
        return True

    def wait(self) -> int:
        """Wait for locust to finish the run and return its exit status.

        Raises RunError, after stopping locust, when it overruns the run by
        ``LOCUST_EXIT_MARGIN_S``.
        """
        args = self.args
        deadline = self.started + args.duration + args.request_timeout + LOCUST_EXIT_MARGIN_S
        if not self.wait_until(deadline):
            self.stop()
            overrun_s = args.request_timeout + LOCUST_EXIT_MARGIN_S
            raise RunError(
                f"locust was still running {overrun_s:g} s after the end of the run; "
                f"see {self.log_path}"
            )
        assert self.process is not None
        return self.process.returncode

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)


def run_kill_schedule(
    victim: LlamaServer,
    bin_dir: Path,
    load: LocustProcess,
    offsets_s: list[float],
    args: argparse.Namespace,
) -> list[Kill]:
    """Kill ``victim`` at each offset after the load started, restarting it after a pause."""
    kills: list[Kill] = []
    for offset_s in offsets_s:
        if load.wait_until(load.started + offset_s):
            break
        assert victim.process is not None
        kill = Kill(node=VICTIM, port=victim.port, killed_at=time.time())
        victim.process.send_signal(signal.SIGKILL)
        victim.process.wait(PROCESS_STOP_TIMEOUT_S)
        kills.append(kill)
        print(f"run.py: killed {VICTIM} at {offset_s:g} s of load")
        if load.wait_until(time.monotonic() + args.down_time):
            break
        restart_node(victim, bin_dir)
        kill.restarted_at = time.time()
        print(f"run.py: {VICTIM} healthy again on port {victim.port}")
    return kills


def restart_node(node: LlamaServer, bin_dir: Path) -> None:
    """Start ``node`` again on its port, so the router's configuration stays valid."""
    error: LlamaServerStartError | None = None
    for _ in range(RESTART_ATTEMPTS):
        node.start(bin_dir)
        try:
            node.wait_healthy(timeout_s=NODE_START_TIMEOUT_S)
        except LlamaServerStartError as exc:
            # Another socket, such as an outgoing connection given this port as
            # its ephemeral port, may hold the port for a while, so try again.
            node.stop()
            error = exc
            time.sleep(1.0)
            continue
        return
    raise RunError(
        f"failed to restart {VICTIM} on port {node.port} after {RESTART_ATTEMPTS} attempts: {error}"
    )


class RssSampler:
    """Sample a process's resident memory in a background thread."""

    def __init__(self, pid: int, *, interval_s: float) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.samples: list[tuple[float, int]] = []  # (time.monotonic(), bytes)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join()

    def _sample(self) -> None:
        while True:
            rss = read_rss_bytes(self.pid)
            if rss is not None:
                self.samples.append((time.monotonic(), rss))
            if self._stopping.wait(self.interval_s):
                return

    def summary(self, idle_bytes: int | None, start: float) -> RssSummary | None:
        """Summarise the samples taken from ``start`` (time.monotonic()) on."""
        values = [rss for sampled_at, rss in self.samples if sampled_at >= start]
        if not values:
            return None
        return RssSummary(
            idle_bytes=idle_bytes,
            start_bytes=values[0],
            max_bytes=max(values),
            end_bytes=values[-1],
        )


def read_rss_bytes(pid: int) -> int | None:
    """Return VmRSS of ``pid``, or None once the process is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024  # the kernel reports kB
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def wait_for_status_200(url: str, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(URLError, OSError), urlopen(url, timeout=1.0) as response:
            if response.status == 200:
                return True
        time.sleep(0.1)
    return False


def stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(PROCESS_STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


if __name__ == "__main__":
    sys.exit(main())
