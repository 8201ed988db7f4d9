"""Run a shard group in the foreground: start it, watch it, restart it as a whole.

Start order: local workers, then a HELLO to every worker (protocol version
and memory), then placement, then the coordinator ``llama-server --rpc``.
llama.cpp aborts the coordinator when a worker fails the handshake at start
or dies later, so the group is one unit. When any process of it exits, the
supervisor kills the others at once, so the router's next probe or request
gets a refused connection and takes the group out. Then it starts the whole
group again after a backoff that doubles up to ``restart_max_s``.
"""

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from ..llamacpp import LlamaServer, LlamaServerStartError
from .config import ShardGroupConfig
from .errors import GroupStartError, PlacementError, ShardError, VersionMismatchError
from .placement import Placement, plan_placement, read_model_layout
from .rpc import RpcVersion
from .state import GroupState, WorkerState
from .workers import WorkerProcess, build_rpc_version, probe_report, stop_process

log = logging.getLogger(__name__)

# A group that stayed up this long counts as started well: the backoff and
# the count of failed starts begin again from zero.
STABLE_RUN_S = 60.0
WATCH_INTERVAL_S = 0.05
# -ngl 99 offloads every layer to the workers, so only the input embedding
# stays on the coordinator.
GPU_LAYERS = "99"


class GroupSupervisor:
    def __init__(
        self,
        group: ShardGroupConfig,
        *,
        bin_dir: Path,
        stop_event: threading.Event,
        console: Callable[[str], None],
    ) -> None:
        self.group = group
        self.bin_dir = bin_dir
        self.stop_event = stop_event
        self.console = console
        self.state_dir = group.state_dir()
        self.state = GroupState(group=group.name, supervisor_pid=os.getpid(), url=group.url)
        self.workers: list[WorkerProcess] = []
        self.coordinator: LlamaServer | None = None
        self._build_version: RpcVersion | None = None

    # -- the foreground loop ----------------------------------------------

    def run(self) -> int:
        """Start and supervise until stopped; return the process exit code."""
        group = self.group
        delay_s = group.restart_initial_s
        failures = 0
        try:
            while not self.stop_event.is_set():
                started_at = time.monotonic()
                try:
                    self._start_group()
                except ShardError as exc:
                    self._stop_processes(kill=True)
                    self.state.last_error = str(exc)
                    if not exc.retryable:
                        self.console(f"error: {exc}")
                        self._save("failed")
                        return 2
                    problem = f"start failed: {exc}"
                else:
                    self._save("running")
                    problem = self._watch()
                    self._stop_processes(kill=True)
                    if problem is None:
                        break
                    self.state.last_error = problem
                    if time.monotonic() - started_at >= STABLE_RUN_S:
                        delay_s, failures = group.restart_initial_s, 0
                failures += 1
                if failures > group.max_restarts:
                    self.console(f"{problem}; gave up after {group.max_restarts} restarts")
                    self._save("failed")
                    return 1
                self.state.restarts += 1
                self._save("restarting")
                self.console(f"{problem}; group stopped, restarting in {delay_s:.1f} s")
                if self.stop_event.wait(delay_s):
                    break
                delay_s = min(delay_s * 2, group.restart_max_s)
        finally:
            self._stop_processes(kill=False)
        self._save("stopped")
        self.console(f"group {group.name} stopped")
        return 0

    def _watch(self) -> str | None:
        """Wait until a process of the group exits (return what happened) or a stop request."""
        # NOTE: remote workers are not watched. A worker serves one connection at
        # a time, so it cannot be probed while the coordinator holds it; a dead one
        # shows only when the coordinator next uses it and aborts.
        while not self.stop_event.wait(WATCH_INTERVAL_S):
            for worker in self.workers:
                code = worker.exit_code()
                if code is not None:
                    return f"worker {worker.config.address} exited with code {code}"
            assert self.coordinator is not None and self.coordinator.process is not None
            code = self.coordinator.process.poll()
            if code is not None:
                # llama-server aborts when a worker it uses fails or disappears.
                return (
                    f"coordinator exited with code {code} (a worker may have failed); "
                    f"see {self.coordinator.log_path}"
                )
        return None

    # -- one start ----------------------------------------------------------

    def _start_group(self) -> None:
        group = self.group
        begun = time.monotonic()
        self.workers, self.coordinator = [], None
        self.state.coordinator_pid = None
        self._save("starting")
        if not group.model_path.is_file():
            raise PlacementError(f"model file {group.model_path} not found")
        layout = read_model_layout(group.model_path)

        local = [worker for worker in group.workers if worker.start]
        for worker in local:
            if not worker.loopback:
                self.console(
                    f"warning: worker {worker.address} listens on a non-loopback address; "
                    "the llama.cpp RPC protocol has no authentication or encryption, so "
                    "anyone who reaches that port can run code on this machine's backend. "
                    "Expose it only on a private network behind a firewall"
                )
        if local:
            addresses = ", ".join(worker.address for worker in local)
            self.console(f"starting {len(local)} local worker(s): {addresses}")
        self.workers = [
            WorkerProcess(worker, log_path=self.state_dir / f"worker-{worker.port}.log").start(
                self.bin_dir
            )
            for worker in local
        ]
        self._save("starting")
        versions = [process.wait_ready() for process in self.workers]
        build_version = self._local_build_version(versions)

        memory = []
        for worker in group.workers:
            report = probe_report(worker.host, worker.port, build_version)
            if not report.version.accepted_by(build_version):
                raise VersionMismatchError(
                    f"worker {worker.address} speaks RPC protocol {report.version}, but this "
                    f"llama.cpp build (llama-server in {self.bin_dir}) speaks {build_version} "
                    f"and accepts only {build_version.major}.x with minor <= "
                    f"{build_version.minor}; run the same llama.cpp build on every machine"
                )
            assert report.free_bytes is not None
            memory.append(worker.memory_bytes or report.free_bytes)
        self.console(f"workers answered HELLO with RPC protocol {build_version}")

        placement = plan_placement(
            layout,
            addresses=[worker.address for worker in group.workers],
            memory_bytes=memory,
            context_size=group.context_size,
            tensor_split=group.tensor_split,
        )
        self._report_placement(placement)
        self._start_coordinator(placement)
        self.console(
            f"group {group.name} serves '{group.served_model}' at {group.url} "
            f"(started in {time.monotonic() - begun:.1f} s)"
        )

    def _local_build_version(self, versions: list[RpcVersion]) -> RpcVersion:
        # A local worker runs this build's libggml-rpc, as the coordinator will.
        if versions:
            return versions[0]
        if self._build_version is None:
            self._build_version = build_rpc_version(
                self.bin_dir, self.state_dir / "version-probe.log"
            )
        return self._build_version

    def _report_placement(self, placement: Placement) -> None:
        for share in placement.shares:
            output = " and the output layer" if share.has_output else ""
            self.console(
                f"worker {share.address}: {share.layers} layer(s){output}, "
                f"{share.needed_bytes / 2**20:.1f} MiB of {share.memory_bytes / 2**20:.0f} MiB"
            )
        self.state.workers = [
            WorkerState(
                address=share.address,
                started_here=worker.start,
                pid=self._worker_pid(worker.address),
                memory_bytes=share.memory_bytes,
                layers=share.layers,
            )
            for share, worker in zip(placement.shares, self.group.workers, strict=True)
        ]

    def _worker_pid(self, address: str) -> int | None:
        for process in self.workers:
            if process.config.address == address:
                return process.pid
        return None

    def _start_coordinator(self, placement: Placement) -> None:
        group = self.group
        addresses = ",".join(worker.address for worker in group.workers)
        self.console(f"starting the coordinator llama-server on {group.url} --rpc {addresses}")
        rpc_args = ["--rpc", addresses, "-ngl", GPU_LAYERS]
        rpc_args += ["--tensor-split", placement.split_argument()]
        coordinator = LlamaServer(
            group.model_path,
            host=group.host,
            port=group.port,
            alias=group.served_model,
            parallel=group.parallel,
            context_size=group.context_size,
            # -1 lets llama.cpp pick; the coordinator itself computes little with -ngl 99.
            threads=group.threads or -1,
            extra_args=rpc_args,
            # An abort would otherwise run gdb for a backtrace first, which
            # keeps the dead coordinator's port open for seconds.
            extra_env={"GGML_NO_BACKTRACE": "1"},
            log_path=self.state_dir / "coordinator.log",
        )
        self.coordinator = coordinator
        coordinator.start(self.bin_dir)
        self.state.coordinator_pid = coordinator.process.pid if coordinator.process else None
        self._save("starting")
        try:
            coordinator.wait_healthy(timeout_s=group.start_timeout_s)
        except LlamaServerStartError as exc:
            raise GroupStartError(f"coordinator did not start: {exc}") from exc

    # -- stopping and state -------------------------------------------------

    def _stop_processes(self, *, kill: bool) -> None:
        # The coordinator goes first, so clients see its port closed at once.
        if self.coordinator is not None:
            stop_process(self.coordinator.process, kill=kill)
        for worker in self.workers:
            worker.stop(kill=kill)

    def _save(self, state: str) -> None:
        self.state.state = state
        self.state.save(self.state_dir)
