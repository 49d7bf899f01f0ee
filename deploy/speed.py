"""How fast a plan serves: time per engine step from bytes and FLOPs, stepped through vLLM's scheduler.

One engine step runs every scheduled token through the model once. Its time is a roofline plus
fixed costs (per rank):

    step = overhead + max(bytes read / bandwidth, linear FLOPs / FLOP/s) + attention FLOPs / its FLOP/s
           + all-reduce bytes / interconnect
           + LoRA (seconds per rank-token x rank x adapter tokens + seconds per adapter in the step)

Bytes read: the weights (the embedding table only where it is also the LM head) and, per sequence,
the KV cache its tokens attend to, per layer: all of it on full-attention layers, the last `window`
tokens on sliding ones (the layout of `kv.py`). FLOPs: 2 per weight per token for the linear layers,
the LM head for each sampled sequence only; attention, 4 x heads x head_dim per (query, key) pair per
layer, runs at its own rate (the spec sheet's FLOP/s until a calibration measures it). Tensor parallelism: two ring all-reduces of the hidden state per layer.

`simulate` steps vLLM's V1 scheduler (v1/core/sched/scheduler.py): each step has a budget of
max_num_batched_tokens; the running requests, in arrival order, take what they need (one token
when decoding, the rest of their prompt when prefilling, capped by what is left); waiting requests
are admitted while budget and max_num_seqs allow, their prompt chunked. That is why inter-token
latency rises under load: other requests' prompt chunks share the decode steps.

Every step's time is a dot product of its features and the constants `Figures.theta()`, so the
calibration (calibrate.py) fits the constants by least squares on the same features.
Not modelled: preemption (the plan caps the users at what the KV cache holds), prefix-cache hits,
speculative decoding, MoE routing (every expert counts), pipeline bubbles (a token passes all
stages one after another). Pure: no I/O.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from lcserve.model_config import ModelInfo

from .hardware import Profile
from .kv import KVLayout

# Spec-sheet predictions need the fixed costs a spec sheet does not give: per-step scheduling and
# launch overhead, and a request's HTTP, tokenizing and queueing path. Estimates, labelled so.
UNCALIBRATED_OVERHEAD_S = {"gpu": (0.004, 0.020), "cpu": (0.010, 0.050)}  # (per step, per request)
THETA = (
    "step overhead s",
    "s/byte",
    "s/FLOP",
    "s/interconnect byte",
    "LoRA s/rank-token",
    "LoRA s/adapter",
    "request s",
    "s/attention FLOP",
)


@dataclass(frozen=True)
class Figures:
    """The constants of the step equation, from a calibration or from the spec sheet."""

    step_overhead_s: float
    request_overhead_s: float
    bandwidth: float  # bytes/s
    flops: float  # FLOP/s
    interconnect: float  # bytes/s per direction
    lora_s_per_rank_token: float
    lora_s_per_adapter: float
    source: str
    calibrated: bool
    basis: str = "calibrated"  # or "spec sheet", or "CPU estimates"
    attention_flops: float | None = None  # FLOP/s of the attention kernels (None: as `flops`; inf: free)
    overlap: bool = True  # GPU: memory traffic and compute overlap (the roofline's max); CPU: the same cores do both

    def theta(self) -> tuple[float, ...]:
        return (
            self.step_overhead_s,
            1 / self.bandwidth,
            1 / self.flops,
            1 / self.interconnect,
            self.lora_s_per_rank_token,
            self.lora_s_per_adapter,
            self.request_overhead_s,
            1 / (self.attention_flops or self.flops),
        )


@dataclass(frozen=True)
class ModelCost:
    """What one step costs one rank, from config.json numbers and the KV layout."""

    weight_bytes: int  # read every step
    linear_flops_per_token: int  # 2 x the linear layers' weights (without the LM head)
    lm_head_flops: int  # per sampled sequence
    attention_flops_per_pair: int  # per (query, key) pair per layer
    windows: tuple[tuple[int | None, int], ...]  # (sliding window or None for full, layers)
    kv_bytes_per_token_layer: int
    allreduce_bytes_per_token: float  # TP ring all-reduce traffic per token (0 without TP)
    lora_rank: int = 0  # max_lora_rank (vLLM pads every adapter to it); 0 without adapters
    lora_flops_per_rank_token: int = 0  # 2 x sum(in + out) of the wrapped modules


def model_cost(
    model: ModelInfo, layout: KVLayout, dtype_bytes: int, tp: int, lora_rank: int = 0, lora_in_out: int = 0
) -> ModelCost:
    """The per-rank costs of `model` at tensor parallel size `tp` (whole model: with pipeline
    parallelism a token still passes every layer, one stage after another)."""
    layer_linears = {k: v for k, v in model.linear_shapes.items() if ".layers." in k or ".h." in k}
    linear = sum(2 * out * inp for out, inp in layer_linears.values())
    head = model.vocab_size * model.hidden_size
    weights = model.weight_bytes if model.quantization else model.param_count * dtype_bytes
    if not model.tie_word_embeddings:  # the input embedding is looked up, not read whole
        weights -= head * dtype_bytes
    windows: dict[int | None, int] = {}
    for layer in model.layers:
        key = layer.window if layer.kind == "sliding" else None
        windows[key] = windows.get(key, 0) + 1
    heads = max(1, model.num_attention_heads // tp)
    ring = 2 * (tp - 1) / tp if tp > 1 else 0.0
    return ModelCost(
        weight_bytes=weights // tp,
        linear_flops_per_token=linear // tp,
        lm_head_flops=2 * head // tp,
        attention_flops_per_pair=4 * heads * model.head_dim,
        windows=tuple(windows.items()),
        kv_bytes_per_token_layer=layout.bytes_per_token_layer,
        allreduce_bytes_per_token=2 * len(model.layers) * model.hidden_size * dtype_bytes * ring,
        lora_rank=lora_rank,
        lora_flops_per_rank_token=2 * lora_in_out // tp,
    )


def figures_for(profile: Profile, cost: ModelCost, fp8: bool = False) -> Figures | None:
    """The profile's calibration, else its spec sheet (None when it lacks bandwidth or FLOP/s)."""
    interconnect = (profile.interconnect_gbs or profile.memory_bandwidth_gbs or 1.0) * 1e9
    c = profile.calibration
    if c is not None:
        return Figures(
            c.step_overhead_ms / 1e3,
            c.request_overhead_ms / 1e3,
            c.bandwidth_gbs * 1e9,
            c.tflops * 1e12,
            interconnect,
            c.lora_us_per_rank_token / 1e6,
            c.lora_ms_per_adapter_step / 1e3,
            f"calibrated on {c.model} ({c.build}{', LoRA ops ' + c.lora_ops if c.lora_ops else ''}) {c.fitted_at}",
            True,
            attention_flops=c.attention_tflops * 1e12 if c.attention_tflops else None,
            overlap=not profile.is_cpu,
        )
    tflops = profile.fp8_tflops if fp8 and profile.fp8_tflops else profile.bf16_tflops
    if not (profile.memory_bandwidth_gbs and tflops):
        return None
    step, request = UNCALIBRATED_OVERHEAD_S[profile.kind]
    flops = tflops * 1e12
    kind = "CPU estimates" if profile.is_cpu else "spec sheet"
    return Figures(
        step,
        request,
        profile.memory_bandwidth_gbs * 1e9,
        flops,
        interconnect,
        cost.lora_flops_per_rank_token / flops,
        0.0,
        f"uncalibrated: {kind} of {profile.name} ({profile.memory_bandwidth_gbs:g} GB/s, {tflops:g} TFLOP/s), "
        f"overheads estimated ({step * 1e3:g} ms/step, {request * 1e3:g} ms/request); "
        "`lcserve deploy calibrate` measures them",
        False,
        kind,
        overlap=not profile.is_cpu,
    )


def key_pairs(start: int, n: int, window: int | None) -> int:
    """(query, key) pairs of tokens start..start+n-1, each attending to min(position + 1, window) keys."""
    full = n * start + n * (n + 1) // 2
    if window is None:
        return full
    lo, hi = max(start, window), start + n
    if lo >= hi:
        return full
    a, b = lo + 1 - window, hi - window
    return full - (a + b) * (b - a + 1) // 2


@dataclass(frozen=True)
class Chunk:
    """One request's share of a step: `tokens` new tokens after `start` cached ones."""

    start: int
    tokens: int
    samples: bool  # the chunk ends the prompt (or decodes): a token comes out
    lora: bool = False


def step_features(
    cost: ModelCost, chunks: list[Chunk], theta: tuple[float, ...], overlap: bool = True
) -> tuple[float, ...]:
    """The step's features, in THETA's order: its time is their dot product with `theta`, the roofline
    choosing whichever of bytes and the linear layers' FLOPs takes longer. Attention runs in kernels
    of its own (paged attention), at a rate of its own, after the projections: its FLOPs add."""
    tokens = sum(c.tokens for c in chunks)
    sampled = sum(c.samples for c in chunks)
    kv_tokens = pairs = 0
    for c in chunks:
        for window, layers in cost.windows:
            kv_tokens += layers * (min(c.start, window) if window else c.start)
            pairs += layers * key_pairs(c.start, c.tokens, window)
    read = cost.weight_bytes + kv_tokens * cost.kv_bytes_per_token_layer
    flops = tokens * cost.linear_flops_per_token + sampled * cost.lm_head_flops
    memory_bound = read * theta[1] >= flops * theta[2]
    if not overlap:  # the sum instead of the max
        return (1.0, read, flops, *_rest(cost, chunks, tokens, pairs))
    return (1.0, read if memory_bound else 0.0, 0.0 if memory_bound else flops, *_rest(cost, chunks, tokens, pairs))


def _rest(cost: ModelCost, chunks: list[Chunk], tokens: int, pairs: int) -> tuple[float, ...]:
    """The features after bytes and linear FLOPs: all-reduce, LoRA, request (0 per step), attention."""
    lora_tokens = sum(c.tokens for c in chunks if c.lora)
    return (
        tokens * cost.allreduce_bytes_per_token,
        cost.lora_rank * lora_tokens,
        1.0 if lora_tokens else 0.0,
        0.0,
        pairs * cost.attention_flops_per_pair,
    )


def dot(features: tuple[float, ...], theta: tuple[float, ...]) -> float:
    return sum(f * t for f, t in zip(features, theta, strict=True))


@dataclass(frozen=True)
class Pattern:
    """Closed-loop load: `users` send a request each at once, and each sends its next as its last ends."""

    users: int
    prompt: int
    output: int
    rounds: int = 1
    lora: bool = False


@dataclass
class Trace:
    """One request's life in steps: arrival, the step of each output token."""

    arrival: int
    token_steps: list[int] = field(default_factory=list)


@dataclass
class Simulation:
    steps: list[tuple[float, ...]]  # each step's features
    ends: list[float]  # each step's end time
    traces: list[Trace]
    theta: tuple[float, ...]
    schedule: list[list[tuple[int, int]]] = field(default_factory=list)  # per step: (trace index, tokens)

    def ttfts(self) -> list[float]:
        start = [0.0, *self.ends]
        return [self.ends[t.token_steps[0]] - start[t.arrival] + self.theta[6] for t in self.traces]

    def itls(self) -> list[float]:
        return [self.ends[b] - self.ends[a] for t in self.traces for a, b in zip(t.token_steps, t.token_steps[1:])]

    def tpots(self) -> list[float]:
        """Each request's mean inter-token gap (vLLM's benchmarks call it TPOT)."""
        return [(self.ends[t.token_steps[-1]] - self.ends[t.token_steps[0]]) / (len(t.token_steps) - 1)
                for t in self.traces if len(t.token_steps) > 1]  # fmt: skip

    def output_tokens_per_s(self) -> float:
        return sum(len(t.token_steps) for t in self.traces) / self.ends[-1]

    def _summed(self, first: int, last: int) -> list[float]:
        """The features of steps first..last summed: their total time is this dot theta."""
        return [sum(s[i] for s in self.steps[first : last + 1]) for i in range(len(THETA))]

    def mean_ttft_features(self) -> list[float]:
        """Mean over requests of the features whose dot product with theta is the TTFT."""
        rows = [self._summed(t.arrival, t.token_steps[0]) for t in self.traces]
        mean = [sum(col) / len(rows) for col in zip(*rows, strict=True)]
        return [*mean[:6], 1.0, *mean[7:]]  # plus one request overhead

    def mean_itl_features(self) -> list[float]:
        """Mean over all inter-token gaps of their features."""
        rows = [self._summed(a + 1, b) for t in self.traces for a, b in zip(t.token_steps, t.token_steps[1:])]
        return [sum(col) / len(rows) for col in zip(*rows, strict=True)]


@dataclass
class _Request:
    trace: Trace
    prompt: int
    output: int
    user: int
    index: int  # in Simulation.traces
    computed: int = 0


def simulate(
    cost: ModelCost, figures: Figures, pattern: Pattern, max_num_seqs: int, max_num_batched_tokens: int
) -> Simulation:
    """Step vLLM's scheduler through `pattern`; deterministic. The KV cache is assumed to hold every
    admitted request (the plan caps the users at what fits)."""
    theta = figures.theta()
    sent = [1] * pattern.users
    waiting = [_Request(Trace(0), pattern.prompt, pattern.output, u, u) for u in range(pattern.users)]
    running: list[_Request] = []
    sim = Simulation([], [], [r.trace for r in waiting], theta)
    while waiting or running:
        budget, scheduled = max_num_batched_tokens, []
        for r in running:
            n = min(r.prompt + len(r.trace.token_steps) - r.computed, budget)
            if n > 0:
                scheduled.append((r, n))
                budget -= n
        while waiting and budget > 0 and len(running) < max_num_seqs:
            r = waiting.pop(0)
            running.append(r)
            n = min(r.prompt, budget)
            scheduled.append((r, n))
            budget -= n
        chunks = [Chunk(r.computed, n, r.computed + n >= r.prompt, pattern.lora) for r, n in scheduled]
        sim.schedule.append([(r.index, n) for r, n in scheduled])
        features = step_features(cost, chunks, theta, figures.overlap)
        sim.steps.append(features)
        sim.ends.append((sim.ends[-1] if sim.ends else 0.0) + dot(features, theta))
        step = len(sim.steps) - 1
        for r, n in scheduled:
            r.computed += n
            if r.computed >= r.prompt:
                r.trace.token_steps.append(step)
            if len(r.trace.token_steps) == r.output:
                running.remove(r)
                if sent[r.user] < pattern.rounds:  # the user's next request arrives as this one ends
                    sent[r.user] += 1
                    nxt = _Request(Trace(step + 1), r.prompt, r.output, r.user, len(sim.traces))
                    sim.traces.append(nxt.trace)
                    waiting.append(nxt)
    return sim


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by linear interpolation, as numpy's default does."""
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    return s[lo] + (s[min(lo + 1, len(s) - 1)] - s[lo]) * (pos - lo)


def median(values: list[float]) -> float:
    return statistics.median(values)


def load_summary(sim: Simulation) -> dict:
    ttft, itl = sim.ttfts(), sim.itls() or [0.0]
    return {
        "ttft_ms_p50": round(median(ttft) * 1e3, 1),
        "ttft_ms_p90": round(percentile(ttft, 0.9) * 1e3, 1),
        "itl_ms_p50": round(median(itl) * 1e3, 2),
        "itl_ms_p90": round(percentile(itl, 0.9) * 1e3, 2),
        "tpot_ms_p50": round(median(sim.tpots() or [0.0]) * 1e3, 2),
        "ttft_ms_mean": round(statistics.fmean(ttft) * 1e3, 1),
        "itl_ms_mean": round(statistics.fmean(itl) * 1e3, 2),
        "output_tokens_per_s": round(sim.output_tokens_per_s(), 1),
    }


def model_identity(model: ModelInfo) -> str:
    """What a calibration must match to transfer as it is."""
    return f"{model.architecture}, {model.param_count:,} parameters, {len(model.layers)} layers"
