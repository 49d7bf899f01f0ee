"""The plan of an embedding model (vLLM's pooling runner), pure like `plan.py`.

An encoder keeps no KV cache: each input is embedded in one forward pass and forgotten. So
there is no context capacity to size; what remains is the runner, max_model_len (which vLLM
caps at sentence-transformers' max_seq_length, and which the model's absolute positions bound
for good), the tokens of one batch, and whether the weights fit. Every choice has its Reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lcserve.errors import PlanError
from lcserve.model_config import ModelInfo
from lcserve.model_facts import GIB

from .device import batch_sizes
from .hardware import Profile
from .plan_types import Choice, Explained, PlanOutput, PlanRequest, Reason

# What /v1/embeddings does with an input past max_model_len: `lcserve serve --embedding-policy`
# (serving/embeddings.py's POLICIES, which a unit test keeps equal to these).
EMBEDDING_POLICIES = ("reject", "truncate", "chunk")


@dataclass
class PoolingPlan(PlanOutput):
    model: ModelInfo
    profile: Profile
    max_model_len: int
    max_num_batched_tokens: int
    max_num_seqs: int | None  # None: vLLM's default
    dtype: str | None  # None: vLLM's choice
    training_len: int | None
    policy: str
    hf_overrides: dict | None = None
    env: dict[str, str] = field(default_factory=dict)
    reasons: list[Reason] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    # The shape the cluster renderings read off any plan (deploy/pods.py): one device, one replica, no
    # LoRA buffers (vLLM's pooling runner serves no adapters), the weights as all of its memory.
    tensor_parallel_size = pipeline_parallel_size = nodes = replicas = ranks = 1
    lora = None

    @property
    def gpus_per_node(self) -> int:
        return 0 if self.profile.is_cpu else 1

    @property
    def memory(self) -> dict[str, int]:
        return {"weights": self.model.weight_bytes}

    def vllm_options(self) -> dict:
        opts = {"runner": "pooling", "max-model-len": self.max_model_len}
        opts["max-num-batched-tokens"] = self.max_num_batched_tokens
        if self.max_num_seqs is not None:
            opts["max-num-seqs"] = self.max_num_seqs
        if self.dtype:
            opts["dtype"] = self.dtype
        if self.hf_overrides:
            opts["hf-overrides"] = self.hf_overrides
        return opts

    def to_json(self) -> dict:
        return {
            "model": str(self.model.path),
            "profile": self.profile.name,
            "runner": "pooling",
            "max_model_len": self.max_model_len,
            "derived_max_len": self.model.derived_max_len,
            "max_position_embeddings": self.model.max_position_embeddings,
            "max_num_batched_tokens": self.max_num_batched_tokens,
            "max_num_seqs": self.max_num_seqs,
            "kv_cache_tokens": 0,
            "training_len": self.training_len,
            "embedding_policy": self.policy,
            "pooling": {
                "mode": self.model.pooling.pooling_mode,
                "normalize": self.model.pooling.normalize,
                "max_seq_length": self.model.pooling.max_seq_length,
                "dimension": self.model.pooling.dimension,
            },
            "vllm_args": self.vllm_args(),
            "env": self.env,
            "reasons": self.reasons_json(),
            "warnings": self.warnings,
        }

    def summary(self) -> list[str]:
        """The lines `serve` prints before it starts."""
        return [
            f"plan ({self.profile.name}): embedding model, pooling runner, no KV cache; max_model_len "
            f"{self.max_model_len}, {self.max_num_batched_tokens:,} tokens per batch, long inputs: {self.policy}",
            *(f"{r.setting} = {r.value}: {r.why}" for r in self.reasons),
            *(f"warning: {w}" for w in self.warnings),
        ]


@dataclass(frozen=True)
class PoolingLength(Explained):
    """max_model_len, and the `--hf-overrides` that lift vLLM's cap to it."""

    max_model_len: int
    hf_overrides: dict | None


@dataclass(frozen=True)
class PoolingMemory(Explained):
    """The dtype (None: vLLM's choice) and the environment the pooling runner needs."""

    dtype: str | None
    env: dict[str, str]


def plan_pooling(
    profile: Profile, model: ModelInfo, request: PlanRequest, policy: str, training_len: int | None = None
) -> PoolingPlan:
    """The pooling runner's settings for an embedding model; PlanError naming the setting when one cannot be met."""
    trained = pooling_runner(model, training_len)
    length = pooling_max_model_len(model, request, trained.value, policy)
    batched = pooling_batched_tokens(profile, model, request, length.max_model_len)
    memory = pooling_memory(profile, model, request)
    steps = (trained, length, batched, memory)
    return PoolingPlan(
        model=model,
        profile=profile,
        max_model_len=length.max_model_len,
        max_num_batched_tokens=batched.value,
        max_num_seqs=request.max_num_seqs,
        dtype=memory.dtype,
        training_len=trained.value,
        policy=policy,
        hf_overrides=length.hf_overrides,
        env=memory.env,
        reasons=[r for step in steps for r in step.reasons],
        warnings=[w for step in steps for w in step.warnings],
    )


def pooling_runner(model: ModelInfo, training_len: int | None) -> Choice[int | None]:
    """The runner (pooling: the model embeds), and the length it was trained on (--training-len first)."""
    trained = training_len or model.pooling.training_len
    source = "--training-len" if training_len else model.pooling.training_len_source
    reasons = (
        Reason("runner", "pooling", f"{model.architecture} is an embedding model ({_pooling_words(model)})"),
        Reason("training_len", str(trained), source),
    )
    return Choice(trained, reasons=reasons)


def pooling_max_model_len(model: ModelInfo, request: PlanRequest, trained: int | None, policy: str) -> PoolingLength:
    """The requested length, else vLLM's derived maximum; never past the model's absolute positions.
    Above vLLM's cap, `--hf-overrides model_max_length` lifts it."""
    positions, derived = model.max_position_embeddings, model.derived_max_len
    wanted = request.max_model_len or derived
    if positions and wanted > positions:
        raise PlanError(
            f"{{max_model_len}} {wanted} is beyond the {positions} positions of {model.path.name} "
            f"(max_position_embeddings; absolute positions cannot be extended): serve at most {positions}, "
            "and embed longer texts with --embedding-policy chunk",
            "max_model_len",
        )
    overrides = None
    if wanted > derived:
        overrides = {"model_max_length": wanted}
        why = (
            f"requested; vLLM caps it at {model.derived_max_len_reason}, and --hf-overrides "
            f"model_max_length={wanted} lifts that cap (vLLM allows a max_model_len up to the config's "
            f"model_max_length), within the model's {positions} positions"
        )
    else:
        why = "requested" if request.max_model_len else f"vLLM's derived maximum ({model.derived_max_len_reason})"
    warnings = ()
    if trained and wanted > trained and policy == "reject":
        warnings = (
            f"inputs between {trained} (the training length) and {wanted} tokens are embedded whole, beyond what "
            "the model was trained on; `lcserve probe` measures whether retrieval holds there "
            "(--embedding-policy truncate or chunk keeps every window within the training length)",
        )
    reason = Reason("max_model_len", str(wanted), why)
    return PoolingLength(wanted, overrides, reasons=(reason,), warnings=warnings)


def pooling_batched_tokens(profile: Profile, model: ModelInfo, request: PlanRequest, max_model_len: int) -> Choice[int]:
    """Tokens per batch: at least max_model_len, since the pooling runner embeds each input in one pass."""
    batch = batch_sizes(profile, model, request.max_num_seqs, request.max_num_batched_tokens)
    batched = request.max_num_batched_tokens or max(batch.default_batched, max_model_len)
    if batched < max_model_len:
        raise PlanError(
            f"{{max_num_batched_tokens}} {batched} is below {{max_model_len}} {max_model_len}: vLLM's pooling "
            "runner does not split an input across batches (no chunked prefill); raise it to at least max_model_len",
            "max_num_batched_tokens",
        )
    why = (
        "requested"
        if request.max_num_batched_tokens
        else f"{batch.why_batched.split(',')[0]}, at least max_model_len "
        "(the pooling runner embeds each input in one pass)"
    )
    return Choice(batched, reasons=(Reason("max_num_batched_tokens", str(batched), why),))


def pooling_memory(profile: Profile, model: ModelInfo, request: PlanRequest) -> PoolingMemory:
    """No KV cache; float32 kept on the CPU build; the least VLLM_CPU_KVCACHE_SPACE the CPU worker
    starts with; PlanError when the weights do not fit."""
    reasons = [
        Reason(
            "kv_cache",
            "none",
            "encoder-only attention keeps no KV cache (vLLM allocates none for it); memory is the weights "
            f"({model.weight_bytes / GIB:.2f} GiB) and the activations of one batch",
        )
    ]
    dtype = None
    if profile.is_cpu and set(model.param_bytes_by_dtype) - {"I64", "I32"} == {"F32"}:
        dtype = "float32"
        reasons.append(
            Reason(
                "dtype",
                dtype,
                "the checkpoint is float32; vLLM would downcast it to float16, which its CPU build runs several "
                "times slower (all-MiniLM-L6-v2 here: about 700 against 2,000 to 5,000 prompt tokens/s)",
            )
        )
    env = {}
    if profile.is_cpu:
        fixed = request.kv_cache_gib
        env["VLLM_CPU_KVCACHE_SPACE"] = str(fixed or 1)
        reasons.append(
            Reason(
                "VLLM_CPU_KVCACHE_SPACE",
                str(fixed or 1),
                "from the environment"
                if fixed
                else "the smallest whole GiB: the encoder uses none of it, and without it vLLM's CPU worker "
                "refuses to start unless gpu_memory_utilization (0.92) of the machine's RAM is free",
            )
        )
    if model.weight_bytes > profile.memory_bytes * profile.count:
        raise PlanError(
            f"{model.path.name} has {model.weight_bytes / GIB:.1f} GiB of weights, more than {profile.name} holds; "
            "choose a larger --profile"
        )
    return PoolingMemory(dtype, env, reasons=tuple(reasons))


def _pooling_words(model: ModelInfo) -> str:
    p = model.pooling
    parts = [f"{p.pooling_mode} pooling", "normalized" if p.normalize else "not normalized"]
    if p.dimension:
        parts.append(f"{p.dimension} dimensions")
    if p.max_seq_length:
        parts.append(f"max_seq_length {p.max_seq_length}")
    return ", ".join(parts)
