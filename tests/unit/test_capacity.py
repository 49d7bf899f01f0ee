"""Live capacity (serving/capacity.py): quantiles from vLLM's latency histograms, the window that
keeps them recent, the saturation figure, and the series the gateway exports."""

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from lcserve.serving import capacity as c
from lcserve.serving import metrics as m
from tests.unit.test_metrics import ISSUE_15_CORE, Status, value, vllm_032_exposition

# vLLM 0.32's own inter-token latency buckets (vllm/v1/metrics/loggers.py, inter_token_latency_buckets)
ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0]


def exposition(observations: dict[str, list[float]]) -> str:
    """vLLM-shaped /metrics text: each engine core's ITL observations in a real prometheus-client
    Histogram with vLLM's buckets and labels, plus one core's gauges."""
    registry = CollectorRegistry()
    itl = Histogram(
        c.ITL,
        "Histogram of inter-token latency in seconds.",
        ["model_name", "engine"],
        buckets=ITL_BUCKETS,
        registry=registry,
    )
    for engine, values in observations.items():
        for v in values:
            itl.labels("gemma-3-270m", engine).observe(v)
    return generate_latest(registry).decode() + vllm_032_exposition([ISSUE_15_CORE])


def test_quantile_lies_in_the_bucket_of_the_true_quantile():
    """The oracle is numpy over the raw observations: a bucketed quantile can only promise the bucket."""
    rng = np.random.default_rng(0)
    raw = rng.lognormal(mean=np.log(0.08), sigma=0.6, size=2000)
    buckets = m.parse_engine_metrics(exposition({"0": raw.tolist()})).histograms[c.ITL]
    for q in (0.1, 0.5, 0.9, 0.99):
        truth = float(np.quantile(raw, q))
        got = c.histogram_quantile(q, buckets)
        bounds = [0.0, *ITL_BUCKETS]
        i = next(i for i, le in enumerate(ITL_BUCKETS) if truth <= le)
        assert bounds[i] <= got <= bounds[i + 1], (q, truth, got)


def test_quantile_interpolates_as_prometheus_documents():
    # 10 observations at or under 0.1 s, 10 more under 0.2 s: the median is the top of the first bucket,
    # the 0.75 quantile halfway through the second
    buckets = ((0.1, 10.0), (0.2, 20.0), (float("inf"), 20.0))
    assert c.histogram_quantile(0.5, buckets) == pytest.approx(0.1)
    assert c.histogram_quantile(0.75, buckets) == pytest.approx(0.15)
    assert c.histogram_quantile(0.99, ((0.1, 1.0), (float("inf"), 5.0))) == 0.1  # in +Inf: the last bound
    assert c.histogram_quantile(0.5, ((0.1, 0.0), (float("inf"), 0.0))) is None  # nothing observed


def test_engine_cores_are_summed():
    buckets = m.parse_engine_metrics(exposition({"0": [0.02] * 3, "1": [0.3] * 5})).histograms[c.ITL]
    assert buckets[-1] == (float("inf"), 8.0)
    assert dict(buckets)[0.025] == 3.0 and dict(buckets)[0.3] == 8.0


def test_delta_counts_since_the_last_reading_and_survives_a_restart():
    old = ((0.1, 10.0), (float("inf"), 12.0))
    new = ((0.1, 15.0), (float("inf"), 30.0))
    assert c.bucket_delta(new, old) == ((0.1, 5.0), (float("inf"), 18.0))
    restarted = ((0.1, 1.0), (float("inf"), 1.0))
    assert c.bucket_delta(restarted, new) == restarted  # counts went down: the engine restarted
    assert c.bucket_delta(new, None) == new


def test_window_forgets_what_is_older_than_a_minute():
    window = c.LatencyWindow(window_s=60)
    fast = m.parse_engine_metrics(exposition({"0": [0.02] * 100})).histograms
    window.add(0.0, fast)
    assert c.histogram_quantile(0.5, fast[c.ITL]) == window.quantile(c.ITL, 0.5) <= 0.025  # young: since start
    slow = m.parse_engine_metrics(exposition({"0": [0.02] * 100 + [0.4] * 50})).histograms
    window.add(30.0, slow)
    window.add(90.0, slow)  # nothing new in the last minute after t=30
    slow_later = m.parse_engine_metrics(exposition({"0": [0.02] * 100 + [0.4] * 80})).histograms
    window.add(100.0, slow_later)
    # the base is now the reading at t=30: only the 30 slow tokens since count
    assert 0.3 < window.quantile(c.ITL, 0.5) <= 0.4
    assert window.quantile(c.TTFT, 0.5) is None  # a histogram the engine did not publish


def test_saturation_counts_queued_requests_whatever_the_kv_usage():
    # long prompts flood a big KV cache: 2 running, 14 waiting, KV a third used
    terms = c.saturation_terms(kv_usage=0.32, running=2, waiting=14, observed_itl_s=None, predicted_itl_s=None)
    assert terms == {"kv_cache": 0.32, "queue": 7.0}
    assert max(terms.values()) > c.SATURATED
    idle = c.saturation_terms(kv_usage=0.01, running=0, waiting=0, observed_itl_s=None, predicted_itl_s=None)
    assert max(idle.values()) < c.SATURATED
    slow = c.saturation_terms(0.1, 4, 0, observed_itl_s=0.3, predicted_itl_s=0.1)
    assert slow["latency"] == pytest.approx(2.0)  # 3x the prediction is 2x the alert's 1.5x


def test_gateway_exports_predicted_observed_and_saturation():
    metrics = m.GatewayMetrics(Status())
    metrics.predictions = c.Predictions(
        ttft_s={(256, 1): 0.2, (32767, 1): 9.5, (256, 16): 1.8},
        itl_s={1: 0.068, 16: 0.11},
        output_tokens_per_s=140.0,
        prefill_tokens_per_s=2500.0,
        full_batch_itl_s=0.11,
        calibrated=False,
    )
    metrics.observe(m.parse_engine_metrics(exposition({"0": [0.3] * 40})))
    text = metrics.render()
    assert value(text, "lcserve_predicted_ttft_seconds", prompt_tokens="32767", users="1") == 9.5
    assert value(text, "lcserve_predicted_itl_seconds", running="16") == 0.11
    assert value(text, "lcserve_predicted_output_tokens_per_second") == 140.0
    assert b"from the profile spec sheet, uncalibrated" in text
    observed = value(text, "lcserve_observed_itl_seconds", quantile="0.5")
    assert 0.2 < observed <= 0.3
    # ISSUE_15_CORE: KV 0.97, 9 running, 3 waiting; ITL at least 0.2 s against 1.5 x 0.11 s
    assert value(text, "lcserve_saturation_term", term="kv_cache") == pytest.approx(0.97)
    assert value(text, "lcserve_saturation_term", term="queue") == pytest.approx(3 / 9)
    assert value(text, "lcserve_saturation_term", term="latency") == pytest.approx(observed / (1.5 * 0.11))
    assert value(text, "lcserve_saturation_ratio") == pytest.approx(observed / (1.5 * 0.11))


def test_no_predictions_and_no_engine_give_no_capacity_samples():
    metrics = m.GatewayMetrics(Status(up=False))
    metrics.observe(None)
    text = metrics.render()
    assert value(text, "lcserve_saturation_ratio") is None
    assert b"lcserve_predicted_ttft_seconds" not in text


def test_predictions_come_from_the_plan(tmp_path):
    """The README's example plan (Llama-3.1-8B writer, RTX 5090, 9 x 64k): what the gateway publishes is
    the plan's own speed figures, labelled uncalibrated, and the latency term uses its slowest decode."""
    from lcserve.deploy.hardware import resolve_profile
    from lcserve.deploy.plan import PlanRequest, plan_deployment
    from lcserve.model_config import read_model
    from tests.support.tiny_models import build_llama_3_1_8b

    model = read_model(build_llama_3_1_8b(tmp_path / "llama-3.1-8b-writer"))
    plan = plan_deployment(resolve_profile("rtx-5090"), model, request=PlanRequest(max_model_len=64000, max_num_seqs=9))
    speed = plan.speed
    got = c.predictions_from_plan(speed, plan.max_model_len)
    assert not got.calibrated
    assert got.ttft_s[(63999, 1)] == pytest.approx(speed["ttft_ms_max_model_len"] / 1e3)
    assert got.itl_s[1] == pytest.approx(speed["itl_ms_batch_1"] / 1e3)
    load = speed["load"]
    assert got.ttft_s[(load["prompt"], load["users"])] == pytest.approx(load["ttft_ms_p50"] / 1e3)
    slowest = max(speed["itl_ms_largest_batch"], load["itl_ms_p50"]) / 1e3
    assert got.full_batch_itl_s == pytest.approx(slowest) and got.full_batch_itl_s >= got.itl_s[1]
    assert c.predictions_from_plan(None, 64000) is None  # a profile without speed figures


def test_the_training_length_ttft_is_the_one_the_plan_predicted(embedded_model_dir, demo_adapter):
    """With an adapter, the plan predicts TTFT at its training length; the gauge carries that length."""
    from lcserve.deploy.inputs import read_plan_inputs
    from lcserve.deploy.plan import PlanRequest, plan_deployment

    profile, model, adapters = read_plan_inputs(embedded_model_dir, "cpu", [demo_adapter])
    plan = plan_deployment(profile, model, adapters, PlanRequest(max_model_len=4096, kv_cache_gib=1))
    got = c.predictions_from_plan(plan.speed, plan.max_model_len)
    trained = adapters[0].training_seq_len
    assert plan.speed["training_len"] == trained
    assert got.ttft_s[(trained, 1)] == pytest.approx(plan.speed["ttft_ms_training_len"] / 1e3)
