"""The gateway's Prometheus exporter: every series is named `lcserve_*`.

Three sources meet here:
- the engine's own `/metrics` (KV-cache use and capacity, running and queued sequences,
  preemptions, the TTFT and inter-token latency histograms), read by the gateway at most once a
  second and summarised by `parse_engine_metrics`; its `vllm:*` families are also passed through
  unchanged, so that the gateway is the one scrape target (the engine port is internal);
- the plan's speed predictions, published beside the observed latency, and the saturation figure
  built from both (`serving/capacity.py`);
- what the gateway sees per request (prompt tokens against the model's training length);
- the supervisor (engine up, restarts), NVML (GPU memory) and the long-context probes.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families

from .adapter_metrics import LoadedAdapter, loaded_family
from .capacity import HISTOGRAMS, LatencyWindow, Predictions, capacity_families, histogram_buckets

# Prompt length / training length. Dense around 1 (the training length) and up to 128x, the
# span of a 256-token adapter on a 32k base.
RATIO_BUCKETS = (0.125, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0)

# vLLM families the summary reads. The KV usage gauge was `vllm:gpu_cache_usage_perc` before
# the v1 engine renamed it `vllm:kv_cache_usage_perc` (vllm/v1/metrics/loggers.py); both are read.
# The preemption counter is `vllm:num_preemptions` in 0.32 and was `vllm:num_preemptions_total`
# before; prometheus-client exposes both as the sample `vllm:num_preemptions_total`.
KV_USAGE_NAMES = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
_SUMMARY_FAMILIES = frozenset(
    {
        *KV_USAGE_NAMES,
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:num_preemptions",
        "vllm:num_preemptions_total",
        "vllm:cache_config_info",
        *(f"{h}{suffix}" for h in HISTOGRAMS for suffix in ("", "_bucket", "_count", "_sum", "_created")),
    }
)

PROBE_ACCURACY = "lcserve_probe_accuracy"
PROBE_EFFECTIVE_LENGTH = "lcserve_probe_effective_length"
# the field's definitions of the needle effective length (serving/probes/verdicts.py), beside lcserve's
PROBE_EFFECTIVE_LENGTH_BY = {
    "lcserve_probe_effective_length_ruler": "effective_length_ruler",
    "lcserve_probe_effective_length_nolima": "effective_length_nolima",
}
# style at length (serving/probes/style.py): the writer and the base on the same held-out prompts
PROBE_STYLE_MARKERS = "lcserve_probe_style_markers_per_answer"
PROBE_STYLE_SIGNED_OFF = "lcserve_probe_style_signed_off"
# the retrieval probe of an embedding model (serving/probes/retrieval.py), per long-input policy
PROBE_RETRIEVAL_RECALL = "lcserve_probe_retrieval_recall_at_1"
PROBE_RETRIEVAL_MRR = "lcserve_probe_retrieval_mrr"
PROBE_RETRIEVAL_EFFECTIVE_LENGTH = "lcserve_probe_retrieval_effective_length"
_PROBE_LABELS = {
    PROBE_ACCURACY: ("model", "task", "length"),
    PROBE_EFFECTIVE_LENGTH: ("model",),
    **{name: ("model",) for name in PROBE_EFFECTIVE_LENGTH_BY},
    PROBE_STYLE_MARKERS: ("model", "length"),
    PROBE_STYLE_SIGNED_OFF: ("model", "length"),
    PROBE_RETRIEVAL_RECALL: ("model", "policy", "length"),
    PROBE_RETRIEVAL_MRR: ("model", "policy", "length"),
    PROBE_RETRIEVAL_EFFECTIVE_LENGTH: ("model", "policy"),
}
_PROBE_HELP = {
    PROBE_ACCURACY: "Probe accuracy (0..1) by model, task and context length in tokens (length 0: the no-context control).",
    PROBE_EFFECTIVE_LENGTH: "Longest probed length at which the model's needle accuracy held the threshold (tokens).",
    "lcserve_probe_effective_length_ruler": "RULER's needle effective length: the longest probed length scoring "
    "above 85.6% (tokens; 0: none).",
    "lcserve_probe_effective_length_nolima": "NoLiMa's needle effective length: the longest probed length keeping "
    "85% of the model's best score at 1K tokens or fewer (tokens; 0: none).",
    PROBE_STYLE_MARKERS: "Style at length: the writer's style markers per answer after a neutral preamble, by model "
    "and context length in tokens (the base answers the same prompts).",
    PROBE_STYLE_SIGNED_OFF: "Style at length: share of answers (0..1) that end with the demo writer's sign-off, by model "
    "and context length in tokens.",
    PROBE_RETRIEVAL_RECALL: "Retrieval probe of an embedding model: recall@1 (0..1) by long-input policy and document "
    "length in tokens.",
    PROBE_RETRIEVAL_MRR: "Retrieval probe of an embedding model: mean reciprocal rank (0..1) by long-input policy and "
    "document length in tokens.",
    PROBE_RETRIEVAL_EFFECTIVE_LENGTH: "Retrieval probe: longest document length up to which recall@1 held the "
    "threshold, by long-input policy (tokens; 0: none).",
}


@dataclass(frozen=True)
class EngineSnapshot:
    """The engine's state at one scrape, summed (usage: averaged) over its engine cores."""

    kv_usage: float | None
    kv_capacity_tokens: int | None
    kv_cache_max_concurrency: float | None  # requests of max_model_len tokens the KV cache holds at once
    running: float | None
    waiting: float | None
    preemptions: float | None
    passthrough: str = field(repr=False, default="")  # the `vllm:*` families, verbatim
    histograms: dict = field(repr=False, default_factory=dict)  # TTFT and ITL: capacity.Buckets by name

    @property
    def kv_free_tokens(self) -> float | None:
        if self.kv_usage is None or self.kv_capacity_tokens is None:
            return None
        return self.kv_capacity_tokens * (1.0 - self.kv_usage)


def _family_of(line: str) -> str:
    if line.startswith("#"):
        parts = line.split(None, 3)
        return parts[2] if len(parts) > 2 else ""
    return line.split("{", 1)[0].split(" ", 1)[0]


def parse_engine_metrics(text: str) -> EngineSnapshot:
    """Summarise vLLM's `/metrics` text. Only the few families needed are parsed (the full text
    is ~60 kB of histograms), so this stays well under a millisecond."""
    lines = text.splitlines()
    wanted = "\n".join(line for line in lines if _family_of(line) in _SUMMARY_FAMILIES) + "\n"
    values: dict[str, list[float]] = {}
    capacity: list[int] = []
    concurrency: list[float] = []
    latency = []
    for family in text_string_to_metric_families(wanted):
        for sample in family.samples:
            if family.name in HISTOGRAMS:
                latency.append(sample)
            elif sample.name == "vllm:cache_config_info":
                tokens = _cache_tokens(sample.labels)
                if tokens is not None:
                    capacity.append(tokens)
                requests = _label_float(sample.labels, "kv_cache_max_concurrency")
                if requests is not None:
                    concurrency.append(requests)
            else:
                values.setdefault(sample.name, []).append(sample.value)
    usage = next((values[name] for name in KV_USAGE_NAMES if name in values), None)
    passthrough = "\n".join(line for line in lines if _family_of(line).startswith("vllm:"))
    return EngineSnapshot(
        kv_usage=sum(usage) / len(usage) if usage else None,
        kv_capacity_tokens=sum(capacity) if capacity else None,
        kv_cache_max_concurrency=sum(concurrency) if concurrency else None,
        running=_total(values, "vllm:num_requests_running"),
        waiting=_total(values, "vllm:num_requests_waiting"),
        preemptions=_total(values, "vllm:num_preemptions_total"),
        passthrough=passthrough + "\n" if passthrough else "",
        histograms=histogram_buckets(latency),
    )


def _cache_tokens(labels: dict[str, str]) -> int | None:
    """KV capacity in tokens from `vllm:cache_config_info`. `kv_cache_size_tokens` is the engine's
    own figure (right for hybrid sliding-window models); blocks x block size is the older fallback."""
    try:
        return int(labels["kv_cache_size_tokens"])
    except (KeyError, ValueError):
        pass
    try:
        return int(labels["num_gpu_blocks"]) * int(labels["block_size"])
    except (KeyError, ValueError):
        return None


def _label_float(labels: dict[str, str], name: str) -> float | None:
    """A number from an info gauge's label; vLLM writes `str(value)`, so an unset field reads "None"."""
    try:
        return float(labels[name])
    except (KeyError, ValueError):
        return None


def full_context_requests(snapshot: EngineSnapshot, max_model_len: int | None) -> float | None:
    """How many requests of max_model_len tokens the KV cache holds at once. vLLM's own figure
    (`kv_cache_max_concurrency` in `vllm:cache_config_info`, per engine core, summed) where it
    publishes one: it counts blocks per KV-cache group, right for hybrid sliding-window models.
    Before that label existed, the capacity in tokens / max_model_len, as vLLM computed it then."""
    if snapshot.kv_cache_max_concurrency is not None:
        return snapshot.kv_cache_max_concurrency
    if snapshot.kv_capacity_tokens is None or not max_model_len:
        return None
    return snapshot.kv_capacity_tokens / max_model_len


def _total(values: dict[str, list[float]], name: str) -> float | None:
    return sum(values[name]) if name in values else None


class EngineStatus(Protocol):
    """What the supervisor (or ExternalEngine) tells the gateway about the engine."""

    url: str
    up: bool
    restarts: int
    generation: int  # +1 each time an engine becomes ready: the served models may have changed


@dataclass(frozen=True)
class ModelLimits:
    """What the exporter needs to know about one served model."""

    name: str
    training_len: int | None
    max_model_len: int | None
    task: str = "generate"  # "embed" for a model vLLM's pooling runner serves (/v1/embeddings)
    policy: str = "reject"  # an embedding model's long-input policy (serving/embeddings.py)
    adapter: LoadedAdapter | None = None  # set when the model is a LoRA adapter (mounted, or merged at start)


class GatewayMetrics:
    """One gateway's series, in a registry of its own (several gateways may share a process)."""

    def __init__(self, engine: EngineStatus):
        self.engine = engine
        self.snapshot: EngineSnapshot | None = None
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.requests = Counter(
            "lcserve_requests", "Requests forwarded to the engine, by model.", ["model"], registry=r
        )
        self.prompt_tokens = Counter(
            "lcserve_prompt_tokens",
            "Prompt tokens of completed requests (vLLM's usage), by model.",
            ["model"],
            registry=r,
        )
        self.prompt_ratio = Histogram(
            "lcserve_prompt_training_length_ratio",
            "Prompt tokens / the model's training sequence length, per completed request.",
            ["model"],
            buckets=RATIO_BUCKETS,
            registry=r,
        )
        self.beyond = Counter(
            "lcserve_requests_beyond_training_length",
            "Completed requests whose context (prompt + generated tokens) exceeded the model's "
            "training sequence length.",
            ["model"],
            registry=r,
        )
        self.longest = Gauge(
            "lcserve_longest_context_tokens",
            "Longest context (prompt + generated tokens) of a completed request, by model.",
            ["model"],
            registry=r,
        )
        self.training_len = Gauge(
            "lcserve_model_training_length_tokens",
            "Training sequence length of the model (adapter metadata, or the base's max_position_embeddings).",
            ["model"],
            registry=r,
        )
        self.max_model_len = Gauge(
            "lcserve_model_max_model_len_tokens", "The engine's max_model_len for the model.", ["model"], registry=r
        )
        self.errors = Counter(
            "lcserve_gateway_errors",
            "Requests the gateway answered with an error of its own: context_overflow (400), bad_body (400), "
            "bad_input (400: an embeddings input, or a route the model does not serve), "
            "body_too_large (413), adapter_refused (runtime adapter load refused), engine_unavailable (503), "
            "engine_lost (the engine failed mid-request), engine_key_refused (502: the engine refused the gateway's "
            "upstream key), client_stalled (a stream client stopped reading).",
            ["reason"],
            registry=r,
        )
        self.embedding_inputs = Counter(
            "lcserve_embedding_inputs",
            "Inputs of /v1/embeddings requests, by model, the long-input policy applied and what it did: as_is, "
            "truncated (to the training length), chunked (windows of the training length, pooled), rejected (400).",
            ["model", "policy", "action"],
            registry=r,
        )
        self.generation_tokens = Counter(
            "lcserve_generation_tokens",
            "Generated tokens of completed requests (vLLM's usage), by model (an adapter is a model).",
            ["model"],
            registry=r,
        )
        self.adapters: list[LoadedAdapter] = []  # the served adapters, from the last served-model list
        for reason in ("context_overflow", "engine_unavailable", "engine_lost"):
            self.errors.labels(reason)
        self._longest: dict[str, int] = {}
        self.engine_max_model_len: int | None = None  # the same for every model of one engine
        self.predictions: Predictions | None = None  # the plan's, when the gateway fronts a planned engine
        self.latency = LatencyWindow()
        self._lock = threading.Lock()
        r.register(_LiveCollector(self))

    def set_models(self, models: list[ModelLimits]) -> None:
        """The served models' limits, and their per-model series at 0 before their first request."""
        self.adapters = [m.adapter for m in models if m.adapter is not None]
        self.engine_max_model_len = next(
            (m.max_model_len for m in models if m.max_model_len), self.engine_max_model_len
        )
        for m in models:
            if m.training_len is not None:
                self.training_len.labels(m.name).set(m.training_len)
            if m.max_model_len is not None:
                self.max_model_len.labels(m.name).set(m.max_model_len)
            self.requests.labels(m.name)
            self.beyond.labels(m.name)
            self.generation_tokens.labels(m.name)
            if m.task == "embed":
                self.embedding_inputs.labels(m.name, m.policy, "as_is")

    def record(self, model: ModelLimits, prompt_tokens: int, context_tokens: int) -> None:
        """Account one completed request (token counts from vLLM's `usage`)."""
        self.prompt_tokens.labels(model.name).inc(prompt_tokens)
        self.generation_tokens.labels(model.name).inc(max(0, context_tokens - prompt_tokens))
        if model.training_len:
            self.prompt_ratio.labels(model.name).observe(prompt_tokens / model.training_len)
            if context_tokens > model.training_len:
                self.beyond.labels(model.name).inc()
        with self._lock:
            if context_tokens > self._longest.get(model.name, 0):
                self._longest[model.name] = context_tokens
                self.longest.labels(model.name).set(context_tokens)

    def record_usage(self, model: ModelLimits, usage: dict | None) -> None:
        """Account one completed request from vLLM's `usage` object; nothing when it has none."""
        if isinstance(usage, dict) and isinstance(usage.get("prompt_tokens"), int):
            prompt = usage["prompt_tokens"]
            total = usage.get("total_tokens")
            self.record(model, prompt, total if isinstance(total, int) else prompt)

    def observe(self, snapshot: EngineSnapshot | None) -> None:
        """The engine's state at this scrape; its latency histograms join the window."""
        self.snapshot = snapshot
        if snapshot is not None and snapshot.histograms:
            self.latency.add(time.monotonic(), snapshot.histograms)

    def render(self) -> bytes:
        """The exposition text: the gateway's series, the probe gauges, then the engine's `vllm:*`."""
        snapshot = self.snapshot if self.engine.up else None
        engine_text = snapshot.passthrough.encode() if snapshot else b""
        return generate_latest(self.registry) + generate_latest(_PROBE_REGISTRY) + engine_text


class _LiveCollector:
    """Series read at scrape time: the engine summary, the supervisor's state, GPU memory."""

    def __init__(self, metrics: GatewayMetrics):
        self.metrics = metrics

    def collect(self):
        engine = self.metrics.engine
        yield GaugeMetricFamily(
            "lcserve_engine_up",
            "1 when the engine answers, 0 while it is down or restarting.",
            value=1.0 if engine.up else 0.0,
        )
        yield CounterMetricFamily(
            "lcserve_engine_restarts", "Times the supervisor restarted the engine after it died.", value=engine.restarts
        )
        snap = self.metrics.snapshot if engine.up else None
        if snap is not None:
            gauges = (
                ("lcserve_kv_cache_usage_ratio", "Fraction of the KV cache in use (0..1), from vLLM.", snap.kv_usage),
                (
                    "lcserve_kv_cache_capacity_tokens",
                    "KV-cache capacity in tokens (vLLM's cache_config_info).",
                    snap.kv_capacity_tokens,
                ),
                ("lcserve_kv_cache_free_tokens", "KV-cache tokens free: capacity x (1 - usage).", snap.kv_free_tokens),
                (
                    "lcserve_kv_cache_full_context_requests",
                    "Requests of max_model_len tokens the KV cache holds at once (vLLM's kv_cache_max_concurrency). "
                    "More running sequences than this fit only while they are shorter; past it, vLLM preempts.",
                    full_context_requests(snap, self.metrics.engine_max_model_len),
                ),
                (
                    "lcserve_requests_running",
                    "Sequences in the engine's running batch (vLLM's num_requests_running, at most max_num_seqs).",
                    snap.running,
                ),
                (
                    "lcserve_requests_waiting",
                    "Requests queued in the engine (vLLM's num_requests_waiting).",
                    snap.waiting,
                ),
            )
            for name, doc, value in gauges:
                if value is not None:
                    yield GaugeMetricFamily(name, doc, value=value)
            if snap.preemptions is not None:
                yield CounterMetricFamily(
                    "lcserve_preemptions",
                    "Sequences the engine preempted because the KV "
                    "cache ran out (vLLM's num_preemptions): each is recomputed later. "
                    "Resets when the engine restarts.",
                    value=snap.preemptions,
                )
        yield from capacity_families(self.metrics.predictions, self.metrics.latency, snap)
        if engine.up:
            yield loaded_family(self.metrics.adapters)
        gpus = _NVML.memory()
        if gpus:
            used = GaugeMetricFamily("lcserve_gpu_memory_used_bytes", "GPU memory in use (NVML).", labels=["gpu"])
            total = GaugeMetricFamily("lcserve_gpu_memory_total_bytes", "GPU memory in total (NVML).", labels=["gpu"])
            for index, used_bytes, total_bytes in gpus:
                used.add_metric([index], used_bytes)
                total.add_metric([index], total_bytes)
            yield used
            yield total


class _Nvml:
    """GPU memory through NVML, initialised on first use; on a machine without an NVIDIA GPU
    (or without nvidia-ml-py) it stays disabled and the GPU series are simply absent."""

    def __init__(self):
        self._module = None
        self._tried = False
        self._lock = threading.Lock()

    def memory(self) -> list[tuple[str, int, int]]:
        with self._lock:
            if not self._tried:
                self._tried = True
                try:
                    import pynvml

                    pynvml.nvmlInit()
                    self._module = pynvml
                except Exception:  # ImportError, or NVMLError_LibraryNotFound / DriverNotLoaded
                    self._module = None
            nvml = self._module
            if nvml is None:
                return []
            try:
                out = []
                for i in range(nvml.nvmlDeviceGetCount()):
                    info = nvml.nvmlDeviceGetMemoryInfo(nvml.nvmlDeviceGetHandleByIndex(i))
                    out.append((str(i), int(info.used), int(info.total)))
                return out
            except nvml.NVMLError:
                return []


_NVML = _Nvml()


class _ProbeCollector:
    """The latest long-context probe results, replaced per model by `set_probe_results`."""

    def __init__(self):
        self.samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self.lock = threading.Lock()

    def collect(self):
        families = {
            name: GaugeMetricFamily(name, _PROBE_HELP[name], labels=list(labels))
            for name, labels in _PROBE_LABELS.items()
        }
        with self.lock:
            for (name, labels), value in sorted(self.samples.items()):
                families[name].add_metric([v for _, v in labels], value)
        for family in families.values():
            if family.samples:
                yield family


_PROBE_REGISTRY = CollectorRegistry(auto_describe=False)
_PROBES = _ProbeCollector()
_PROBE_REGISTRY.register(_PROBES)


def set_probe_results(samples: list[tuple[str, dict[str, str], float]]) -> None:
    """Publish probe results (`serving.probes.gauges.gauge_samples`) on every gateway of this
    process. A model's previous results are replaced; other models' stay. ValueError on a
    name or label set that is not one of the probe gauges."""
    checked = {}
    for name, labels, value in samples:
        expected = _PROBE_LABELS.get(name)
        if expected is None:
            raise ValueError(f"{name!r} is not a probe gauge; use one of {', '.join(_PROBE_LABELS)}")
        if set(labels) != set(expected):
            raise ValueError(f"{name} takes labels {', '.join(expected)}, got {', '.join(sorted(labels)) or 'none'}")
        checked[(name, tuple((k, str(labels[k])) for k in expected))] = float(value)
    models = {dict(labels)["model"] for _, labels in checked}
    with _PROBES.lock:
        _PROBES.samples = {key: v for key, v in _PROBES.samples.items() if dict(key[1])["model"] not in models}
        _PROBES.samples.update(checked)
