"""A plan's speed: the predictions of deploy/speed.py for the plan's own settings, as reasons, and
the max_num_seqs (and replicas) that meet latency targets.

`plan_deployment` hands its plan here last (`with_predictions`). Uncalibrated profiles say their
figures come from the spec sheet; a calibration fitted on another model is used with a warning.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from lcserve.adapters.reader import LoraAdapter
from lcserve.errors import PlanError
from lcserve.model_facts import DTYPE_BYTES, cdiv, dtype_code

from .plan_types import PlanRequest, Reason, ServePlan
from .speed import (
    THETA,
    Chunk,
    Figures,
    ModelCost,
    Pattern,
    Simulation,
    dot,
    figures_for,
    load_summary,
    model_cost,
    model_identity,
    simulate,
    step_features,
)

# --- predictions for a plan -----------------------------------------------------------------------


@dataclass(frozen=True)
class SpeedRequest:
    """What the predictions are for: the plan's settings and the stated load."""

    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    training_len: int | None
    pattern: Pattern  # the arrival pattern the load prediction is for
    batch: int  # the largest batch that fits the KV cache at the pattern's prompt + output length


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.0f} ms" if seconds >= 0.01 else f"{seconds * 1e3:.2f} ms"


def _steps_text(cost: ModelCost, figures: Figures, sim: Simulation, chunks_note: str) -> str:
    """The equation behind a run of steps, with its summed inputs."""
    theta = figures.theta()
    t = [sum(s[i] for s in sim.steps) for i in range(len(THETA))]
    parts = [f"{len(sim.steps)} step(s) x overhead {_ms(theta[0])}"]
    if t[1]:
        parts.append(f"{t[1]:,.0f} B read / {figures.bandwidth / 1e9:g} GB/s")
    if t[2]:
        parts.append(f"{t[2]:.3g} linear FLOP / {figures.flops / 1e12:g} TFLOP/s")
    parts.append(f"{t[7]:.3g} attention FLOP / {_tflops(theta[7])}")
    if t[3]:
        parts.append(f"{t[3]:,.0f} B all-reduce / {figures.interconnect / 1e9:g} GB/s")
    if t[4] or t[5]:
        parts.append(
            f"LoRA {t[4]:,.0f} rank-tokens x {theta[4] * 1e6:.3g} us + {t[5]:.0f} adapter-step(s) x {_ms(theta[5])}"
        )
    rule = "the larger of bytes and linear FLOPs" if figures.overlap else "bytes and linear FLOPs summed (CPU)"
    return f"{chunks_note}: " + " + ".join(parts) + f" (each step: {rule}, over their rates)"


def _tflops(seconds_per_flop: float) -> str:
    return f"{1 / seconds_per_flop / 1e12:.3g} TFLOP/s" if seconds_per_flop else "(free: the fit found no cost)"


def _decode_step(cost: ModelCost, figures: Figures, batch: int, context: int, lora: bool) -> tuple[float, str]:
    theta = figures.theta()
    chunks = [Chunk(context, 1, True, lora)] * batch
    f = step_features(cost, chunks, theta, figures.overlap)
    kv = sum(layers * (min(context, w) if w else context) for w, layers in cost.windows) * cost.kv_bytes_per_token_layer
    flops = batch * (cost.linear_flops_per_token + cost.lm_head_flops)
    bound = ("memory-bound" if f[1] else "compute-bound") if figures.overlap else "the CPU's cores do both: summed"
    read = f"({cost.weight_bytes:,} B weights + {batch} x {kv:,} B KV at {context:,} tokens) / {figures.bandwidth / 1e9:g} GB/s"
    compute = f"{flops:.3g} FLOP (linear + LM head) / {figures.flops / 1e12:g} TFLOP/s"
    both = f"max({read}, {compute})" if figures.overlap else f"{read} + {compute}"
    text = f"overhead {_ms(theta[0])} + {both} ({bound}) + {f[7]:.3g} attention FLOP / {_tflops(theta[7])}"
    if f[3]:
        text += f" + {f[3]:,.0f} B all-reduce / {figures.interconnect / 1e9:g} GB/s"
    if f[4]:
        text += f" + LoRA {f[4]:,.0f} rank-tokens x {theta[4] * 1e6:.3g} us + {_ms(theta[5])}"
    return dot(f, theta), text


def predict(cost: ModelCost, figures: Figures, req: SpeedRequest, reason) -> tuple[list, dict]:
    """The plan's speed predictions as reasons (`reason(setting, value, why)`) and as JSON."""
    lora, p = req.pattern.lora, req.pattern
    budget = req.max_num_batched_tokens
    label = "calibrated" if figures.calibrated else "uncalibrated"
    out = [reason("speed figures", label, figures.source)]
    doc: dict = {"calibrated": figures.calibrated, "basis": figures.basis, "source": figures.source, "lora": lora}

    def ttft(length: int, name: str, key: str) -> None:
        sim = simulate(cost, figures, Pattern(1, length, 1, lora=lora), 1, budget)
        note = f"{length:,}-token prompt in chunks of <= {budget:,} tokens"
        text = _steps_text(cost, figures, sim, note) + f" + request overhead {_ms(figures.request_overhead_s)}"
        out.append(reason(name, f"{_ms(sim.ttfts()[0])} ({label})", text))
        doc[key] = round(sim.ttfts()[0] * 1e3, 1)

    if req.training_len:
        doc["training_len"] = min(req.training_len, req.max_model_len)
        ttft(doc["training_len"], "TTFT at the training length", "ttft_ms_training_len")
    ttft(req.max_model_len - 1, "TTFT at max_model_len", "ttft_ms_max_model_len")
    for batch, key in ((1, "itl_ms_batch_1"), (req.batch, "itl_ms_largest_batch")):
        seconds, text = _decode_step(cost, figures, batch, p.prompt + p.output // 2, lora)
        out.append(reason(f"ITL at batch {batch}", f"{_ms(seconds)} ({label})", text))
        doc[key] = round(seconds * 1e3, 2)
    doc["largest_batch"] = req.batch
    sim = simulate(cost, figures, Pattern(1, budget, 1, lora=lora), 1, budget)
    prefill = budget / (sim.ends[-1])
    out.append(
        reason(
            "prefill tokens/s",
            f"{prefill:,.0f} ({label})",
            _steps_text(cost, figures, sim, f"max_num_batched_tokens {budget:,} / one full prompt step"),
        )
    )
    doc["prefill_tokens_per_s"] = round(prefill, 1)
    load = simulate(cost, figures, p, req.max_num_seqs, budget)
    doc["load"] = load_summary(load) | {
        "users": p.users,
        "prompt": p.prompt,
        "output": p.output,
        "rounds": p.rounds,
    }
    s = doc["load"]
    out.append(
        reason(
            f"under load: {p.users} user(s), prompt {p.prompt:,}, output {p.output:,}",
            f"TTFT {s['ttft_ms_p50']:,.0f} ms, ITL {s['itl_ms_p50']:,.1f} ms, {s['output_tokens_per_s']:,.1f} "
            f"output tok/s ({label})",
            f"medians of a step-by-step run of vLLM's scheduler ({len(load.steps)} steps): {p.users} users send at "
            f"once, closed loop, {p.rounds} round(s); each step decodes the running requests first and fills the rest "
            f"of max_num_batched_tokens {budget:,} with prompt chunks (max_num_seqs {req.max_num_seqs}); "
            f"p90: TTFT {s['ttft_ms_p90']:,.0f} ms, ITL {s['itl_ms_p90']:,.1f} ms",
        )
    )
    doc["summary"] = summary_line(doc, req.max_model_len, p)
    return out, doc


def summary_line(doc: dict, max_model_len: int, p: Pattern) -> str:
    """One line of the predictions, for people (the dry run's notes, the README)."""
    label = "calibrated" if doc["calibrated"] else f"uncalibrated, from the {doc['basis']}"
    load = doc["load"]
    return (
        f"speed ({label}): TTFT {doc['ttft_ms_max_model_len'] / 1e3:,.1f} s for a prompt filling max_model_len "
        f"{max_model_len:,}; "
        f"ITL {doc['itl_ms_batch_1']:,.0f} ms at 1 sequence, {doc['itl_ms_largest_batch']:,.0f} ms at "
        f"{doc['largest_batch']}; {p.users} users with {p.prompt:,}-token prompts: TTFT {load['ttft_ms_p50']:,.0f} "
        f"ms, ITL {load['itl_ms_p50']:,.0f} ms (medians)"
    )


def meets(summary: dict, slo_ttft_ms: float | None, slo_itl_ms: float | None) -> bool:
    return (slo_ttft_ms is None or summary["ttft_ms_p50"] <= slo_ttft_ms) and (
        slo_itl_ms is None or summary["itl_ms_p50"] <= slo_itl_ms
    )


def largest_meeting(
    cost: ModelCost, figures: Figures, pattern: Pattern, cap: int, budget: int, slo_ttft_ms, slo_itl_ms
) -> tuple[int, dict]:
    """The largest max_num_seqs n <= cap at which n users (closed loop, `pattern`) meet the median
    targets, by bisection (latency rises with the users); (0, the summary at 1 user) when none does."""

    def at(n: int) -> dict:
        return load_summary(
            simulate(cost, figures, Pattern(n, pattern.prompt, pattern.output, pattern.rounds, pattern.lora), n, budget)
        )

    best, best_summary, lo, hi = 0, at(1), 1, cap
    if not meets(best_summary, slo_ttft_ms, slo_itl_ms):
        return 0, best_summary
    while lo <= hi:
        mid = (lo + hi) // 2
        summary = at(mid)
        if meets(summary, slo_ttft_ms, slo_itl_ms):
            best, best_summary, lo = mid, summary, mid + 1
        else:
            hi = mid - 1
    return best, best_summary


# --- the plan's hook --------------------------------------------------------------------------------

DEFAULT_OUTPUT_LEN = 128
DEFAULT_ROUNDS = 2


def plan_cost(plan: ServePlan) -> ModelCost:
    lora = plan.lora
    dtype_bytes = DTYPE_BYTES[dtype_code(plan.dtype)]
    in_out = plan.memory.get("lora_buffers", 0) // (lora.max_loras * lora.max_lora_rank * dtype_bytes) if lora else 0
    tp = plan.tensor_parallel_size
    return model_cost(plan.model, plan.layout, dtype_bytes, tp, lora.max_lora_rank if lora else 0, in_out * tp)


def with_predictions(
    plan: ServePlan, request: PlanRequest, adapters: list[LoraAdapter], replan: Callable[[PlanRequest], ServePlan]
) -> ServePlan:
    """The plan with its speed predictions; with latency targets, re-planned at the largest
    max_num_seqs that meets them (and the replicas for --target-concurrency)."""
    cost = plan_cost(plan)
    fp8 = bool(plan.model.quantization and "fp8" in str(plan.model.quantization.get("quant_method", "")))
    figures = figures_for(plan.profile, cost, fp8)
    slo = request.slo_ttft_ms is not None or request.slo_itl_ms is not None
    if figures is None:
        missing = f"profile {plan.profile.name} has no memory_bandwidth_gbs and bf16_tflops"
        if slo:
            raise PlanError(f"{{slo_ttft_ms}}/{{slo_itl_ms}}: {missing}; add them (see deploy/profiles/h100-80gb.yaml)")
        plan.reasons.append(
            Reason("speed", "not predicted", f"{missing} (or a calibration: `lcserve deploy calibrate`)")
        )
        return plan
    c = plan.profile.calibration
    if c is not None and c.model_identity != model_identity(plan.model):
        plan.warnings.append(
            f"speed calibration of {plan.profile.name} was fitted on {c.model} ({c.model_identity}), not on "
            f"{plan.model.path.name} ({model_identity(plan.model)}): its bandwidth and FLOP/s carry over, its "
            "overheads and LoRA costs may not; calibrate with --model to be sure"
        )
    trained = min((a.training_seq_len for a in adapters if a.training_seq_len), default=None)
    prompt = request.expected_prompt_len or trained or min(1024, plan.max_model_len // 2)
    output = min(request.expected_output_len or DEFAULT_OUTPUT_LEN, max(plan.max_model_len - prompt, 1))
    if prompt + output > plan.max_model_len:
        raise PlanError(
            f"{{expected_prompt_len}} {prompt} + output {output} is above max_model_len {plan.max_model_len}; "
            f"largest feasible: {{expected_prompt_len}} {plan.max_model_len - output}",
            "expected_prompt_len",
        )
    usable = plan.kv_bytes // plan.layout.bytes_per_block - 1
    fit = usable // plan.layout.blocks_per_request(prompt + output, plan.in_flight_tokens)
    pattern = Pattern(min(fit, plan.max_num_seqs), prompt, output, DEFAULT_ROUNDS, lora=plan.lora is not None)
    if slo:
        return _meet_targets(plan, request, cost, figures, pattern, fit, replan)
    req = SpeedRequest(
        plan.max_num_seqs, plan.max_num_batched_tokens, plan.max_model_len, trained, pattern, pattern.users
    )
    reasons, plan.speed = predict(cost, figures, req, Reason)
    plan.reasons.extend(reasons)
    return plan


def _meet_targets(
    plan: ServePlan, request: PlanRequest, cost: ModelCost, figures: Figures, pattern: Pattern, fit: int, replan
) -> ServePlan:
    """Re-plan at the largest max_num_seqs whose users meet the median TTFT/ITL targets."""
    cap = min(request.max_num_seqs or plan.max_num_seqs, fit)
    budget = plan.max_num_batched_tokens
    n, summary = largest_meeting(cost, figures, pattern, max(cap, 1), budget, request.slo_ttft_ms, request.slo_itl_ms)
    targets = " and ".join(
        f"{name} <= {value:g} ms"
        for name, value in (("TTFT", request.slo_ttft_ms), ("ITL", request.slo_itl_ms))
        if value is not None
    )
    load = f"prompts of {pattern.prompt:,} tokens, {pattern.output:,} out"
    label = "calibrated" if figures.calibrated else f"uncalibrated, {figures.basis}"
    given = " ".join(
        f"{{{k}}} {getattr(request, k):g}" for k in ("slo_ttft_ms", "slo_itl_ms") if getattr(request, k) is not None
    )
    if n == 0:
        raise PlanError(
            f"{given}: no max_num_seqs meets median {targets} on {plan.profile.name} at "
            f"{load}; best achievable: TTFT {summary['ttft_ms_p50']:,.0f} ms, ITL {summary['itl_ms_p50']:,.1f} ms "
            f"at max_num_seqs 1 ({label})",
            "slo_ttft_ms" if request.slo_ttft_ms is not None else "slo_itl_ms",
        )
    inner = dataclasses.replace(
        request,
        max_num_seqs=n,
        slo_ttft_ms=None,
        slo_itl_ms=None,
        target_concurrency=None,
        expected_prompt_len=pattern.prompt,
        expected_output_len=pattern.output,
    )
    chosen = replan(inner)
    why = (
        f"largest that meets median {targets} with {n} user(s) at once ({load}, closed loop), by bisection over "
        f"1..{cap} (min(vLLM's cap {request.max_num_seqs or plan.max_num_seqs}, {fit} that fit the KV cache)): "
        f"predicted TTFT {summary['ttft_ms_p50']:,.0f} ms, ITL {summary['itl_ms_p50']:,.1f} ms ({label})"
    )
    chosen.reasons.append(Reason("max_num_seqs for the latency targets", str(n), why))
    chosen.speed = (chosen.speed or {}) | {"targets": {"ttft_ms": request.slo_ttft_ms, "itl_ms": request.slo_itl_ms}}
    if request.target_concurrency:
        chosen.replicas = cdiv(request.target_concurrency, n)
        chosen.reasons.append(
            Reason(
                "replicas",
                str(chosen.replicas),
                f"ceil(target {request.target_concurrency} users / {n} per replica within the latency targets)",
            )
        )
    return chosen
