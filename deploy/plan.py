"""The capacity planner: profile + model + adapters + targets -> vLLM settings, each with its reason.

Pure functions over dataclasses; reading files and detecting hardware happen before.
The KV arithmetic is vLLM's own (see `kv.py`); what vLLM measures at startup on a GPU is
estimated (see `estimates.py`) and labelled so in the reasons.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lcserve.adapters.reader import LoraAdapter
from lcserve.errors import PlanError
from lcserve.model_config import ModelInfo
from lcserve.model_facts import DTYPE_BYTES, DTYPE_NAMES, GIB, TORCH_NAMES, cdiv, dtype_code
from lcserve.vllm_rules import ALLOWED_MAX_LORA_RANKS, KV_CACHE_DTYPES, round_max_lora_rank

from . import estimates as est
from .hardware import Profile
from .kv import Capacity, KVLayout, capacity, fits, kv_layout, largest_fitting_len, pp_partitions
from .plan_types import TRAINING_RATIO_WARN, LoraPlan, PlanRequest, Reason, ServePlan
from .speed_plan import with_predictions

__all__ = ["TRAINING_RATIO_WARN", "LoraPlan", "PlanRequest", "Reason", "ServePlan", "plan_deployment"]

# vLLM packs these projections into one wrapped layer (qkv_proj, gate_up_proj): targeting
# any member allocates LoRA buffers for all of them.
PACKED = ({"q_proj", "k_proj", "v_proj"}, {"gate_proj", "up_proj"})
ROW_PARALLEL = {"o_proj", "down_proj", "out_proj", "dense", "fc2", "w2", "c_proj", "wo"}
REPLICATED_HINTS = ("q_a_proj", "kv_a_proj", "kv_a_proj_with_mqa")


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
        return kv_layout(self.model, self.kv_element_bytes, self.block_size, tp, self.pp)

    def kv_budget(self, tp: int, max_model_len: int) -> tuple[int, dict[str, int]]:
        """KV bytes left on one device at tensor parallel size `tp`, and what takes the rest."""
        profile, model, lora = self.profile, self.model, self.lora
        share = self.stage_layers / max(len(model.layers), 1)  # 1 without pipeline parallelism
        memory = {"weights": int(_weight_bytes(model, self.dtype_bytes) * share) // tp}
        if lora:
            memory["lora_buffers"] = int(_lora_buffer_bytes(model, lora, tp, self.dtype_bytes) * share)
        if profile.is_cpu:  # the ranks share one machine's RAM; VLLM_CPU_KVCACHE_SPACE is per rank
            ranks = tp * self.pp
            overhead = est.CPU_RUNTIME_OVERHEAD_BYTES + (ranks - 1) * est.CPU_WORKER_OVERHEAD_BYTES
            memory["runtime_overhead_estimate"] = overhead // ranks
            usable = profile.memory_bytes // ranks - sum(memory.values())
            return (max(usable, 0) // GIB) * GIB, memory  # VLLM_CPU_KVCACHE_SPACE takes whole GiB
        act = est.activation_estimate_bytes(
            self.batch.batched(max_model_len),
            self.batch.max_num_seqs,
            model.hidden_size,
            model.intermediate_size,
            model.vocab_size,
            tp,
            self.dtype_bytes,
        )
        memory |= {
            "activation_estimate": act,
            "cuda_graph_estimate": est.CUDA_GRAPH_ESTIMATE_BYTES,
            "non_torch_estimate": est.NON_TORCH_ESTIMATE_BYTES + (est.NCCL_ESTIMATE_BYTES if tp > 1 else 0),
        }
        return int(self.gpu_memory_utilization * profile.memory_bytes) - sum(memory.values()), memory


def plan_deployment(
    profile: Profile, model: ModelInfo, adapters: list[LoraAdapter] | tuple = (), request: PlanRequest | None = None
) -> ServePlan:
    """Plan a vLLM deployment, one named step at a time; PlanError (with the largest feasible
    value, naming the setting) when impossible."""
    request = request or PlanRequest()
    reasons: list[Reason] = []
    warnings: list[str] = []
    check_request(request, profile)
    limit, hf_overrides = context_limit(model, request, reasons, warnings)
    pp = choose_pipeline_parallel(profile, model, request, reasons, warnings, bool(adapters))
    device = device_facts(profile, model, list(adapters), request, warnings, pp)
    full_context_target = request.full_context_requests or 1
    tp = choose_tensor_parallel(device, request, limit, full_context_target)
    layout = device.layout(tp)
    kv_bytes, memory = device.kv_budget(tp, request.max_model_len or limit)
    if kv_bytes < 2 * layout.bytes_per_block:
        raise does_not_fit(device, tp, request.max_model_len or limit)
    if request.kv_cache_gib is not None:
        kv_bytes = fixed_cpu_kv_cache(request.kv_cache_gib, kv_bytes, profile)
    max_len = choose_max_model_len(device, layout, kv_bytes, request, limit, full_context_target, tp, reasons)
    kv_bytes, env, util = size_kv_cache(device, layout, kv_bytes, max_len, request, memory, reasons)
    backend = choose_executor(device, tp, request.nodes, env, reasons)
    memory["kv_cache"] = kv_bytes
    cap = capacity(layout, kv_bytes, max_len, device.in_flight_tokens(max_len))
    explain_choices(device, layout, cap, request, tp, max_len, list(adapters), memory, reasons)
    fit_len = max_num_seqs_fit_len(device, layout, cap, max_len, request, reasons, warnings)
    replicas = choose_replicas(device, cap, request, tp, reasons)
    ratio = _training_ratio(list(adapters), max_len, request.training_ratio_warn, reasons, warnings)
    warnings += model.rope_findings
    plan = ServePlan(
        model=model,
        profile=profile,
        max_model_len=max_len,
        max_num_seqs=device.batch.max_num_seqs,
        max_num_batched_tokens=device.batch.batched(max_len),
        tensor_parallel_size=tp,
        block_size=device.block_size,
        dtype=_serving_dtype(model, profile),
        kv_cache_dtype=request.kv_cache_dtype,
        gpu_memory_utilization=util,
        kv_bytes=kv_bytes,
        layout=layout,
        capacity=cap,
        lora=device.lora,
        memory=memory,
        env=env,
        hf_overrides=hf_overrides,
        training_ratio=ratio,
        warnings=warnings,
        reasons=reasons,
        max_num_seqs_fit_len=fit_len,
        pipeline_parallel_size=pp,
        nodes=request.nodes,
        replicas=replicas,
        distributed_executor_backend=backend,
        layers_per_stage=tuple(pp_partitions(len(model.layers), pp)),
        in_flight_tokens=device.in_flight_tokens(max_len),
    )
    return with_predictions(plan, request, list(adapters), lambda r: plan_deployment(profile, model, adapters, r))


# --- the steps, in the order plan_deployment takes them ----------------------------------------


def check_request(request: PlanRequest, profile: Profile) -> None:
    """Values no plan can take, whatever the model."""
    if request.max_model_len is not None and request.max_model_len < 1:
        raise PlanError(
            f"{{max_model_len}} {request.max_model_len}: must be a positive number of tokens", "max_model_len"
        )
    for setting in (
        "max_num_seqs",
        "full_context_requests",
        "max_num_batched_tokens",
        "block_size",
        "pipeline_parallel_size",
        "target_concurrency",
        "expected_prompt_len",
        "expected_output_len",
        "nodes",
    ):
        if getattr(request, setting) is not None and getattr(request, setting) < 1:
            raise PlanError(f"{{{setting}}} {getattr(request, setting)}: must be at least 1", setting)
    for setting in ("slo_ttft_ms", "slo_itl_ms"):
        if getattr(request, setting) is not None and not getattr(request, setting) > 0:
            raise PlanError(
                f"{{{setting}}} {getattr(request, setting):g}: a latency target must be above 0 ms", setting
            )
    if request.kv_cache_dtype not in KV_CACHE_DTYPES:
        raise PlanError(
            f"{{kv_cache_dtype}} {request.kv_cache_dtype}: choose one of {', '.join(KV_CACHE_DTYPES)}", "kv_cache_dtype"
        )
    if profile.is_cpu and request.nodes > 1:
        raise PlanError(
            f"{{nodes}} {request.nodes}: the CPU profile plans one machine; drop {{nodes}} (or plan a GPU profile)",
            "nodes",
        )
    if request.kv_cache_gib is not None and not profile.is_cpu:
        raise PlanError(
            "{kv_cache_gib} sets VLLM_CPU_KVCACHE_SPACE for the CPU profile; on GPUs the KV cache is what "
            "gpu_memory_utilization leaves after weights and activations",
            "kv_cache_gib",
        )


def device_facts(
    profile: Profile,
    model: ModelInfo,
    adapters: list[LoraAdapter],
    request: PlanRequest,
    warnings: list[str],
    pp: int = 1,
) -> Device:
    """Dtypes, block size, LoRA buffers and batch sizes: what the later steps share."""
    dtype_bytes = DTYPE_BYTES[dtype_code(_serving_dtype(model, profile))]
    kv_element_bytes = KV_CACHE_DTYPES[request.kv_cache_dtype] or dtype_bytes
    if kv_element_bytes == 1 and not profile.fp8 and not profile.is_cpu:
        warnings.append(
            f"{profile.name} has no fp8 tensor cores: the fp8 KV cache saves memory but is converted for compute"
        )
    return Device(
        profile=profile,
        model=model,
        dtype_bytes=dtype_bytes,
        kv_element_bytes=kv_element_bytes,
        block_size=request.block_size or (profile.mla_block_size if model.mla else profile.block_size),
        lora=_plan_lora(model, adapters, dtype_bytes) if adapters else None,
        batch=batch_sizes(profile, model, request.max_num_seqs, request.max_num_batched_tokens),
        gpu_memory_utilization=None if profile.is_cpu else request.gpu_memory_utilization or _gpu_util(profile),
        pp=pp,
    )


def choose_pipeline_parallel(
    profile: Profile,
    model: ModelInfo,
    request: PlanRequest,
    reasons: list[Reason],
    warnings: list[str],
    lora: bool = False,
) -> int:
    """One pipeline stage per node (tensor parallelism stays inside a node, on its fast links), or the
    requested size; the layers split as vLLM splits them."""
    nodes, layers = request.nodes, len(model.layers)
    pp = request.pipeline_parallel_size or nodes
    if pp > layers:
        raise PlanError(
            f"{{pipeline_parallel_size}} {pp}: {model.path.name} has {layers} layers and each stage needs at "
            f"least one; largest feasible: {{pipeline_parallel_size}} {layers}",
            "pipeline_parallel_size",
        )
    if nodes > 1 and pp != nodes:
        raise PlanError(
            f"{{pipeline_parallel_size}} {pp} with {{nodes}} {nodes}: the plan puts one pipeline stage on each "
            f"node; give {{pipeline_parallel_size}} {nodes} or leave it out",
            "pipeline_parallel_size",
        )
    if profile.is_cpu and pp > 1 and lora:
        raise PlanError(
            f"{{pipeline_parallel_size}} {pp} with adapters: vLLM 0.32's CPU build runs LoRA in eager mode only, "
            "and in eager mode pipeline parallelism dies on the last rank (sync_and_gather_intermediate_tensors); "
            "use {tensor_parallel_size} 2 instead, or merge the adapter (`lcserve adapters merge`)",
            "pipeline_parallel_size",
        )
    if profile.is_cpu and pp > (profile.cores or 1):
        raise PlanError(
            f"{{pipeline_parallel_size}} {pp}: the CPU profile has {profile.cores or 1} core(s), one or more per "
            f"rank; largest feasible: {{pipeline_parallel_size}} {profile.cores or 1}",
            "pipeline_parallel_size",
        )
    if profile.is_cpu and pp > 1:
        warnings.append(
            "pipeline parallelism on vLLM's CPU build works compiled only: start vLLM without --enforce-eager "
            "(which `lcserve serve` adds on the CPU build); the compile warm-up costs about a minute on 2 "
            "cores (benchmarks/bench_parallel_cpu.py measures it)"
        )
    if pp > 1:
        parts = pp_partitions(layers, pp)
        source = f"one stage per node (--nodes {nodes})" if nodes > 1 else "requested"
        reasons.append(
            Reason(
                "pipeline_parallel_size",
                str(pp),
                f"{source}; {layers} layers split {parts} (vLLM's get_pp_indices: even "
                "shares, the remainder to the stages before the last); the plan sizes the stage with the most "
                "layers",
            )
        )
    return pp


def has_room(device: Device, tp: int, max_model_len: int) -> bool:
    """Whether the KV budget at `tp` holds at least one block beside vLLM's null block."""
    return device.kv_budget(tp, max_model_len)[0] >= 2 * device.layout(tp).bytes_per_block


def choose_tensor_parallel(device: Device, request: PlanRequest, limit: int, full_context_target: int) -> int:
    """The requested size (checked), 1 on the CPU, else the smallest power of two whose KV budget
    fits the target at full length, else the smallest that fits anything, else the largest."""
    profile, model = device.profile, device.model
    if request.tensor_parallel_size is not None:
        return _checked_tp(profile, model, request.tensor_parallel_size, device.pp, request.nodes)
    if profile.is_cpu:
        return 1
    if request.nodes > 1:  # every GPU of every node: a stage per node, TP across the node's GPUs
        return _checked_tp(profile, model, profile.count, device.pp, request.nodes)
    target_len = request.max_model_len or limit
    per_stage = profile.count // device.pp
    if per_stage < 1:
        raise PlanError(
            f"{{pipeline_parallel_size}} {device.pp}: the profile has {profile.count} GPU(s), fewer than the "
            f"stages; largest feasible: {{pipeline_parallel_size}} {profile.count}",
            "pipeline_parallel_size",
        )
    candidates = [t for t in (1, 2, 4, 8, 16, 32) if t <= per_stage and _heads_ok(model, t)]
    for t in candidates:
        kv_bytes = device.kv_budget(t, target_len)[0]
        if has_room(device, t, target_len) and fits(
            device.layout(t), kv_bytes, target_len, device.in_flight_tokens(target_len), full_context_target
        ):
            return t
    return next((t for t in candidates if has_room(device, t, target_len)), candidates[-1])


def does_not_fit(device: Device, tp: int, max_model_len: int) -> PlanError:
    """The model fits at no context: say what takes the memory and the smallest TP that would do."""
    enough = [
        t for t in (1, 2, 4, 8, 16, 32) if t > tp and _heads_ok(device.model, t) and has_room(device, t, max_model_len)
    ]
    kv_bytes, memory = device.kv_budget(tp, max_model_len)
    return PlanError(_does_not_fit(device, tp, memory, kv_bytes, enough[0] if enough else None))


def fixed_cpu_kv_cache(kv_cache_gib: int, kv_bytes: int, profile: Profile) -> int:
    """--kv-cache-gib, checked against what RAM leaves."""
    if kv_cache_gib < 1 or kv_cache_gib * GIB > kv_bytes:
        raise PlanError(
            f"{{kv_cache_gib}} {kv_cache_gib}: must be from 1 to what RAM allows; largest feasible: "
            f"{kv_bytes // GIB} (available {_gib(profile.memory_bytes)} - weights - runtime overhead)",
            "kv_cache_gib",
        )
    return kv_cache_gib * GIB


def choose_max_model_len(
    device: Device,
    layout: KVLayout,
    kv_bytes: int,
    request: PlanRequest,
    limit: int,
    full_context_target: int,
    tp: int,
    reasons: list[Reason],
) -> int:
    """The requested length when the target fits it, else the derived maximum, else the largest that fits."""
    model, in_flight = device.model, device.in_flight_tokens
    derived, n = model.derived_max_len, full_context_target
    wanted = request.max_model_len
    if wanted is not None:
        if not fits(layout, kv_bytes, wanted, in_flight(wanted), n):
            per_request = layout.blocks_per_request(wanted, in_flight(wanted))
            best_len = largest_fitting_len(layout, kv_bytes, limit, in_flight(limit), n)
            best_n = (kv_bytes // layout.bytes_per_block - 1) // per_request
            target = f" ({{full_context_requests}} {n})" if request.full_context_requests else ""
            raise PlanError(
                f"{{max_model_len}} {wanted} x {n} request(s) at full length{target} needs "
                f"{n * per_request + 1} KV blocks of {layout.bytes_per_block / 1024**2:.2f} MiB, the budget "
                f"holds {kv_bytes // layout.bytes_per_block} ({_gib(kv_bytes)}); largest feasible: "
                f"{{max_model_len}} {best_len}"
                + (f" at {n} request(s), or {best_n} request(s) at {{max_model_len}} {wanted}" if n > 1 else ""),
                "max_model_len",
            )
        reasons.append(
            Reason(
                "max_model_len",
                str(wanted),
                f"requested {wanted} (derived maximum {derived}: {model.derived_max_len_reason})",
            )
        )
        return wanted
    if fits(layout, kv_bytes, limit, in_flight(limit), n):
        reasons.append(Reason("max_model_len", str(limit), f"the derived maximum ({model.derived_max_len_reason})"))
        return limit
    best = largest_fitting_len(layout, kv_bytes, limit, in_flight(limit), n)
    if best < 1:
        raise does_not_fit(device, tp, limit)
    reasons.append(
        Reason(
            "max_model_len",
            str(best),
            f"largest length at which {n} request(s) fit the KV budget "
            f"{_gib(kv_bytes)} (bisection, as vLLM's --max-model-len auto); derived maximum {derived} "
            "does not fit",
        )
    )
    return best


def size_kv_cache(
    device: Device,
    layout: KVLayout,
    kv_bytes: int,
    max_len: int,
    request: PlanRequest,
    memory: dict[str, int],
    reasons: list[Reason],
) -> tuple[int, dict[str, str], float | None]:
    """(KV cache bytes, environment, gpu_memory_utilization). The CPU build takes the size in
    whole GiB (VLLM_CPU_KVCACHE_SPACE); a GPU takes a memory fraction and keeps what is left."""
    profile = device.profile
    if profile.is_cpu and request.kv_cache_gib:
        reasons.append(Reason("VLLM_CPU_KVCACHE_SPACE", str(request.kv_cache_gib), "--kv-cache-gib"))
        return kv_bytes, {"VLLM_CPU_KVCACHE_SPACE": str(request.kv_cache_gib)}, None
    if profile.is_cpu:
        n = request.full_context_requests or profile.default_concurrency
        per_request = layout.blocks_per_request(max_len, device.in_flight_tokens(max_len))
        need = cdiv((n * per_request + 1) * layout.bytes_per_block, GIB)
        gib = max(1, min(need, kv_bytes // GIB))
        source = "--full-context-requests" if request.full_context_requests else "profile default_concurrency"
        capped = "" if gib == max(1, need) else f", capped at what RAM allows ({gib} GiB)"
        reasons.append(
            Reason(
                "VLLM_CPU_KVCACHE_SPACE",
                str(gib),
                f"ceil(({n} request(s) x {per_request} blocks + 1 null block) x {layout.bytes_per_block} B "
                f"/ 1 GiB) = {max(1, need)} GiB ({source} {n}){capped}; at most {kv_bytes // GIB} GiB = "
                f"floor(available RAM {_gib(profile.memory_bytes)} - {_memory_terms(memory)})",
            )
        )
        return gib * GIB, {"VLLM_CPU_KVCACHE_SPACE": str(gib)}, None
    util = device.gpu_memory_utilization
    reasons.append(
        Reason(
            "gpu_memory_utilization",
            str(util),
            f"requested {util}" if request.gpu_memory_utilization else _util_reason(profile, util),
        )
    )
    reasons.append(
        Reason(
            "KV cache memory",
            _gib(kv_bytes),
            f"{util} x {_gib(profile.memory_bytes)} - {_memory_terms(memory)} = {_gib(kv_bytes)} per GPU",
        )
    )
    return kv_bytes, {}, util


def choose_executor(device: Device, tp: int, nodes: int, env: dict[str, str], reasons: list[Reason]) -> str | None:
    """How vLLM starts its ranks: one process (None: vLLM's default), multiprocessing on one machine,
    Ray across nodes. On the CPU build each rank gets its own cores."""
    profile, ranks = device.profile, tp * device.pp
    if profile.is_cpu and ranks > 1:
        bind = cpu_threads_bind(profile, ranks)
        env["VLLM_CPU_OMP_THREADS_BIND"] = bind
        reasons.append(
            Reason(
                "distributed_executor_backend",
                "mp",
                "CPU build: vLLM's multiprocessing executor, one worker process per rank (its CPU platform "
                "replaces the single-process executor with mp, which sets each rank's OpenMP environment)",
            )
        )
        reasons.append(
            Reason(
                "VLLM_CPU_OMP_THREADS_BIND",
                bind,
                f"{profile.cores} core(s) split into {ranks} lists, one per rank (vLLM requires as many lists "
                "as local ranks, '|' between them)",
            )
        )
        return "mp"
    if nodes > 1:
        reasons.append(
            Reason(
                "distributed_executor_backend",
                "ray",
                f"{ranks} ranks on {nodes} nodes: Ray places them across the group's pods, as vLLM's multi-node "
                f"guide does (leader: Ray head and the server; workers: join). The alternative is vLLM's "
                f"multiprocessing multi-node mode (--nnodes {nodes} --node-rank R --master-addr LEADER on every "
                "node, no Ray), which needs a different command per node",
            )
        )
        return "ray"
    return None


def cpu_threads_bind(profile: Profile, ranks: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for `ranks` ranks: the profile's CPUs in equal runs, e.g. '0|1'."""
    cores = profile.cores or 1
    ids = list(profile.cpu_ids)[:cores] if len(profile.cpu_ids) >= cores else list(range(cores))
    each = len(ids) // ranks
    groups = [ids[i * each : (i + 1) * each] for i in range(ranks)]
    return "|".join(",".join(map(str, g)) for g in groups)


def choose_replicas(device: Device, cap: Capacity, request: PlanRequest, tp: int, reasons: list[Reason]) -> int:
    """Replicas for a target number of full-length requests served at once (1 without a target)."""
    target = request.target_concurrency
    if target is None:
        return 1
    per_replica = min(int(cap.max_concurrency), device.batch.max_num_seqs)
    replicas = cdiv(target, per_replica)
    devices = tp * device.pp
    unit = "core group(s)" if device.profile.is_cpu else "GPU(s)"
    reasons.append(
        Reason(
            "replicas",
            str(replicas),
            f"ceil(target {target} requests / {per_replica} per replica) where a replica holds "
            f"min(floor({cap.max_concurrency:.2f} at max_model_len {cap.max_model_len}), max_num_seqs "
            f"{device.batch.max_num_seqs}); {replicas} x {devices} {unit} (TP {tp} x PP {device.pp}) = "
            f"{replicas * devices} in all",
        )
    )
    return replicas


def max_num_seqs_fit_len(
    device: Device,
    layout: KVLayout,
    cap: Capacity,
    max_len: int,
    request: PlanRequest,
    reasons: list[Reason],
    warnings: list[str],
) -> int:
    """The longest request length at which all max_num_seqs sequences fit in the KV cache at once.

    vLLM admits up to max_num_seqs sequences whatever their length; when the cache runs out,
    it preempts and later recomputes some. Past this length, sequences queue instead of running.
    """
    seqs = device.batch.max_num_seqs
    in_flight = device.in_flight_tokens(max_len)
    fit_len = largest_fitting_len(layout, cap.kv_bytes, max_len, in_flight, seqs)
    if fit_len >= max_len:
        text = f"all {seqs} sequences fit at once even at max_model_len {max_len}"
    else:
        text = (
            f"{cap.max_concurrency:.2f} requests fit at full length (max_model_len {max_len}); {seqs} sequences "
            f"fit at once up to about {fit_len:,} tokens each (bisection over the KV blocks)"
        )
        if request.max_num_seqs:
            warnings.append(
                f"max_num_seqs {seqs} is vLLM's cap, not a guarantee: the KV cache holds "
                f"{cap.max_concurrency:.2f} requests of {max_len} tokens, and {seqs} only up to about "
                f"{fit_len:,} tokens each; longer requests wait in the queue or are preempted"
            )
    reasons.append(Reason("max_num_seqs at once", f"up to {min(fit_len, max_len):,} tokens", text))
    return min(fit_len, max_len)


def explain_choices(
    device: Device,
    layout: KVLayout,
    cap: Capacity,
    request: PlanRequest,
    tp: int,
    max_len: int,
    adapters: list[LoraAdapter],
    memory: dict[str, int],
    reasons: list[Reason],
) -> None:
    """The reasons for the settings that follow from the steps above."""
    model, profile = device.model, device.profile
    dtype = _serving_dtype(model, profile)

    def why(setting: str, value, text: str) -> None:
        reasons.append(Reason(setting, str(value), text))

    why(
        "dtype",
        dtype,
        f"config dtype {model.dtype}"
        + ("" if dtype == model.dtype else f", served as {dtype} (vLLM's choice on {profile.name})"),
    )
    why(
        "weights",
        _gib(memory["weights"]),
        f"per device: {model.param_count:,} parameters"
        + (f" x {device.stage_layers}/{len(model.layers)} layers (largest PP stage)" if device.pp > 1 else "")
        + f" / TP {tp}; "
        f"{model.weights_source} ({model.weights_source_reason})",
    )
    why("tensor_parallel_size", tp, _tp_reason(profile, model, tp, request.tensor_parallel_size, request.nodes))
    why(
        "block_size",
        device.block_size,
        f"requested {request.block_size}"
        if request.block_size
        else ("MLA block size of the profile" if model.mla else "profile block size")
        + f" ({profile.name}); passed explicitly so vLLM uses the plan's arithmetic",
    )
    _explain_kv(
        why,
        model,
        layout,
        cap,
        request.kv_cache_dtype,
        device.in_flight_tokens(max_len),
        device.in_flight_batches,
        device.batch.batched(max_len),
    )
    why("max_num_seqs", device.batch.max_num_seqs, device.batch.why_seqs)
    why("max_num_batched_tokens", device.batch.batched(max_len), device.batch.why_batched)
    if device.lora:
        lora = device.lora
        why(
            "max_lora_rank",
            lora.max_lora_rank,
            f"largest adapter rank {max(a.max_rank for a in adapters)} rounded up to a "
            f"rank vLLM allows {ALLOWED_MAX_LORA_RANKS}",
        )
        why(
            "LoRA buffers",
            _gib(memory["lora_buffers"]),
            f"max_loras {lora.max_loras} x max_lora_rank "
            f"{lora.max_lora_rank} x sum(in + out) over wrapped modules ({', '.join(lora.target_modules)}) x "
            f"{device.dtype_bytes} B, per device",
        )


# --- pieces -------------------------------------------------------------------------------


def context_limit(
    model: ModelInfo, request: PlanRequest, reasons: list[Reason], warnings: list[str]
) -> tuple[int, dict | None]:
    """(largest max_model_len allowed, hf_overrides): the derived maximum, or past it only with YaRN."""
    derived, wanted = model.derived_max_len, request.max_model_len
    if wanted is None or wanted <= derived:
        return derived, None
    if request.rope_scaling is None:
        raise PlanError(
            f"{{max_model_len}} {wanted} is above the derived maximum {derived} "
            f"({model.derived_max_len_reason}); largest feasible: {{max_model_len}} {derived}. To go "
            "further, scale RoPE explicitly with {rope_scaling} yarn",
            "max_model_len",
        )
    if request.rope_scaling != "yarn":
        raise PlanError(f"{{rope_scaling}} {request.rope_scaling}: only 'yarn' is supported", "rope_scaling")
    reasons.append(
        Reason(
            "hf_overrides",
            "YaRN",
            f"context {wanted} > derived {derived}: RoPE scaled by YaRN factor "
            f"{_yarn_factor(model, wanted):g} = {wanted} / original {_original_len(model)} on "
            "full-attention layers",
        )
    )
    warnings.append(
        f"max_model_len {wanted} is past the model's trained range ({derived}); YaRN is set through "
        f"--hf-overrides; measure quality with `lcserve probe` before relying on it"
    )
    return wanted, yarn_overrides(model, wanted)


def _explain_kv(
    why,
    model: ModelInfo,
    layout: KVLayout,
    cap: Capacity,
    kv_key: str,
    in_flight: int,
    in_flight_batches: int,
    batched: int,
) -> None:
    """The reasons behind the KV figures, as vLLM computes them."""
    why(
        "KV bytes per token per layer",
        layout.bytes_per_token_layer,
        layout.equation + (f" ({kv_key} KV cache)" if kv_key != "auto" else ""),
    )
    why(
        "KV groups",
        layout.describe_groups(),
        f"{model.attention_summary}; "
        + (
            "one group holds all layers"
            if len(layout.groups) == 1
            else f"vLLM's hybrid manager: groups of {layout.group_size} layers per kind, the last one padded"
        ),
    )
    why(
        "bytes per block",
        layout.bytes_per_block,
        f"{layout.block_layers} layers x block {layout.block_size} tokens x {layout.bytes_per_token_layer} B"
        + (" (the widest group's layers on the fullest pipeline rank)" if layout.stage_layers else ""),
    )
    why("num_blocks", cap.num_blocks, f"floor({cap.kv_bytes} B KV cache / {layout.bytes_per_block} B per block)")
    why(
        "blocks per request",
        cap.blocks_per_request,
        _per_request_reason(layout, cap.max_model_len, in_flight, in_flight_batches, batched),
    )
    why(
        "max concurrency at full context",
        f"{cap.max_concurrency:.2f}",
        f"{cap.num_blocks} blocks / {cap.blocks_per_request} blocks per request at {cap.max_model_len} tokens",
    )
    why(
        "KV cache capacity (tokens)",
        cap.kv_tokens,
        f"int({cap.max_concurrency:.4f} x max_model_len {cap.max_model_len})",
    )


def _serving_dtype(model: ModelInfo, profile: Profile) -> str:
    """vLLM's "auto" dtype: the config dtype, float32 downcast, bf16 only where supported."""
    dtype = TORCH_NAMES[DTYPE_NAMES.get(model.dtype, "BF16")]
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
            raise PlanError(
                f"{profile.name}: only {_gib(profile.free_bytes)} free of {_gib(profile.memory_bytes)}; "
                "free the GPU (other processes hold it) and plan again"
            )
    return util


def _util_reason(profile: Profile, util: float) -> str:
    text = "vLLM default 0.92 minus 0.02 for the error of the estimates"
    if profile.free_bytes is not None and util < est.GPU_MEMORY_UTILIZATION:
        text = (
            f"detected free memory {_gib(profile.free_bytes)} - {_gib(est.GPU_FREE_MARGIN_BYTES)} margin, "
            f"as a fraction of {_gib(profile.memory_bytes)} (other processes use the GPU)"
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


def _heads_ok(model: ModelInfo, t: int) -> bool:
    if model.num_attention_heads % t:
        return False
    if model.mla:
        return True
    kv = model.num_kv_heads
    return kv % t == 0 or t % kv == 0


def _checked_tp(profile: Profile, model: ModelInfo, tp: int, pp: int = 1, nodes: int = 1) -> int:
    """The requested TP, or PlanError: within one node's GPUs (per stage) or the CPU's cores, and heads that divide."""
    if profile.is_cpu:
        limit = (profile.cores or 1) // pp
        room = f"the CPU profile has {profile.cores or 1} core(s), one or more per rank" + (
            f" of {pp} pipeline stages" if pp > 1 else ""
        )
    elif nodes > 1:
        limit, room = profile.count, f"the profile has {profile.count} GPU(s) per node"
    else:
        limit = profile.count // pp
        room = f"the profile has {profile.count} GPU(s)" + (f" for {pp} pipeline stages" if pp > 1 else "")
    feasible = [t for t in range(1, limit + 1) if _heads_ok(model, t)] or [1]
    if tp > limit or not _heads_ok(model, tp):
        problem = (
            room
            if tp > limit
            else f"{model.num_attention_heads} attention heads / {model.num_kv_heads} KV heads are not divisible by it"
        )
        raise PlanError(
            f"{{tensor_parallel_size}} {tp}: {problem}; largest feasible: {{tensor_parallel_size}} {max(feasible)}",
            "tensor_parallel_size",
        )
    return tp


def _tp_reason(profile: Profile, model: ModelInfo, t: int, requested: int | None, nodes: int = 1) -> str:
    heads = f"{model.num_attention_heads} heads, {model.num_kv_heads} KV heads divisible"
    if model.num_kv_heads < t and not model.mla:
        heads += f"; vLLM replicates the {model.num_kv_heads} KV head(s) so each of the {t} ranks holds one"
    if requested:
        return f"requested {requested} ({heads})"
    if profile.is_cpu:
        return "CPU engine: one process"
    if nodes > 1:
        return f"all {profile.count} GPUs of each node, on the node's own links; the nodes split the layers ({heads})"
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


def _does_not_fit(device: Device, t: int, memory: dict[str, int], kv_budget: int, enough_tp: int | None) -> str:
    profile, model = device.profile, device.model
    used = ", ".join(f"{k.replace('_', ' ')} {_gib(v)}" for k, v in memory.items())
    if profile.is_cpu:
        return (
            f"{model.path.name} does not fit {profile.name} at any context: {used} leave {_gib(max(kv_budget, 0))} "
            f"of {_gib(profile.memory_bytes)} available RAM for the KV cache (need >= 1 GiB); largest feasible: none "
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
        f"leave {_gib(kv_budget)} of {device.gpu_memory_utilization} x {_gib(profile.memory_bytes)} for the KV "
        f"cache; {hint}"
    )


def _plan_lora(model: ModelInfo, adapters: list[LoraAdapter], dtype_bytes: int) -> LoraPlan:
    rank = max(a.max_rank for a in adapters)
    max_lora_rank = round_max_lora_rank(rank)
    if max_lora_rank is None:
        raise PlanError(
            f"adapter rank {rank} is above vLLM's largest max_lora_rank {ALLOWED_MAX_LORA_RANKS[-1]}; "
            f"largest feasible: {ALLOWED_MAX_LORA_RANKS[-1]} (merge this adapter into the base instead)"
        )
    modules = _wrapped_modules(model, adapters)
    if not modules:
        raise PlanError(
            f"no module of {model.path} matches the adapters' target_modules "
            f"({', '.join(str(a.target_modules) for a in adapters)}); is the adapter for this base?"
        )
    names = tuple(sorted({m.rsplit(".", 1)[-1] for m in modules}))
    plan = LoraPlan(max_loras=len(adapters), max_lora_rank=max_lora_rank, target_modules=names, buffer_bytes=0)
    return LoraPlan(plan.max_loras, plan.max_lora_rank, names, _lora_buffer_bytes(model, plan, 1, dtype_bytes))


def _wrapped_modules(model: ModelInfo, adapters: list[LoraAdapter]) -> set[str]:
    """Full module names vLLM wraps for these adapters (packed siblings included)."""
    layer_modules = [m for m in model.linear_shapes if ".layers." in m or ".h." in m]
    matched: set[str] = set()
    for a in adapters:
        t = a.target_modules
        if t is None:  # target_parameters only: no linear module is wrapped
            continue
        for m in layer_modules:
            if (
                t == "all-linear"
                or (isinstance(t, str) and re.fullmatch(t, m))
                or (not isinstance(t, str) and any(m == x or m.endswith("." + x) for x in t))
            ):
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


def _training_ratio(
    adapters: list[LoraAdapter], max_len: int, threshold: float, reasons: list[Reason], warnings: list[str]
) -> float | None:
    known = [a for a in adapters if a.training_seq_len]
    if not known:
        if adapters:
            reasons.append(
                Reason(
                    "training length",
                    "unknown",
                    "no lcserve_adapter.json / axolotl sequence_len / "
                    "training_args beside the adapter; pass --training-len to check serving vs training length",
                )
            )
        return None
    shortest = min(known, key=lambda a: a.training_seq_len)
    ratio = max_len / shortest.training_seq_len
    reasons.append(
        Reason(
            "max_model_len / training length",
            f"{ratio:.1f}x",
            f"{max_len} / {shortest.training_seq_len} ({shortest.path.name}); warning above {threshold:g}x",
        )
    )
    if ratio > threshold:
        warnings.append(
            f"max_model_len {max_len} is {ratio:.0f}x the training length {shortest.training_seq_len} of "
            f"adapter {shortest.path.name}: quality past {shortest.training_seq_len} tokens is unmeasured; "
            f"run the long-context probes (`lcserve probe`) before serving long prompts, or lower max_model_len"
        )
    return ratio


def _original_len(model: ModelInfo) -> int:
    for p in model.rope_parameters.values():
        if p.get("original_max_position_embeddings"):
            return int(p["original_max_position_embeddings"])
    return model.derived_max_len


def _yarn_factor(model: ModelInfo, context: int) -> float:
    return cdiv(100 * context, _original_len(model)) / 100


def yarn_overrides(model: ModelInfo, context: int) -> dict:
    """The `--hf-overrides` that make vLLM apply YaRN and accept `context` as max_model_len.

    vLLM treats a YaRN max_position_embeddings as already scaled, so the override sets it
    (and model_max_length, which caps it through the tokenizer config) to the new length.
    With per-layer-type RoPE (Gemma 3) only full-attention layers are scaled: sliding
    layers never see distances beyond their window.
    """
    yarn = {
        "rope_type": "yarn",
        "factor": _yarn_factor(model, context),
        "original_max_position_embeddings": _original_len(model),
    }
    params = model.rope_parameters
    if set(params) == {"default"}:
        rope = {**params["default"], **yarn}
    else:
        rope = {k: ({**v, **yarn} if k == "full_attention" else dict(v)) for k, v in params.items()}
    return {"max_position_embeddings": context, "model_max_length": context, "rope_parameters": rope}


def _memory_terms(memory: dict[str, int]) -> str:
    return " - ".join(f"{k.replace('_', ' ')} {_gib(v)}" for k, v in memory.items())


def _gib(n: int | float) -> str:
    return f"{n / GIB:.2f} GiB"
