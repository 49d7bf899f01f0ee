"""Every number the planner estimates rather than reads or derives, in one place.

The KV accounting is exact (it replays vLLM's own arithmetic). What vLLM *measures* at
startup on a GPU (activation peak, CUDA graphs, non-torch memory) cannot be derived
from config files; these constants stand in for it and are labelled "estimate" wherever
they appear in a plan's reasons. They only decide how much of the device is left for the
KV cache on GPUs; on the CPU build the KV cache size is explicit (VLLM_CPU_KVCACHE_SPACE).
"""

from __future__ import annotations

from lcserve.model_config import ModelInfo
from lcserve.model_facts import GIB, cdiv

from .plan_types import Reason, gib

# vLLM's default gpu_memory_utilization is 0.92 (config/cache.py); the plan keeps 0.02
# more for the error of the estimates below.
GPU_MEMORY_UTILIZATION = 0.90
# Free memory kept unclaimed when a detected GPU is partly used by other processes.
GPU_FREE_MARGIN_BYTES = GIB // 2

# CUDA graph memory: vLLM (>= 0.21, VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS on by default) captures the
# graphs before sizing the KV cache and takes their memory from it (gpu_worker.determine_available_memory,
# gpu_model_runner.profile_cudagraph_memory); typical captures take a few hundred MiB per GPU. Not derived:
# the capture is measured on the device.
CUDA_GRAPH_ESTIMATE_BYTES = 512 * 1024**2
# Non-torch memory grown from the worker's first snapshot to the end of profiling (cuBLAS workspaces,
# allocator slack), at TP 1. Calibrated on one published log that the tests do not count (llm-d-benchmark,
# gpt-oss-20b, H100, vLLM 0.11: 0.13 GiB); see tests/data/gpu_startup_logs/README.md.
NON_TORCH_ESTIMATE_BYTES = 140 * 1024**2
# NCCL's own communicator buffers when tensor parallelism is on (NCCL allocates them, not vLLM: not derivable
# from vLLM's code). Calibrated on one published log the tests do not count (llm-d-benchmark,
# Llama-3.3-70B-FP8, TP 2, H100, vLLM 0.11: non-torch 0.55 GiB against 0.13 GiB at TP 1), less the custom
# all-reduce buffers below.
NCCL_ESTIMATE_BYTES = 400 * 1024**2
MIB = 1024**2


def custom_all_reduce_bytes(tp: int) -> int:
    """vLLM's custom all-reduce buffers on each rank (derived): the IPC metadata + staging buffer (max_size
    8 MiB), the registered input buffer (max of max_size, all-gather 2 MiB and reduce-scatter 16 MiB) and
    rank_data (8 MiB); none at TP 1. CustomAllreduce.__init__ (distributed/device_communicators/custom_all_reduce.py)."""
    return (8 + 16 + 8) * MIB if tp > 1 else 0


def non_torch_estimate_bytes(tp: int) -> int:
    """Non-torch memory per GPU (estimate): cuBLAS and allocator slack, plus NCCL and the custom all-reduce
    buffers when TP > 1 (memory_profiling's non_torch_increase, utils/mem_utils.py)."""
    comm = NCCL_ESTIMATE_BYTES + custom_all_reduce_bytes(tp) if tp > 1 else 0
    return NON_TORCH_ESTIMATE_BYTES + comm


# Bytes per [max_num_seqs x vocab] element that vLLM's dummy sampler run holds at its peak
# (gpu_model_runner._dummy_sampler_run, top_k = vocab - 1, top_p = 0.9, all_random False), beside the
# logits in the model dtype that compute_logits returns:
# - Triton top-k/top-p (vLLM PR 33538, early 2026; the pinned 0.32): Sampler.forward's float32 copy, the
#   float32 softmax probabilities and the float32 exponential noise of random_sample (forward_native, the
#   second, per-request-generator warm-up call): 4 + 4 + 4.
SAMPLER_TRITON_BYTES = 12
# - PyTorch sort (apply_top_k_top_p_pytorch, vLLM before PR 33538): the float32 copy (4), torch.sort's
#   int64 index iota (8), its sorted values and indices (4 + 8) and cub's radix-sort double buffers (4 + 8).
SAMPLER_SORT_BYTES = 36
# - FlashInfer (runs that log "Using FlashInfer for top-p & top-k sampling", as 0.10.1.1 with flashinfer-python
#   installed does; TopKTopPSampler.forward_cuda -> flashinfer_sample ->
#   flashinfer.sampling.top_k_top_p_sampling_from_logits, no sort): the float32 copy, top_k_mask_logits' float32
#   output and its float32 softmax: 4 + 4 + 4, as many bytes as the Triton path.


def sampler_peak_bytes(max_num_seqs: int, vocab_size: int, dtype_bytes: int, sort: bool = False) -> int:
    """Peak of the dummy sampler run over max_num_seqs requests (estimate, derived): the logits are gathered
    to the full vocabulary on every TP rank (LogitsProcessor._gather_logits), so TP does not divide it.
    gpu_model_runner._dummy_sampler_run; sampler.Sampler.forward."""
    per_element = dtype_bytes + (SAMPLER_SORT_BYTES if sort else SAMPLER_TRITON_BYTES)
    return max_num_seqs * vocab_size * per_element


def forward_peak_bytes(tokens: int, hidden_size: int, intermediate_size: int, tp: int, dtype_bytes: int) -> int:
    """Largest transient of one decoder layer in the profiling forward pass over max_num_batched_tokens
    (estimate): residual and normed hidden states (2 x hidden) and the MLP's gate_up output and activation
    (3 x intermediate / tp). gpu_model_runner._dummy_run(max_num_tokens, is_profile=True)."""
    return tokens * (2 * hidden_size + 3 * intermediate_size // tp) * dtype_bytes


def moe_workspace_bytes(tokens: int, hidden_size: int, moe: tuple[int, int, int], tp: int, dtype_bytes: int) -> int:
    """Fused-MoE workspace at max_num_batched_tokens (derived): TritonExperts.workspace_shapes gives
    workspace13 (M, top_k, max(N / 2, K)) and workspace2 (M, top_k, max(N, K)) with N = 2 x expert
    intermediate / tp, K = hidden; FusedMoEKernel._allocate_buffers takes them from the WorkspaceManager, which
    keeps its high-water mark allocated (model_executor/layers/fused_moe/modular_kernel.py; no chunking in 0.32)."""
    if not moe:
        return 0
    _, top_k, inter = moe
    n = 2 * inter // tp
    workspace13 = max(tokens * top_k * max(n // 2, hidden_size), tokens * hidden_size)
    workspace2 = tokens * top_k * max(n, hidden_size)
    return (workspace13 + workspace2) * dtype_bytes


def activation_estimate_bytes(
    max_num_batched_tokens: int,
    max_num_seqs: int,
    hidden_size: int,
    intermediate_size: int,
    vocab_size: int,
    tp: int,
    dtype_bytes: int,
    moe: tuple[int, int, int] = (),
    legacy: bool = False,
    sort: bool | None = None,
) -> int:
    """Peak memory of vLLM's profiling run (estimate): the larger of the forward pass and the sampler run (which
    also holds the forward's hidden states), plus the fused-MoE workspace, which the pinned release keeps
    allocated. The forward takes the config's intermediate_size for MoE models too (their dense or shared-expert
    MLPs; the routed experts run in the workspace). `legacy`: releases before vLLM PR 33538 (all of 2025, up to
    0.11), whose sampler sorts the vocabulary and whose MoE workspace is not kept (gpt-oss-20b's logged 0.11 peak
    is the sampler's alone); `sort`: whether its sampler sorts (default `legacy`; a legacy log that used FlashInfer's
    sampler does not). gpu_model_runner.profile_run; memory_profiling's transient_peak_headroom."""
    tokens = max_num_batched_tokens
    sort = legacy if sort is None else sort
    workspace = moe_workspace_bytes(tokens, hidden_size, moe, tp, dtype_bytes)
    forward = forward_peak_bytes(tokens, hidden_size, intermediate_size, tp, dtype_bytes) + (workspace if legacy else 0)
    sampler = sampler_peak_bytes(max_num_seqs, vocab_size, dtype_bytes, sort=sort) + tokens * hidden_size * dtype_bytes
    return max(forward, sampler) + (0 if legacy else workspace)


def version_shift_bytes(version: tuple[int, int], flashinfer_sampler: bool = False, **activation_args) -> int:
    """How much more non-KV memory vLLM `version` takes than the pinned 0.32 (negative: less), so that a plan
    can be compared with an older startup log (activation_args: those of activation_estimate_bytes): the
    legacy profiling run (its sampler sorts unless the log says it used FlashInfer's), and no CUDA graph estimate
    taken from the KV cache before 0.21 (gpu_worker.determine_available_memory)."""
    legacy = version < LEGACY_BEFORE
    sort = legacy and not flashinfer_sampler
    shift = activation_estimate_bytes(**activation_args, legacy=legacy, sort=sort) - activation_estimate_bytes(
        **activation_args
    )
    return shift - (CUDA_GRAPH_ESTIMATE_BYTES if version < CUDA_GRAPH_ESTIMATE_SINCE else 0)


# vLLM releases where what profiling measures changed. The Triton top-k/top-p sampler (PR 33538) was merged
# in February 2026, after 0.11 (every 2025 release sorts; the first release with it is not pinned here, and no
# log the tests use falls between). The CUDA graph estimate is on by default from 0.21.
LEGACY_BEFORE = (0, 12)
CUDA_GRAPH_ESTIMATE_SINCE = (0, 21)


def rope_cache_bytes(model: ModelInfo, dtype_bytes: int) -> int:
    """vLLM's rotary cos/sin tables (derived): get_rope builds one RotaryEmbedding per distinct RoPE setting and
    registers cos_sin_cache, (positions, rotary_dim) in the model dtype, on every rank (not split by TP); it is
    loaded with the weights, so vLLM's "Model loading took" includes it (Llama-3.1-8B: 131,072 x 128 x 2 B =
    32 MiB over the checkpoint's 14.96 GiB, logged 14.99). Positions: max_position_embeddings; YaRN tables span
    original_max_position_embeddings x factor (rotary_embedding/base.py _compute_cos_sin_cache,
    yarn_scaling_rope.py, get_rope's rope_dim / partial_rotary_factor). A config with no RoPE keys (no theta, no
    scaling: Granite 4.0-H's position_embedding_type "nope", Jamba) builds no table."""
    if not model.max_position_embeddings:
        return 0
    head = model.mla.qk_rope_head_dim if model.mla else model.head_dim
    settings = [p for p in model.rope_parameters.values() if "rope_theta" in p or p.get("rope_type") != "default"]
    total = 0
    for params in {repr(sorted(p.items())): p for p in settings}.values():
        rotary_dim = params.get("rope_dim") or int(head * params.get("partial_rotary_factor", 1.0))
        positions = model.max_position_embeddings
        if params.get("rope_type") == "yarn":
            positions = int(params.get("original_max_position_embeddings", positions) * params.get("factor", 1.0))
        total += positions * rotary_dim * dtype_bytes
    return total


def gpu_startup_estimates(
    model: ModelInfo, tp: int, batched: int, max_num_seqs: int, dtype_bytes: int
) -> dict[str, int]:
    """What vLLM holds on each GPU before sizing the KV cache besides the checkpoint's weights, by the names the
    plan prints: the RoPE tables (derived) and what vLLM measures at startup (estimates)."""
    act = activation_estimate_bytes(
        batched, max_num_seqs, model.hidden_size, model.intermediate_size, model.vocab_size, tp, dtype_bytes, model.moe
    )
    return {
        "rope_cache": rope_cache_bytes(model, dtype_bytes),
        "activation_estimate": act,
        "cuda_graph_estimate": CUDA_GRAPH_ESTIMATE_BYTES,
        "non_torch_estimate": non_torch_estimate_bytes(tp),
    }


def startup_estimates_reason(
    model: ModelInfo, tp: int, batched: int, max_num_seqs: int, dtype_bytes: int, memory: dict
) -> Reason:
    """What each GPU estimate covers, for the plan's reasons."""
    keys = ("rope_cache", "activation_estimate", "cuda_graph_estimate", "non_torch_estimate")
    rope, act, graphs, non_torch = (memory[k] for k in keys)
    parts = [
        f"RoPE cos/sin cache {gib(rope)}: max_position_embeddings x rotary dim, loaded with the weights (derived); "
        f"activation estimate {gib(act)}: vLLM's profiling run, the larger of one layer's forward over "
        f"max_num_batched_tokens {batched} and the sampler over max_num_seqs {max_num_seqs} x vocab "
        f"{model.vocab_size} (not split by TP)"
    ]
    if model.moe:
        workspace = moe_workspace_bytes(batched, model.hidden_size, model.moe, tp, dtype_bytes)
        parts.append(
            f"plus the fused-MoE workspace at max_num_batched_tokens ({gib(workspace)}, "
            f"top-{model.moe[1]} of {model.moe[0]} experts)"
        )
    comm = f", NCCL and custom all-reduce buffers at TP {tp}" if tp > 1 else ""
    why = ", ".join(parts) + (
        f"; CUDA graph estimate {gib(graphs)}: graph capture before the KV cache is sized; "
        f"non-torch estimate {gib(non_torch)}: cuBLAS and allocator slack{comm}"
    )
    return Reason("GPU startup estimates", gib(rope + act + graphs + non_torch), why)


# CPU build: memory of the API server, engine core and worker processes besides the
# weights and the KV cache (Python, torch, oneDNN buffers, activations). Measured on
# vllm-cpu 0.32.0 serving Gemma 3 270M: 1.6 + 0.9 + 1.4 GiB RSS.
CPU_RUNTIME_OVERHEAD_BYTES = 4 * GIB
# CPU build, tensor parallel: each rank past the first is another worker process (Python, torch,
# oneDNN buffers): about the worker's 1.4 GiB RSS measured above, rounded up.
CPU_WORKER_OVERHEAD_BYTES = 3 * GIB // 2

# Time for a replica to become ready, which sizes the cluster renderings' startup probe: engine start
# (imports, memory profiling, CUDA graphs; about 75 s for Gemma 3 270M on the CPU build here) plus
# reading the weights from a network volume.
ENGINE_START_SECONDS = 180
WEIGHT_LOAD_BYTES_PER_SECOND = 500 * 1024**2


def load_seconds(weight_bytes: int) -> int:
    """Estimated seconds from container start to a ready engine."""
    return ENGINE_START_SECONDS + cdiv(weight_bytes, WEIGHT_LOAD_BYTES_PER_SECOND)
