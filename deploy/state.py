"""The recurrent state of hybrid models (Mamba, Mamba2, gated delta net), planned as vLLM 0.32 plans it.

A state layer keeps a fixed-size state per sequence (a convolution window and an SSM or delta-rule
state) where an attention layer keeps a KV cache that grows with the sequence. vLLM puts both in
one block pool (v1/core/kv_cache_utils.py):

- shapes: `MambaStateShapeCalculator` (model_executor/layers/mamba/mamba_utils.py), called by the
  model class's `get_mamba_state_shape_from_config` (`lcserve.state_layers` reads its arguments);
  the convolution state in the "SD" layout (state_len, dim), the CPU build's and vLLM's default;
- dtypes: `MambaStateDtypeCalculator`: the convolution state in the model dtype
  (--mamba-cache-dtype auto), the SSM state in the model dtype too unless the model says otherwise
  (NemotronH: float32); the CPU build resets the SSM state to float32 where the CPU has AVX512-BF16
  (platforms/cpu.py check_and_update_config);
- page sizes: `Platform._align_hybrid_block_size` (platforms/interface.py) raises the attention
  block size until an attention page holds a whole state, in multiples of the attention kernel's
  block, and pads the state page to the attention page, so every layer's page is the same;
- blocks per sequence: vLLM enables prefix caching for hybrids by default, which sets
  mamba_cache_mode "align" (model_executor/models/config.py MambaModelConfig): a state group then
  holds 2 blocks per sequence, plus 1 prefill checkpoint for Mamba2 mixers (MambaSpec
  .max_memory_usage_bytes; MambaMixer2.get_kv_cache_spec), whatever the length;
- the state pool: every running sequence holds its state blocks, so at most
  (num_blocks - 1 null block) / (state blocks + one block per attention group) sequences run at
  once; with full CUDA graphs (GPUs) vLLM refuses to start when max_num_seqs exceeds num_blocks
  (config/compilation.py resolve_cudagraph_mode_and_sizes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lcserve.errors import PlanError
from lcserve.model_config import ModelInfo
from lcserve.model_facts import cdiv
from lcserve.state_layers import STATE_KINDS, StateDims

TORCH_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
CPU_KERNEL_BLOCK = 32  # CPUAttentionBackend.get_supported_kernel_block_sizes: MultipleOf(32)
GPU_KERNEL_BLOCK = 16  # FlashAttentionBackend.get_supported_kernel_block_sizes: MultipleOf(16)
CACHE_MODE = "align"  # prefix caching is on by default for hybrids (vLLM's default; lcserve keeps it)


@dataclass(frozen=True)
class StateSpec:
    """vLLM's MambaSpec for the state layers on one tensor-parallel rank."""

    kind: str  # a STATE_KINDS kind
    shapes: tuple[tuple[int, ...], ...]  # (conv state, SSM / delta-rule state)
    dtypes: tuple[str, ...]
    blocks_per_request: int  # per state group, whatever the length
    kernel_block: int  # the attention kernel's block multiple (page alignment)
    source: str
    dtype_why: str

    @property
    def bytes(self) -> int:
        """One layer's state for one sequence (MambaSpec.state_content_size_bytes)."""
        return sum(math.prod(s) * TORCH_BYTES[d] for s, d in zip(self.shapes, self.dtypes))

    def describe(self) -> str:
        return " + ".join(f"{'x'.join(map(str, s))} {d}" for s, d in zip(self.shapes, self.dtypes))


def _divide(n: int, tp: int, what: str) -> int:
    if n % tp:
        raise PlanError(
            f"{{tensor_parallel_size}} {tp} does not divide {what} {n} of the state layers (vLLM asserts it); "
            "choose a TP size that divides it",
            "tensor_parallel_size",
        )
    return n // tp


def state_shapes(dims: StateDims, tp: int) -> tuple[tuple[int, ...], ...]:
    """MambaStateShapeCalculator.<kind>_state_shape on one TP rank (conv state in the SD layout)."""
    d = dict(dims.dims)
    if dims.kind == "mamba2":
        groups = d["n_groups"] + (0 if d["n_groups"] % tp == 0 else tp - d["n_groups"])  # extra_groups_for_head_shards
        conv_dim = d["intermediate_size"] + 2 * groups * d["state_size"]
        conv = (d["conv_kernel"] - 1, _divide(conv_dim, tp, "conv dim"))
        return conv, (_divide(d["num_heads"], tp, "num_heads"), d["head_dim"], d["state_size"])
    if dims.kind == "mamba1":
        inner = _divide(d["intermediate_size"], tp, "intermediate_size")
        return (d["conv_kernel"] - 1, inner), (inner, d["state_size"])
    conv_dim = d["head_k_dim"] * d["num_k_heads"] * 2 + d["head_v_dim"] * d["num_v_heads"]  # gated delta net
    conv = (d["conv_kernel_size"] - 1, _divide(conv_dim, tp, "conv dim"))
    return conv, (_divide(d["num_v_heads"], tp, "num_v_heads"), d["head_v_dim"], d["head_k_dim"])


def state_splits(dims: StateDims, tp: int) -> bool:
    """Whether `tp` ranks can share the state layers (vLLM asserts each split divides)."""
    try:
        state_shapes(dims, tp)
    except PlanError:
        return False
    return True


def state_dtypes(dims: StateDims, serving_dtype: str, is_cpu: bool, cpu_bf16: bool) -> tuple[tuple[str, str], str]:
    """(conv dtype, SSM dtype) and why: MambaStateDtypeCalculator under vLLM's defaults on this build."""
    ssm = dims.ssm_cache_dtype
    why = f"conv state in the model dtype {serving_dtype} (--mamba-cache-dtype auto)"
    if ssm == "auto":
        ssm, ssm_why = serving_dtype, "SSM state in the model dtype (--mamba-ssm-cache-dtype auto)"
    else:
        ssm_why = f"SSM state {ssm} (the model's default for --mamba-ssm-cache-dtype)"
    if is_cpu and cpu_bf16 and ssm != "float32":
        ssm, ssm_why = "float32", "SSM state float32 (vLLM's CPU build resets it where the CPU has AVX512-BF16)"
    return (serving_dtype, ssm), f"{why}; {ssm_why}"


def state_spec(model: ModelInfo, tp: int, serving_dtype: str, is_cpu: bool, cpu_bf16: bool) -> StateSpec | None:
    """The state layers' MambaSpec on one TP rank; None for a model without state layers."""
    kinds = {layer.kind for layer in model.layers} & set(STATE_KINDS)
    if not kinds or model.state is None:
        return None
    dims = model.state
    dtypes, why = state_dtypes(dims, serving_dtype, is_cpu, cpu_bf16)
    blocks = 2 + dims.prefill_checkpoint_blocks if CACHE_MODE == "align" else 1
    kernel = CPU_KERNEL_BLOCK if is_cpu else GPU_KERNEL_BLOCK
    return StateSpec(dims.kind, state_shapes(dims, tp), dtypes, blocks, kernel, dims.source, why)


def aligned_block_size(attn_bytes_per_token: int, state_bytes: int, block_size: int, kernel_block: int) -> int:
    """Platform._align_hybrid_block_size: the smallest multiple of max(kernel block, block size) whose
    attention page holds one state, rounded to the kernel block; never below `block_size`."""
    align = max(kernel_block, block_size)
    raised = align * cdiv(state_bytes, align * attn_bytes_per_token)
    raised = kernel_block * cdiv(raised, kernel_block)
    return max(block_size, raised)
