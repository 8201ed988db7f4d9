"""Prometheus metrics at /metrics: what real traffic produces, and bounded labels."""

import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.llamacpp

MESSAGES = [{"role": "user", "content": "Count the nodes."}]


def scrape(router) -> dict[str, list]:
    """Return the samples of every metric family, by family name."""
    text = httpx.get(router.base_url + "/metrics").text
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def value(samples: list, name: str, **labels: str) -> float:
    return sum(
        sample.value
        for sample in samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


def test_traffic_shows_in_request_metrics(router):
    with openai.OpenAI(base_url=router.base_url + "/v1", api_key="unused", max_retries=0) as sdk:
        sdk.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4)
        list(
            sdk.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4, stream=True)
        )
    # A stream is counted when its relay closes, just after the client has
    # read its last byte, so the scrape may come first: poll briefly.
    deadline = time.monotonic() + 5
    while True:
        metrics = scrape(router)
        requests = metrics["sollol_requests"]
        ok = value(requests, "sollol_requests_total", route="/v1/chat/completions", outcome="ok")
        if ok >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert ok >= 2
    assert value(metrics["sollol_time_to_first_token_seconds"],
                 "sollol_time_to_first_token_seconds_count") >= 1  # fmt: skip
    assert value(metrics["sollol_tokens"], "sollol_tokens_total", kind="completion") >= 8
    assert value(metrics["sollol_decode_tokens_per_second"],
                 "sollol_decode_tokens_per_second_count") >= 2  # fmt: skip
    assert value(metrics["sollol_request_latency_seconds"],
                 "sollol_request_latency_seconds_count", model="tiny") >= 2  # fmt: skip


def test_node_state_is_reported_per_node(router):
    metrics = scrape(router)
    up = {sample.labels["node"]: sample.value for sample in metrics["sollol_node_up"]}
    assert up == {"node-a": 1.0, "node-b": 1.0}
    states = {
        (sample.labels["node"], sample.labels["state"]): sample.value
        for sample in metrics["sollol_node_breaker_state"]
    }
    assert states[("node-a", "closed")] == 1.0
    assert states[("node-a", "open")] == 0.0
    assert {sample.labels["node"] for sample in metrics["sollol_node_in_flight"]} == {
        "node-a",
        "node-b",
    }
    assert "sollol_history_buffered_rows" in metrics
    assert "sollol_history_dropped_rows" in metrics


def test_rejected_requests_keep_labels_bounded(router):
    for index in range(5):
        httpx.post(
            router.base_url + "/v1/chat/completions",
            json={"model": f"no-such-model-{index}", "messages": MESSAGES},
        )
        httpx.get(router.base_url + f"/v1/models/missing-{index}")
    text = httpx.get(router.base_url + "/metrics").text
    # Neither the unknown model names nor the raw paths become label values.
    assert "no-such-model" not in text
    assert "missing-" not in text
    metrics = scrape(router)
    rejected = metrics["sollol_rejected_requests"]
    assert value(rejected, "sollol_rejected_requests_total", route="/v1/chat/completions",
                 status="404") >= 5  # fmt: skip
