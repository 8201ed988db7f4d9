"""The live dashboard at ``/dashboard``: nodes, a request feed and latency charts.

The page is one static HTML file with its script inline, so it needs no build
step and no other service. It reads ``/dashboard/events``, a server-sent event
stream that carries one JSON state object per ``interval_s``:

- ``nodes``: health, breaker, loaded models, in-flight and queued requests;
- ``requests``: the requests finished since the client's last update (the
  node chosen, the policy and the runner-up among the other candidates);
- ``stats``: latency and time-to-first-token percentiles per model and per
  node, in ``bucket_s`` buckets over the last ``window_s``, with errors and
  failovers per bucket.

``publish`` is the only call on the request path: a tuple appended to the
feed, and the request's figures to the current bucket of a
``LatencyWindow``. The statistics are summarised at most once per interval,
whatever the number of open dashboards, and the number of open streams is
bounded.
"""

import asyncio
import itertools
import math
import time
from collections import deque
from importlib import resources
from typing import TYPE_CHECKING, Any

import orjson
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from .errors import SollolError
from .window_stats import LatencyWindow

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from .cluster import Cluster
    from .history import RequestRecord
    from .routing.scheduler import Scheduler

# Requests sent to one client per update; a faster burst is summarised by the stats.
MAX_FEED_PER_UPDATE = 50


# A feed entry is a tuple of these fields: cheaper to build on the request path.
FEED_FIELDS = (
    "seq",
    "finished_at",  # Unix time, seconds
    "route",
    "model",
    "node",
    "policy",
    "runner_up",
    "status",
    "outcome",
    "attempts",
    "latency_ms",
    "ttft_ms",
    "prompt_tokens",
    "completion_tokens",
)


class DashboardFeed:
    def __init__(
        self,
        cluster: "Cluster",
        scheduler: "Scheduler",
        *,
        interval_s: float = 1.0,
        window_s: float = 600.0,
        bucket_s: float = 10.0,
        max_entries: int = 1_000,
        max_streams: int = 16,
    ) -> None:
        self.cluster = cluster
        self.scheduler = scheduler
        # Faster updates would cost more than they show.
        self.interval_s = max(interval_s, 0.1)
        self.max_streams = max_streams
        self.streams = 0
        # The newest requests, for the feed; the window keeps the statistics.
        self._entries: deque[tuple] = deque(maxlen=max_entries)
        self.window = LatencyWindow(window_s=window_s, bucket_s=bucket_s)
        self._seq = itertools.count(1)
        self._stats: dict[str, Any] = {}
        self._stats_at = -math.inf
        self._stats_lock = asyncio.Lock()
        self._closing: asyncio.Event | None = None

    # -- request path ----------------------------------------------------

    def publish(self, record: "RequestRecord") -> None:
        """Add a finished request to the feed and the statistics."""
        now = time.time()
        self._entries.append(
            (
                next(self._seq),
                now,
                record.route,
                record.model,
                record.node,
                record.policy,
                record.runner_up,
                record.status,
                record.outcome,
                record.attempts,
                record.latency_ms,
                record.ttft_ms,
                record.prompt_tokens,
                record.completion_tokens,
            )
        )
        self.window.add(
            now,
            model=record.model,
            node=record.node or "-",
            latency_ms=record.latency_ms,
            ttft_ms=record.ttft_ms,
            failed=record.outcome != "ok" or record.status >= 500,
            failover=record.attempts > 1,
        )

    # -- state -------------------------------------------------------------

    def close_on(self, event: asyncio.Event) -> None:
        """End every dashboard stream when ``event`` is set (the server is stopping)."""
        self._closing = event

    async def refresh_stats(self) -> None:
        """Summarise the window if the last summary is older than the interval.

        The summary runs in a worker thread: after a bucket closes it takes
        tens of milliseconds on a busy window, and the event loop keeps serving
        requests meanwhile. One summary runs at a time for every open dashboard.
        """
        async with self._stats_lock:
            if time.monotonic() - self._stats_at < self.interval_s:
                return
            self._stats = await asyncio.to_thread(self.window.summary, time.time())
            self._stats_at = time.monotonic()

    def state(self, after_seq: int = 0) -> dict[str, Any]:
        """Return the dashboard state, with the requests newer than ``after_seq``."""
        now = time.time()
        newer = [entry for entry in self._entries if entry[0] > after_seq]
        return {
            "now": now,
            "interval_s": self.interval_s,
            "open_dashboards": self.streams,
            "nodes": [self.cluster.describe(node) for node in self.cluster.nodes],
            "queued": self.scheduler.queued_by_model(),
            "requests": [_feed_json(entry) for entry in newer[-MAX_FEED_PER_UPDATE:]],
            "last_seq": self._entries[-1][0] if self._entries else after_seq,
            "stats": self._stats,
        }

    # -- HTTP ----------------------------------------------------------------

    def routes(self) -> list[Route]:
        return [
            Route("/dashboard", self._page, methods=["GET"]),
            Route("/dashboard/state", self._state, methods=["GET"]),
            Route("/dashboard/events", self._events, methods=["GET"]),
        ]

    async def _page(self, request: Request) -> Response:
        page = resources.files("sollol").joinpath("static/dashboard.html").read_bytes()
        return Response(page, media_type="text/html; charset=utf-8")

    async def _state(self, request: Request) -> Response:
        await self.refresh_stats()
        return Response(orjson.dumps(self.state(), option=_JSON), media_type="application/json")

    async def _events(self, request: Request) -> Response:
        if self.streams >= self.max_streams:
            raise SollolError(
                f"{self.max_streams} dashboards are open already; close one and retry",
                code="too_many_dashboards",
                status_code=503,
                headers={"Retry-After": str(math.ceil(self.interval_s * 5))},
            )
        return StreamingResponse(
            self._stream(),
            media_type="text/event-stream",
            headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
        )

    async def _stream(self) -> "AsyncIterator[bytes]":
        # Counted once running: a response whose client left before it began
        # never runs its generator, so counting earlier could leak.
        self.streams += 1
        try:
            last_seq = 0
            while self._closing is None or not self._closing.is_set():
                await self.refresh_stats()
                state = self.state(last_seq)
                last_seq = state["last_seq"]
                yield b"data: " + orjson.dumps(state, option=_JSON) + b"\n\n"
                await self._pause()
        finally:
            self.streams -= 1

    async def _pause(self) -> None:
        if self._closing is None:
            await asyncio.sleep(self.interval_s)
            return
        try:
            async with asyncio.timeout(self.interval_s):
                await self._closing.wait()
        except TimeoutError:
            pass


_JSON = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS


def _feed_json(entry: tuple) -> dict[str, Any]:
    row = dict(zip(FEED_FIELDS, entry, strict=True))
    row["latency_ms"] = round(row["latency_ms"], 2)
    if row["ttft_ms"] is not None:
        row["ttft_ms"] = round(row["ttft_ms"], 2)
    return row
