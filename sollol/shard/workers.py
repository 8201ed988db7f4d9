"""Local ``ggml-rpc-server`` worker processes, and the RPC version of this llama.cpp build."""

import contextlib
import logging
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from ..llamacpp import binary_env
from .config import WorkerConfig
from .errors import GroupStartError, WorkerUnreachableError
from .rpc import RpcVersion, WorkerReport, probe_worker

log = logging.getLogger(__name__)

WORKER_BINARY = "ggml-rpc-server"
WORKER_START_TIMEOUT_S = 15.0
# A client version no worker matches, so the probe reads the version only and
# sends none of the commands that may differ between protocol versions.
_ANY_VERSION = RpcVersion(255, 255, 255)


@dataclass
class WorkerProcess:
    """One ggml-rpc-server started by the supervisor."""

    config: WorkerConfig
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self, bin_dir: Path) -> "WorkerProcess":
        command = [
            str(bin_dir / WORKER_BINARY),
            "--host", self.config.host,
            "--port", str(self.config.port),
        ]  # fmt: skip
        if self.config.threads is not None:
            command += ["--threads", str(self.config.threads)]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(
                command,
                env=binary_env(bin_dir),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        return self

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def exit_code(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def wait_ready(self, *, timeout_s: float = WORKER_START_TIMEOUT_S) -> RpcVersion:
        """Wait until the worker replies to HELLO and return its protocol version."""
        deadline = time.monotonic() + timeout_s
        while True:
            code = self.exit_code()
            if code is not None:
                raise GroupStartError(
                    f"worker {self.config.address} exited with code {code} at start "
                    f"(is the port in use?); see {self.log_path}"
                )
            try:
                return probe_version(self.config.host, self.config.port)
            except WorkerUnreachableError:
                if time.monotonic() > deadline:
                    raise GroupStartError(
                        f"worker {self.config.address} did not accept connections within "
                        f"{timeout_s:.0f} s; see {self.log_path}"
                    ) from None
            time.sleep(0.02)

    def stop(self, *, kill: bool = False, timeout_s: float = 5.0) -> None:
        stop_process(self.process, kill=kill, timeout_s=timeout_s)


def stop_process(
    process: subprocess.Popen[bytes] | None, *, kill: bool, timeout_s: float = 5.0
) -> None:
    """Stop a child process: SIGKILL at once with ``kill``, else SIGTERM, then SIGKILL."""
    if process is None or process.poll() is not None:
        return
    if kill:
        process.kill()
    else:
        process.terminate()
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def probe_version(host: str, port: int, *, timeout_s: float = 2.0) -> RpcVersion:
    """Return a worker's protocol version from HELLO alone."""
    return probe_worker(host, port, client_version=_ANY_VERSION, timeout_s=timeout_s).version


def probe_report(host: str, port: int, client_version: RpcVersion) -> WorkerReport:
    return probe_worker(host, port, client_version=client_version)


def build_rpc_version(bin_dir: Path, log_path: Path) -> RpcVersion:
    """Return the RPC protocol version of this build, from a throwaway local worker.

    llama-server and ggml-rpc-server load the same libggml-rpc, so the worker's
    HELLO reply is also the version the coordinator will require.
    """
    worker = WorkerProcess(
        WorkerConfig(host="127.0.0.1", port=_free_port(), threads=1), log_path=log_path
    )
    try:
        worker.start(bin_dir)
        return worker.wait_ready()
    finally:
        worker.stop(kill=True)


def _free_port() -> int:
    # NOTE: another process may take the port between close() and the
    # worker's bind; the worker then exits and wait_ready() reports it.
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
