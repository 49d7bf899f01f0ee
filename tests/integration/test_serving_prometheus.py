"""A real Prometheus (Debian package, installed by the set-up when absent) against the gateway
in front of the real vLLM, and promtool on the alert rules."""

from __future__ import annotations

import asyncio
import subprocess

import httpx
import pytest

from lcserve.deploy.hardware import resolve_profile
from lcserve.deploy.plan import PlanRequest, plan_deployment
from lcserve.model_config import read_model
from lcserve.serving.capacity import predictions_from_plan
from lcserve.serving.stack import Stack
from tests.integration.load import running_stream
from tests.integration.prometheus_server import PrometheusServer, prometheus_tools
from tests.unit.test_monitoring import ALERTS, alert_rules, dashboard_exprs, metric_names

pytestmark = pytest.mark.integration

TRAINING_LEN = 256  # the demo adapter's training length, declared for the base in this test
LONG_PROMPT = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. " * 20

# promtool unit tests of the rules: each alert fires when it should and only then.
RULE_TESTS = """
rule_files: [{rules}]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'lcserve_kv_cache_usage_ratio{{instance="full"}}'
        values: '0.95x12'
      - series: 'lcserve_kv_cache_usage_ratio{{instance="busy"}}'
        values: '0.85x12'
      - series: 'lcserve_preemptions_total{{instance="full"}}'
        values: '0+4x12'
      - series: 'lcserve_preemptions_total{{instance="busy"}}'
        values: '7x12'
      - series: 'lcserve_engine_up{{instance="full"}}'
        values: '1 1 0 0 0 0 0 0 0 0 0 0'
      - series: 'lcserve_engine_up{{instance="busy"}}'
        values: '1 0 1 0 1 0 1 0 1 1 1 1'
      - series: 'lcserve_engine_restarts_total{{instance="busy"}}'
        values: '0 1 1 2 2 3 3 4 4 4 4 4'
      - series: 'lcserve_requests_beyond_training_length_total{{instance="full", model="writer"}}'
        values: '0+30x30'
      - series: 'lcserve_prompt_training_length_ratio_count{{instance="full", model="writer"}}'
        values: '0+60x30'
      - series: 'lcserve_requests_beyond_training_length_total{{instance="full", model="base"}}'
        values: '0+3x30'
      - series: 'lcserve_prompt_training_length_ratio_count{{instance="full", model="base"}}'
        values: '0+60x30'
      - series: 'lcserve_saturation_ratio{{instance="busy"}}'
        values: '0.3 0.5 1.4x10'
      - series: 'lcserve_saturation_ratio{{instance="full"}}'
        values: '0.9x12'
      - series: 'lcserve_saturation_term{{instance="busy", term="latency"}}'
        values: '0.9 1.2x11'
      - series: 'lcserve_saturation_term{{instance="full", term="latency"}}'
        values: '1.0x12'
    promql_expr_test:
      - expr: ALERTS{{alertname="LcserveKVCacheNearlyFull", alertstate="firing"}}
        eval_time: 4m
        exp_samples: []
      - expr: ALERTS{{alertname="LcserveKVCacheNearlyFull", alertstate="firing"}}
        eval_time: 6m
        exp_samples:
          - labels: 'ALERTS{{alertname="LcserveKVCacheNearlyFull", alertstate="firing", instance="full", severity="warning"}}'
            value: 1
      - expr: ALERTS{{alertname="LcservePreemptionsRising", alertstate="firing"}}
        eval_time: 8m
        exp_samples:
          - labels: 'ALERTS{{alertname="LcservePreemptionsRising", alertstate="firing", instance="full", severity="warning"}}'
            value: 1
      - expr: ALERTS{{alertname="LcserveEngineDown", alertstate="firing"}}
        eval_time: 5m
        exp_samples:
          - labels: 'ALERTS{{alertname="LcserveEngineDown", alertstate="firing", instance="full", severity="critical"}}'
            value: 1
      - expr: ALERTS{{alertname="LcserveEngineRestarting", alertstate="firing"}}
        eval_time: 8m
        exp_samples:
          - labels: 'ALERTS{{alertname="LcserveEngineRestarting", alertstate="firing", instance="busy", severity="warning"}}'
            value: 1
      - expr: ALERTS{{alertname="LcserveSaturated", alertstate="firing"}}
        eval_time: 6m
        exp_samples: []
      - expr: ALERTS{{alertname="LcserveSaturated", alertstate="firing"}}
        eval_time: 8m
        exp_samples:
          - labels: 'ALERTS{{alertname="LcserveSaturated", alertstate="firing", instance="busy", severity="warning"}}'
            value: 1
      - expr: ALERTS{{alertname="LcserveLatencyAbovePlan", alertstate="firing"}}
        eval_time: 5m
        exp_samples: []
      - expr: ALERTS{{alertname="LcserveLatencyAbovePlan", alertstate="firing"}}
        eval_time: 7m
        exp_samples:
          - labels: 'ALERTS{{alertname="LcserveLatencyAbovePlan", alertstate="firing", instance="busy", severity="warning", term="latency"}}'
            value: 1
      - expr: ALERTS{{alertname="LcserveBeyondTrainingLength", alertstate="firing"}}
        eval_time: 25m
        exp_samples:
          - labels: 'ALERTS{{alertname="LcserveBeyondTrainingLength", alertstate="firing", instance="full", model="writer", severity="warning"}}'
            value: 1
"""


def test_promtool_checks_the_rules():
    _, promtool = prometheus_tools()
    result = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


def test_alert_rules_fire_when_they_should(tmp_path):
    _, promtool = prometheus_tools()
    tests = tmp_path / "alerts_test.yml"
    tests.write_text(RULE_TESTS.format(rules=ALERTS))
    result = subprocess.run([promtool, "test", "rules", str(tests)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


async def _complete(client: httpx.AsyncClient, url: str, model: str, prompt: str) -> dict:
    r = await client.post(
        f"{url}/v1/completions",
        json={"model": model, "prompt": prompt, "max_tokens": 32, "temperature": 0, "ignore_eos": True},
    )
    assert r.status_code == 200, r.text
    return r.json()["usage"]


def test_prometheus_reads_kv_usage_and_beyond_training_length(engine, tmp_path):
    model = engine.base_model
    # the plan's speed for this engine's model and context, as `lcserve serve` hands it to the gateway
    plan = plan_deployment(
        resolve_profile("cpu"), read_model(engine.model_dir), request=PlanRequest(max_model_len=engine.max_model_len)
    )
    predictions = predictions_from_plan(plan.speed, plan.max_model_len)
    stack = Stack(
        upstream_url=engine.url, gateway_port=0, training_lengths={model: TRAINING_LEN}, predictions=predictions
    )
    stack.start()
    try:
        target = stack.url.removeprefix("http://")
        with PrometheusServer(tmp_path / "prometheus", [target], rule_files=[ALERTS]) as prom:
            up = prom.wait_for('up{job="lcserve"}', lambda r: r and r[0]["value"][1] == "1")
            assert up and up[0]["value"][1] == "1", prom.log_path.read_text()[-2000:]

            async def round_of_load() -> int:
                async with httpx.AsyncClient(timeout=300) as client:
                    usages = await asyncio.gather(
                        *[_complete(client, stack.url, model, p) for p in [LONG_PROMPT] * 4 + ["Say hello."] * 4]
                    )
                return sum(u["total_tokens"] > TRAINING_LEN for u in usages)

            beyond_sent = asyncio.run(round_of_load())
            assert beyond_sent >= 4

            # The KV cache is in use for as long as a read stream is open, whatever this machine's speed: hold
            # one (to the adapter, so the base's counters stay exact) until Prometheus has scraped it in use.
            with running_stream(stack.url, engine.adapter_model):
                kv = prom.wait_for("lcserve_kv_cache_usage_ratio > 0", bool, timeout_s=180)
            assert kv, "Prometheus never saw the KV cache in use"
            assert 0 < float(kv[0]["value"][1]) <= 1

            expr = f'lcserve_requests_beyond_training_length_total{{model="{model}"}}'
            beyond = prom.wait_for(expr, lambda r: r and float(r[0]["value"][1]) == beyond_sent)
            assert beyond and float(beyond[0]["value"][1]) == beyond_sent
            ratio = prom.query(f'lcserve_prompt_training_length_ratio_bucket{{model="{model}", le="1.0"}}')
            assert ratio and float(ratio[0]["value"][1]) > 0  # the short prompts are within the training length

            # every series the dashboard queries is there, as Prometheus stores it
            for name in sorted(set().union(*(metric_names(e) for e in dashboard_exprs()))):
                assert prom.query(f'count({{__name__="{name}"}})'), f"no series {name} in Prometheus"

            rules = httpx.get(f"{prom.url}/api/v1/rules", timeout=10).json()["data"]["groups"][0]["rules"]
            assert len(rules) == len(alert_rules()) and all(r["health"] == "ok" for r in rules)
    finally:
        stack.stop()
