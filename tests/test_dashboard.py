"""The live dashboard: its state, its event stream, and the page in a real browser."""

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import orjson
import pytest

from sollol.app import create_app
from sollol.config import NodeConfig, NodeKind, Settings
from sollol.dashboard import DashboardFeed
from sollol.history import RequestRecord

from .support.fixtures import RouterProcess, write_router_config

CHROMIUM = Path(os.environ.get("SOLLOL_CHROMIUM", "/usr/bin/chromium"))
# Headless, and no calls to Google's services: the machine may have no network.
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
MESSAGES = [{"role": "user", "content": "Show me on the dashboard."}]


def settings_with_nodes(tmp_path: Path) -> Settings:
    return Settings(
        database_url=f"sqlite:///{tmp_path / 'history.db'}",
        nodes=(
            NodeConfig(url="http://127.0.0.1:9", kind=NodeKind.LLAMACPP, name="a", models=("m",)),
            NodeConfig(url="http://127.0.0.1:9", kind=NodeKind.LLAMACPP, name="b", models=("m",)),
        ),
    )


def finished(**fields) -> RequestRecord:
    values = {"started_at": time.time(), "route": "/v1/chat/completions", "model": "m"}
    values.update(stream=True, node="a", policy="round_robin", attempts=1, latency_ms=10.0)
    values.update(fields)
    return RequestRecord(**values)


@pytest.fixture
def feed(tmp_path):
    app = create_app(settings_with_nodes(tmp_path), probe_nodes=False)
    return app.state.dashboard


def test_feed_carries_choice_and_runner_up(feed: DashboardFeed):
    feed.publish(finished(node="a", runner_up="b", ttft_ms=4.0, prompt_tokens=7))
    feed.publish(finished(node="b", runner_up=None, status=502, outcome="error", attempts=2))
    state = feed.state()
    first, second = state["requests"]
    assert (first["node"], first["runner_up"], first["policy"]) == ("a", "b", "round_robin")
    assert (first["ttft_ms"], first["prompt_tokens"]) == (4.0, 7)
    assert (second["status"], second["outcome"], second["attempts"]) == (502, "error", 2)
    # A client that has seen the first request gets only the second.
    assert [r["seq"] for r in feed.state(after_seq=first["seq"])["requests"]] == [second["seq"]]
    assert [node["name"] for node in state["nodes"]] == ["a", "b"]


async def test_stats_come_from_the_published_requests(feed: DashboardFeed):
    latencies = np.arange(1.0, 101.0)  # 1 .. 100 ms
    for index, latency in enumerate(latencies):
        node = "a" if index % 2 else "b"
        feed.publish(finished(node=node, latency_ms=float(latency), ttft_ms=float(latency) / 2))
    feed.publish(finished(node="b", latency_ms=5.0, outcome="error", status=502, attempts=2))
    await feed.refresh_stats()
    stats = feed.state()["stats"]

    overall = stats["by_model"]["m"]
    expected = np.percentile(np.append(latencies, 5.0), [50, 95, 99])
    assert overall["count"] == 101
    assert [overall["latency_ms"][k] for k in ("p50", "p95", "p99")] == pytest.approx(expected)
    assert stats["by_node"]["a"]["latency_ms"]["p50"] == pytest.approx(
        np.percentile(latencies[1::2], 50)
    )
    assert sum(stats["requests"]) == 101
    assert (sum(stats["errors"]), sum(stats["failovers"])) == (1, 1)


async def test_stats_are_summarised_at_most_once_per_interval(feed: DashboardFeed):
    feed.publish(finished())
    await feed.refresh_stats()
    feed.publish(finished())
    await feed.refresh_stats()  # within the interval: no new summary
    assert feed.state()["stats"]["by_model"]["m"]["count"] == 1
    assert len(feed.state()["requests"]) == 2  # the feed itself is always current


async def test_page_and_state_in_process(tmp_path):
    app = create_app(settings_with_nodes(tmp_path), probe_nodes=False)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://sollol") as client:
        page = await client.get("/dashboard")
        state = await client.get("/dashboard/state")
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert b'new EventSource("dashboard/events")' in page.content
    body = state.json()
    assert [node["name"] for node in body["nodes"]] == ["a", "b"]
    assert body["nodes"][0]["loaded_models"] == []
    assert body["requests"] == []
    assert body["stats"]["buckets"] == 60


@pytest.fixture
def dashboard_router(llama_nodes, tmp_path):
    config = write_router_config(
        tmp_path / "sollol.toml",
        database_path=tmp_path / "history.db",
        nodes=[
            {"name": "node-a", "url": llama_nodes[0].url, "models": ["tiny"]},
            {"name": "node-b", "url": llama_nodes[1].url, "models": ["tiny", "tiny-embed"]},
        ],
        server={"dashboard_interval_s": 0.2, "routing_policy": "round_robin"},
    )
    process = RouterProcess(config, tmp_path / "router.log").start()
    try:
        yield process
    finally:
        process.stop()


def read_events(lines: Iterator[str], count: int) -> list[dict]:
    """Read ``count`` state events from a stream's line iterator."""
    events = []
    for line in lines:
        if line.startswith("data: "):
            events.append(orjson.loads(line[len("data: ") :]))
            if len(events) == count:
                break
    return events


@pytest.mark.llamacpp
def test_event_stream_shows_new_requests(dashboard_router):
    url = dashboard_router.base_url
    with (
        httpx.Client(timeout=10) as http,
        http.stream("GET", url + "/dashboard/events") as events,
        openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0) as sdk,
    ):
        assert events.headers["content-type"].startswith("text/event-stream")
        lines = events.iter_lines()
        (first,) = read_events(lines, 1)
        assert {node["name"] for node in first["nodes"]} == {"node-a", "node-b"}
        sdk.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2)
        seen = []
        deadline = time.monotonic() + 10
        while not seen and time.monotonic() < deadline:
            seen = read_events(lines, 1)[0]["requests"]
    (request,) = seen
    assert request["model"] == "tiny"
    assert request["node"] in {"node-a", "node-b"}
    assert request["runner_up"] == ({"node-a", "node-b"} - {request["node"]}).pop()
    assert request["policy"] == "round_robin"


@pytest.mark.llamacpp
def test_dashboard_stream_limit_and_shutdown(dashboard_router):
    url = dashboard_router.base_url
    with httpx.Client(timeout=10) as http, contextlib.ExitStack() as streams:
        readers = []  # an abandoned line iterator would close its stream
        for count in range(1, 17):
            stream = streams.enter_context(http.stream("GET", url + "/dashboard/events"))
            readers.append(stream.iter_lines())
            assert read_events(readers[-1], 1)[0]["open_dashboards"] == count
        rejected = http.get(url + "/dashboard/events")
        assert rejected.status_code == 503
        assert rejected.json()["error"]["code"] == "too_many_dashboards"
        assert "Retry-After" in rejected.headers

        assert dashboard_router.process is not None
        stopping = time.monotonic()
        dashboard_router.process.send_signal(signal.SIGTERM)
        dashboard_router.process.wait(timeout=10)
        # The graceful timeout is 10 s; open streams must not use it up.
        assert time.monotonic() - stopping < 5


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    if not CHROMIUM.is_file():
        pytest.fail(
            f"Chromium not found at {CHROMIUM}: install Debian's chromium package "
            "(scripts/setup.sh does) or set SOLLOL_CHROMIUM"
        )
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.mark.llamacpp
def test_dashboard_in_chromium_shows_nodes_and_requests(browser, dashboard_router, tmp_path):
    url = dashboard_router.base_url
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(url + "/dashboard")
    page.wait_for_selector("#conn.ok", timeout=10_000)
    page.wait_for_selector('#nodes tr[data-node="node-a"]', timeout=10_000)
    assert page.locator("#nodes tbody tr").count() == 2
    page.wait_for_function(
        "[...document.querySelectorAll('#nodes tbody tr td:nth-child(3)')]"
        ".every(td => td.textContent === 'up')",
        timeout=10_000,
    )

    with openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0) as sdk:
        for _ in range(3):
            sdk.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=3)
        list(
            sdk.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=3, stream=True)
        )

    page.wait_for_function(
        "document.querySelectorAll('#feed tbody tr').length >= 4", timeout=10_000
    )
    feed_nodes = page.locator("#feed tbody tr td:nth-child(4)").all_text_contents()
    assert set(feed_nodes) == {"node-a", "node-b"}  # round robin uses both
    assert page.locator("#total-requests").text_content() == "4"
    # The charts drew a line per model, and the stream's TTFT shows in its chart.
    # A single bucket draws a one-point path, which has no size, so wait for it attached.
    page.wait_for_selector(
        '#latency-chart path[data-series="tiny p95"]', state="attached", timeout=5_000
    )
    assert page.locator("#ttft-chart circle").count() >= 1
    assert page.locator('#percentiles tr[data-group="node:node-a"]').count() == 1

    page.select_option("#group", "by_node")
    assert page.locator("#latency-chart path").count() == 2

    screenshot = tmp_path / "dashboard.png"
    page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.stat().st_size > 10_000
    assert errors == []
    page.close()
