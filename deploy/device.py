"""The facts every step of the plan shares (`Device`): the profile and the model, the dtypes, the block
size, the LoRA slots, vLLM's batch sizes and the fraction of a GPU vLLM may use, each chosen here with
its reason.
"""

from __future__ import annotations

from dataclasses import dataclass

from lcserve.adapters.reader import LoraAdapter
from lcserve.errors import PlanError
from lcserve.model_config import ModelInfo
from lcserve.model_facts import DTYPE_BYTES, DTYPE_NAMES, GIB, TORCH_NAMES, dtype_code
from lcserve.vllm_rules import KV_CACHE_DTYPES

from . import estimates as est
from .hardware import Profile
from .kv import KVLayout, kv_layout, pp_partitions
from .lora_buffers import plan_lora
from .plan_types import Choice, LoraPlan, PlanRequest, Reason, gib
from .state import state_spec, state_splits

TP_SIZES = (1, 2, 4, 8, 16, 32)  # the tensor parallel sizes the planner tries


@dataclass(frozen=True)
class BatchSizes:
    """vLLM's max_num_seqs and max_num_batched_tokens (which may depend on max_model_len)."""

    max_num_seqs: int
    default_batched: int
    no_chunked_prefill: bool  # vLLM's CPU MLA kernel without AMX: batched tokens follow max_model_len
    why_seqs: str
    why_batched: str
    requested_batched: int | None = None

    def batched(self, max_model_len: int) -> int:
        if self.requested_batched:
            return self.requested_batched
        if self.no_chunked_prefill:
            return max(max_model_len, 2048)
        return max(self.default_batched, self.max_num_seqs)


@dataclass(frozen=True)
class Device:
    """The facts every step of the plan shares: hardware, model, dtypes, LoRA, batch sizes."""

    profile: Profile
    model: ModelInfo
    dtype: str  # what vLLM serves the weights in
    dtype_bytes: int
    kv_element_bytes: int
    block_size: int
    lora: LoraPlan | None
    batch: BatchSizes
    gpu_memory_utilization: float | None  # GPU only: the fraction of the device vLLM may use
    pp: int = 1  # pipeline stages; every stage gets the smallest block count of them (vLLM's rule)

    @property
    def stage_layers(self) -> int:
        return max(pp_partitions(len(self.model.layers), self.pp))

    @property
    def in_flight_batches(self) -> int:
        """vLLM's max_concurrent_batches (config/vllm.py): a pipeline keeps one batch per stage in flight,
        and async scheduling (GPUs; its model runner V2) one more; the CPU build schedules synchronously."""
        return self.pp if self.profile.is_cpu else self.pp + 1

    def in_flight_tokens(self, max_model_len: int) -> int:
        return self.in_flight_batches * self.batch.batched(max_model_len)

    def layout(self, tp: int) -> KVLayout:
        """The KV groups on one TP rank; a hybrid's state layers too (their shapes depend on TP)."""
        state = state_spec(self.model, tp, self.dtype, self.profile.is_cpu, self.profile.bf16)
        return kv_layout(self.model, self.kv_element_bytes, self.block_size, tp, self.pp, state)


def device_facts(
    profile: Profile, model: ModelInfo, adapters: list[LoraAdapter], request: PlanRequest, pp: int = 1
) -> Choice[Device]:
    """Dtypes, block size, LoRA slots, batch sizes and the GPU memory fraction: what the later steps share."""
    dtype = serving_dtype(model, profile)
    dtype_bytes = DTYPE_BYTES[dtype_code(dtype)]
    kv_element_bytes = KV_CACHE_DTYPES[request.kv_cache_dtype] or dtype_bytes
    warnings = ()
    if kv_element_bytes == 1 and not profile.fp8 and not profile.is_cpu:
        warnings = (
            f"{profile.name} has no fp8 tensor cores: the fp8 KV cache saves memory but is converted for compute",
        )
    block_size = choose_block_size(profile, model, request)
    lora = plan_lora(model, adapters, dtype_bytes) if adapters else Choice(None)
    util = choose_gpu_memory_utilization(profile, request)
    device = Device(
        profile=profile,
        model=model,
        dtype=dtype,
        dtype_bytes=dtype_bytes,
        kv_element_bytes=kv_element_bytes,
        block_size=block_size.value,
        lora=lora.value,
        batch=batch_sizes(profile, model, request.max_num_seqs, request.max_num_batched_tokens),
        gpu_memory_utilization=util.value,
        pp=pp,
    )
    served_as = "" if dtype == model.dtype else f", served as {dtype} (vLLM's choice on {profile.name})"
    dtype_reason = Reason("dtype", dtype, f"config dtype {model.dtype}" + served_as)
    reasons = (dtype_reason, *block_size.reasons, *util.reasons, *lora.reasons)
    return Choice(device, reasons=reasons, warnings=warnings)


def serving_dtype(model: ModelInfo, profile: Profile) -> str:
    """vLLM's "auto" dtype: the config dtype, float32 downcast, bf16 only where supported."""
    dtype = TORCH_NAMES[DTYPE_NAMES.get(model.dtype, "BF16")]
    if dtype == "float32" or (dtype == "bfloat16" and not profile.bf16):
        dtype = "bfloat16" if profile.bf16 else "float16"
    return dtype


def choose_block_size(profile: Profile, model: ModelInfo, request: PlanRequest) -> Choice[int]:
    """The requested block size, else the profile's (its MLA one for MLA models)."""
    if request.block_size:
        size, why = request.block_size, f"requested {request.block_size}"
    else:
        size = profile.mla_block_size if model.mla else profile.block_size
        kind = "MLA block size of the profile" if model.mla else "profile block size"
        why = f"{kind} ({profile.name}); passed explicitly so vLLM uses the plan's arithmetic"
    return Choice(size, reasons=(Reason("block_size", str(size), why),))


def choose_gpu_memory_utilization(profile: Profile, request: PlanRequest) -> Choice[float | None]:
    """The requested fraction, else vLLM's default less a margin for the estimates, lowered to what is
    free when other processes hold the GPU; None on the CPU build, which sizes its KV cache in GiB."""
    if profile.is_cpu:
        return Choice(None)
    if request.gpu_memory_utilization:
        util, why = request.gpu_memory_utilization, f"requested {request.gpu_memory_utilization}"
    else:
        util = _default_gpu_util(profile)
        why = _default_util_reason(profile, util)
    return Choice(util, reasons=(Reason("gpu_memory_utilization", str(util), why),))


def _default_gpu_util(profile: Profile) -> float:
    util = est.GPU_MEMORY_UTILIZATION
    if profile.free_bytes is not None and not profile.is_cpu:
        util = min(util, int(100 * (profile.free_bytes - est.GPU_FREE_MARGIN_BYTES) / profile.memory_bytes) / 100)
        if util <= 0:
            raise PlanError(
                f"{profile.name}: only {gib(profile.free_bytes)} free of {gib(profile.memory_bytes)}; "
                "free the GPU (other processes hold it) and plan again"
            )
    return util


def _default_util_reason(profile: Profile, util: float) -> str:
    text = "vLLM default 0.92 minus 0.02 for the error of the estimates"
    if profile.free_bytes is not None and util < est.GPU_MEMORY_UTILIZATION:
        text = (
            f"detected free memory {gib(profile.free_bytes)} - {gib(est.GPU_FREE_MARGIN_BYTES)} margin, "
            f"as a fraction of {gib(profile.memory_bytes)} (other processes use the GPU)"
        )
    return text


def batch_sizes(
    profile: Profile, model: ModelInfo, max_num_seqs: int | None, max_num_batched_tokens: int | None = None
) -> BatchSizes:
    """max_num_seqs and max_num_batched_tokens: the requested values, else vLLM's API-server
    defaults (engine/arg_utils.py get_batch_defaults)."""
    if profile.is_cpu:
        default_batched, default_seqs, source = 2048, 128, "vLLM CPU default"
    elif profile.memory_bytes >= 160 * GIB:
        default_batched, default_seqs, source = 16384, 1024, "vLLM default for >= 160 GiB GPUs"
    elif profile.memory_bytes >= 70 * GIB and "a100" not in profile.name.lower():
        default_batched, default_seqs, source = 8192, 1024, "vLLM default for >= 70 GiB GPUs (not A100)"
    else:
        default_batched, default_seqs, source = 2048, 256, "vLLM default"
    no_chunked = profile.is_cpu and model.mla is not None and not profile.amx
    return BatchSizes(
        max_num_seqs=max_num_seqs or default_seqs,
        default_batched=default_batched,
        no_chunked_prefill=no_chunked,
        why_seqs=(
            f"requested {max_num_seqs}: vLLM's cap on sequences in one batch"
            if max_num_seqs
            else f"{source} ({default_seqs}); requests beyond KV capacity wait"
        ),
        why_batched=(
            f"requested {max_num_batched_tokens}"
            if max_num_batched_tokens
            else "CPU MLA without AMX: vLLM disables chunked prefill and sets max(max_model_len, 2048)"
            if no_chunked
            else f"{source} ({default_batched}), at least max_num_seqs; chunked prefill splits longer prompts"
        ),
        requested_batched=max_num_batched_tokens,
    )


def batch_settings(batch: BatchSizes, max_model_len: int) -> Choice[int]:
    """max_num_batched_tokens at the chosen max_model_len, with the reasons for both batch sizes."""
    batched = batch.batched(max_model_len)
    reasons = (
        Reason("max_num_seqs", str(batch.max_num_seqs), batch.why_seqs),
        Reason("max_num_batched_tokens", str(batched), batch.why_batched),
    )
    return Choice(batched, reasons=reasons)


def heads_split(model: ModelInfo, tp: int) -> bool:
    """Whether `tp` ranks can share the attention heads (and the KV heads, or replicate them)."""
    if model.num_attention_heads % tp or (model.state is not None and not state_splits(model.state, tp)):
        return False
    if model.mla:
        return True
    kv = model.num_kv_heads
    return kv % tp == 0 or tp % kv == 0
