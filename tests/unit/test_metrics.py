"""The exporter: vLLM's /metrics summary (current and older names), per-request series, probes, NVML."""

import sys
import types

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from lcserve.serving import metrics as m

# Recorded from vLLM 0.32.0 (CPU build) serving Gemma 3 270M: the families the gateway reads or
# the dashboard queries, histograms trimmed to a few buckets, gauge values edited to be non-zero.
VLLM_032_METRICS = """\
# HELP python_gc_objects_collected_total Objects collected during gc
# TYPE python_gc_objects_collected_total counter
python_gc_objects_collected_total{generation="0"} 15089.0
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="gemma-3-270m"} 3.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="gemma-3-270m"} 2.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="gemma-3-270m"} 0.25
# HELP vllm:num_preemptions_total Cumulative number of preemption from the engine.
# TYPE vllm:num_preemptions_total counter
vllm:num_preemptions_total{engine="0",model_name="gemma-3-270m"} 7.0
# HELP vllm:num_preemptions_created Cumulative number of preemption from the engine.
# TYPE vllm:num_preemptions_created gauge
vllm:num_preemptions_created{engine="0",model_name="gemma-3-270m"} 1.7953050993560345e+09
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.04",model_name="gemma-3-270m"} 5.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.1",model_name="gemma-3-270m"} 18.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="1.0",model_name="gemma-3-270m"} 30.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="gemma-3-270m"} 46.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="gemma-3-270m"} 46.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="gemma-3-270m"} 98.92849087715149
# HELP vllm:e2e_request_latency_seconds Histogram of e2e request latency in seconds.
# TYPE vllm:e2e_request_latency_seconds histogram
vllm:e2e_request_latency_seconds_bucket{engine="0",le="0.3",model_name="gemma-3-270m"} 4.0
vllm:e2e_request_latency_seconds_bucket{engine="0",le="1.0",model_name="gemma-3-270m"} 19.0
vllm:e2e_request_latency_seconds_bucket{engine="0",le="10.0",model_name="gemma-3-270m"} 39.0
vllm:e2e_request_latency_seconds_bucket{engine="0",le="+Inf",model_name="gemma-3-270m"} 45.0
vllm:e2e_request_latency_seconds_count{engine="0",model_name="gemma-3-270m"} 45.0
vllm:e2e_request_latency_seconds_sum{engine="0",model_name="gemma-3-270m"} 205.56430840492249
# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{_block_size_resolved="True",block_size="128",cache_dtype="auto",enable_prefix_caching="True",engine="0",gpu_memory_utilization="0.92",kv_cache_max_concurrency="15.12742382271468",kv_cache_memory_bytes="2147483648",kv_cache_size_tokens="495695",num_cpu_blocks="None",num_gpu_blocks="5461",sliding_window="None"} 1.0
"""

# The older names (vLLM before the v1 metrics rename): gpu_cache_usage_perc, a counter declared
# without `_total`, and a cache_config_info without kv_cache_size_tokens.
VLLM_OLD_METRICS = """\
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{model_name="m"} 0.5
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="m"} 1.0
# TYPE vllm:num_preemptions counter
vllm:num_preemptions_total{model_name="m"} 4.0
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="16",cache_dtype="auto",num_gpu_blocks="1000"} 1.0
"""


# vLLM 0.32's cache_config_info labels: every field of its CacheConfig as `str(value)`
# (vllm/config/cache.py metrics_info(); read from the installed class, defaults before the engine
# fills in its KV figures), plus `engine` (vllm/v1/metrics/loggers.py log_metrics_info).
CACHE_CONFIG_032 = {
    "_block_size_resolved": "True",
    "block_size": "16",
    "cache_dtype": "auto",
    "cache_hit_alignment_tokens": "None",
    "effective_attention_block_size": "None",
    "enable_mamba_shared_prefix_checkpoint": "False",
    "enable_prefix_caching": "True",
    "gpu_memory_utilization": "0.92",
    "hash_block_size": "None",
    "is_attention_free": "False",
    "kv_cache_dtype_skip_layers": "[]",
    "kv_cache_layout": "None",
    "kv_cache_max_concurrency": "None",
    "kv_cache_memory_bytes": "None",
    "kv_cache_size_tokens": "None",
    "kv_offloading_backend": "native",
    "kv_offloading_size": "None",
    "kv_sharing_fast_prefill": "False",
    "mamba_block_size": "None",
    "mamba_cache_dtype": "auto",
    "mamba_cache_mode": "none",
    "mamba_page_size_padded": "None",
    "mamba_ssm_cache_dtype": "auto",
    "num_cpu_blocks": "None",
    "num_gpu_blocks": "None",
    "num_gpu_blocks_override": "None",
    "prefix_cache_retention_interval": "0",
    "prefix_caching_hash_algo": "sha256",
    "prefix_match_unit": "None",
    "replayssm_buffer_len": "16",
    "skip_page_size_padded": "None",
    "sliding_window": "None",
    "swa_bounded_replay": "True",
    "use_kda_recoverssm": "False",
    "use_replayssm": "False",
    "user_specified_block_size": "False",
}

# Issue 15's case: Llama-3.1-8B at max_model_len 64000 and max_num_seqs 9 on an RTX 5090. The KV
# cache holds 102,624 tokens (6414 blocks of 16), 1.6 requests of 64000 tokens; 9 sequences run,
# long prompts arrived, and the engine preempted 12 times.
ISSUE_15_CORE = {
    "running": 9,
    "waiting": 3,
    "kv_usage": 0.97,
    "preemptions": 12,
    "cache_config": {
        "gpu_memory_utilization": "0.9",
        "num_gpu_blocks": "6414",
        "kv_cache_size_tokens": "102624",
        "kv_cache_max_concurrency": str(102624 / 64000),
        "effective_attention_block_size": "16",
    },
}


def vllm_032_exposition(cores: list[dict], model: str = "llama-3.1-8b-writer") -> str:
    """The /metrics text of vLLM 0.32 for the families the exporter reads, one child per engine
    core, built from vLLM's own definitions (vllm/v1/metrics/loggers.py PrometheusStatLogger:
    names, HELP, types, labels model_name and engine) and rendered by prometheus-client as vLLM's
    server renders them. A key missing from a core leaves its series out."""
    registry = CollectorRegistry()
    labels = ["model_name", "engine"]
    gauges = {
        "running": Gauge(
            "vllm:num_requests_running", "Number of requests in model execution batches.", labels, registry=registry
        ),
        "waiting": Gauge(
            "vllm:num_requests_waiting", "Number of requests waiting to be processed.", labels, registry=registry
        ),
        "kv_usage": Gauge(
            "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", labels, registry=registry
        ),
    }
    preemptions = Counter(
        "vllm:num_preemptions", "Cumulative number of preemption from the engine.", labels, registry=registry
    )
    info = Gauge(
        "vllm:cache_config_info",
        "Information of the LLMEngine CacheConfig",
        [*CACHE_CONFIG_032, "engine"],
        registry=registry,
    )
    for index, core in enumerate(cores):
        child = (model, str(index))
        for key, gauge in gauges.items():
            if key in core:
                gauge.labels(*child).set(core[key])
        if "preemptions" in core:
            preemptions.labels(*child).inc(core["preemptions"])
        if "cache_config" in core:
            info.labels(**{**CACHE_CONFIG_032, **core["cache_config"], "engine": str(index)}).set(1)
    return generate_latest(registry).decode()


class Status:
    def __init__(self, up=True, restarts=0):
        self.url, self.up, self.restarts = "http://127.0.0.1:1", up, restarts


def samples(text: bytes | str) -> dict[tuple[str, tuple], float]:
    text = text.decode() if isinstance(text, bytes) else text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(text, name, **labels):
    return samples(text).get((name, tuple(sorted(labels.items()))))


def test_parse_current_vllm_names():
    snap = m.parse_engine_metrics(VLLM_032_METRICS)
    assert snap.kv_usage == 0.25
    assert snap.kv_capacity_tokens == 495695
    assert snap.kv_free_tokens == pytest.approx(495695 * 0.75)
    assert (snap.running, snap.waiting, snap.preemptions) == (3.0, 2.0, 7.0)
    # the vllm:* families pass through verbatim; the engine's process/python series do not
    assert "vllm:time_to_first_token_seconds_bucket" in snap.passthrough
    assert "python_gc" not in snap.passthrough


def test_parse_older_vllm_names():
    snap = m.parse_engine_metrics(VLLM_OLD_METRICS)
    assert snap.kv_usage == 0.5
    assert snap.kv_capacity_tokens == 16 * 1000  # blocks x block size when the token figure is absent
    assert snap.preemptions == 4.0
    assert snap.waiting is None


def test_parse_sums_engine_cores_and_averages_usage():
    two = VLLM_OLD_METRICS.replace(
        'vllm:gpu_cache_usage_perc{model_name="m"} 0.5',
        'vllm:gpu_cache_usage_perc{engine="0"} 0.5\nvllm:gpu_cache_usage_perc{engine="1"} 0.1',
    )
    two = two.replace(
        'vllm:num_requests_running{model_name="m"} 1.0',
        'vllm:num_requests_running{engine="0"} 1.0\nvllm:num_requests_running{engine="1"} 2.0',
    )
    snap = m.parse_engine_metrics(two)
    assert snap.kv_usage == pytest.approx(0.3)
    assert snap.running == 3.0


def test_parse_without_engine_series():
    snap = m.parse_engine_metrics("# TYPE other gauge\nother 1\n")
    assert snap.kv_usage is None and snap.kv_free_tokens is None and snap.passthrough == ""


def test_parse_vllm_032_exposition_built_from_its_definitions():
    text = vllm_032_exposition([ISSUE_15_CORE])
    assert "vllm:num_preemptions_created" in text  # prometheus-client's extra series: not a preemption count
    snap = m.parse_engine_metrics(text)
    assert (snap.running, snap.waiting, snap.preemptions) == (9, 3, 12)
    assert snap.kv_capacity_tokens == 102624
    assert snap.kv_cache_max_concurrency == pytest.approx(1.6035)
    assert snap.kv_usage == pytest.approx(0.97)


def test_parse_sums_engine_cores_of_vllm_032():
    """Data parallel: each engine core has its own KV cache, so the capacities add up."""
    snap = m.parse_engine_metrics(vllm_032_exposition([ISSUE_15_CORE, {**ISSUE_15_CORE, "running": 4}]))
    assert snap.running == 13 and snap.preemptions == 24
    assert snap.kv_cache_max_concurrency == pytest.approx(2 * 1.6035)
    assert snap.kv_capacity_tokens == 2 * 102624


def test_running_preemptions_and_full_context_capacity_are_exported():
    metrics = m.GatewayMetrics(Status())
    metrics.snapshot = m.parse_engine_metrics(vllm_032_exposition([ISSUE_15_CORE]))
    text = metrics.render()
    assert value(text, "lcserve_requests_running") == 9
    assert value(text, "lcserve_preemptions_total") == 12
    assert value(text, "lcserve_kv_cache_full_context_requests") == pytest.approx(1.6035)
    assert b"# HELP lcserve_kv_cache_full_context_requests Requests of max_model_len tokens" in text


def test_missing_engine_series_give_no_sample():
    """A series the engine did not publish is absent, not 0: 0 running or 0 full-context requests
    would be a false statement on the dashboard."""
    no_kv_figures = {"kv_usage": 0.5, "cache_config": {"num_gpu_blocks": "None"}}  # KV labels still "None"
    snap = m.parse_engine_metrics(vllm_032_exposition([no_kv_figures]))
    assert (snap.running, snap.waiting, snap.preemptions) == (None, None, None)
    assert snap.kv_capacity_tokens is None and snap.kv_cache_max_concurrency is None
    metrics = m.GatewayMetrics(Status())
    metrics.set_models([m.ModelLimits("base", None, 64000)])
    metrics.snapshot = snap
    text = metrics.render()
    assert value(text, "lcserve_kv_cache_usage_ratio") == 0.5
    for name in (
        "lcserve_requests_running",
        "lcserve_requests_waiting",
        "lcserve_preemptions_total",
        "lcserve_kv_cache_full_context_requests",
        "lcserve_kv_cache_capacity_tokens",
    ):
        assert value(text, name) is None, name


def test_full_context_requests_on_older_vllm():
    """Without the kv_cache_max_concurrency label: the capacity over the served max_model_len."""
    snap = m.parse_engine_metrics(VLLM_OLD_METRICS)
    assert snap.kv_cache_max_concurrency is None
    assert m.full_context_requests(snap, 8000) == 2.0  # 16000 tokens / 8000
    assert m.full_context_requests(snap, None) is None
    metrics = m.GatewayMetrics(Status())
    metrics.snapshot = snap
    assert value(metrics.render(), "lcserve_kv_cache_full_context_requests") is None  # max_model_len not known yet
    metrics.set_models([m.ModelLimits("m", None, 8000)])
    assert value(metrics.render(), "lcserve_kv_cache_full_context_requests") == 2.0


def test_record_usage_reads_vllm_usage():
    metrics = m.GatewayMetrics(Status())
    writer = m.ModelLimits("writer", training_len=256, max_model_len=8192)
    metrics.record_usage(writer, {"prompt_tokens": 200, "completion_tokens": 100, "total_tokens": 300})
    metrics.record_usage(writer, {"prompt_tokens": 100})  # no total: the prompt is the context
    metrics.record_usage(writer, None)
    metrics.record_usage(writer, {"total_tokens": 5000})
    text = metrics.render()
    assert value(text, "lcserve_prompt_tokens_total", model="writer") == 300
    assert value(text, "lcserve_requests_beyond_training_length_total", model="writer") == 1
    assert value(text, "lcserve_longest_context_tokens", model="writer") == 300
    assert value(text, "lcserve_generation_tokens_total", model="writer") == 100  # vLLM's completion_tokens


def test_adapter_loaded_follows_the_served_models():
    from lcserve.serving.adapter_metrics import LoadedAdapter

    status = Status()
    metrics = m.GatewayMetrics(status)
    base = m.ModelLimits("base", None, 8192)
    writer = m.ModelLimits("writer", 256, 8192, adapter=LoadedAdapter("writer", "base", "mount", 8))
    metrics.set_models([base, writer])
    labels = {"adapter": "writer", "base": "base", "mode": "mount", "rank": "8"}
    loaded = {k: v for k, v in samples(metrics.render()).items() if k[0] == "lcserve_lora_adapter_loaded"}
    assert loaded == {("lcserve_lora_adapter_loaded", tuple(sorted(labels.items()))): 1.0}  # the base is no adapter
    metrics.set_models([base])  # unloaded
    assert not [k for k in samples(metrics.render()) if k[0] == "lcserve_lora_adapter_loaded"]


def test_record_against_training_length():
    metrics = m.GatewayMetrics(Status())
    writer = m.ModelLimits("writer", training_len=256, max_model_len=8192)
    metrics.set_models([writer, m.ModelLimits("base", training_len=None, max_model_len=8192)])
    metrics.record(writer, prompt_tokens=128, context_tokens=200)  # ratio 0.5, within
    metrics.record(writer, prompt_tokens=250, context_tokens=300)  # prompt within, context beyond
    metrics.record(writer, prompt_tokens=1024, context_tokens=1040)  # ratio 4
    text = metrics.render()
    assert value(text, "lcserve_prompt_tokens_total", model="writer") == 128 + 250 + 1024
    assert value(text, "lcserve_requests_beyond_training_length_total", model="writer") == 2
    assert value(text, "lcserve_requests_beyond_training_length_total", model="base") == 0
    assert value(text, "lcserve_prompt_training_length_ratio_bucket", model="writer", le="0.5") == 1
    assert value(text, "lcserve_prompt_training_length_ratio_bucket", model="writer", le="1.0") == 2
    assert value(text, "lcserve_prompt_training_length_ratio_bucket", model="writer", le="4.0") == 3
    assert value(text, "lcserve_longest_context_tokens", model="writer") == 1040
    assert value(text, "lcserve_model_training_length_tokens", model="writer") == 256
    assert value(text, "lcserve_model_training_length_tokens", model="base") is None
    assert value(text, "lcserve_model_max_model_len_tokens", model="base") == 8192


def test_longest_context_keeps_the_maximum():
    metrics = m.GatewayMetrics(Status())
    base = m.ModelLimits("base", None, 8192)
    for context in (500, 2000, 700):
        metrics.record(base, prompt_tokens=context, context_tokens=context)
    assert value(metrics.render(), "lcserve_longest_context_tokens", model="base") == 2000


def test_engine_series_follow_the_engine_state():
    status = Status(up=True, restarts=2)
    metrics = m.GatewayMetrics(status)
    metrics.snapshot = m.parse_engine_metrics(VLLM_032_METRICS)
    text = metrics.render()
    assert value(text, "lcserve_engine_up") == 1
    assert value(text, "lcserve_engine_restarts_total") == 2
    assert value(text, "lcserve_kv_cache_usage_ratio") == 0.25
    assert value(text, "lcserve_kv_cache_capacity_tokens") == 495695
    assert value(text, "lcserve_kv_cache_free_tokens") == pytest.approx(371771.25)
    assert value(text, "lcserve_requests_running") == 3
    assert value(text, "lcserve_requests_waiting") == 2
    assert value(text, "lcserve_preemptions_total") == 7
    assert value(text, "vllm:time_to_first_token_seconds_count", engine="0", model_name="gemma-3-270m") == 46

    status.up = False  # a stale snapshot must not be shown while the engine is down
    text = metrics.render()
    assert value(text, "lcserve_engine_up") == 0
    assert value(text, "lcserve_kv_cache_usage_ratio") is None
    assert b"vllm:" not in text


def test_probe_results_replace_per_model():
    m.set_probe_results(
        [
            (m.PROBE_ACCURACY, {"model": "writer", "task": "needle", "length": "1024"}, 0.5),
            (m.PROBE_ACCURACY, {"model": "base", "task": "needle", "length": "1024"}, 1.0),
            (m.PROBE_EFFECTIVE_LENGTH, {"model": "writer"}, 512),
        ]
    )
    m.set_probe_results([(m.PROBE_ACCURACY, {"model": "writer", "task": "passkey", "length": "256"}, 1.0)])
    text = m.GatewayMetrics(Status()).render()
    assert value(text, "lcserve_probe_accuracy", model="writer", task="passkey", length="256") == 1.0
    assert value(text, "lcserve_probe_accuracy", model="writer", task="needle", length="1024") is None
    assert value(text, "lcserve_probe_effective_length", model="writer") is None
    assert value(text, "lcserve_probe_accuracy", model="base", task="needle", length="1024") == 1.0


def test_the_fields_effective_lengths_are_published_beside_lcserves():
    m.set_probe_results(
        [
            (m.PROBE_EFFECTIVE_LENGTH, {"model": "field"}, 2048),
            ("lcserve_probe_effective_length_ruler", {"model": "field"}, 1024),
            ("lcserve_probe_effective_length_nolima", {"model": "field"}, 4096),
        ]
    )
    text = m.GatewayMetrics(Status()).render()
    assert value(text, "lcserve_probe_effective_length", model="field") == 2048
    assert value(text, "lcserve_probe_effective_length_ruler", model="field") == 1024
    assert value(text, "lcserve_probe_effective_length_nolima", model="field") == 4096


@pytest.mark.parametrize(
    "sample",
    [
        ("lcserve_probe_other", {"model": "x"}, 1.0),
        (m.PROBE_ACCURACY, {"model": "x"}, 1.0),
        (m.PROBE_EFFECTIVE_LENGTH, {"model": "x", "task": "needle"}, 1.0),
    ],
)
def test_probe_results_reject_unknown_series(sample):
    with pytest.raises(ValueError):
        m.set_probe_results([sample])


def test_gpu_memory_from_nvml(monkeypatch):
    """NVML stands in for a GPU this machine does not have: one device, 2 of 8 GiB used."""
    calls = []

    class NVMLError(Exception):
        pass

    fake = types.SimpleNamespace(
        NVMLError=NVMLError,
        nvmlInit=lambda: calls.append("init"),
        nvmlDeviceGetCount=lambda: 1,
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=2 << 30, total=8 << 30),
    )
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(m, "_NVML", m._Nvml())
    metrics = m.GatewayMetrics(Status())
    metrics.render()
    text = metrics.render()
    assert value(text, "lcserve_gpu_memory_used_bytes", gpu="0") == 2 << 30
    assert value(text, "lcserve_gpu_memory_total_bytes", gpu="0") == 8 << 30
    assert calls == ["init"]  # initialised once, not per scrape


def test_no_gpu_series_without_nvml(monkeypatch):
    def fail():
        raise RuntimeError("NVML Shared Library Not Found")

    monkeypatch.setitem(sys.modules, "pynvml", types.SimpleNamespace(nvmlInit=fail))
    monkeypatch.setattr(m, "_NVML", m._Nvml())
    text = m.GatewayMetrics(Status()).render()
    assert b"lcserve_gpu_memory" not in text
