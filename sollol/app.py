"""The Starlette application: routes, error handling and the router's lifespan."""

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import AsyncIterator

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .admin_api import AdminRoutes
from .auth import AuthGate, DashboardSessions
from .cluster import Cluster
from .config import Settings
from .dashboard import DashboardFeed
from .errors import SollolError, openai_error_body
from .health import HealthPolicy
from .history import HistoryWriter, create_history_engine
from .learned_api import LearnedModelRoutes
from .loops import LoopGuard, new_instance_id
from .membership import Membership, NodeStore
from .metrics import RouterMetrics
from .nodes_api import NodeRoutes
from .ollama_api import OllamaRoutes, ollama_error_body
from .openai_api import OpenAIRoutes
from .openapi import openapi_route
from .proxy import Proxy
from .routing.scheduler import Scheduler
from .tenancy import Tenancy
from .upstream import UpstreamClient

log = logging.getLogger(__name__)
access_log = logging.getLogger("sollol.access")

_HTTP_ERROR_TYPES = {404: "not_found_error", 405: "invalid_request_error"}


def create_app(settings: Settings, *, probe_nodes: bool = True) -> Starlette:
    """Build the router app.

    With ``probe_nodes`` False the lifespan neither probes nodes nor runs the
    health loop, so tests can set node state by hand.
    """
    cluster = Cluster(
        settings.nodes,
        default_policy=settings.routing_policy,
        node_queue_per_slot=settings.node_queue_per_slot,
        health_policy=HealthPolicy(
            evict_after=settings.evict_after_failures,
            recover_after=settings.recover_after_successes,
            breaker_failures=settings.breaker_failures,
            open_s=settings.breaker_open_s,
            max_open_s=settings.breaker_max_open_s,
        ),
        progress_window_s=settings.health_interval_s + settings.connect_timeout_s,
    )
    scheduler = Scheduler(
        signals=cluster.signals.matrix,
        candidates_of=cluster.candidates_of,
        max_queued_per_model=settings.max_queued_per_model,
        aging_s=settings.queue_aging_s,
        timeout_s=settings.queue_timeout_s,
        node_queue_per_slot=settings.node_queue_per_slot,
    )
    cluster.on_capacity = scheduler.wake  # type: ignore[method-assign]
    instance_id = new_instance_id()
    client = UpstreamClient(
        connect_timeout_s=settings.connect_timeout_s,
        max_connections=settings.max_upstream_connections,
        instance_id=instance_id,
    )
    engine = create_history_engine(settings.database_url)
    history = HistoryWriter(engine)
    tenancy = Tenancy(
        engine,
        required=settings.auth == "required",
        interval_s=settings.keys_refresh_interval_s,
        costs=settings.costs,
    )
    sessions = DashboardSessions(tenancy.keys)
    learned = LearnedModelRoutes(cluster, settings)
    membership = Membership(
        cluster,
        NodeStore(engine),
        client,
        probe_timeout_s=settings.connect_timeout_s,
        refresh_interval_s=settings.membership_refresh_interval_s,
    )

    def membership_changed() -> None:
        # A node joined or left: the matrix was reallocated, and the learned
        # scorer maps node names to indices.
        scheduler.set_signals(cluster.signals.matrix)
        if learned.reloader is not None:
            learned.reloader.set_node_names(cluster.node_names_by_index())

    cluster.on_membership = membership_changed  # type: ignore[method-assign]
    metrics = RouterMetrics()
    metrics.watch(cluster, scheduler, history)
    feed = DashboardFeed(cluster, scheduler, interval_s=settings.dashboard_interval_s)
    proxy = Proxy(
        cluster=cluster,
        client=client,
        history=history,
        settings=settings,
        metrics=metrics,
        feed=feed,
        tenancy=tenancy,
    )
    openai_routes = OpenAIRoutes(proxy, scheduler, max_body_bytes=settings.max_body_bytes)
    ollama_routes = OllamaRoutes(
        openai_routes,
        cluster,
        client,
        max_body_bytes=settings.max_body_bytes,
        timeout_s=settings.connect_timeout_s,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await tenancy.keys.start()
        if not tenancy.keys.enabled and not _is_loopback(settings.host):
            log.warning(
                "listening on %s with authentication off: anyone who can reach this address "
                "can use every route; create a key with `sollol keys create NAME --admin`",
                settings.host,
            )
        await client.start()
        history.start()
        await learned.start()
        await membership.start(probe=probe_nodes)
        health_task = None
        if probe_nodes:
            await cluster.refresh(client, timeout_s=settings.connect_timeout_s)
            health_task = asyncio.create_task(
                cluster.run_health_loop(
                    client,
                    interval_s=settings.health_interval_s,
                    timeout_s=settings.connect_timeout_s,
                ),
                name="sollol-health",
            )
        try:
            yield
        finally:
            if health_task is not None:
                health_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await health_task
            await membership.stop()
            await learned.stop()
            await tenancy.keys.stop()
            await tenancy.drain()
            await client.close()
            await asyncio.to_thread(history.close)
            # Close the pooled database connections rather than leave them to exit.
            await asyncio.to_thread(engine.dispose)

    async def health(request: Request) -> Response:
        nodes = [cluster.describe(node) for node in cluster.nodes]
        healthy = any(node.healthy for node in cluster.nodes)
        body = {
            "status": "ok" if healthy else "unavailable",
            "queued": scheduler.queued(),
            "nodes": nodes,
        }
        return Response(
            orjson.dumps(body), status_code=200 if healthy else 503, media_type="application/json"
        )

    app = Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/sollol/route", openai_routes.explain_route, methods=["GET"]),
            *learned.routes(),
            *openai_routes.routes(),
            *ollama_routes.routes(),
            metrics.route(),
            *feed.routes(),
            sessions.route(),
            *AdminRoutes(tenancy).routes(),
            *NodeRoutes(membership, detect_timeout_s=settings.connect_timeout_s).routes(),
            openapi_route(),
        ],
        middleware=[
            Middleware(LoopGuard, instance_id=instance_id),
            Middleware(AuthGate, keys=tenancy.keys, sessions=sessions),
        ],
        exception_handlers={
            SollolError: _sollol_error,
            HTTPException: _http_error,
            Exception: _unexpected_error,
        },
        lifespan=lifespan,
    )
    app.state.cluster = cluster
    app.state.history = history
    app.state.client = client
    app.state.scheduler = scheduler
    app.state.metrics = metrics
    app.state.learned = learned
    app.state.dashboard = feed
    app.state.tenancy = tenancy
    app.state.membership = membership
    return app


async def _sollol_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, SollolError)
    if not exc.recorded:
        # Rejected before reaching the proxy: bad input or an unknown model.
        request.app.state.metrics.rejected.labels(_route_label(request), str(exc.status_code)).inc()
        access_log.info(
            "%s %s status=%d error=%s",
            request.method,
            request.url.path,
            exc.status_code,
            exc.message,
        )
    body = ollama_error_body(exc.message) if _speaks_ollama(request) else exc.to_body()
    return Response(
        body, status_code=exc.status_code, headers=exc.headers, media_type="application/json"
    )


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _route_label(request: Request) -> str:
    """Return the route's template, never the raw path, so metric labels stay bounded."""
    route = request.scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "other"


def _speaks_ollama(request: Request) -> bool:
    """Errors on Ollama's routes take Ollama's shape, ``{"error": "<text>"}``."""
    return request.url.path.startswith("/api/")


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    error_type = _HTTP_ERROR_TYPES.get(exc.status_code, "invalid_request_error")
    message = f"{request.method} {request.url.path}: {exc.detail}"
    access_log.info(
        "%s %s status=%d error=%s", request.method, request.url.path, exc.status_code, exc.detail
    )
    if _speaks_ollama(request):
        body = ollama_error_body(message)
    else:
        body = openai_error_body(message, error_type)
    return Response(
        body, status_code=exc.status_code, headers=exc.headers, media_type="application/json"
    )


async def _unexpected_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    message = "internal router error; see the router log"
    return Response(
        ollama_error_body(message)
        if _speaks_ollama(request)
        else openai_error_body(message, "server_error"),
        status_code=500,
        media_type="application/json",
    )
