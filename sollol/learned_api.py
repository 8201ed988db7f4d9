"""HTTP surface and lifecycle of the learned model: initial load, file watch, reload call.

``POST /sollol/policy/reload`` loads the artifact now. It returns 200 with
``{"loaded": true, ...}`` when the new model is in use. When the file is
missing or incompatible it returns 409 in the OpenAI error shape, with code
``model_not_loaded``, and the previous model stays in use.
"""

import asyncio
import contextlib
import logging
from pathlib import Path

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .cluster import Cluster
from .config import Settings
from .errors import SollolError
from .learning.policy import ModelReloader

log = logging.getLogger(__name__)


class LearnedModelRoutes:
    def __init__(self, cluster: Cluster, settings: Settings) -> None:
        cluster.engine.explore_share = settings.explore_share
        self.interval_s = settings.model_reload_interval_s
        self.reloader: ModelReloader | None = None
        if settings.learned_model_path:
            self.reloader = ModelReloader(
                cluster.engine,
                [node.name for node in cluster.nodes],
                Path(settings.learned_model_path),
            )
        self._task: asyncio.Task[None] | None = None

    def routes(self) -> list[Route]:
        return [Route("/sollol/policy/reload", self.reload, methods=["POST"])]

    async def start(self) -> None:
        """Load the artifact if it exists, then watch it for changes."""
        if self.reloader is None:
            return
        if self.reloader.changed():
            await asyncio.to_thread(self.reloader.reload)
        else:
            log.info("no learned model at %s yet; `sollol train` writes one", self.reloader.path)
        if self.interval_s > 0:
            self._task = asyncio.create_task(
                self.reloader.watch(self.interval_s), name="sollol-model-watch"
            )

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def reload(self, request: Request) -> Response:
        if self.reloader is None:
            raise _not_loaded("learned_model_path is not set")
        result = await asyncio.to_thread(self.reloader.reload)
        if not result.loaded:
            raise _not_loaded(result.message)
        body = {"loaded": True, "path": result.path, "message": result.message}
        return Response(orjson.dumps(body), media_type="application/json")


def _not_loaded(message: str) -> SollolError:
    return SollolError(message, code="model_not_loaded", status_code=409)
