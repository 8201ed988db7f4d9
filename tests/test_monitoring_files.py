"""The Grafana dashboard and Prometheus alert rules in deploy/: they load, and use real metrics."""

import json
import re
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
GRAFANA_DASHBOARD = DEPLOY / "grafana" / "sollol-dashboard.json"
ALERT_RULES = DEPLOY / "prometheus" / "sollol-alerts.yml"
METRIC_NAME = re.compile(r"\bsollol_[a-z_]+")
DURATION = re.compile(r"^\d+[smhd]$")
# The series a metric family exposes, by its type (Prometheus text format).
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def grafana_expressions() -> list[str]:
    dashboard = json.loads(GRAFANA_DASHBOARD.read_text(encoding="utf-8"))
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def alert_rules() -> list[dict]:
    document = yaml.safe_load(ALERT_RULES.read_text(encoding="utf-8"))
    return [rule for group in document["groups"] for rule in group["rules"]]


def test_grafana_dashboard_is_well_formed():
    dashboard = json.loads(GRAFANA_DASHBOARD.read_text(encoding="utf-8"))
    assert dashboard["uid"] and dashboard["title"]
    variables = {variable["name"] for variable in dashboard["templating"]["list"]}
    assert "datasource" in variables
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)) >= 10
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert set(panel["gridPos"]) == {"x", "y", "w", "h"}
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)) >= 1, panel["title"]
        for target in panel["targets"]:
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]


def test_alert_rules_are_well_formed():
    rules = alert_rules()
    names = {rule["alert"] for rule in rules}
    for wanted in (
        "SollolNodeDown",
        "SollolBreakerOpen",
        "SollolHighErrorRate",
        "SollolLatencySLO",
        "SollolQueueGrowing",
    ):
        assert wanted in names
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"]
        assert DURATION.match(rule.get("for", "0s")), rule["alert"]
        assert rule["expr"].count("(") == rule["expr"].count(")"), rule["alert"]


@pytest.mark.llamacpp
def test_every_referenced_metric_is_served(router):
    messages = [{"role": "user", "content": "hi"}]
    with openai.OpenAI(base_url=router.base_url + "/v1", api_key="unused", max_retries=0) as sdk:
        list(
            sdk.chat.completions.create(model="tiny", messages=messages, max_tokens=2, stream=True)
        )
        with pytest.raises(openai.NotFoundError):
            sdk.chat.completions.create(model="no-such-model", messages=messages, max_tokens=2)

    text = httpx.get(router.base_url + "/metrics").text
    served = {
        family.name + suffix
        for family in text_string_to_metric_families(text)
        for suffix in SUFFIXES.get(family.type, ("",))
    }
    referenced = {
        name
        for expr in grafana_expressions() + [rule["expr"] for rule in alert_rules()]
        for name in METRIC_NAME.findall(expr)
    }
    assert referenced, "no sollol_ metric found in the files"
    assert referenced - served == set()
