"""``sollol demo``: two llama-server nodes on the tiny model, with the router in front.

Everything listens on 127.0.0.1 on ports picked at run time, except the
router's own port (``--port``, 8000 by default). Ctrl-C stops the router and
both nodes.
"""

import logging
import sys
from pathlib import Path

from .config import NodeConfig, NodeKind, Settings
from .llamacpp import LlamaCppNotFoundError, LlamaServer, LlamaServerStartError, find_bin_dir
from .server import run
from .tinymodel import write_tiny_model

log = logging.getLogger(__name__)

CHAT_MODEL = "tiny"
EMBEDDING_MODEL = "tiny-embed"


def run_demo(*, host: str, port: int, workdir: Path) -> int:
    from .cli import serve_router

    workdir.mkdir(parents=True, exist_ok=True)
    model_path = workdir / "tiny.gguf"
    if not model_path.exists():
        write_tiny_model(model_path)
        print(f"sollol demo: wrote the tiny model to {model_path}", flush=True)

    try:
        bin_dir = find_bin_dir()
    except LlamaCppNotFoundError as exc:
        print(f"sollol demo: {exc}", file=sys.stderr)
        return 1

    servers = [
        LlamaServer(model_path, log_path=workdir / "node-1.log"),
        LlamaServer(model_path, embeddings=True, log_path=workdir / "node-2.log"),
    ]
    try:
        for server in servers:
            server.start(bin_dir)
        for server in servers:
            server.wait_healthy()
        print(
            "sollol demo: llama-server nodes ready at "
            + ", ".join(server.url for server in servers),
            flush=True,
        )
        settings = Settings(
            host=host,
            port=port,
            database_url=f"sqlite:///{(workdir / 'history.db').resolve()}",
            nodes=(
                NodeConfig(
                    url=servers[0].url, kind=NodeKind.LLAMACPP, name="node-1", models=(CHAT_MODEL,)
                ),
                NodeConfig(
                    url=servers[1].url,
                    kind=NodeKind.LLAMACPP,
                    name="node-2",
                    models=(CHAT_MODEL, EMBEDDING_MODEL),
                ),
            ),
        )
        print(
            f"sollol demo: models '{CHAT_MODEL}' (chat, completions) and "
            f"'{EMBEDDING_MODEL}' (embeddings); history in {workdir / 'history.db'}; "
            "Ctrl-C stops everything",
            flush=True,
        )
        run(lambda: serve_router(settings))
    except LlamaServerStartError as exc:
        print(f"sollol demo: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    finally:
        for server in servers:
            server.stop()
        print("sollol demo: stopped", flush=True)
    return 0
