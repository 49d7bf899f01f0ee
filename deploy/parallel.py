"""Parallelism: pipeline stages (one per node), tensor parallel ranks within a node, how vLLM starts
its ranks (the executor), and replicas for a concurrency target.
"""

from __future__ import annotations

from dataclasses import dataclass

from lcserve.errors import PlanError
from lcserve.model_config import ModelInfo
from lcserve.model_facts import cdiv

from .device import TP_SIZES, Device, heads_split
from .hardware import Profile
from .kv import Capacity, fits, pp_partitions
from .memory import has_room, kv_budget
from .plan_types import Choice, Explained, PlanRequest, Reason


@dataclass(frozen=True)
class Executor(Explained):
    """How vLLM starts its ranks (None: vLLM's default, one process or mp within a node), and the
    environment the ranks need."""

    backend: str | None
    env: dict[str, str]


def choose_pipeline_parallel(
    profile: Profile, model: ModelInfo, request: PlanRequest, lora: bool = False
) -> Choice[int]:
    """One pipeline stage per node (tensor parallelism stays inside a node, on its fast links), or the
    requested size; the layers split as vLLM splits them."""
    nodes, layers = request.nodes, len(model.layers)
    pp = request.pipeline_parallel_size or nodes
    _check_pipeline_parallel(profile, model, pp, nodes, lora)
    warnings = ()
    if profile.is_cpu and pp > 1:
        warnings = (
            "pipeline parallelism on vLLM's CPU build works compiled only: start vLLM without --enforce-eager "
            "(which `lcserve serve` adds on the CPU build); the compile warm-up costs about a minute on 2 "
            "cores (benchmarks/bench_parallel_cpu.py measures it)",
        )
    if pp == 1:
        return Choice(pp, warnings=warnings)
    source = f"one stage per node (--nodes {nodes})" if nodes > 1 else "requested"
    why = (
        f"{source}; {layers} layers split {pp_partitions(layers, pp)} (vLLM's get_pp_indices: even "
        "shares, the remainder to the stages before the last); the plan sizes the stage with the most layers"
    )
    return Choice(pp, reasons=(Reason("pipeline_parallel_size", str(pp), why),), warnings=warnings)


def _check_pipeline_parallel(profile: Profile, model: ModelInfo, pp: int, nodes: int, lora: bool) -> None:
    """PlanError for a pipeline the layers, the nodes, the CPU build or its cores cannot take."""
    layers = len(model.layers)
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
    if profile.is_cpu and pp > (profile.cores or 1) * nodes:  # across nodes: a stage on each node's cores
        raise PlanError(
            f"{{pipeline_parallel_size}} {pp}: the CPU profile has {profile.cores or 1} core(s), one or more per "
            f"rank; largest feasible: {{pipeline_parallel_size}} {(profile.cores or 1) * nodes}",
            "pipeline_parallel_size",
        )


def choose_tensor_parallel(device: Device, request: PlanRequest, limit: int, full_context_target: int) -> Choice[int]:
    """The requested size (checked), 1 on the CPU, all of a node's GPUs across nodes, else the smallest
    power of two whose KV budget fits the target at full length."""
    profile, model, requested = device.profile, device.model, request.tensor_parallel_size
    if requested is not None:
        tp = _checked_tp(profile, model, requested, device.pp, request.nodes)
    elif profile.is_cpu:
        tp = 1
    elif request.nodes > 1:  # every GPU of every node: a stage per node, TP across the node's GPUs
        tp = _checked_tp(profile, model, profile.count, device.pp, request.nodes)
    else:
        tp = _smallest_fitting_tp(device, request.max_model_len or limit, full_context_target)
    why = _tp_reason(profile, model, tp, requested, request.nodes)
    return Choice(tp, reasons=(Reason("tensor_parallel_size", str(tp), why),))


def _smallest_fitting_tp(device: Device, target_len: int, full_context_target: int) -> int:
    """The smallest power of two whose KV budget fits the target at full length, else the smallest
    that fits anything, else the largest."""
    profile = device.profile
    per_stage = profile.count // device.pp
    if per_stage < 1:
        raise PlanError(
            f"{{pipeline_parallel_size}} {device.pp}: the profile has {profile.count} GPU(s), fewer than the "
            f"stages; largest feasible: {{pipeline_parallel_size}} {profile.count}",
            "pipeline_parallel_size",
        )
    candidates = [t for t in TP_SIZES if t <= per_stage and heads_split(device.model, t)]
    for t in candidates:
        kv_bytes = kv_budget(device, t, target_len)[0]
        if has_room(device, t, target_len) and fits(
            device.layout(t), kv_bytes, target_len, device.in_flight_tokens(target_len), full_context_target
        ):
            return t
    return next((t for t in candidates if has_room(device, t, target_len)), candidates[-1])


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
    feasible = [t for t in range(1, limit + 1) if heads_split(model, t)] or [1]
    if tp > limit or not heads_split(model, tp):
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


def choose_executor(device: Device, tp: int, nodes: int) -> Executor:
    """How vLLM starts its ranks: one process (None: vLLM's default), multiprocessing on one machine,
    Ray across nodes. On the CPU build each rank gets its own cores."""
    profile, ranks = device.profile, tp * device.pp
    if profile.is_cpu and ranks > 1:
        local = ranks // nodes  # each node binds its own ranks: the same lists on every node
        bind = cpu_threads_bind(profile, local)
        reasons = (
            Reason(
                "distributed_executor_backend",
                "mp",
                "CPU build: vLLM's multiprocessing executor, one worker process per rank (its CPU platform "
                "replaces the single-process executor with mp, which sets each rank's OpenMP environment)",
            ),
            Reason(
                "VLLM_CPU_OMP_THREADS_BIND",
                bind,
                f"{profile.cores} core(s) split into {local} lists, one per rank (vLLM requires as many lists "
                "as local ranks, '|' between them)",
            ),
        )
        return Executor("mp", {"VLLM_CPU_OMP_THREADS_BIND": bind}, reasons=reasons)
    if nodes > 1:
        why = (
            f"{ranks} ranks on {nodes} nodes: Ray places them across the group's pods, as vLLM's multi-node "
            f"guide does (leader: Ray head and the server; workers: join). The alternative is vLLM's "
            f"multiprocessing multi-node mode (--nnodes {nodes} --node-rank R --master-addr LEADER on every "
            "node, no Ray), which needs a different command per node"
        )
        return Executor("ray", {}, reasons=(Reason("distributed_executor_backend", "ray", why),))
    return Executor(None, {})


def cpu_threads_bind(profile: Profile, ranks: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for `ranks` ranks: the profile's CPUs in equal runs, e.g. '0|1'."""
    cores = profile.cores or 1
    ids = list(profile.cpu_ids)[:cores] if len(profile.cpu_ids) >= cores else list(range(cores))
    each = len(ids) // ranks
    groups = [ids[i * each : (i + 1) * each] for i in range(ranks)]
    return "|".join(",".join(map(str, g)) for g in groups)


def choose_replicas(device: Device, cap: Capacity, request: PlanRequest, tp: int) -> Choice[int]:
    """Replicas for a target number of full-length requests served at once (1 without a target)."""
    target = request.target_concurrency
    if target is None:
        return Choice(1)
    per_replica = min(int(cap.max_concurrency), device.batch.max_num_seqs)
    replicas = cdiv(target, per_replica)
    devices = tp * device.pp
    unit = "core group(s)" if device.profile.is_cpu else "GPU(s)"
    why = (
        f"ceil(target {target} requests / {per_replica} per replica) where a replica holds "
        f"min(floor({cap.max_concurrency:.2f} at max_model_len {cap.max_model_len}), max_num_seqs "
        f"{device.batch.max_num_seqs}); {replicas} x {devices} {unit} (TP {tp} x PP {device.pp}) = "
        f"{replicas * devices} in all"
    )
    return Choice(replicas, reasons=(Reason("replicas", str(replicas), why),))
