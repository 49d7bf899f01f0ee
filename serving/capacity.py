"""Live capacity: latency observed in vLLM's own histograms, the plan's predictions beside it, and one
saturation figure that also moves when the KV cache does not.

KV usage alone is a weak saturation signal: a prefill-heavy load queues requests while the cache is
far from full (one such saturated load ran at about 0.32 KV usage). So the saturation figure is the
largest of three terms, each 1.0 where the engine stops keeping up on that count:

- `kv_cache`: vLLM's KV usage (1.0: full; vLLM preempts past it);
- `queue`: requests waiting per request running (1.0: as many queued as served);
- `latency`: observed median inter-token latency over 1.5 x the plan's prediction for its full batch
  (1.0: decoding is half again slower than planned), when the plan predicts one.

Pure functions and one small stateful window; the gateway feeds them at scrape time.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from prometheus_client.core import GaugeMetricFamily

from lcserve.vllm_rules import ITL_HISTOGRAM, TTFT_HISTOGRAM

TTFT, ITL = TTFT_HISTOGRAM, ITL_HISTOGRAM
HISTOGRAMS = (TTFT, ITL)
QUANTILES = (0.5, 0.9)
WINDOW_S = 60.0  # observed quantiles describe about the last minute, not the engine's whole life
LATENCY_SLACK = 1.5  # observed ITL this many times the prediction counts as saturated (and alerts)
SATURATED = 1.0  # the alert threshold of the saturation figure

Buckets = tuple[tuple[float, float], ...]  # (upper bound `le`, cumulative count), ascending, +Inf last


def histogram_buckets(samples) -> dict[str, Buckets]:
    """Cumulative buckets of each latency histogram, summed over label sets (engine cores, models),
    from prometheus_client samples (`NAME_bucket` with an `le` label)."""
    sums: dict[str, dict[float, float]] = {}
    for s in samples:
        name = s.name.removesuffix("_bucket")
        if s.name.endswith("_bucket") and name in HISTOGRAMS and "le" in s.labels:
            per_le = sums.setdefault(name, {})
            le = float(s.labels["le"])
            per_le[le] = per_le.get(le, 0.0) + s.value
    return {name: tuple(sorted(per_le.items())) for name, per_le in sums.items()}


def bucket_delta(new: Buckets, old: Buckets | None) -> Buckets:
    """Counts observed between two readings of one histogram. A reading whose counts went down (the
    engine restarted) or whose bounds changed is not comparable: then the new one counts whole."""
    if not old or [le for le, _ in old] != [le for le, _ in new]:
        return new
    delta = tuple((le, n - o) for (le, n), (_, o) in zip(new, old))
    return new if any(count < 0 for _, count in delta) else delta


def histogram_quantile(q: float, buckets: Buckets) -> float | None:
    """The q-quantile of cumulative buckets, interpolated linearly within a bucket as Prometheus'
    `histogram_quantile` does; None when nothing was observed. In the +Inf bucket: the last finite bound."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower_le, lower_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if math.isinf(le):
                return lower_le
            if count == lower_count:
                return le
            return lower_le + (le - lower_le) * (rank - lower_count) / (count - lower_count)
        lower_le, lower_count = le, count
    return lower_le


@dataclass(frozen=True)
class Predictions:
    """The plan's speed predictions that the exporter publishes beside what it observes."""

    ttft_s: dict[tuple[int, int], float]  # (prompt tokens, users at once) -> predicted median TTFT
    itl_s: dict[int, float]  # sequences running -> predicted inter-token latency
    output_tokens_per_s: float | None  # under the planned load
    prefill_tokens_per_s: float | None
    full_batch_itl_s: float | None  # the ITL the latency term of saturation compares against
    calibrated: bool


def predictions_from_plan(speed: dict | None, max_model_len: int) -> Predictions | None:
    """The exporter's view of a plan's `speed` (deploy/speed_plan.py `predict`); None without one.
    The latency term compares with the slowest decode the plan expects: its largest batch alone, or
    its planned load, where prompt chunks share the decode steps."""
    if not speed or "itl_ms_batch_1" not in speed:
        return None
    load = speed.get("load") or {}
    ttft = {(max_model_len - 1, 1): speed["ttft_ms_max_model_len"] / 1e3}
    if "ttft_ms_training_len" in speed:
        ttft[(speed["training_len"], 1)] = speed["ttft_ms_training_len"] / 1e3
    itl = {1: speed["itl_ms_batch_1"] / 1e3, speed["largest_batch"]: speed["itl_ms_largest_batch"] / 1e3}
    if load:
        ttft[(load["prompt"], load["users"])] = load["ttft_ms_p50"] / 1e3
        itl[load["users"]] = max(itl.get(load["users"], 0.0), load["itl_ms_p50"] / 1e3)
    return Predictions(
        ttft_s=ttft,
        itl_s=itl,
        output_tokens_per_s=load.get("output_tokens_per_s"),
        prefill_tokens_per_s=speed.get("prefill_tokens_per_s"),
        full_batch_itl_s=max(itl.values()),
        calibrated=bool(speed.get("calibrated")),
    )


class LatencyWindow:
    """Readings of the latency histograms over about WINDOW_S: quantiles over the counts observed
    since the oldest reading in the window (since the engine started, while it is younger)."""

    def __init__(self, window_s: float = WINDOW_S):
        self.window_s = window_s
        self._readings: deque[tuple[float, dict[str, Buckets]]] = deque()

    def add(self, now: float, histograms: dict[str, Buckets]) -> None:
        self._readings.append((now, histograms))
        # keep one reading at least window_s old as the base; drop the ones before it
        while len(self._readings) > 2 and now - self._readings[1][0] >= self.window_s:
            self._readings.popleft()

    def quantile(self, name: str, q: float) -> float | None:
        if not self._readings:
            return None
        latest = self._readings[-1][1].get(name)
        if latest is None:
            return None
        base = self._readings[0][1].get(name) if len(self._readings) > 1 else None
        return histogram_quantile(q, bucket_delta(latest, base))


def saturation_terms(
    kv_usage: float | None,
    running: float | None,
    waiting: float | None,
    observed_itl_s: float | None,
    predicted_itl_s: float | None,
) -> dict[str, float]:
    """Each known term of the saturation figure (see the module docstring); the figure is their max."""
    terms: dict[str, float] = {}
    if kv_usage is not None:
        terms["kv_cache"] = kv_usage
    if waiting is not None:
        terms["queue"] = waiting / max(running or 0.0, 1.0)
    if observed_itl_s is not None and predicted_itl_s:
        terms["latency"] = observed_itl_s / (LATENCY_SLACK * predicted_itl_s)
    return terms


def capacity_families(predicted: Predictions | None, latency: LatencyWindow, snap):
    """The exporter's capacity series at one scrape: predicted against observed latency, and the
    saturation figure with its terms (`snap`: the engine's EngineSnapshot, None while it is down)."""
    if predicted is not None:
        ttft = GaugeMetricFamily(
            "lcserve_predicted_ttft_seconds",
            "The plan's median time to first token for prompts of this many tokens, this many users at once "
            f"({'calibrated' if predicted.calibrated else 'from the profile spec sheet, uncalibrated'}).",
            labels=["prompt_tokens", "users"],
        )
        for (tokens, users), seconds in sorted(predicted.ttft_s.items()):
            ttft.add_metric([str(tokens), str(users)], seconds)
        itl = GaugeMetricFamily(
            "lcserve_predicted_itl_seconds",
            "The plan's inter-token latency with this many sequences running.",
            labels=["running"],
        )
        for running, seconds in sorted(predicted.itl_s.items()):
            itl.add_metric([str(running)], seconds)
        yield ttft
        yield itl
        for name, doc, value in (
            (
                "lcserve_predicted_output_tokens_per_second",
                "The plan's output tokens/s under its planned load.",
                predicted.output_tokens_per_s,
            ),
            (
                "lcserve_predicted_prefill_tokens_per_second",
                "The plan's prompt tokens/s in prefill.",
                predicted.prefill_tokens_per_s,
            ),
        ):
            if value is not None:
                yield GaugeMetricFamily(name, doc, value=value)
    if snap is None:
        return  # no observed figures while the engine is down: the window may be stale
    observed_itl = None
    for name, histogram, what in (
        ("lcserve_observed_ttft_seconds", TTFT, "time to first token"),
        ("lcserve_observed_itl_seconds", ITL, "inter-token latency"),
    ):
        family = GaugeMetricFamily(
            name,
            f"Quantiles of the engine's {what} over about the last minute (vLLM's "
            f"{histogram.removeprefix('vllm:')} histogram).",
            labels=["quantile"],
        )
        for q in QUANTILES:
            value = latency.quantile(histogram, q)
            if value is not None:
                family.add_metric([str(q)], value)
                observed_itl = value if (histogram, q) == (ITL, 0.5) else observed_itl
        yield family
    terms = saturation_terms(
        snap.kv_usage, snap.running, snap.waiting, observed_itl, predicted.full_batch_itl_s if predicted else None
    )
    if terms:
        yield GaugeMetricFamily(
            "lcserve_saturation_ratio",
            f"The engine's saturation, the largest of its terms (lcserve_saturation_term); {SATURATED:g} and more: "
            "it is not keeping up (KV cache full, as many requests queued as running, or decoding 1.5x slower "
            "than planned).",
            value=max(terms.values()),
        )
        family = GaugeMetricFamily(
            "lcserve_saturation_term", "Each term of lcserve_saturation_ratio, 1.0 at its limit.", labels=["term"]
        )
        for term, value in sorted(terms.items()):
            family.add_metric([term], value)
        yield family
