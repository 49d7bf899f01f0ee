"""The plan's values: what the user asked for (`PlanRequest`) and what the planner decided, each
number with its `Reason` (`ServePlan`), with the renderings every output shares (vLLM options and
arguments, JSON). The planner (`plan.py` and its steps), the pooling plan (`pooling.py`) and the speed
predictions (`speed_plan.py`) all build on them.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from lcserve.model_config import ModelInfo
from lcserve.model_facts import GIB
from lcserve.vllm_rules import lora_options, option_args

from .hardware import Profile
from .kv import Capacity, KVLayout

TRAINING_RATIO_WARN = 4.0
T = TypeVar("T")


@dataclass(frozen=True)
class Reason:
    setting: str
    value: str
    why: str


@dataclass(frozen=True, kw_only=True)
class Explained:
    """What a step of the plan says with its choice: the reasons behind it and the warnings it raises."""

    reasons: tuple[Reason, ...] = ()
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class Choice(Explained, Generic[T]):
    """One value a step chose, explained."""

    value: T


def gib(n: int | float) -> str:
    """Bytes as the reasons and errors print them."""
    return f"{n / GIB:.2f} GiB"


class PlanOutput:
    """The renderings a plan shares with every other plan: its `vllm_options()` as arguments, as one
    shell string, and its reasons as JSON."""

    reasons: list[Reason]

    def vllm_options(self) -> dict:
        """Each plan's own vLLM options (long names without dashes)."""
        raise NotImplementedError

    def vllm_args(self) -> list[str]:
        """The plan as vLLM command-line arguments (no model, host or port)."""
        return [a for key, value in self.vllm_options().items() for a in option_args(key, value)]

    def shell_args(self) -> str:
        """`vllm_args()` quoted for a shell, as one string (the environment is the caller's: `env`)."""
        return shlex.join(self.vllm_args())

    def reasons_json(self) -> list[dict]:
        return [{"setting": r.setting, "value": r.value, "why": r.why} for r in self.reasons]


@dataclass(frozen=True)
class LoraPlan:
    max_loras: int
    max_lora_rank: int
    target_modules: tuple[str, ...]
    buffer_bytes: int  # per device


@dataclass
class ServePlan(PlanOutput):
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
    max_num_seqs_fit_len: int | None = None  # longest request length at which max_num_seqs sequences all fit
    pipeline_parallel_size: int = 1
    nodes: int = 1  # nodes per replica: one pipeline stage each
    replicas: int = 1
    distributed_executor_backend: str | None = None  # None: vLLM's default (mp within one node)
    layers_per_stage: tuple[int, ...] = ()
    warnings: list[str] = field(default_factory=list)
    reasons: list[Reason] = field(default_factory=list)
    in_flight_tokens: int = 0  # tokens in flight per request on sliding-window layers (kv.py)
    speed: dict | None = None  # the speed predictions (deploy/speed.py); None without speed figures
    state_pool: int | None = None  # a hybrid: sequences whose recurrent states fit at once (state_pool.py)

    @property
    def state_bytes_per_sequence(self) -> int | None:
        """A hybrid's recurrent state for one sequence (all its state layers), unpadded."""
        state = self.layout.state
        return (
            None if state is None else state.bytes * sum(g.layers for g in self.layout.groups if g.kind == state.kind)
        )

    @property
    def kv_tokens(self) -> int:
        return self.capacity.kv_tokens

    @property
    def max_concurrency(self) -> float:
        return self.capacity.max_concurrency

    @property
    def ranks(self) -> int:
        """Devices one replica uses: TP x PP."""
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def gpus_per_node(self) -> int:
        return 0 if self.profile.is_cpu else self.tensor_parallel_size * self.pipeline_parallel_size // self.nodes

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
        if self.pipeline_parallel_size > 1:
            opts["pipeline-parallel-size"] = self.pipeline_parallel_size
        if self.distributed_executor_backend:
            opts["distributed-executor-backend"] = self.distributed_executor_backend
        if self.kv_cache_dtype != "auto":
            opts["kv-cache-dtype"] = self.kv_cache_dtype
        if self.lora:
            opts |= lora_options(self.lora.max_loras, self.lora.max_lora_rank)
            opts["lora-target-modules"] = list(self.lora.target_modules)
        if self.hf_overrides:
            opts["hf-overrides"] = self.hf_overrides
        return opts

    def _state_json(self) -> dict:
        """A hybrid's recurrent-state figures (absent for attention-only models)."""
        if self.layout.state is None:
            return {}
        return {"state_bytes_per_sequence": self.state_bytes_per_sequence, "state_pool_sequences": self.state_pool}

    def to_json(self) -> dict:
        return {
            "model": str(self.model.path),
            "profile": self.profile.name,
            "device": {
                "kind": self.profile.kind,
                "count": self.profile.count,
                "memory_bytes": self.profile.memory_bytes,
            },
            "max_model_len": self.max_model_len,
            "derived_max_len": self.model.derived_max_len,
            "gpu_memory_utilization": self.gpu_memory_utilization,
            "max_num_seqs": self.max_num_seqs,
            "max_num_batched_tokens": self.max_num_batched_tokens,
            "tensor_parallel_size": self.tensor_parallel_size,
            "pipeline_parallel_size": self.pipeline_parallel_size,
            "layers_per_stage": list(self.layers_per_stage),
            "nodes": self.nodes,
            "replicas": self.replicas,
            "distributed_executor_backend": self.distributed_executor_backend,
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
            "max_num_seqs_fit_len": self.max_num_seqs_fit_len,
            **self._state_json(),
            "memory_per_device": self.memory,
            "training_ratio": self.training_ratio,
            "hf_overrides": self.hf_overrides,
            "env": self.env,
            "vllm_args": self.vllm_args(),
            "warnings": self.warnings,
            "reasons": self.reasons_json(),
            "speed": self.speed,
        }


@dataclass(frozen=True)
class PlanRequest:
    """What the user fixed, in vLLM's names; None leaves the choice to the planner."""

    max_model_len: int | None = None
    max_num_seqs: int | None = None  # vLLM's cap on sequences in one batch, not a promise that they fit at full length
    full_context_requests: int | None = None  # requests of max_model_len the KV cache must hold at once
    gpu_memory_utilization: float | None = None
    max_num_batched_tokens: int | None = None
    block_size: int | None = None
    kv_cache_dtype: str = "auto"
    tensor_parallel_size: int | None = None
    pipeline_parallel_size: int | None = None
    nodes: int = 1  # nodes per replica (GPUs per node: the profile's count)
    target_concurrency: int | None = None  # requests of max_model_len served at once, over all replicas
    rope_scaling: str | None = None
    kv_cache_gib: int | None = None  # CPU: fixes VLLM_CPU_KVCACHE_SPACE instead of sizing it
    training_ratio_warn: float = TRAINING_RATIO_WARN
    slo_ttft_ms: float | None = None  # median time to first token to meet: chooses max_num_seqs (deploy/speed.py)
    slo_itl_ms: float | None = None  # median inter-token latency to meet
    expected_prompt_len: int | None = None  # the load the speed predictions are for (default: training length)
    expected_output_len: int | None = None
