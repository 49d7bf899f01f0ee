"""The GPU plan against published vLLM startup logs (each cited in tests/data/gpu_startup_logs/*.json and README.md).

The planner estimates, for the pinned vLLM 0.32, what vLLM measures on a GPU at startup (deploy/estimates.py). The
logs come from older releases, so each comparison moves the plan to the log's release first, by the derived
`version_shift_bytes` (the sort-based sampler before vLLM PR 33538 unless the log says it sampled with FlashInfer,
no MoE workspace kept after the forward pass, no CUDA graph estimate before 0.21), and plans with the logged
settings: the model's published config.json, TP, gpu_memory_utilization, max_model_len, block size and the
CUDA-visible memory total of the GPU.

Expected figures are vLLM's own logged ones. Two logs (use: calibration) set the two constants that cannot be
derived from vLLM's code (non-torch memory at TP 1, NCCL's buffers at TP 2); they are not counted here. Releases from
0.21 on take vLLM's CUDA graph estimate from the KV cache; vLLM measures it by capturing graphs on the device, so where
a log states it the comparison takes the logged figure, as it takes the logged memory total.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from lcserve.deploy import estimates as est
from lcserve.deploy.hardware import GIB, resolve_profile
from lcserve.deploy.plan import PlanRequest, plan_deployment
from lcserve.model_config import read_model

DATA = Path(__file__).parents[1] / "data" / "gpu_startup_logs"
LOGS = {p.stem: json.loads(p.read_text()) for p in sorted(DATA.glob("*.json"))}
COUNTED = [name for name, log in LOGS.items() if log["use"] == "counted"]
# Counted logs the plan misses by more than 2%, and what the logs do not let us derive (see README.md).
GAPS = {
    "lmcache_qwen3_32b_tp2": "TP 2: ~0.9 GiB more non-KV memory than llm-d's TP 2 run of the same model (NCCL buffers "
    "differ by interconnect and NCCL version; the table gives neither)",
    "lmcache_llama31_70b_tp4": "TP 4: ~1.0 GiB more non-KV memory than planned, as in the TP 2 row of the same table",
    "vllm21348_qwen3_235b_a22b_fp8_tp4": "MoE FP8 at TP 4 with an LMCache connector: ~2 GiB more non-KV memory than "
    "planned; the log gives neither the weights nor the profiling breakdown",
    "pie_qwen3_coder_30b_a3b_h100_tp1": "vLLM 0.25.1 subtracts its measured CUDA graph estimate, which this publication "
    "does not state; the plan's 0.5 GiB constant leaves it +3.4% (the A100 run of the same model and release logged "
    "0.92 GiB for 86 graphs; this run captures 102)",
    "llmdplanner_mixtral_8x7b_tp2": "vLLM 0.19 at TP 2 on H100: non-torch 2.07 GiB against 0.56 planned (0.54 in "
    "llm-d's 0.11 TP 2 run), as in every TP >= 2 run of that publication whatever the FlashInfer all-reduce workspace: "
    "NCCL's own buffers on that system, not derivable (weights and activation peak match: 43.50 / 1.15 vs 43.51 / 1.21)",
    "llmdplanner_llama31_8b_tp4": "vLLM 0.19 at TP 4 on H100: non-torch 2.13 GiB against 0.56 planned, with a "
    "FlashInfer all-reduce workspace of only 256 tokens; the same +1.5 GiB as the TP 2 runs of that publication",
    "dennislee_qwen2_7b_a100_tp2_util025": "TP 2 on one A100 node without GPU peer access (custom all-reduce disabled): "
    "0.39 GiB less non-KV memory than planned, 0.34 GiB more than the TP 1 runs of the same setup (NCCL's buffers on "
    "that node; the plan's are calibrated on an H100 run); 3.2% of this run's 12.02 GiB, 1.2% at util 0.5",
}


def plan_at_log_release(log: dict):
    """(planned KV tokens at the log's vLLM release, logged KV tokens) for one log."""
    tp = log["tensor_parallel_size"]
    profile = resolve_profile(log["profile"])
    profile = dataclasses.replace(profile, memory_bytes=int(log["total_gpu_memory_gib"] * GIB), count=tp)
    model = read_model(DATA / log["config"])
    request = PlanRequest(
        tensor_parallel_size=tp,
        gpu_memory_utilization=log["gpu_memory_utilization"],
        max_model_len=log["max_model_len"],
        block_size=log["block_size"],
        max_num_seqs=log["max_num_seqs"],
        max_num_batched_tokens=log["max_num_batched_tokens"],
    )
    plan = plan_deployment(profile, model, (), request)
    shift = est.version_shift_bytes(
        tuple(log["vllm_release"]),
        flashinfer_sampler=log.get("sampler") == "flashinfer",
        max_num_batched_tokens=plan.max_num_batched_tokens,
        max_num_seqs=plan.max_num_seqs,
        hidden_size=model.hidden_size,
        intermediate_size=model.intermediate_size,
        vocab_size=model.vocab_size,
        tp=tp,
        dtype_bytes=2,
        moe=model.moe,
    )
    shift += logged_cuda_graph_bytes(log)
    per_block, block = plan.layout.bytes_per_block, plan.block_size
    planned = (plan.kv_bytes - shift) // per_block * block
    logged = log["gpu_kv_cache_size_tokens"]
    if logged is None:  # the publication quotes "Available KV cache memory" only: vLLM's blocks in it
        logged = int(log["logged"]["available_kv_cache_memory_gib"] * GIB) // per_block * block
    return planned, logged


def _residual(log: dict) -> float:
    planned, logged = plan_at_log_release(log)
    return planned / logged - 1


def logged_cuda_graph_bytes(log: dict) -> int:
    """The log's measured CUDA graph estimate less the plan's constant (0 where the log states none or its release
    does not take the estimate from the KV cache: gpu_worker.determine_available_memory, from 0.21)."""
    logged = log["logged"].get("cuda_graph_estimate_gib")
    if logged is None or tuple(log["vllm_release"]) < est.CUDA_GRAPH_ESTIMATE_SINCE:
        return 0
    return int(logged * GIB) - est.CUDA_GRAPH_ESTIMATE_BYTES


@pytest.mark.parametrize("name", [n for n in COUNTED if n not in GAPS])
def test_planned_kv_tokens_within_2_percent_of_the_log(name):
    planned, logged = plan_at_log_release(LOGS[name])
    assert abs(planned / logged - 1) <= 0.02, f"{name}: planned {planned:,} tokens, logged {logged:,}"


@pytest.mark.parametrize("name", list(GAPS))
def test_known_gaps_stay_recorded(name):
    """A gap that closes (or a log that moves) must update GAPS and README.md, so these fail when within 2%."""
    planned, logged = plan_at_log_release(LOGS[name])
    assert abs(planned / logged - 1) > 0.02, f"{name} is now within 2%: move it out of GAPS"


def test_the_set_covers_moe_and_tensor_parallelism():
    counted = [LOGS[n] for n in COUNTED]
    assert len(counted) >= 6
    assert sum(log["tensor_parallel_size"] >= 2 for log in counted) >= 2
    assert any(read_model(DATA / log["config"]).moe for log in counted)


def test_done_when_six_logs_within_2_percent_with_two_moe_and_two_tensor_parallel():
    """Issue 24: >= 6 published logs within 2%, >= 2 of them MoE and >= 2 at TP >= 2, counted from the residuals
    themselves (README.md lists them)."""
    within = [LOGS[n] for n in COUNTED if abs(_residual(LOGS[n])) <= 0.02]
    assert len(within) >= 6
    assert sum(bool(read_model(DATA / log["config"]).moe) for log in within) >= 2
    assert sum(log["tensor_parallel_size"] >= 2 for log in within) >= 2


@pytest.mark.parametrize(
    "name",
    [
        "llmd_llama31_8b_tp1",
        "llmd_qwen3_06b_tp1",
        "llmd_qwen3_32b_tp1",
        "llmdplanner_qwen3_30b_a3b_tp1",
        "llmdplanner_qwen15_moe_a27b_tp1",
    ],
)
def test_rope_cache_completes_the_logged_weights(name):
    """vLLM's "Model loading took" is the checkpoint plus the RoPE cos/sin tables (Llama-3.1-8B: 131,072 positions
    x 128 x 2 B = 32 MiB); both derived from config.json, against the logged figure (2 decimals)."""
    log = LOGS[name]
    model = read_model(DATA / log["config"])
    loaded = model.param_count * 2 + est.rope_cache_bytes(model, 2)
    assert loaded / GIB == pytest.approx(log["logged"]["model_weights_gib"], abs=0.005)


@pytest.mark.parametrize(
    "name", ["llmd_llama31_8b_tp1", "llmd_qwen3_06b_tp1", "llmd_qwen3_32b_tp1", "llmd_gpt_oss_20b_tp1"]
)
def test_sort_sampler_peak_matches_the_logged_activation_peak(name):
    """vLLM 0.11's logged "PyTorch activation peak" on H100 (max_num_seqs 1024, 8192 batched tokens) against the
    derived sort-path sampler run; gpt-oss-20b is MoE (32 experts, top-4), its dims from the log file."""
    log = LOGS[name]
    dims = log.get("moe_dims") or _dims(read_model(DATA / log["config"]))
    act = est.activation_estimate_bytes(
        8192, 1024, dims["hidden_size"], dims["intermediate_size"], dims["vocab_size"], 1, 2, legacy=True
    )
    assert act / GIB == pytest.approx(log["logged"]["activation_peak_gib"], rel=0.02)


@pytest.mark.parametrize(
    "name", ["llmdplanner_qwen3_30b_a3b_tp1", "llmdplanner_qwen15_moe_a27b_tp1", "llmdplanner_mixtral_8x7b_tp2"]
)
def test_kept_moe_workspace_completes_the_logged_activation_peak(name):
    """vLLM 0.19's logged "torch peak memory increase" of MoE models on H100 (1024 seqs, 8192 batched tokens) against
    the pinned-release estimate: the Triton sampler run plus the fused-MoE workspace, kept allocated. Without the
    workspace (0.30 to 0.66 GiB here) the estimate falls short by more than the tolerance; what it still lacks, 0.06
    to 0.12 GiB, the dense models of the same publication lack too (Llama-3.1-8B: 1.78 planned, 1.89 logged)."""
    log = LOGS[name]
    model = read_model(DATA / log["config"])
    act = est.activation_estimate_bytes(
        8192,
        1024,
        model.hidden_size,
        model.intermediate_size,
        model.vocab_size,
        log["tensor_parallel_size"],
        2,
        model.moe,
    )
    assert act / GIB == pytest.approx(log["logged"]["activation_peak_gib"], abs=0.15)


def _dims(model) -> dict:
    return {
        "hidden_size": model.hidden_size,
        "intermediate_size": model.intermediate_size,
        "vocab_size": model.vocab_size,
    }


@pytest.mark.parametrize(
    "tokens,hidden,moe,tp",
    [
        (8192, 2048, (128, 8, 768), 1),  # Qwen3-30B-A3B
        (8192, 4096, (8, 2, 14336), 2),  # Mixtral 8x7B
        (8192, 4096, (128, 8, 1536), 4),  # Qwen3-235B-A22B
        (2048, 4096, (8, 2, 14336), 8),  # a narrow shard: K dominates both workspaces
    ],
)
def test_moe_workspace_is_vllms_triton_workspace(tokens, hidden, moe, tp):
    """The fused-MoE workspace against vLLM's own TritonExperts.workspace_shapes and FusedMoEKernel._allocate_buffers'
    rule (workspace13 shared with the (M, K) output)."""
    from vllm.model_executor.layers.fused_moe import activation  # vLLM's own shapes: no skip if they move
    from vllm.model_executor.layers.fused_moe.experts import triton_moe

    experts = triton_moe.TritonExperts.__new__(triton_moe.TritonExperts)
    n = 2 * moe[2] // tp
    ws13, ws2, out = experts.workspace_shapes(
        tokens, n, hidden, moe[1], moe[0], moe[0], None, activation.MoEActivation.SILU
    )
    prod = lambda shape: shape[0] * shape[1] * (shape[2] if len(shape) > 2 else 1)  # noqa: E731
    expected = (max(prod(ws13), prod(out)) + prod(ws2)) * 2
    assert est.moe_workspace_bytes(tokens, hidden, moe, tp, 2) == expected


def test_moe_plan_says_what_its_estimates_cover():
    model = read_model(DATA / "models" / "Qwen3-30B-A3B")
    profile = dataclasses.replace(resolve_profile("h100-80gb"), count=2)
    plan = plan_deployment(profile, model, (), PlanRequest(tensor_parallel_size=2, max_model_len=32768))
    reason = next(r for r in plan.reasons if r.setting == "GPU startup estimates")
    assert "fused-MoE workspace at max_num_batched_tokens" in reason.why
    assert "top-8 of 128 experts" in reason.why and "NCCL" in reason.why
    workspace = est.moe_workspace_bytes(plan.max_num_batched_tokens, 2048, model.moe, 2, 2)
    assert plan.memory["activation_estimate"] >= workspace > 0


NEXT = Path(__file__).parents[1] / "data" / "hybrid_configs" / "qwen3-next-80b-a3b-instruct"


@pytest.mark.parametrize(
    "folder",
    [
        DATA / "models" / "Llama-3.1-70B",  # llama3 scaling, 131,072 positions
        DATA / "models" / "Qwen3-Coder-30B-A3B-Instruct",  # default RoPE, 262,144 positions
        NEXT,  # partial_rotary_factor 0.25 at the top level
    ],
)
def test_rope_cache_is_vllms_cos_sin_cache(folder):
    """The RoPE table size against the buffer vLLM's own get_rope registers, with the RoPE parameters as vLLM
    standardizes them (a top-level partial_rotary_factor folded in)."""
    import torch
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope

    model = read_model(folder)
    (params,) = model.rope_parameters.values()
    with set_current_vllm_config(VllmConfig()):  # RotaryEmbedding is a CustomOp: it reads the current config
        rope = get_rope(model.head_dim, model.max_position_embeddings, True, params, torch.bfloat16)
    assert est.rope_cache_bytes(model, 2) == rope.cos_sin_cache.numel() * rope.cos_sin_cache.element_size()


def test_a_nope_config_builds_no_rope_table():
    """Granite 4.0-H (position_embedding_type "nope"): vLLM's GraniteMoeHybridAttention builds a rotary embedding
    only for "rope" (granitemoehybrid.py), so the plan holds no table."""
    model = read_model(NEXT.parent / "granite-4.0-h-tiny")
    assert est.rope_cache_bytes(model, 2) == 0
