"""Memory per device: what the weights, LoRA buffers and runtime take, the KV cache that is left
(`VLLM_CPU_KVCACHE_SPACE` on the CPU build), and what that cache holds, in vLLM's own arithmetic
(`kv.py`). GPU figures that vLLM measures at startup are estimated (`estimates.py`) and labelled so.
"""

from __future__ import annotations

from dataclasses import dataclass

from lcserve.errors import PlanError
from lcserve.model_config import ModelInfo
from lcserve.model_facts import GIB, cdiv

from . import estimates as est
from .device import TP_SIZES, Device, heads_split
from .hardware import Profile
from .kv import Capacity, KVLayout, capacity, largest_fitting_len
from .lora_buffers import lora_buffer_bytes, lora_buffers_reason
from .plan_types import Choice, Explained, PlanRequest, Reason, gib
from .state_pool import state_reasons


@dataclass(frozen=True)
class Budget(Explained):
    """The KV bytes one device has at the chosen TP, and what takes the rest of its memory."""

    kv_bytes: int
    memory: dict[str, int]


@dataclass(frozen=True)
class KVCache(Explained):
    """The KV cache vLLM is told to keep, and the environment that tells it (the CPU build)."""

    kv_bytes: int
    env: dict[str, str]


def weight_bytes(model: ModelInfo, dtype_bytes: int) -> int:
    """Weights as vLLM holds them: the stored bytes for quantized models, else params x dtype."""
    return model.weight_bytes if model.quantization else model.param_count * dtype_bytes


def kv_budget(device: Device, tp: int, max_model_len: int) -> tuple[int, dict[str, int]]:
    """KV bytes left on one device at tensor parallel size `tp`, and what takes the rest."""
    profile, model, lora = device.profile, device.model, device.lora
    share = device.stage_layers / max(len(model.layers), 1)  # 1 without pipeline parallelism
    memory = {"weights": int(weight_bytes(model, device.dtype_bytes) * share) // tp}
    if lora:
        memory["lora_buffers"] = int(lora_buffer_bytes(model, lora, tp, device.dtype_bytes) * share)
    if profile.is_cpu:  # the ranks share one machine's RAM; VLLM_CPU_KVCACHE_SPACE is per rank
        ranks = tp * device.pp
        overhead = est.CPU_RUNTIME_OVERHEAD_BYTES + (ranks - 1) * est.CPU_WORKER_OVERHEAD_BYTES
        memory["runtime_overhead_estimate"] = overhead // ranks
        usable = profile.memory_bytes // ranks - sum(memory.values())
        return (max(usable, 0) // GIB) * GIB, memory  # VLLM_CPU_KVCACHE_SPACE takes whole GiB
    batch = device.batch
    memory |= est.gpu_startup_estimates(model, tp, batch.batched(max_model_len), batch.max_num_seqs, device.dtype_bytes)
    return int(device.gpu_memory_utilization * profile.memory_bytes) - sum(memory.values()), memory


def has_room(device: Device, tp: int, max_model_len: int) -> bool:
    """Whether the KV budget at `tp` holds at least one block beside vLLM's null block."""
    return kv_budget(device, tp, max_model_len)[0] >= 2 * device.layout(tp).bytes_per_block


def memory_budget(device: Device, tp: int, layout: KVLayout, request: PlanRequest, max_model_len: int) -> Budget:
    """The KV budget at the chosen TP (the fixed --kv-cache-gib on the CPU); PlanError when not even one
    block fits. Its reasons say what the weights and the LoRA buffers take."""
    kv_bytes, memory = kv_budget(device, tp, max_model_len)
    if kv_bytes < 2 * layout.bytes_per_block:
        raise does_not_fit(device, tp, max_model_len)
    if request.kv_cache_gib is not None:
        kv_bytes = fixed_cpu_kv_cache(request.kv_cache_gib, kv_bytes, device.profile)
    model = device.model
    stage = f" x {device.stage_layers}/{len(model.layers)} layers (largest PP stage)" if device.pp > 1 else ""
    weights = Reason(
        "weights",
        gib(memory["weights"]),
        f"per device: {model.param_count:,} parameters{stage} / TP {tp}; "
        f"{model.weights_source} ({model.weights_source_reason})",
    )
    lora = (lora_buffers_reason(device.lora, memory["lora_buffers"], device.dtype_bytes),) if device.lora else ()
    batch, dtype_bytes = device.batch, device.dtype_bytes
    startup = (
        ()
        if device.profile.is_cpu
        else (
            est.startup_estimates_reason(
                model, tp, batch.batched(max_model_len), batch.max_num_seqs, dtype_bytes, memory
            ),
        )
    )
    return Budget(kv_bytes, memory, reasons=(weights, *lora, *startup))


def does_not_fit(device: Device, tp: int, max_model_len: int) -> PlanError:
    """The model fits at no context: say what takes the memory and the smallest TP that would do."""
    enough = [t for t in TP_SIZES if t > tp and heads_split(device.model, t) and has_room(device, t, max_model_len)]
    kv_bytes, memory = kv_budget(device, tp, max_model_len)
    return PlanError(_does_not_fit_message(device, tp, memory, kv_bytes, enough[0] if enough else None))


def _does_not_fit_message(device: Device, t: int, memory: dict[str, int], kv_budget: int, enough_tp: int | None) -> str:
    profile, model = device.profile, device.model
    used = ", ".join(f"{k.replace('_', ' ')} {gib(v)}" for k, v in memory.items())
    if profile.is_cpu:
        return (
            f"{model.path.name} does not fit {profile.name} at any context: {used} leave {gib(max(kv_budget, 0))} "
            f"of {gib(profile.memory_bytes)} available RAM for the KV cache (need >= 1 GiB); largest feasible: none "
            "on this machine - free RAM or use a smaller/quantized model"
        )
    hint = (
        f"largest feasible on {profile.count} GPU(s): none; it fits from --gpus {enough_tp} {{tensor_parallel_size}} {enough_tp}"
        if enough_tp
        else "largest feasible: none up to TP 32; split the layers over nodes ({nodes} 2: one pipeline stage per "
        "node) or use a quantized model"
    )
    return (
        f"{model.path.name} does not fit {profile.count} x {profile.name} at any context with TP {t}: per GPU {used} "
        f"leave {gib(kv_budget)} of {device.gpu_memory_utilization} x {gib(profile.memory_bytes)} for the KV "
        f"cache; {hint}"
    )


def fixed_cpu_kv_cache(kv_cache_gib: int, kv_bytes: int, profile: Profile) -> int:
    """--kv-cache-gib, checked against what RAM leaves."""
    if kv_cache_gib < 1 or kv_cache_gib * GIB > kv_bytes:
        raise PlanError(
            f"{{kv_cache_gib}} {kv_cache_gib}: must be from 1 to what RAM allows; largest feasible: "
            f"{kv_bytes // GIB} (available {gib(profile.memory_bytes)} - weights - runtime overhead)",
            "kv_cache_gib",
        )
    return kv_cache_gib * GIB


def size_kv_cache(device: Device, layout: KVLayout, budget: Budget, max_len: int, request: PlanRequest) -> KVCache:
    """The CPU build takes the size in whole GiB (VLLM_CPU_KVCACHE_SPACE), enough for the full-context
    target within what RAM leaves; a GPU takes a memory fraction and keeps what is left."""
    profile, kv_bytes, memory = device.profile, budget.kv_bytes, budget.memory
    if profile.is_cpu and request.kv_cache_gib:
        reason = Reason("VLLM_CPU_KVCACHE_SPACE", str(request.kv_cache_gib), "--kv-cache-gib")
        return KVCache(kv_bytes, {"VLLM_CPU_KVCACHE_SPACE": str(request.kv_cache_gib)}, reasons=(reason,))
    if profile.is_cpu:
        n = request.full_context_requests or profile.default_concurrency
        per_request = layout.blocks_per_request(max_len, device.in_flight_tokens(max_len))
        need = cdiv((n * per_request + 1) * layout.bytes_per_block, GIB)
        size = max(1, min(need, kv_bytes // GIB))
        source = "--full-context-requests" if request.full_context_requests else "profile default_concurrency"
        capped = "" if size == max(1, need) else f", capped at what RAM allows ({size} GiB)"
        reason = Reason(
            "VLLM_CPU_KVCACHE_SPACE",
            str(size),
            f"ceil(({n} request(s) x {per_request} blocks + 1 null block) x {layout.bytes_per_block} B "
            f"/ 1 GiB) = {max(1, need)} GiB ({source} {n}){capped}; at most {kv_bytes // GIB} GiB = "
            f"floor(available RAM {gib(profile.memory_bytes)} - {memory_terms(memory)})",
        )
        return KVCache(size * GIB, {"VLLM_CPU_KVCACHE_SPACE": str(size)}, reasons=(reason,))
    util = device.gpu_memory_utilization
    reason = Reason(
        "KV cache memory",
        gib(kv_bytes),
        f"{util} x {gib(profile.memory_bytes)} - {memory_terms(memory)} = {gib(kv_bytes)} per GPU",
    )
    return KVCache(kv_bytes, {}, reasons=(reason,))


def memory_terms(memory: dict[str, int]) -> str:
    return " - ".join(f"{k.replace('_', ' ')} {gib(v)}" for k, v in memory.items())


def kv_capacity(device: Device, layout: KVLayout, kv_bytes: int, max_len: int, kv_cache_dtype: str) -> Choice[Capacity]:
    """What the KV cache holds at max_model_len, with the reasons behind each figure, as vLLM computes them."""
    model, in_flight = device.model, device.in_flight_tokens(max_len)
    cap = capacity(layout, kv_bytes, max_len, in_flight)
    kv_key = f" ({kv_cache_dtype} KV cache)" if kv_cache_dtype != "auto" else ""
    one_group = len(layout.groups) == 1
    groups = (
        "one group holds all layers"
        if one_group
        else f"vLLM's hybrid manager: groups of {layout.group_size} layers per kind, the last one padded"
    )
    stage = " (the widest group's layers on the fullest pipeline rank)" if layout.stage_layers else ""
    batched = device.batch.batched(max_len)
    per_request = _per_request_reason(layout, max_len, in_flight, device.in_flight_batches, batched)
    reasons = (
        Reason("KV bytes per token per layer", str(layout.bytes_per_token_layer), layout.equation + kv_key),
        Reason("KV groups", layout.describe_groups(), f"{model.attention_summary}; {groups}"),
        Reason(
            "bytes per block",
            str(layout.bytes_per_block),
            f"{layout.block_layers} layers x block {layout.block_size} tokens x {layout.bytes_per_token_layer} B"
            + stage,
        ),
        Reason(
            "num_blocks",
            str(cap.num_blocks),
            f"floor({cap.kv_bytes} B KV cache / {layout.bytes_per_block} B per block)",
        ),
        Reason("blocks per request", str(cap.blocks_per_request), per_request),
        Reason(
            "max concurrency at full context",
            f"{cap.max_concurrency:.2f}",
            f"{cap.num_blocks} blocks / {cap.blocks_per_request} blocks per request at {cap.max_model_len} tokens",
        ),
        Reason(
            "KV cache capacity (tokens)",
            str(cap.kv_tokens),
            f"int({cap.max_concurrency:.4f} x max_model_len {cap.max_model_len})",
        ),
        *state_reasons(layout, model, device.block_size),
    )
    return Choice(cap, reasons=reasons)


def _per_request_reason(layout: KVLayout, max_len: int, in_flight: int, batches: int, batched: int) -> str:
    parts = []
    for g in layout.groups:
        n = g.blocks_per_request(max_len, layout.block_size, in_flight)
        if g.kind == "sliding":
            parts.append(f"sliding: cdiv(min({g.window} - 1 + {in_flight}, {max_len}), {layout.block_size}) + 1 = {n}")
        elif layout.state is not None and g.kind == layout.state.kind:
            parts.append(f"{g.kind} state: {n}")
        else:
            parts.append(f"{g.kind}: cdiv({max_len}, {layout.block_size}) = {n}")
    counted = {}
    for p in parts:
        counted[p] = counted.get(p, 0) + 1
    text = " + ".join(f"{c} x [{p}]" if c > 1 else f"[{p}]" for p, c in counted.items())
    if any(g.kind == "sliding" for g in layout.groups):
        text += f"; in-flight tokens = {batches} batch(es) x max_num_batched_tokens {batched}"
    return text


def max_num_seqs_fit_len(
    device: Device, layout: KVLayout, cap: Capacity, max_len: int, request: PlanRequest
) -> Choice[int]:
    """The longest request length at which all max_num_seqs sequences fit in the KV cache at once.

    vLLM admits up to max_num_seqs sequences whatever their length; when the cache runs out,
    it preempts and later recomputes some. Past this length, sequences queue instead of running.
    """
    seqs = device.batch.max_num_seqs
    in_flight = device.in_flight_tokens(max_len)
    fit_len = largest_fitting_len(layout, cap.kv_bytes, max_len, in_flight, seqs)
    warnings = ()
    if fit_len >= max_len:
        text = f"all {seqs} sequences fit at once even at max_model_len {max_len}"
    else:
        text = (
            f"{cap.max_concurrency:.2f} requests fit at full length (max_model_len {max_len}); {seqs} sequences "
            f"fit at once up to about {fit_len:,} tokens each (bisection over the KV blocks)"
        )
        if request.max_num_seqs:
            warnings = (
                f"max_num_seqs {seqs} is vLLM's cap, not a guarantee: the KV cache holds "
                f"{cap.max_concurrency:.2f} requests of {max_len} tokens, and {seqs} only up to about "
                f"{fit_len:,} tokens each; longer requests wait in the queue or are preempted",
            )
    fit = min(fit_len, max_len)
    return Choice(fit, reasons=(Reason("max_num_seqs at once", f"up to {fit:,} tokens", text),), warnings=warnings)
