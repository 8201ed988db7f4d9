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

``publish`` is the only call on the request path: one deque append. The
statistics are computed at most once per interval, whatever the number of
open dashboards, and the number of open streams is bounded.
"""

import asyncio
import itertools
import math
import time
from collections import deque
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from .errors import SollolError

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from .cluster import Cluster
    from .history import RequestRecord
    from .routing.scheduler import Scheduler

PERCENTILES = (50, 95, 99)
# Requests sent to one client per update; a faster burst is summarised by the stats.
MAX_FEED_PER_UPDATE = 50


@dataclass(frozen=True, slots=True)
class FeedEntry:
    seq: int
    finished_at: float  # Unix time, seconds
    route: str
    model: str
    node: str | None
    policy: str | None
    runner_up: str | None
    status: int
    outcome: str
    attempts: int
    latency_ms: float
    ttft_ms: float | None
    prompt_tokens: int | None
    completion_tokens: int | None

    def to_json(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}


class DashboardFeed:
    def __init__(
        self,
        cluster: "Cluster",
        scheduler: "Scheduler",
        *,
        interval_s: float = 1.0,
        window_s: float = 600.0,
        bucket_s: float = 10.0,
        max_entries: int = 20_000,
        max_streams: int = 16,
    ) -> None:
        self.cluster = cluster
        self.scheduler = scheduler
        # Faster updates would cost more than they show.
        self.interval_s = max(interval_s, 0.1)
        self.window_s = window_s
        self.bucket_s = bucket_s
        self.max_streams = max_streams
        self.streams = 0
        self._entries: deque[FeedEntry] = deque(maxlen=max_entries)
        self._seq = itertools.count(1)
        self._stats: dict[str, Any] = {}
        self._stats_at = -math.inf
        self._closing: asyncio.Event | None = None

    # -- request path ----------------------------------------------------

    def publish(self, record: "RequestRecord") -> None:
        """Add a finished request to the feed."""
        self._entries.append(
            FeedEntry(
                seq=next(self._seq),
                finished_at=time.time(),
                route=record.route,
                model=record.model,
                node=record.node,
                policy=record.policy,
                runner_up=record.runner_up,
                status=record.status,
                outcome=record.outcome,
                attempts=record.attempts,
                latency_ms=round(record.latency_ms, 2),
                ttft_ms=None if record.ttft_ms is None else round(record.ttft_ms, 2),
                prompt_tokens=record.prompt_tokens,
                completion_tokens=record.completion_tokens,
            )
        )

    # -- state -------------------------------------------------------------

    def close_on(self, event: asyncio.Event) -> None:
        """End every dashboard stream when ``event`` is set (the server is stopping)."""
        self._closing = event

    def state(self, after_seq: int = 0) -> dict[str, Any]:
        """Return the dashboard state, with the requests newer than ``after_seq``."""
        now = time.time()
        if time.monotonic() - self._stats_at >= self.interval_s:
            self._stats = self._compute_stats(now)
            self._stats_at = time.monotonic()
        newer = [entry for entry in self._entries if entry.seq > after_seq] if self._entries else []
        return {
            "now": now,
            "interval_s": self.interval_s,
            "open_dashboards": self.streams,
            "nodes": [self.cluster.describe(node) for node in self.cluster.nodes],
            "queued": self.scheduler.queued_by_model(),
            "requests": [entry.to_json() for entry in newer[-MAX_FEED_PER_UPDATE:]],
            "last_seq": self._entries[-1].seq if self._entries else after_seq,
            "stats": self._stats,
        }

    def _compute_stats(self, now: float) -> dict[str, Any]:
        buckets = int(self.window_s // self.bucket_s)
        start = now - buckets * self.bucket_s
        recent = [entry for entry in self._entries if entry.finished_at >= start]
        index = np.array([int((e.finished_at - start) // self.bucket_s) for e in recent], dtype=int)
        index = np.minimum(index, buckets - 1)
        latency = np.array([e.latency_ms for e in recent], dtype=float)
        ttft = np.array([math.nan if e.ttft_ms is None else e.ttft_ms for e in recent])
        failed = np.array([e.outcome != "ok" or e.status >= 500 for e in recent], dtype=bool)
        failover = np.array([e.attempts > 1 for e in recent], dtype=bool)
        return {
            "bucket_s": self.bucket_s,
            "start": start,
            "buckets": buckets,
            "requests": np.bincount(index, minlength=buckets).tolist(),
            "errors": np.bincount(index[failed], minlength=buckets).tolist(),
            "failovers": np.bincount(index[failover], minlength=buckets).tolist(),
            "by_model": _grouped([e.model for e in recent], index, latency, ttft, buckets),
            "by_node": _grouped([e.node or "-" for e in recent], index, latency, ttft, buckets),
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


def _grouped(
    keys: list[str], index: np.ndarray, latency: np.ndarray, ttft: np.ndarray, buckets: int
) -> dict[str, dict[str, Any]]:
    """Per key: percentiles per bucket (None where empty) and over the whole window."""
    groups: dict[str, dict[str, Any]] = {}
    names = np.array(keys, dtype=object)
    for key in sorted(set(keys)):
        mine = names == key
        groups[key] = {
            "count": int(mine.sum()),
            "latency_ms": _percentiles(latency[mine]),
            "ttft_ms": _percentiles(ttft[mine]),
            "series": {
                "latency_ms": _series(index[mine], latency[mine], buckets),
                "ttft_ms": _series(index[mine], ttft[mine], buckets),
            },
        }
    return groups


def _percentiles(values: np.ndarray) -> dict[str, float | None]:
    values = values[~np.isnan(values)]
    if values.size == 0:
        return {f"p{p}": None for p in PERCENTILES}
    found = np.percentile(values, PERCENTILES)
    return {f"p{p}": round(float(v), 2) for p, v in zip(PERCENTILES, found, strict=True)}


def _series(index: np.ndarray, values: np.ndarray, buckets: int) -> dict[str, list]:
    """Percentiles for each bucket; a bucket with no value gives None."""
    series: dict[str, list] = {f"p{p}": [None] * buckets for p in PERCENTILES}
    keep = ~np.isnan(values)
    index, values = index[keep], values[keep]
    for bucket in np.unique(index):
        found = np.percentile(values[index == bucket], PERCENTILES)
        for p, v in zip(PERCENTILES, found, strict=True):
            series[f"p{p}"][int(bucket)] = round(float(v), 2)
    return series
