"""The capacity planner: profile + model + adapters + targets -> vLLM settings, each with its reason.

Pure functions over dataclasses; reading files and detecting hardware happen before. Each step decides
one quantity and returns it with its reasons and warnings: the context (`context.py`), the shared
device facts (`device.py`), memory and the KV cache (`memory.py`, in vLLM's own arithmetic: `kv.py`),
parallelism (`parallel.py`) and the LoRA buffers (`lora_buffers.py`). What vLLM measures at startup
on a GPU is estimated (see `estimates.py`) and labelled so in the reasons.
"""

from __future__ import annotations

import dataclasses

from lcserve.adapters.reader import LoraAdapter
from lcserve.errors import PlanError
from lcserve.model_config import ModelInfo

from .context import choose_max_model_len, context_limit, training_ratio
from .device import batch_settings, device_facts
from .hardware import Profile
from .kv import pp_partitions
from .memory import kv_capacity, max_num_seqs_fit_len, memory_budget, size_kv_cache
from .parallel import choose_executor, choose_pipeline_parallel, choose_replicas, choose_tensor_parallel
from .plan_types import TRAINING_RATIO_WARN, LoraPlan, PlanRequest, Reason, ServePlan
from .settings import check_values
from .speed_plan import with_predictions
from .state_pool import choose_max_num_seqs

__all__ = ["TRAINING_RATIO_WARN", "LoraPlan", "PlanRequest", "Reason", "ServePlan", "plan_deployment"]

# The order the plan prints its reasons in (pinned by tests/unit/golden/): the settings the steps
# decide first, then the figures that follow from them. Each step explains its own choice when it
# makes it; this order is the printed one alone.
REASON_ORDER = (
    "hf_overrides",
    "pipeline_parallel_size",
    "max_model_len",
    "VLLM_CPU_KVCACHE_SPACE",
    "gpu_memory_utilization",
    "KV cache memory",
    "GPU startup estimates",
    "distributed_executor_backend",
    "VLLM_CPU_OMP_THREADS_BIND",
    "dtype",
    "weights",
    "tensor_parallel_size",
    "block_size",
    "KV bytes per token per layer",
    "KV groups",
    "recurrent state per sequence",
    "mamba_cache_mode",
    "bytes per block",
    "num_blocks",
    "blocks per request",
    "max concurrency at full context",
    "KV cache capacity (tokens)",
    "state pool (sequences)",
    "max_num_seqs",
    "max_num_batched_tokens",
    "max_lora_rank",
    "LoRA buffers",
    "max_num_seqs at once",
    "replicas",
    "training length",
    "max_model_len / training length",
)


def plan_deployment(
    profile: Profile, model: ModelInfo, adapters: list[LoraAdapter] | tuple = (), request: PlanRequest | None = None
) -> ServePlan:
    """Plan a vLLM deployment, one named step at a time; PlanError (with the largest feasible
    value, naming the setting) when impossible."""
    request, adapter_list = request or PlanRequest(), list(adapters)
    check_request(request, profile)
    context = context_limit(model, request)
    pp = choose_pipeline_parallel(profile, model, request, bool(adapter_list))
    facts = device_facts(profile, model, adapter_list, request, pp.value)
    device, full_context_target = facts.value, request.full_context_requests or 1
    tp = choose_tensor_parallel(device, request, context.limit, full_context_target)
    layout = device.layout(tp.value)
    budget = memory_budget(device, tp.value, layout, request, request.max_model_len or context.limit)
    max_len = choose_max_model_len(
        device, layout, budget.kv_bytes, request, context.limit, full_context_target, tp.value
    )
    kv_cache = size_kv_cache(device, layout, budget, max_len.value, request)
    executor = choose_executor(device, tp.value, request.nodes)
    cap = kv_capacity(device, layout, kv_cache.kv_bytes, max_len.value, request.kv_cache_dtype)
    pool = choose_max_num_seqs(device, layout, cap.value, request)  # hybrids: within the state pool
    batch = dataclasses.replace(device.batch, max_num_seqs=pool.max_num_seqs, why_seqs=pool.why_seqs)
    device = dataclasses.replace(device, batch=batch)
    batched = batch_settings(device.batch, max_len.value)
    fit_len = max_num_seqs_fit_len(device, layout, cap.value, max_len.value, request)
    replicas = choose_replicas(device, cap.value, request, tp.value)
    ratio = training_ratio(adapter_list, max_len.value, request.training_ratio_warn)
    steps = (context, pp, facts, tp, budget, max_len, kv_cache, executor, cap, pool, batched, fit_len, replicas, ratio)
    reasons = [r for step in steps for r in step.reasons if not raised_block(r, layout.block_size)]
    plan = ServePlan(
        model=model,
        profile=profile,
        max_model_len=max_len.value,
        max_num_seqs=device.batch.max_num_seqs,
        max_num_batched_tokens=batched.value,
        tensor_parallel_size=tp.value,
        block_size=layout.block_size,
        dtype=device.dtype,
        kv_cache_dtype=request.kv_cache_dtype,
        gpu_memory_utilization=device.gpu_memory_utilization,
        kv_bytes=kv_cache.kv_bytes,
        layout=layout,
        capacity=cap.value,
        lora=device.lora,
        memory={**budget.memory, "kv_cache": kv_cache.kv_bytes},
        env={**kv_cache.env, **executor.env},
        hf_overrides=context.hf_overrides,
        training_ratio=ratio.value,
        warnings=[*(w for step in steps for w in step.warnings), *model.rope_findings],
        reasons=in_printed_order(reasons),
        max_num_seqs_fit_len=fit_len.value,
        pipeline_parallel_size=pp.value,
        nodes=request.nodes,
        replicas=replicas.value,
        distributed_executor_backend=executor.backend,
        layers_per_stage=tuple(pp_partitions(len(model.layers), pp.value)),
        in_flight_tokens=device.in_flight_tokens(max_len.value),
        state_pool=pool.pool,
    )
    return with_predictions(plan, request, adapter_list, lambda r: plan_deployment(profile, model, adapters, r))


def raised_block(reason: Reason, block_size: int) -> bool:
    """The profile's block_size reason when a hybrid's state raised the block size (state_pool.py says why)."""
    return reason.setting == "block_size" and reason.value != str(block_size)


def in_printed_order(reasons: list[Reason]) -> list[Reason]:
    """The reasons in REASON_ORDER; a setting missing there goes last, in the order it came."""
    rank = {setting: i for i, setting in enumerate(REASON_ORDER)}
    return sorted(reasons, key=lambda r: rank.get(r.setting, len(rank)))


def check_request(request: PlanRequest, profile: Profile) -> None:
    """Values no plan can take, whatever the model: each setting against its declaration, then the
    settings that only one kind of profile takes."""
    check_values(request)
    if request.kv_cache_gib is not None and not profile.is_cpu:
        raise PlanError(
            "{kv_cache_gib} sets VLLM_CPU_KVCACHE_SPACE for the CPU profile; on GPUs the KV cache is what "
            "gpu_memory_utilization leaves after weights and activations",
            "kv_cache_gib",
        )
