"""The capacity planner: profile + model + adapters + targets -> vLLM settings, each with its reason.

Pure functions over dataclasses; reading files and detecting hardware happen before.
The KV arithmetic is vLLM's own (see `kv.py`); what vLLM measures at startup on a GPU is
estimated (see `estimates.py`) and labelled so in the reasons.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field

from lcserve.errors import PlanError
from lcserve.model_config import ModelInfo

from . import estimates as est
from .adapters_info import AdapterInfo
from .hardware import GIB, Profile
from .kv import Capacity, KVLayout, capacity, fits, kv_layout, largest_fitting_len

ALLOWED_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM config/lora.py MaxLoRARanks
KV_DTYPES = {"auto": None, "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1, "bfloat16": 2, "float16": 2}
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
TRAINING_RATIO_WARN = 4.0
# vLLM packs these projections into one wrapped layer (qkv_proj, gate_up_proj): targeting
# any member allocates LoRA buffers for all of them.
PACKED = ({"q_proj", "k_proj", "v_proj"}, {"gate_proj", "up_proj"})
ROW_PARALLEL = {"o_proj", "down_proj", "out_proj", "dense", "fc2", "w2", "c_proj", "wo"}
REPLICATED_HINTS = ("q_a_proj", "kv_a_proj", "kv_a_proj_with_mqa")


@dataclass(frozen=True)
class Reason:
    setting: str
    value: str
    why: str


@dataclass(frozen=True)
class LoraPlan:
    max_loras: int
    max_lora_rank: int
    target_modules: tuple[str, ...]
    buffer_bytes: int  # per device


@dataclass
class ServePlan:
    model: ModelInfo
    profile: Profile
    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    tensor_parallel_size: int
    block_size: int
    dtype: str
    kv_cache_dtype: str
    gpu_memory_utilization: float | None
    kv_bytes: int
    layout: KVLayout
    capacity: Capacity
    lora: LoraPlan | None
    memory: dict[str, int]
    env: dict[str, str]
    hf_overrides: dict | None = None
    training_ratio: float | None = None
    warnings: list[str] = field(default_factory=list)
    reasons: list[Reason] = field(default_factory=list)

    @property
    def kv_tokens(self) -> int:
        return self.capacity.kv_tokens

    @property
    def max_concurrency(self) -> float:
        return self.capacity.max_concurrency

    def vllm_options(self) -> dict:
        """vLLM options (long names without dashes) in the order the plan decides them."""
        opts: dict = {
            "max-model-len": self.max_model_len,
            "max-num-seqs": self.max_num_seqs,
            "max-num-batched-tokens": self.max_num_batched_tokens,
            "block-size": self.block_size,
            "dtype": self.dtype,
        }
        if self.gpu_memory_utilization is not None:
            opts["gpu-memory-utilization"] = self.gpu_memory_utilization
        if self.tensor_parallel_size > 1:
            opts["tensor-parallel-size"] = self.tensor_parallel_size
        if self.kv_cache_dtype != "auto":
            opts["kv-cache-dtype"] = self.kv_cache_dtype
        if self.lora:
            opts.update({"enable-lora": True, "max-loras": self.lora.max_loras, "max-lora-rank": self.lora.max_lora_rank,
                         "max-cpu-loras": self.lora.max_loras, "lora-target-modules": list(self.lora.target_modules)})
        if self.hf_overrides:
            opts["hf-overrides"] = self.hf_overrides
        return opts

    def vllm_args(self) -> list[str]:
        """The plan as vLLM command-line arguments (no model, host or port)."""
        return [a for key, value in self.vllm_options().items() for a in option_args(key, value)]

    def shell_args(self) -> str:
        return " ".join(shlex.quote(a) for a in self.vllm_args())

    def to_json(self) -> dict:
        return {
            "model": str(self.model.path),
            "profile": self.profile.name,
            "device": {"kind": self.profile.kind, "count": self.profile.count, "memory_bytes": self.profile.memory_bytes},
            "max_model_len": self.max_model_len,
            "derived_max_len": self.model.derived_max_len,
            "gpu_memory_utilization": self.gpu_memory_utilization,
            "max_num_seqs": self.max_num_seqs,
            "max_num_batched_tokens": self.max_num_batched_tokens,
            "tensor_parallel_size": self.tensor_parallel_size,
            "block_size": self.block_size,
            "dtype": self.dtype,
            "kv_cache_dtype": self.kv_cache_dtype,
            "max_lora_rank": self.lora.max_lora_rank if self.lora else None,
            "max_loras": self.lora.max_loras if self.lora else None,
            "lora_target_modules": list(self.lora.target_modules) if self.lora else None,
            "kv_cache_bytes": self.kv_bytes,
            "kv_bytes_per_token_layer": self.layout.bytes_per_token_layer,
            "kv_groups": self.layout.describe_groups(),
            "bytes_per_block": self.layout.bytes_per_block,
            "num_blocks": self.capacity.num_blocks,
            "blocks_per_request": self.capacity.blocks_per_request,
            "kv_cache_tokens": self.kv_tokens,
            "max_concurrency": self.max_concurrency,
            "memory_per_device": self.memory,
            "training_ratio": self.training_ratio,
            "hf_overrides": self.hf_overrides,
            "env": self.env,
            "vllm_args": self.vllm_args(),
            "warnings": self.warnings,
            "reasons": [{"setting": r.setting, "value": r.value, "why": r.why} for r in self.reasons],
        }


def option_args(key: str, value) -> list[str]:
    """One vLLM option as arguments, the way vLLM reads its YAML config (flags, lists, JSON)."""
    if value is True:
        return [f"--{key}"]
    if isinstance(value, list):
        return [f"--{key}", *map(str, value)]
    if isinstance(value, dict):
        return [f"--{key}", json.dumps(value, separators=(",", ":"))]
    return [f"--{key}", str(value)]


def plan_deployment(
    profile: Profile,
    model: ModelInfo,
    adapters: list[AdapterInfo] | tuple = (),
    context: int | None = None,
    concurrency: int | None = None,
    kv_dtype: str | None = None,
    tp: int | None = None,
    rope_scaling: str | None = None,
    training_ratio_warn: float = TRAINING_RATIO_WARN,
    kv_cache_gib: int | None = None,
) -> ServePlan:
    """Plan a vLLM deployment; PlanError (with the largest feasible value) when impossible.

    `kv_cache_gib` (CPU only) fixes VLLM_CPU_KVCACHE_SPACE instead of sizing it for the
    concurrency target.
    """
    reasons: list[Reason] = []
    warnings: list[str] = []

    def why(setting: str, value, text: str) -> None:
        reasons.append(Reason(setting, str(value), text))

    if context is not None and context < 1:
        raise PlanError(f"--context {context}: must be a positive number of tokens")
    if concurrency is not None and concurrency < 1:
        raise PlanError(f"--concurrency {concurrency}: must be at least 1")

    limit, hf_overrides = _context_limit(model, context, rope_scaling, why, warnings)
    derived = model.derived_max_len

    dtype = _serving_dtype(model, profile)
    dtype_bytes = DTYPE_BYTES[dtype]
    kv_key = kv_dtype or "auto"
    if kv_key not in KV_DTYPES:
        raise PlanError(f"--kv-dtype {kv_dtype}: choose one of {', '.join(KV_DTYPES)}")
    kv_bytes_elem = KV_DTYPES[kv_key] or dtype_bytes
    if kv_bytes_elem == 1 and not profile.fp8 and not profile.is_cpu:
        warnings.append(f"{profile.name} has no fp8 tensor cores: the fp8 KV cache saves memory but is converted for compute")
    block_size = profile.mla_block_size if model.mla else profile.block_size
    in_flight_batches = 1 if profile.is_cpu else 2  # async scheduling keeps two batches in flight on GPUs

    # Adapters -> LoRA buffers.
    lora = _plan_lora(model, list(adapters), dtype_bytes) if adapters else None

    tp_size = _choose_tp(profile, model, tp)
    if kv_cache_gib is not None and not profile.is_cpu:
        raise PlanError("--kv-cache-gib sets VLLM_CPU_KVCACHE_SPACE for the CPU profile; on GPUs the KV cache is what "
                        "gpu_memory_utilization leaves after weights and activations")
    default_requests = 1 if kv_cache_gib or not profile.is_cpu else profile.default_concurrency
    target_requests = concurrency or default_requests
    seqs, batched, batch_why = _batch_sizes(profile, model, concurrency)

    def budget_for(t: int, max_len: int) -> tuple[int, dict[str, int]]:
        """KV bytes left on one device at TP t, and the memory breakdown."""
        lora_bytes = _lora_buffer_bytes(model, lora, t, dtype_bytes) if lora else 0
        weights = _weight_bytes(model, dtype_bytes) // t
        memory = {"weights": weights} | ({"lora_buffers": lora_bytes} if lora else {})
        if profile.is_cpu:
            memory["runtime_overhead_estimate"] = est.CPU_RUNTIME_OVERHEAD_BYTES
            usable = profile.memory_bytes - sum(memory.values())
            return (max(usable, 0) // GIB) * GIB, memory  # VLLM_CPU_KVCACHE_SPACE takes whole GiB
        act = est.activation_estimate_bytes(batched(max_len), seqs, model.hidden_size, model.intermediate_size,
                                            model.vocab_size, t, dtype_bytes)
        memory |= {"activation_estimate": act, "cuda_graph_estimate": est.CUDA_GRAPH_ESTIMATE_BYTES,
                   "non_torch_estimate": est.NON_TORCH_ESTIMATE_BYTES + (est.NCCL_ESTIMATE_BYTES if t > 1 else 0)}
        return int(_gpu_util(profile) * profile.memory_bytes) - sum(memory.values()), memory

    def layout_for(t: int) -> KVLayout:
        return kv_layout(model, kv_bytes_elem, block_size, t)

    if tp is None and not profile.is_cpu:
        tp_size = _auto_tp(profile, model, context or limit, target_requests, layout_for, budget_for, batched,
                           in_flight_batches)
    layout = layout_for(tp_size)
    kv_budget, memory = budget_for(tp_size, context or limit)

    def does_not_fit() -> PlanError:
        """The model fits at no context: say what takes the memory and the smallest TP that would do."""
        enough = [t for t in (1, 2, 4, 8, 16, 32) if t > tp_size and _heads_ok(model, t)
                  and budget_for(t, context or limit)[0] >= 2 * layout_for(t).bytes_per_block]
        return PlanError(_does_not_fit(profile, model, tp_size, memory, kv_budget, enough[0] if enough else None))

    if kv_budget < 2 * layout.bytes_per_block:
        raise does_not_fit()
    if kv_cache_gib is not None:
        if kv_cache_gib < 1 or kv_cache_gib * GIB > kv_budget:
            raise PlanError(f"--kv-cache-gib {kv_cache_gib}: must be from 1 to what RAM allows; largest feasible: "
                            f"{kv_budget // GIB} (available {_gib(profile.memory_bytes)} - weights - runtime overhead)")
        kv_budget = kv_cache_gib * GIB

    def in_flight(max_len: int) -> int:
        return in_flight_batches * batched(max_len)

    if context is not None:
        max_len = context
        if not fits(layout, kv_budget, max_len, in_flight(max_len), target_requests):
            best_len = largest_fitting_len(layout, kv_budget, limit, in_flight(limit), target_requests)
            best_n = (kv_budget // layout.bytes_per_block - 1) // layout.blocks_per_request(max_len, in_flight(max_len))
            raise PlanError(f"--context {context} x {target_requests} request(s) needs "
                            f"{target_requests * layout.blocks_per_request(max_len, in_flight(max_len)) + 1} KV blocks of "
                            f"{layout.bytes_per_block / 1024**2:.2f} MiB, the budget holds {kv_budget // layout.bytes_per_block} "
                            f"({_gib(kv_budget)}); largest feasible: --context {best_len} at {target_requests} request(s), "
                            f"or {best_n} request(s) at --context {context}")
        why("max_model_len", max_len, f"requested --context {context} (derived maximum {derived}: "
            f"{model.derived_max_len_reason})")
    else:
        max_len = limit
        if not fits(layout, kv_budget, max_len, in_flight(max_len), target_requests):
            max_len = largest_fitting_len(layout, kv_budget, limit, in_flight(limit), target_requests)
            if max_len < 1:
                raise does_not_fit()
            why("max_model_len", max_len, f"largest length at which {target_requests} request(s) fit the KV budget "
                f"{_gib(kv_budget)} (bisection, as vLLM's --max-model-len auto); derived maximum {derived} does not fit")
        else:
            why("max_model_len", max_len, f"the derived maximum ({model.derived_max_len_reason})")

    batched_tokens = batched(max_len)
    kv_mem, env, util = kv_budget, {}, None
    per_request = layout.blocks_per_request(max_len, in_flight(max_len))
    if profile.is_cpu and kv_cache_gib:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(kv_cache_gib)
        why("VLLM_CPU_KVCACHE_SPACE", kv_cache_gib, "--kv-cache-gib")
    elif profile.is_cpu:
        need = (target_requests * per_request + 1) * layout.bytes_per_block
        gib = max(1, -(-need // GIB))
        kv_mem = gib * GIB
        env["VLLM_CPU_KVCACHE_SPACE"] = str(gib)
        why("VLLM_CPU_KVCACHE_SPACE", gib, f"ceil(({target_requests} request(s) x {per_request} blocks + 1 null block) x "
            f"{layout.bytes_per_block} B / 1 GiB) = {gib} GiB "
            f"({'--concurrency' if concurrency else 'profile default_concurrency'} {target_requests}); "
            f"at most {kv_budget // GIB} GiB = floor(available RAM {_gib(profile.memory_bytes)} - "
            + " - ".join(f"{k.replace('_', ' ')} {_gib(v)}" for k, v in memory.items()) + ")")
    else:
        util = _gpu_util(profile)
        why("gpu_memory_utilization", util, _util_reason(profile, util))
        parts = " - ".join(f"{k.replace('_', ' ')} {_gib(v)}" for k, v in memory.items())
        why("KV cache memory", _gib(kv_mem), f"{util} x {_gib(profile.memory_bytes)} - {parts} = {_gib(kv_mem)} per GPU")
    memory["kv_cache"] = kv_mem
    cap = capacity(layout, kv_mem, max_len, in_flight(max_len))

    why("dtype", dtype, f"config dtype {model.dtype}"
        + ("" if dtype == model.dtype else f", served as {dtype} (vLLM's choice on {profile.name})"))
    why("tensor_parallel_size", tp_size, _tp_reason(profile, model, tp_size, tp))
    why("block_size", block_size, ("MLA block size of the profile" if model.mla else "profile block size")
        + f" ({profile.name}); passed explicitly so vLLM uses the plan's arithmetic")
    _explain_kv(why, model, layout, cap, kv_key, in_flight(max_len), in_flight_batches, batched_tokens)
    why("max_num_seqs", seqs, batch_why["seqs"])
    why("max_num_batched_tokens", batched_tokens, batch_why["batched"])
    if lora:
        why("max_lora_rank", lora.max_lora_rank, f"largest adapter rank {max(a.rank for a in adapters)} rounded up to a "
            f"rank vLLM allows {ALLOWED_LORA_RANKS}")
        why("LoRA buffers", _gib(memory["lora_buffers"]), f"max_loras {lora.max_loras} x max_lora_rank {lora.max_lora_rank} x "
            f"sum(in + out) over wrapped modules ({', '.join(lora.target_modules)}) x {dtype_bytes} B, per device")

    ratio = _training_ratio(list(adapters), max_len, training_ratio_warn, reasons, warnings)
    return ServePlan(model=model, profile=profile, max_model_len=max_len, max_num_seqs=seqs,
                     max_num_batched_tokens=batched_tokens, tensor_parallel_size=tp_size, block_size=block_size,
                     dtype=dtype, kv_cache_dtype=kv_key, gpu_memory_utilization=util, kv_bytes=kv_mem, layout=layout,
                     capacity=cap, lora=lora, memory=memory, env=env, hf_overrides=hf_overrides, training_ratio=ratio,
                     warnings=warnings, reasons=reasons)


# --- pieces -------------------------------------------------------------------------------

def _context_limit(model: ModelInfo, context: int | None, rope_scaling: str | None, why, warnings: list[str]):
    """The largest max_model_len allowed: the derived maximum, or past it only with YaRN."""
    derived = model.derived_max_len
    if context is None or context <= derived:
        return derived, None
    if rope_scaling is None:
        raise PlanError(f"--context {context} is above the derived maximum {derived} ({model.derived_max_len_reason}); "
                        f"largest feasible: {derived}. To go further, scale RoPE explicitly with --rope-scaling yarn")
    if rope_scaling != "yarn":
        raise PlanError(f"--rope-scaling {rope_scaling}: only 'yarn' is supported")
    why("hf_overrides", "YaRN", f"context {context} > derived {derived}: RoPE scaled by YaRN factor "
        f"{_yarn_factor(model, context):g} = {context} / original {_original_len(model)} on full-attention layers")
    warnings.append(f"max_model_len {context} is past the model's trained range ({derived}); YaRN is set through "
                    f"--hf-overrides; measure quality with `lcserve probe` before relying on it")
    return context, yarn_overrides(model, context)


def _explain_kv(why, model: ModelInfo, layout: KVLayout, cap: Capacity, kv_key: str, in_flight: int,
                in_flight_batches: int, batched: int) -> None:
    """The reasons behind the KV figures, as vLLM computes them."""
    why("KV bytes per token per layer", layout.bytes_per_token_layer,
        layout.equation + (f" ({kv_key} KV cache)" if kv_key != "auto" else ""))
    why("KV groups", layout.describe_groups(), f"{model.attention_summary}; " + (
        "one group holds all layers" if len(layout.groups) == 1 else
        f"vLLM's hybrid manager: groups of {layout.group_size} layers per kind, the last one padded"))
    why("bytes per block", layout.bytes_per_block,
        f"{max(g.layers for g in layout.groups)} layers x block {layout.block_size} tokens x {layout.bytes_per_token_layer} B")
    why("num_blocks", cap.num_blocks, f"floor({cap.kv_bytes} B KV cache / {layout.bytes_per_block} B per block)")
    why("blocks per request", cap.blocks_per_request,
        _per_request_reason(layout, cap.max_model_len, in_flight, in_flight_batches, batched))
    why("max concurrency at full context", f"{cap.max_concurrency:.2f}",
        f"{cap.num_blocks} blocks / {cap.blocks_per_request} blocks per request at {cap.max_model_len} tokens")
    why("KV cache capacity (tokens)", cap.kv_tokens, f"int({cap.max_concurrency:.4f} x max_model_len {cap.max_model_len})")


def _serving_dtype(model: ModelInfo, profile: Profile) -> str:
    """vLLM's "auto" dtype: the config dtype, float32 downcast, bf16 only where supported."""
    dtype = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32"}.get(model.dtype, model.dtype)
    if dtype not in DTYPE_BYTES:
        dtype = "bfloat16"
    if dtype == "float32" or (dtype == "bfloat16" and not profile.bf16):
        dtype = "bfloat16" if profile.bf16 else "float16"
    return dtype


def _weight_bytes(model: ModelInfo, dtype_bytes: int) -> int:
    """Weights as vLLM holds them: the stored bytes for quantized models, else params x dtype."""
    return model.weight_bytes if model.quantization else model.param_count * dtype_bytes


def _gpu_util(profile: Profile) -> float:
    util = est.GPU_MEMORY_UTILIZATION
    if profile.free_bytes is not None and not profile.is_cpu:
        util = min(util, int(100 * (profile.free_bytes - est.GPU_FREE_MARGIN_BYTES) / profile.memory_bytes) / 100)
        if util <= 0:
            raise PlanError(f"{profile.name}: only {_gib(profile.free_bytes)} free of {_gib(profile.memory_bytes)}; "
                            "free the GPU (other processes hold it) and plan again")
    return util


def _util_reason(profile: Profile, util: float) -> str:
    text = "vLLM default 0.92 minus 0.02 for the error of the estimates"
    if profile.free_bytes is not None and util < est.GPU_MEMORY_UTILIZATION:
        text = (f"detected free memory {_gib(profile.free_bytes)} - {_gib(est.GPU_FREE_MARGIN_BYTES)} margin, "
                f"as a fraction of {_gib(profile.memory_bytes)} (other processes use the GPU)")
    return text


def _batch_sizes(profile: Profile, model: ModelInfo, concurrency: int | None):
    """max_num_seqs and max_num_batched_tokens (a function of max_model_len), mirroring
    vLLM's API-server defaults (engine/arg_utils.py get_batch_defaults) unless --concurrency."""
    if profile.is_cpu:
        default_batched, default_seqs, source = 2048, 128, "vLLM CPU default"
    elif profile.memory_bytes >= 160 * GIB:
        default_batched, default_seqs, source = 16384, 1024, "vLLM default for >= 160 GiB GPUs"
    elif profile.memory_bytes >= 70 * GIB and "a100" not in profile.name.lower():
        default_batched, default_seqs, source = 8192, 1024, "vLLM default for >= 70 GiB GPUs (not A100)"
    else:
        default_batched, default_seqs, source = 2048, 256, "vLLM default"
    seqs = concurrency or default_seqs
    no_chunked = profile.is_cpu and model.mla is not None and not profile.amx

    def batched(max_len: int) -> int:
        if no_chunked:  # vLLM's CPU MLA kernel disables chunked prefill and forces this
            return max(max_len, 2048)
        return max(default_batched, seqs)

    why = {
        "seqs": f"--concurrency {concurrency}" if concurrency else f"{source} ({default_seqs}); requests beyond KV capacity wait",
        "batched": ("CPU MLA without AMX: vLLM disables chunked prefill and sets max(max_model_len, 2048)" if no_chunked
                    else f"{source} ({default_batched}), at least max_num_seqs; chunked prefill splits longer prompts"),
    }
    return seqs, batched, why


def _heads_ok(model: ModelInfo, t: int) -> bool:
    if model.num_attention_heads % t:
        return False
    if model.mla:
        return True
    kv = model.num_kv_heads
    return kv % t == 0 or t % kv == 0


def _choose_tp(profile: Profile, model: ModelInfo, tp: int | None) -> int:
    if tp is None:
        return 1
    if profile.is_cpu and tp != 1:
        raise PlanError(f"--tp {tp}: the CPU profile plans one engine (tensor parallel size 1)")
    feasible = [t for t in range(1, profile.count + 1) if _heads_ok(model, t)]
    if tp > profile.count or not _heads_ok(model, tp):
        problem = (f"the profile has {profile.count} GPU(s)" if tp > profile.count else
                   f"{model.num_attention_heads} attention heads / {model.num_kv_heads} KV heads are not divisible by it")
        raise PlanError(f"--tp {tp}: {problem}; largest feasible: --tp {max(feasible)}")
    return tp


def _auto_tp(profile, model, target_len, requests, layout_for, budget_for, batched, in_flight_batches) -> int:
    """Smallest power-of-two TP whose KV budget fits `requests` at `target_len`, else the
    smallest that fits anything (the context is then reduced), else the largest."""
    candidates = [t for t in (1, 2, 4, 8, 16, 32) if t <= profile.count and _heads_ok(model, t)]

    def room(t: int) -> tuple[KVLayout, int]:
        return layout_for(t), budget_for(t, target_len)[0]

    for t in candidates:
        layout, kv_budget = room(t)
        if kv_budget >= 2 * layout.bytes_per_block and fits(
                layout, kv_budget, target_len, in_flight_batches * batched(target_len), requests):
            return t
    for t in candidates:
        layout, kv_budget = room(t)
        if kv_budget >= 2 * layout.bytes_per_block:
            return t
    return candidates[-1]


def _tp_reason(profile: Profile, model: ModelInfo, t: int, requested: int | None) -> str:
    heads = f"{model.num_attention_heads} heads, {model.num_kv_heads} KV heads divisible"
    if requested:
        return f"--tp {requested} ({heads})"
    if profile.is_cpu:
        return "CPU engine: one process"
    return f"smallest power of two <= {profile.count} GPU(s) whose KV budget fits the target ({heads})"


def _per_request_reason(layout: KVLayout, max_len: int, in_flight: int, batches: int, batched: int) -> str:
    parts = []
    for g in layout.groups:
        n = g.blocks_per_request(max_len, layout.block_size, in_flight)
        if g.kind == "sliding":
            parts.append(f"sliding: cdiv(min({g.window} - 1 + {in_flight}, {max_len}), {layout.block_size}) + 1 = {n}")
        else:
            parts.append(f"{g.kind}: cdiv({max_len}, {layout.block_size}) = {n}")
    counted = {}
    for p in parts:
        counted[p] = counted.get(p, 0) + 1
    text = " + ".join(f"{c} x [{p}]" if c > 1 else f"[{p}]" for p, c in counted.items())
    if any(g.kind == "sliding" for g in layout.groups):
        text += f"; in-flight tokens = {batches} batch(es) x max_num_batched_tokens {batched}"
    return text


def _does_not_fit(profile: Profile, model: ModelInfo, t: int, memory: dict[str, int], kv_budget: int,
                  enough_tp: int | None) -> str:
    used = ", ".join(f"{k.replace('_', ' ')} {_gib(v)}" for k, v in memory.items())
    if profile.is_cpu:
        return (f"{model.path.name} does not fit {profile.name} at any context: {used} leave {_gib(max(kv_budget, 0))} "
                f"of {_gib(profile.memory_bytes)} available RAM for the KV cache (need >= 1 GiB); largest feasible: none "
                "on this machine - free RAM or use a smaller/quantized model")
    hint = (f"largest feasible on {profile.count} GPU(s): none; it fits from --gpus {enough_tp} --tp {enough_tp}"
            if enough_tp else "largest feasible: none up to TP 32; use a quantized model")
    return (f"{model.path.name} does not fit {profile.count} x {profile.name} at any context with TP {t}: per GPU {used} "
            f"leave {_gib(kv_budget)} of {_gpu_util(profile)} x {_gib(profile.memory_bytes)} for the KV cache; {hint}")


def _plan_lora(model: ModelInfo, adapters: list[AdapterInfo], dtype_bytes: int) -> LoraPlan:
    rank = max(a.rank for a in adapters)
    allowed = [r for r in ALLOWED_LORA_RANKS if r >= rank]
    if not allowed:
        raise PlanError(f"adapter rank {rank} is above vLLM's largest max_lora_rank {ALLOWED_LORA_RANKS[-1]}; "
                        f"largest feasible: {ALLOWED_LORA_RANKS[-1]} (merge this adapter into the base instead)")
    modules = _wrapped_modules(model, adapters)
    if not modules:
        raise PlanError(f"no module of {model.path} matches the adapters' target_modules "
                        f"({', '.join(str(a.target_modules) for a in adapters)}); is the adapter for this base?")
    names = tuple(sorted({m.rsplit(".", 1)[-1] for m in modules}))
    plan = LoraPlan(max_loras=len(adapters), max_lora_rank=allowed[0], target_modules=names, buffer_bytes=0)
    return LoraPlan(plan.max_loras, plan.max_lora_rank, names, _lora_buffer_bytes(model, plan, 1, dtype_bytes))


def _wrapped_modules(model: ModelInfo, adapters: list[AdapterInfo]) -> set[str]:
    """Full module names vLLM wraps for these adapters (packed siblings included)."""
    layer_modules = [m for m in model.linear_shapes if ".layers." in m or ".h." in m]
    matched: set[str] = set()
    for a in adapters:
        t = a.target_modules
        for m in layer_modules:
            if t == "all-linear" or (isinstance(t, str) and re.fullmatch(t, m)) or (
                    not isinstance(t, str) and any(m == x or m.endswith("." + x) for x in t)):
                matched.add(m)
    for m in list(matched):
        parent, short = m.rsplit(".", 1)
        for group in PACKED:
            if short in group:
                matched |= {f"{parent}.{s}" for s in group if f"{parent}.{s}" in model.linear_shapes}
    return matched


def _lora_buffer_bytes(model: ModelInfo, lora: LoraPlan, t: int, dtype_bytes: int) -> int:
    """max_loras x max_lora_rank x sum(in + out) x dtype bytes, with TP sharding of
    column-parallel outputs and row-parallel inputs (vLLM lora/layers create_lora_weights)."""
    total = 0
    wanted = set(lora.target_modules) | {s for g in PACKED if g & set(lora.target_modules) for s in g}
    for name, (out, inp) in model.linear_shapes.items():
        short = name.rsplit(".", 1)[-1]
        if short not in wanted or not (".layers." in name or ".h." in name):
            continue
        if short in ROW_PARALLEL:
            inp //= t
        elif not short.startswith(REPLICATED_HINTS):
            out //= t
        total += inp + out
    return lora.max_loras * lora.max_lora_rank * total * dtype_bytes


def _training_ratio(adapters: list[AdapterInfo], max_len: int, threshold: float,
                    reasons: list[Reason], warnings: list[str]) -> float | None:
    known = [a for a in adapters if a.training_seq_len]
    if not known:
        if adapters:
            reasons.append(Reason("training length", "unknown", "no lcserve_adapter.json / axolotl sequence_len / "
                                  "training_args beside the adapter; pass --training-len to check serving vs training length"))
        return None
    shortest = min(known, key=lambda a: a.training_seq_len)
    ratio = max_len / shortest.training_seq_len
    reasons.append(Reason("max_model_len / training length", f"{ratio:.1f}x",
                          f"{max_len} / {shortest.training_seq_len} ({shortest.path.name}); warning above {threshold:g}x"))
    if ratio > threshold:
        warnings.append(f"max_model_len {max_len} is {ratio:.0f}x the training length {shortest.training_seq_len} of "
                        f"adapter {shortest.path.name}: quality past {shortest.training_seq_len} tokens is unmeasured; "
                        f"run the long-context probes (`lcserve probe`) before serving long prompts, or lower --context")
    return ratio


def _original_len(model: ModelInfo) -> int:
    for p in model.rope_parameters.values():
        if p.get("original_max_position_embeddings"):
            return int(p["original_max_position_embeddings"])
    return model.derived_max_len


def _yarn_factor(model: ModelInfo, context: int) -> float:
    return -(-100 * context // _original_len(model)) / 100


def yarn_overrides(model: ModelInfo, context: int) -> dict:
    """The `--hf-overrides` that make vLLM apply YaRN and accept `context` as max_model_len.

    vLLM treats a YaRN max_position_embeddings as already scaled, so the override sets it
    (and model_max_length, which caps it through the tokenizer config) to the new length.
    With per-layer-type RoPE (Gemma 3) only full-attention layers are scaled: sliding
    layers never see distances beyond their window.
    """
    yarn = {"rope_type": "yarn", "factor": _yarn_factor(model, context), "original_max_position_embeddings": _original_len(model)}
    params = model.rope_parameters
    if set(params) == {"default"}:
        rope = {**params["default"], **yarn}
    else:
        rope = {k: ({**v, **yarn} if k == "full_attention" else dict(v)) for k, v in params.items()}
    return {"max_position_embeddings": context, "model_max_length": context, "rope_parameters": rope}


def _gib(n: int | float) -> str:
    return f"{n / GIB:.2f} GiB"
