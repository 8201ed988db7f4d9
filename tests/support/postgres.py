"""Throwaway PostgreSQL servers for the history store tests.

Each ``PostgresServer`` is a cluster of its own: ``initdb`` into a fresh
folder, then ``postgres`` on 127.0.0.1 and a free port, with its Unix socket
in the same folder. PostgreSQL refuses to run as root, so when the tests run
as root (as CI does) every server command runs as the ``postgres`` user
through ``runuser``. Tests fail, never skip, when the binaries are missing.
"""

import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

SERVER_START_TIMEOUT_S = 30
SUPERUSER = "sollol"


def find_postgres_bin_dir() -> Path:
    """Find initdb and pg_ctl: $SOLLOL_PG_BIN_DIR, the PATH, or Debian's versioned folders."""
    if os.environ.get("SOLLOL_PG_BIN_DIR"):
        return Path(os.environ["SOLLOL_PG_BIN_DIR"])
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).resolve().parent
    debian_dirs = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"), key=lambda path: int(path.parent.name)
    )
    for bin_dir in reversed(debian_dirs):
        if (bin_dir / "initdb").exists():
            return bin_dir
    pytest.fail(
        "these tests need PostgreSQL's server binaries (initdb, pg_ctl) but found none; "
        "install them with `apt-get install -y postgresql` (Debian) or set SOLLOL_PG_BIN_DIR"
    )


def _free_port() -> int:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        return holder.getsockname()[1]


class PostgresServer:
    def __init__(self, bin_dir: Path, *, durable: bool = False) -> None:
        self.bin_dir = bin_dir
        # Tests skip fsync for speed; benchmarks keep PostgreSQL's defaults.
        self.durable = durable
        self.run_as_postgres = os.geteuid() == 0
        # Not under pytest's tmp_path: that folder is private to root, and the
        # server may run as the postgres user.
        self.root = Path(tempfile.mkdtemp(prefix="sollol-pg-"))
        self.data_dir = self.root / "data"
        self.log_path = self.root / "server.log"
        self.port = _free_port()
        if self.run_as_postgres:
            account = pwd.getpwnam("postgres")
            os.chown(self.root, account.pw_uid, account.pw_gid)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def init(self) -> "PostgresServer":
        self._run("initdb", "-D", str(self.data_dir), "-U", SUPERUSER, "-A", "trust", "-E", "UTF8")
        return self

    def start(self) -> "PostgresServer":
        """Start the server and wait until it accepts connections."""
        options = f"-h 127.0.0.1 -p {self.port} -k {self.root}"
        if not self.durable:
            options += " -c fsync=off"
        self._run(
            "pg_ctl", "-D", str(self.data_dir), "-l", str(self.log_path), "-o", options,
            "-w", "-t", str(SERVER_START_TIMEOUT_S), "start",
        )  # fmt: skip
        return self

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data_dir), "-m", "fast", "-w", "stop")

    def create_database(self, name: str) -> str:
        """Create an empty database and return its SQLAlchemy URL."""
        with psycopg.connect(
            host="127.0.0.1", port=self.port, user=SUPERUSER, dbname="postgres", autocommit=True
        ) as connection:
            connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(name)

    def remove(self) -> None:
        if (self.data_dir / "postmaster.pid").exists():
            self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def _run(self, program: str, *arguments: str) -> None:
        command = [str(self.bin_dir / program), *arguments]
        if self.run_as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=60)
        if result.returncode != 0:
            log_text = self.log_path.read_text() if self.log_path.exists() else ""
            raise RuntimeError(
                f"{program} failed with exit code {result.returncode}:\n"
                f"{result.stdout}{result.stderr}{log_text}"
            )


def start_postgres_server(*, durable: bool = False) -> PostgresServer:
    server = PostgresServer(find_postgres_bin_dir(), durable=durable)
    try:
        return server.init().start()
    except BaseException:
        server.remove()
        raise


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL server shared by the session; each test takes a database of its own."""
    server = start_postgres_server()
    try:
        yield server
    finally:
        server.remove()


@pytest.fixture
def own_postgres_server() -> Iterator[PostgresServer]:
    """A PostgreSQL server for one test, which may stop and start it."""
    server = start_postgres_server()
    try:
        yield server
    finally:
        server.remove()


_database_numbers = itertools.count()


@pytest.fixture(params=["sqlite", "postgresql"])
def history_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty history database: a SQLite file, or a database on the shared PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'history.db'}"
    server = request.getfixturevalue("postgres_server")
    return server.create_database(f"history_{next(_database_numbers)}")
