"""deploy/monitoring: the dashboard and the alert rules only query series the gateway exports.
(promtool checks the rules in tests/integration/test_serving_prometheus.py.)"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families

from lcserve.serving.adapter_metrics import LoadedAdapter
from lcserve.serving.capacity import SATURATED, Predictions
from lcserve.serving.metrics import GatewayMetrics, ModelLimits, parse_engine_metrics
from tests.unit.test_capacity import exposition
from tests.unit.test_metrics import VLLM_032_METRICS, Status

PREDICTIONS = Predictions(
    ttft_s={(256, 1): 0.2},
    itl_s={1: 0.07},
    output_tokens_per_s=100.0,
    prefill_tokens_per_s=2000.0,
    full_batch_itl_s=0.1,
    calibrated=False,
)

MONITORING = Path(__file__).resolve().parents[2] / "deploy" / "monitoring"
DASHBOARD = MONITORING / "grafana-dashboard.json"
ALERTS = MONITORING / "alerts.yml"

PROMQL_WORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
    "nan",
}


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions, keywords,
    label names (inside {} or by/without/on lists), durations or Grafana variables."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range selectors
    expr = re.sub(r"\$\w+", "", expr)
    names = set()
    for match in re.finditer(r"(?<![A-Za-z0-9_:.])[A-Za-z_:][A-Za-z0-9_:]*", expr):
        name = match.group(0)
        follows = expr[match.end() :].lstrip()[:1]
        if follows == "(" or name.lower() in PROMQL_WORDS:
            continue
        names.add(name)
    return names


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def exported_names(text: str) -> set[str]:
    return {s.name for family in text_string_to_metric_families(text) for s in family.samples}


def gateway_exposition() -> str:
    """What a gateway in front of vLLM 0.32 exports once it has served a request."""
    metrics = GatewayMetrics(Status())
    metrics.predictions = PREDICTIONS  # a gateway in front of a planned engine
    metrics.observe(parse_engine_metrics(VLLM_032_METRICS + exposition({"0": [0.05, 0.08]})))
    model = ModelLimits("writer", 256, 8192, adapter=LoadedAdapter("writer", "base", "mount", 8))
    metrics.set_models([model])
    metrics.record(model, prompt_tokens=300, context_tokens=320)
    metrics.errors.labels("engine_lost").inc()
    return metrics.render().decode()


def test_metric_name_extraction():
    expr = (
        'sum by (model) (rate(a_total{job="x"}[5m])) / sum by (model) (rate(b_count[$__rate_interval])) > 0.2 '
        "and on (instance) vllm:c_bucket offset 5m"
    )
    assert metric_names(expr) == {"a_total", "b_count", "vllm:c_bucket"}


def test_dashboard_queries_only_exported_metrics():
    exprs = dashboard_exprs()
    assert len(exprs) >= 15
    queried = set().union(*(metric_names(e) for e in exprs))
    missing = queried - exported_names(gateway_exposition())
    assert not missing, f"the dashboard queries series the gateway does not export: {sorted(missing)}"


def test_dashboard_covers_the_issue_panels():
    queried = set().union(*(metric_names(e) for e in dashboard_exprs()))
    for name in (
        "lcserve_kv_cache_usage_ratio",
        "lcserve_kv_cache_free_tokens",
        "lcserve_requests_running",
        "lcserve_requests_waiting",
        "lcserve_prompt_training_length_ratio_bucket",
        "lcserve_requests_beyond_training_length_total",
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:e2e_request_latency_seconds_bucket",
        "lcserve_engine_up",
        "lcserve_kv_cache_full_context_requests",
        "lcserve_preemptions_total",
    ):
        assert name in queried, name


def test_dashboard_shows_running_sequences_against_the_full_context_capacity():
    """Issue 15: max_num_seqs is a cap, not a promise. One panel puts the running sequences next
    to how many full-length requests the KV cache holds, so a user sees when they meet long prompts."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    together = [
        p["title"]
        for p in panels
        if {"lcserve_requests_running", "lcserve_kv_cache_full_context_requests"}
        <= set().union(*(metric_names(t["expr"]) for t in p.get("targets", [])))
    ]
    assert together, "no panel shows lcserve_requests_running with lcserve_kv_cache_full_context_requests"


def test_dashboard_panels_are_well_formed():
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"].strip("${}") in variables, panel["title"]
        assert panel["targets"], panel["title"]
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"])


def test_alert_rules_query_only_exported_metrics():
    rules = alert_rules()
    exported = exported_names(gateway_exposition())
    for rule in rules:
        missing = metric_names(rule["expr"]) - exported
        assert not missing, f"{rule['alert']} queries {sorted(missing)}, which the gateway does not export"


def test_alert_rules_cover_the_issue():
    rules = {r["alert"]: r for r in alert_rules()}
    kv = rules["LcserveKVCacheNearlyFull"]
    assert kv["expr"].replace(" ", "") == "lcserve_kv_cache_usage_ratio>0.9" and kv["for"] == "5m"
    assert "lcserve_preemptions_total" in rules["LcservePreemptionsRising"]["expr"]
    assert "lcserve_engine_up == 0" in rules["LcserveEngineDown"]["expr"]
    assert "lcserve_requests_beyond_training_length_total" in rules["LcserveBeyondTrainingLength"]["expr"]
    # issue 21: saturation that KV usage alone misses, and decoding slower than planned
    assert rules["LcserveSaturated"]["expr"].replace(" ", "") == f"lcserve_saturation_ratio>={SATURATED:g}"
    assert rules["LcserveLatencyAbovePlan"]["expr"].replace(" ", "") == 'lcserve_saturation_term{term="latency"}>1'
    assert rules["LcserveSaturated"]["for"] == rules["LcserveLatencyAbovePlan"]["for"] == "5m"
    for rule in rules.values():
        assert rule["annotations"]["summary"] and rule["labels"]["severity"] in ("warning", "critical")


def test_dashboard_shows_predicted_against_observed_latency():
    panels = json.loads(DASHBOARD.read_text())["panels"]
    for observed, predicted in (
        ("lcserve_observed_itl_seconds", "lcserve_predicted_itl_seconds"),
        ("lcserve_observed_ttft_seconds", "lcserve_predicted_ttft_seconds"),
    ):
        assert any(
            {observed, predicted} <= set().union(*(metric_names(t["expr"]) for t in p.get("targets", [])))
            for p in panels
        ), (observed, predicted)
    assert "lcserve_saturation_ratio" in set().union(*(metric_names(e) for e in dashboard_exprs()))


def test_dashboard_shows_adapters_loaded_and_their_traffic():
    """Issue 23: which adapters are loaded (vLLM shows only those with requests in flight), and the
    requests and tokens of each."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    queried = [set().union(*(metric_names(t["expr"]) for t in p.get("targets", []))) for p in panels]
    assert any(q == {"lcserve_lora_adapter_loaded"} for q in queried)
    traffic = {"lcserve_requests_total", "lcserve_prompt_tokens_total", "lcserve_generation_tokens_total"}
    assert any(traffic | {"lcserve_lora_adapter_loaded"} <= q for q in queried)
